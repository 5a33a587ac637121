"""Rebuild a trained model from its run directory and draw samples from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from effusion.config import Config, ConfigError
from effusion.data.loader import to_uint8
from effusion.diffusion import SAMPLERS, GuidedDenoiser, NetworkDenoiser, Schedule, sample
from effusion.models import UNet, build_model
from effusion.train.checkpoint import CheckpointError, latest_checkpoint, load_weights, read_config
from effusion.train.precision import Precision, bf16_supported, resolve_device, resolve_precision

if TYPE_CHECKING:
    from effusion.latent import LoadedVAE


@dataclass
class LoadedRun:
    """A run's config, its network (EMA or raw weights), schedule and checkpoint step."""

    run_dir: Path
    config: Config
    model: UNet
    schedule: Schedule
    step: int
    precision: Precision
    vae: "LoadedVAE | None" = None  # latent runs: decodes the sampled latents

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    def denoiser(self, clip_x0: bool | None = None,
                 guidance: float | None = None) -> NetworkDenoiser | GuidedDenoiser:
        """The network as a Denoiser; class-conditional runs are wrapped in classifier-free
        guidance with weight `guidance` (default: the run's `sample.guidance`)."""
        clip = self.config.sample.clip_x0 if clip_x0 is None else clip_x0
        clip = clip and self.vae is None  # latents have no fixed range to clip to
        if not self.num_classes:
            if guidance is not None:
                raise ConfigError("guidance needs a class-conditional run (model.num_classes > 0)")
            return NetworkDenoiser(self.model, self.schedule, self.config.diffusion.prediction,
                                   clip_x0=clip, autocast=self.precision.autocast)
        learned_uncond = self.config.train.cond_drop > 0
        if guidance is None:  # the run's default; plain conditional if it cannot guide
            w = self.config.sample.guidance if learned_uncond else 1.0
        else:
            w = guidance
            if w != 1.0 and not learned_uncond:
                raise ConfigError("this run was trained with train.cond_drop=0, so it never "
                                  "learned the unconditional prediction that guidance needs; "
                                  "use guidance 1 (plain conditional)")
        if w < 0:
            raise ConfigError(f"guidance must be >= 0, got {w}")
        inner = NetworkDenoiser(self.model, self.schedule, self.config.diffusion.prediction,
                                clip_x0=False, autocast=self.precision.autocast)
        return GuidedDenoiser(inner, self.num_classes, w, clip_x0=clip)


def schedule_for(cfg: Config) -> Schedule:
    return Schedule.make(cfg.diffusion.schedule, cfg.diffusion.timesteps)


def load_run(run_dir: str | Path, ema: bool = True, device: str = "auto",
             precision: str | None = None) -> LoadedRun:
    """Load the latest checkpoint of a run directory; needs nothing but the directory.

    Args:
        run_dir: a directory written by `effusion train`.
        ema: use the EMA weights (usually much better samples) instead of the raw ones.
        device: auto | cpu | cuda | cuda:N.
        precision: override the run's precision for inference (default: the run's).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    cfg = read_config(run_dir)
    if cfg.model.arch != "unet":
        what = "VAE" if cfg.model.arch == "vae" else f"{cfg.model.arch} classifier"
        raise CheckpointError(f"{run_dir} is a {what} run, not a diffusion run; sample from a "
                              "run made by `effusion train`")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet (train it first)")
    dev = resolve_device(device)
    wanted = precision or cfg.train.precision
    if precision is None and wanted != "fp32" and not (dev.type == "cuda" or bf16_supported(dev)):
        wanted = "auto"  # the run's bf16/fp16 was chosen for the machine it trained on
    prec = Precision(dev, resolve_precision(wanted, dev))
    model = build_model(cfg)
    load_weights(ckpt / ("ema.safetensors" if ema else "model.safetensors"), model)
    model.to(dev).eval()
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    step = int(ckpt.name.split("-")[1])
    vae = None
    if cfg.model.space == "latent":
        from effusion.latent import load_vae

        vae = load_vae(cfg.model.vae, dev)
    return LoadedRun(run_dir, cfg, model, schedule_for(cfg), step, prec, vae)


def class_labels(spec: str | int | list[int] | None, n: int, num_classes: int) -> torch.Tensor:
    """Labels for `n` samples: None / "all" = an even spread 0, 1, ..., K-1, 0, 1, ...;
    one class; or a list (comma string) cycled in order."""
    if spec is None or spec == "all":
        return torch.arange(n) % num_classes
    if isinstance(spec, str):
        try:
            spec = [int(c) for c in spec.split(",") if c.strip()]
        except ValueError:
            raise ConfigError(f"--class takes a class number, a comma list or 'all', got {spec!r}") from None
    classes = torch.tensor([spec] if isinstance(spec, int) else list(spec), dtype=torch.long)
    if len(classes) == 0 or classes.min() < 0 or classes.max() >= num_classes:
        raise ConfigError(f"classes must be between 0 and {num_classes - 1}, got {classes.tolist()}")
    return classes[torch.arange(n) % len(classes)]


def generate(run: LoadedRun, n: int, *, sampler: str | None = None, steps: int | None = None,
             seed: int = 0, eta: float | None = None, batch_size: int = 256,
             cond: torch.Tensor | None = None, guidance: float | None = None) -> torch.Tensor:
    """Draw `n` samples as uint8 (N, C, H, W); deterministic for a given seed.

    Sampler, steps and eta default to the run's `sample` config. A class-conditional run
    samples the labels in `cond` (default: an even spread over its classes) with
    classifier-free guidance weight `guidance` (default: the run's `sample.guidance`).
    """
    sc = run.config.sample
    name = sampler or sc.sampler
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if n < 1:
        raise ConfigError(f"number of samples must be >= 1, got {n}")
    if steps is not None and not 1 <= steps <= run.schedule.T:
        raise ConfigError(f"steps must be between 1 and {run.schedule.T}, got {steps}")
    if steps is None:
        # The config's step count belongs to the config's sampler; others get their usual
        # defaults (DDPM's ancestral chain needs all T steps to be accurate).
        steps = sc.steps if name == sc.sampler else {"ddim": 50, "dpmpp_2m": 25,
                                                      "ddpm": run.schedule.T}[name]
    d = run.config.data
    gen = torch.Generator().manual_seed(seed)
    den = run.denoiser(guidance=guidance)
    if run.num_classes and cond is None:
        cond = class_labels(None, n, run.num_classes)
    elif cond is not None and not run.num_classes:
        raise ConfigError("class labels were given but this run is unconditional "
                          "(model.num_classes = 0)")
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        c = None if cond is None else cond[start:start + b].to(run.precision.device)
        shape = (b, *run.vae.latent_shape) if run.vae else (b, d.channels, d.image_size, d.image_size)
        x = sample(name, den, run.schedule, shape, steps, generator=gen,
                   device=run.precision.device, cond=c, eta=sc.eta if eta is None else eta,
                   spacing=sc.spacing)
        if run.vae is not None:
            x = run.vae.decode(x)
        out.append(to_uint8(x).cpu())
    return torch.cat(out)
