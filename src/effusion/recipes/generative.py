"""The generative recipes, diffusion and VAE: their data, networks and tasks.

A task supplies the loss of one batch, what to do at intervals (sample grids and FID for
diffusion; a validation pass each epoch for classifiers) and the run's final artifact.
Everything else — optimizer, LR schedule, precision, EMA, checkpoints, resume, logging,
NaN handling — is the loop's (`effusion.train.loop`), so every efficiency switch applies
to every model. Each task is built from the loop's `TaskContext`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from effusion.config import Config, ConfigError, DataConfig
from effusion.data import ImageSet, resolve_data, to_model_range, to_uint8
from effusion.data.images import make_grid, save_png
from effusion.diffusion import schedule_for
from effusion.evaluate.features import FeatureScorer
from effusion.models import build_model, latent_size
from effusion.models.vae import kl_to_standard_normal, psnr, reconstruction_loss
from effusion.precision import Precision
from effusion.recipes.classifier import feature_classifier
from effusion.runs import LoadedRun, LoadedVAE, load_classifier, load_vae, write_json
from effusion.runs.files import VAE_INFO, checkpoint_name
from effusion.sampling import generate
from effusion.train.loop import PlainRecipe, TaskContext, TrainData, load_training_data
from effusion.train.objective import X0Terms, diffusion_loss


class _GridTask:
    """Shared by the tasks whose artifact is an image grid (`sample_grid`); they keep no
    state across a resume beyond the loop's own."""

    last_grid: Path | None

    def final_grid(self, ema_model: nn.Module, step: int) -> Path:
        """The grid of the final step, reusing the periodic one if it was just made."""
        grid = self.last_grid
        if grid is None or grid.name != checkpoint_name(step) + ".png":
            grid = self.sample_grid(ema_model, step)
        return grid

    def write_grid(self, tag: str, grid: torch.Tensor, step: int) -> Path:
        """A uint8 (C, H, W) grid to TensorBoard and `samples/step-NNNNNNN.png`."""
        if self.logger is not None:
            self.logger.image(tag, grid, step)
        return save_png(grid, self.run_dir / "samples" / f"{checkpoint_name(step)}.png",
                        upscale=max(1, 64 // self.cfg.data.image_size))

    def periodic(self, ema_model: nn.Module, step: int, epoch_done: bool) -> dict[str, float]:
        tc = self.cfg.train
        if tc.sample_every and step % tc.sample_every == 0:
            self.last_grid = self.sample_grid(ema_model, step)
        return {}

    def uses_model(self, step: int, epoch_done: bool) -> bool:
        """Will `periodic` use the averaged model at this step? (The same answer on every
        rank: with FSDP the model is gathered only then.)"""
        tc = self.cfg.train
        return bool((tc.sample_every and step % tc.sample_every == 0)
                    or (tc.eval_every and step % tc.eval_every == 0))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DiffusionTask(_GridTask):
    """Denoising loss; EMA sample grids every `sample_every` steps, FID every `eval_every`."""

    def __init__(self, ctx: TaskContext, vae: LoadedVAE | None = None):
        cfg = ctx.cfg
        self.cfg, self.run_dir, self.prec, self.logger = cfg, ctx.run_dir, ctx.prec, ctx.logger
        self.mem_format = ctx.mem_format
        self.schedule = schedule_for(cfg)
        self.last_grid: Path | None = None
        self.vae = vae  # latent runs: encodes augmented batches, decodes sample grids
        # What the batches are is decided where the data was prepared (DiffusionRecipe):
        # latents encoded once, or, with augmentation, pixels to encode here; never guessed
        # from a batch's channel count (equal for a 3-channel VAE on RGB).
        self.encode_batches = vae is not None and has_augmentation(cfg.data)
        self.terms = x0_terms(cfg, ctx.prec.device)
        self.dist = ctx.dist  # data-parallel: this rank trains its part of each global batch
        self.scorer = None
        if cfg.train.eval_every and ctx.dist.main:  # rank 0 evaluates
            with torch.random.fork_rng(devices=[]):  # training the default one must not
                clf = (load_classifier(cfg.train.eval_features) if cfg.train.eval_features
                       else feature_classifier(cfg.data))  # move this run's RNG
                self.scorer = FeatureScorer.for_data(  # a named classifier: its features
                    cfg.data, clf, space="classifier" if cfg.train.eval_features else None)

    def loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator) -> torch.Tensor:
        cond = labels.to(self.prec.device, non_blocking=True) if self.cfg.model.num_classes else None
        if self.encode_batches:
            x0 = self.vae.encode(x0)  # augmented pixels: encoded on the fly
        n = x0.shape[0]
        shard = self.dist.shard(n) if self.dist.enabled else None
        loss = diffusion_loss(model, x0, cond, self.cfg.diffusion, self.schedule, gen,
                              self.prec, self.mem_format, cond_drop=self.cfg.train.cond_drop,
                              null_class=self.cfg.model.num_classes, terms=self.terms,
                              shard=shard)
        if shard is not None and (shard.stop - shard.start) * self.dist.world != n:
            # uneven parts (a bucket's last batch): DDP averages the ranks' means, so each
            # is scaled to its share, and the average is the global batch's mean again
            loss = loss * ((shard.stop - shard.start) * self.dist.world / n)
        return loss

    def _run(self, ema_model: nn.Module, step: int) -> LoadedRun:
        return LoadedRun(self.run_dir, self.cfg, ema_model, self.schedule, step, self.prec, self.vae)

    def sample_grid(self, ema_model: nn.Module, step: int) -> Path:
        tc = self.cfg.train
        images = generate(self._run(ema_model, step), tc.sample_n, seed=tc.seed)
        return self.write_grid("samples", make_grid(images), step)

    def periodic(self, ema_model: nn.Module, step: int, epoch_done: bool) -> dict[str, float]:
        tc = self.cfg.train
        super().periodic(ema_model, step, epoch_done)
        if self.scorer is not None and step % tc.eval_every == 0:
            images = generate(self._run(ema_model, step), tc.eval_n, seed=tc.seed + 7)
            return {"fid": self.scorer.fid(images)}
        return {}

    def finish(self, ema_model: nn.Module, step: int) -> Path:
        return self.final_grid(ema_model, step)


def x0_terms(cfg: Config, device: torch.device) -> X0Terms | None:
    """The remedies' extra loss terms of a diffusion run (None: all off). The feature and
    diversity terms see x0 through the data's feature classifier (the one the metrics use),
    frozen; they need pixel-space runs."""
    tc = cfg.train
    if not (tc.multiscale_weights or tc.feature_loss_weight or tc.diversity_weight):
        return None
    features = None
    if tc.feature_loss_weight or tc.diversity_weight:
        if cfg.model.space != "pixel":
            raise ConfigError("train.feature_loss_weight and train.diversity_weight work on "
                              "pixel-space runs only (the feature classifier sees pixels, "
                              "this run predicts VAE latents); train.multiscale_weights works "
                              "on both")
        with torch.random.fork_rng(devices=[]):  # training it must not move this run's RNG
            clf = feature_classifier(cfg.data)
        if clf.quantized:
            raise ConfigError("the feature and diversity terms need a float feature classifier")
        features = clf.model.to(device).eval().requires_grad_(False).features
    return X0Terms(tc.multiscale_weights, tc.feature_loss_weight, tc.diversity_weight, features)


class VAETask(_GridTask):
    """Reconstruction (L1/L2) + KL (+ optional classifier-feature) loss; reconstruction
    grids every `sample_every` steps; at the end, held-out PSNR and the latent scaling
    factor, written to `vae.json` (what latent diffusion runs read)."""

    def __init__(self, ctx: TaskContext, latent_shape: tuple[int, int, int]):
        cfg = ctx.cfg
        self.cfg, self.run_dir, self.prec, self.logger = cfg, ctx.run_dir, ctx.prec, ctx.logger
        self.mem_format = ctx.mem_format
        self.train, self.val = ctx.train_set, ctx.val_set
        self.latent_shape = latent_shape
        self.last_grid: Path | None = None
        self.features = None
        if cfg.vae.feature_weight > 0:
            with torch.random.fork_rng(devices=[]):  # training it must not move this run's RNG
                clf = feature_classifier(cfg.data)
            if clf.quantized:
                raise ConfigError("vae.feature_weight needs a float feature classifier")
            self.features = clf.model.to(ctx.prec.device).eval().requires_grad_(False)

    def loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator) -> torch.Tensor:
        vc, dev = self.cfg.vae, self.prec.device
        x = x.to(dev, memory_format=self.mem_format, non_blocking=True)
        eps = torch.randn((x.shape[0], *self.latent_shape), generator=gen).to(dev)
        with self.prec.autocast():
            recon, mean, logvar = model(x, eps)
        loss = reconstruction_loss(recon, x, vc.recon) + vc.kl_weight * kl_to_standard_normal(mean, logvar)
        if self.features is not None:
            with self.prec.autocast():
                fr, fx = self.features.features(recon), self.features.features(x)
            loss = loss + vc.feature_weight * (fr.float() - fx.float()).square().mean()
        return loss

    @torch.no_grad()
    def _reconstruct(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images -> (originals, reconstructions through the posterior mean), floats."""
        was = model.training
        model.eval()
        x = to_model_range(images).to(self.prec.device)
        outs = []
        for i in range(0, x.shape[0], 256):
            mean, _ = model.encode(x[i:i + 256])
            outs.append(model.decode(mean).float().clamp(-1, 1))
        model.train(was)
        return x, torch.cat(outs)

    def sample_grid(self, model: nn.Module, step: int) -> Path:
        src = self.val if self.val is not None else self.train
        x, r = self._reconstruct(model, src.images[:32])
        pairs = torch.stack([x, r], 1).flatten(0, 1)  # original, reconstruction, ...
        return self.write_grid("reconstructions", make_grid(to_uint8(pairs.cpu()), nrow=16), step)

    def finish(self, ema_model: nn.Module, step: int) -> Path:
        src = self.val if self.val is not None else self.train
        x, r = self._reconstruct(ema_model, src.images[:1000])
        # Scale: 1 / std of posterior means over (up to 2,000 of) the training images.
        was = ema_model.training
        ema_model.eval()
        with torch.no_grad():
            xt = to_model_range(self.train.images[:2000]).to(self.prec.device)
            means = torch.cat([ema_model.encode(xt[i:i + 256])[0].float()
                               for i in range(0, xt.shape[0], 256)])
        ema_model.train(was)
        info = {"scale_factor": 1.0 / max(means.std().item(), 1e-8), "latent_mean": means.mean().item(),
                "psnr_db": psnr(r, x), "psnr_on": "held-out" if self.val is not None else "training",
                "latent_shape": list(self.latent_shape), "step": step}
        write_json(self.run_dir / VAE_INFO, info)
        self.logger.log(step, {"psnr_db": info["psnr_db"], "scale_factor": info["scale_factor"]})
        return self.final_grid(ema_model, step)


# ------------------------------------------------------------------------ recipes

def has_augmentation(data: DataConfig) -> bool:
    return bool(data.hflip or data.rotate > 0 or data.translate > 0)


def encode_set(vae: LoadedVAE, data: ImageSet) -> ImageSet:
    """An ImageSet of scaled latents (float32) with the same labels: encoded once, so the
    U-Net trains without running the encoder (used when augmentation is off)."""
    return ImageSet(vae.encode(data.images), data.labels, data.class_names)


class DiffusionRecipe:
    """The U-Net on images, or on the latents of the VAE run in `model.vae`.

    A latent run without augmentation trains on latents encoded once; with augmentation
    each augmented batch is encoded on the fly (in the task's loss). It trains
    data-parallel too (`effusion.train.distributed`)."""

    data_parallel = True

    def __init__(self) -> None:
        self.vae: LoadedVAE | None = None

    def prepare_data(self, cfg: Config, device: torch.device) -> TrainData:
        if cfg.data.buckets and cfg.model.space == "latent":
            raise ConfigError("data.buckets (mixed sizes) trains pixel-space runs only; the "
                              "VAE encodes one image size")
        data = load_training_data(cfg)
        if cfg.model.space != "latent":
            return data
        self.vae = load_vae(cfg.model.vae, device)
        self.vae.check_data(resolve_data(cfg.data))
        if has_augmentation(cfg.data):
            return data
        t0 = time.perf_counter()
        latents = encode_set(self.vae, data.train_set)
        print(f"effusion: encoded {len(latents)} images to {tuple(self.vae.latent_shape)} latents "
              f"with the VAE in {cfg.model.vae} ({time.perf_counter() - t0:.1f} s, once)")
        return replace(data, train_set=latents)

    def build_model(self, cfg: Config) -> nn.Module:
        return build_model(cfg, latent_shape=self.vae.latent_shape if self.vae else None)

    def make_task(self, ctx: TaskContext) -> DiffusionTask:
        return DiffusionTask(ctx, self.vae)

    def fit_to_budget(self, cfg: Config, data: TrainData, prec: Precision
                      ) -> tuple[Config, str | None]:
        """A run from scratch under a time budget: time a few training steps of the
        configured U-Net; if fewer than `train.budget_min_steps` would fit, train it at
        half the width instead. On a 2-core AVX2 CPU (fp32) the default's 32 channels fit
        337 steps in 11 minutes (FID 98, class accuracy 0.82); 16 channels fit 789 (FID
        18.6, 0.970); with bf16, 995 steps of width 32 scored FID 22.9 against 16.3 for
        1,765 of width 16: docs/recipe.md, Hardware. Returns the config to train and a log line."""
        tc, mc = cfg.train, cfg.model
        if not (tc.max_minutes and tc.budget_min_steps and not tc.budget_steps
                and mc.arch == "unet"):
            return cfg, None
        per_step = self.step_seconds(cfg, data, prec)
        fits = int(tc.max_minutes * 60 / per_step)
        probe = (f"a probe timed {per_step:.2f} s per step at model.channels={mc.channels}: "
                 f"{fits} steps fit in train.max_minutes={tc.max_minutes:g}")
        if fits >= tc.budget_min_steps:
            return cfg, probe
        half = mc.channels // 2
        if half < mc.norm_groups or half % mc.norm_groups:
            return cfg, probe + f" (< train.budget_min_steps={tc.budget_min_steps}, but " \
                f"model.channels={mc.channels} cannot be halved with model.norm_groups={mc.norm_groups})"
        narrow = replace(cfg, model=replace(mc, channels=half, head_channels=min(mc.head_channels, half)))
        return narrow, (probe + f", under train.budget_min_steps={tc.budget_min_steps}: training "
                        f"model.channels={half} instead (recorded in config.yaml; "
                        "train.budget_min_steps=0 keeps the width)")

    def step_seconds(self, cfg: Config, data: TrainData, prec: Precision, steps: int = 2) -> float:
        """Seconds per optimizer step of `cfg`'s U-Net at the run's batch size and precision
        (forward, backward, AdamW), on random inputs of the training data's shape; the
        run's RNG streams are left untouched."""
        tc = cfg.train
        shape = tuple(data.train_set.images.shape[1:])
        if data.train_set.bucket is not None:  # buckets hold about image_size^2 pixels
            shape = (shape[0], cfg.data.image_size, cfg.data.image_size)
        if self.vae is not None:
            shape = tuple(self.vae.latent_shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = self.build_model(cfg).to(prec.device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            b = tc.batch_size
            x = torch.randn(b, *shape, device=prec.device)
            t = torch.randint(0, cfg.diffusion.timesteps, (b,), device=prec.device)
            cond = (torch.randint(0, cfg.model.num_classes, (b,), device=prec.device)
                    if cfg.model.num_classes else None)
            times = []
            for _ in range(steps + 1):  # the first call warms up (allocations, kernels)
                t0 = time.perf_counter()
                with prec.autocast():
                    loss = model(x, t, cond).float().square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if prec.device.type == "cuda":
                    torch.cuda.synchronize(prec.device)
                times.append(time.perf_counter() - t0)
        return tc.grad_accum * sum(times[1:]) / steps


class VAERecipe(PlainRecipe):
    """The autoencoder of latent diffusion, on the images."""

    def make_task(self, ctx: TaskContext) -> VAETask:
        vc = ctx.cfg.vae
        s = latent_size(ctx.cfg.data.image_size, vc.downsample)
        return VAETask(ctx, (vc.latent_channels, s, s))
