"""What the training loop optimises, per kind of model: the loop itself is shared.

A task supplies the loss of one batch, what to do at intervals (sample grids and FID for
diffusion; a validation pass each epoch for classifiers) and the run's final artifact.
Everything else — optimizer, LR schedule, precision, EMA, checkpoints, resume, logging,
NaN handling — is the loop's, so every efficiency switch applies to every model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from effusion.config import Config, ConfigError
from effusion.data import ImageSet, to_model_range
from effusion.data.images import make_grid, save_png
from effusion.sampling import LoadedRun, generate, schedule_for
from effusion.train.logging import MetricsLogger, read_metrics
from effusion.train.objective import diffusion_loss
from effusion.train.precision import Precision


class _GridTask:
    """Shared by the tasks whose artifact is an image grid (`sample_grid`); they keep no
    state across a resume beyond the loop's own."""

    last_grid: Path | None

    def final_grid(self, ema_model: nn.Module, step: int) -> Path:
        """The grid of the final step, reusing the periodic one if it was just made."""
        grid = self.last_grid
        if grid is None or grid.name != f"step-{step:07d}.png":
            grid = self.sample_grid(ema_model, step)
        return grid

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DiffusionTask(_GridTask):
    """Denoising loss; EMA sample grids every `sample_every` steps, FID every `eval_every`."""

    def __init__(self, cfg: Config, run_dir: Path, train: ImageSet, val: ImageSet | None,
                 prec: Precision, logger: MetricsLogger, mem_format: torch.memory_format):
        self.cfg, self.run_dir, self.prec, self.logger = cfg, run_dir, prec, logger
        self.mem_format = mem_format
        self.schedule = schedule_for(cfg)
        self.last_grid: Path | None = None
        self.vae = None
        if cfg.model.space == "latent":
            from effusion.latent import load_vae

            self.vae = load_vae(cfg.model.vae, prec.device)
            self.vae.check_data(cfg.data)
        self.scorer = None
        if cfg.train.eval_every:
            from effusion.classify import load_classifier  # only when asked for
            from effusion.evaluate.features import FeatureScorer

            clf = load_classifier(cfg.train.eval_features) if cfg.train.eval_features else None
            with torch.random.fork_rng(devices=[]):  # training the default one must not
                self.scorer = FeatureScorer.for_data(cfg.data, clf)  # move this run's RNG

    def loss(self, model: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator) -> torch.Tensor:
        cond = labels.to(self.prec.device) if self.cfg.model.num_classes else None
        if self.vae is not None and x0.shape[1] != self.vae.latent_shape[0]:
            x0 = self.vae.encode(x0)  # augmented pixels: encoded on the fly
        return diffusion_loss(model, x0, cond, self.cfg.diffusion, self.schedule, gen,
                              self.prec, self.mem_format, cond_drop=self.cfg.train.cond_drop,
                              null_class=self.cfg.model.num_classes)

    def _run(self, ema_model: nn.Module, step: int) -> LoadedRun:
        return LoadedRun(self.run_dir, self.cfg, ema_model, self.schedule, step, self.prec, self.vae)

    def sample_grid(self, ema_model: nn.Module, step: int) -> Path:
        tc = self.cfg.train
        images = generate(self._run(ema_model, step), tc.sample_n, seed=tc.seed)
        grid = make_grid(images)
        self.logger.image("samples", grid, step)
        return save_png(grid, self.run_dir / "samples" / f"step-{step:07d}.png",
                        upscale=max(1, 64 // self.cfg.data.image_size))

    def periodic(self, ema_model: nn.Module, step: int, epoch_done: bool) -> dict[str, float]:
        tc = self.cfg.train
        if tc.sample_every and step % tc.sample_every == 0:
            self.last_grid = self.sample_grid(ema_model, step)
        if self.scorer is not None and step % tc.eval_every == 0:
            images = generate(self._run(ema_model, step), tc.eval_n, seed=tc.seed + 7)
            return {"fid": self.scorer.fid(images)}
        return {}

    def finish(self, ema_model: nn.Module, step: int) -> Path:
        return self.final_grid(ema_model, step)


class VAETask(_GridTask):
    """Reconstruction (L1/L2) + KL (+ optional classifier-feature) loss; reconstruction
    grids every `sample_every` steps; at the end, held-out PSNR and the latent scaling
    factor, written to `vae.json` (what latent diffusion runs read)."""

    def __init__(self, cfg: Config, run_dir: Path, train: ImageSet, val: ImageSet | None,
                 prec: Precision, logger: MetricsLogger, mem_format: torch.memory_format):
        from effusion.models.vae import latent_size

        self.cfg, self.run_dir, self.prec, self.logger = cfg, run_dir, prec, logger
        self.mem_format = mem_format
        self.train, self.val = train, val
        s = latent_size(cfg.data.image_size, cfg.vae.downsample)
        self.latent_shape = (cfg.vae.latent_channels, s, s)
        self.last_grid: Path | None = None
        self.features = None
        if cfg.vae.feature_weight > 0:
            from effusion.evaluate.features import default_feature_classifier

            with torch.random.fork_rng(devices=[]):  # training it must not move this run's RNG
                clf = default_feature_classifier(cfg.data)
            if clf.quantized:
                raise ConfigError("vae.feature_weight needs a float feature classifier")
            self.features = clf.model.to(prec.device).eval().requires_grad_(False)

    def loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator) -> torch.Tensor:
        from effusion.models.vae import kl_to_standard_normal, reconstruction_loss

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
        from effusion.data import to_uint8

        src = self.val if self.val is not None else self.train
        x, r = self._reconstruct(model, src.images[:32])
        pairs = torch.stack([x, r], 1).flatten(0, 1)  # original, reconstruction, ...
        grid = make_grid(to_uint8(pairs.cpu()), nrow=16)
        self.logger.image("reconstructions", grid, step)
        return save_png(grid, self.run_dir / "samples" / f"step-{step:07d}.png",
                        upscale=max(1, 64 // self.cfg.data.image_size))

    def periodic(self, ema_model: nn.Module, step: int, epoch_done: bool) -> dict[str, float]:
        tc = self.cfg.train
        if tc.sample_every and step % tc.sample_every == 0:
            self.last_grid = self.sample_grid(ema_model, step)
        return {}

    def finish(self, ema_model: nn.Module, step: int) -> Path:
        import json

        from effusion.latent import VAE_INFO
        from effusion.models.vae import psnr

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
        (self.run_dir / VAE_INFO).write_text(json.dumps(info, indent=2))
        self.logger.log(step, {"psnr_db": info["psnr_db"], "scale_factor": info["scale_factor"]})
        return self.final_grid(ema_model, step)


class ClassifierTask:
    """Cross-entropy on labels; after each epoch, loss and accuracy on the training epoch
    and the held-out split; at the end, a PNG of the curves."""

    def __init__(self, cfg: Config, run_dir: Path, train: ImageSet, val: ImageSet | None,
                 prec: Precision, logger: MetricsLogger, mem_format: torch.memory_format):
        if val is None:
            raise ConfigError("classifier training needs a held-out split: set "
                              "data.val_fraction > 0 (e.g. 0.1)")
        self.cfg, self.run_dir, self.prec, self.logger = cfg, run_dir, prec, logger
        self.mem_format = mem_format
        self.val = val
        self.sums = {"loss": 0.0, "correct": 0, "n": 0}  # over the current training epoch

    def loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator) -> torch.Tensor:
        dev = self.prec.device
        y = labels.to(dev)
        with self.prec.autocast():
            logits = model(x.to(dev, memory_format=self.mem_format, non_blocking=True))
        loss = F.cross_entropy(logits.float(), y)  # fp32 log-softmax whatever the precision
        if torch.isfinite(loss):
            self.sums["loss"] += loss.item() * len(y)
            self.sums["correct"] += int((logits.argmax(1) == y).sum())
            self.sums["n"] += len(y)
        return loss

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss, correct = 0.0, 0
        for i in range(0, len(self.val), 512):
            x = to_model_range(self.val.images[i:i + 512]).to(self.prec.device)
            y = self.val.labels[i:i + 512].to(self.prec.device)
            with self.prec.autocast():
                logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
        model.train(was_training)
        return {"val_loss": loss / len(self.val), "val_acc": correct / len(self.val)}

    def periodic(self, ema_model: nn.Module, step: int, epoch_done: bool) -> dict[str, float]:
        if not epoch_done:
            return {}
        out = {}
        if self.sums["n"]:
            out = {"train_loss": self.sums["loss"] / self.sums["n"],
                   "train_acc": self.sums["correct"] / self.sums["n"]}
        self.sums = {"loss": 0.0, "correct": 0, "n": 0}
        return {**out, **self.validate(ema_model)}

    def finish(self, ema_model: nn.Module, step: int) -> Path:
        rows = [m for m in read_metrics(self.run_dir) if "val_acc" in m]
        if not rows or rows[-1]["step"] != step:
            # Training ended mid-epoch (time or step budget): validate the final weights too.
            m = self.validate(ema_model)
            self.logger.log(step, {**m, "epoch": rows[-1]["epoch"] if rows else 0.0})
            rows.append({"step": step, **m})
        return plot_curves(rows, self.run_dir / "curves.png")

    def state_dict(self) -> dict[str, Any]:
        return dict(self.sums)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {"loss": float(state["loss"]), "correct": int(state["correct"]),
                     "n": int(state["n"])}


def plot_curves(rows: list[dict[str, Any]], path: Path) -> Path:
    """Loss and accuracy per epoch (training and held-out) as a two-panel PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, ax, label in [("train_loss", ax_l, "train"), ("val_loss", ax_l, "held-out"),
                           ("train_acc", ax_a, "train"), ("val_acc", ax_a, "held-out")]:
        pts = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(rows)
               if r.get(key) is not None and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax_l.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_a.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


TASKS: dict[str, Callable[..., DiffusionTask | ClassifierTask]] = {
    "unet": DiffusionTask, "mlp": ClassifierTask, "cnn": ClassifierTask, "convnet": ClassifierTask,
    "vae": VAETask}
