"""Rebuild a trained model from its run directory and draw samples from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from effusion.config import Config, ConfigError
from effusion.data.loader import to_uint8
from effusion.diffusion import SAMPLERS, NetworkDenoiser, Schedule, sample
from effusion.models import UNet, build_model
from effusion.train.checkpoint import CheckpointError, latest_checkpoint, load_weights, read_config
from effusion.train.precision import Precision, bf16_supported, resolve_device, resolve_precision


@dataclass
class LoadedRun:
    """A run's config, its network (EMA or raw weights), schedule and checkpoint step."""

    run_dir: Path
    config: Config
    model: UNet
    schedule: Schedule
    step: int
    precision: Precision

    def denoiser(self, clip_x0: bool | None = None) -> NetworkDenoiser:
        clip = self.config.sample.clip_x0 if clip_x0 is None else clip_x0
        return NetworkDenoiser(self.model, self.schedule, self.config.diffusion.prediction,
                               clip_x0=clip, autocast=self.precision.autocast)


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
    return LoadedRun(run_dir, cfg, model, schedule_for(cfg), step, prec)


def generate(run: LoadedRun, n: int, *, sampler: str | None = None, steps: int | None = None,
             seed: int = 0, eta: float | None = None, batch_size: int = 256,
             cond: torch.Tensor | None = None) -> torch.Tensor:
    """Draw `n` samples as uint8 (N, C, H, W); deterministic for a given seed.

    Sampler, steps and eta default to the run's `sample` config.
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
    den = run.denoiser()
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        c = None if cond is None else cond[start:start + b].to(run.precision.device)
        x = sample(name, den, run.schedule, (b, d.channels, d.image_size, d.image_size),
                   steps, generator=gen, device=run.precision.device, cond=c,
                   eta=sc.eta if eta is None else eta, spacing=sc.spacing)
        out.append(to_uint8(x).cpu())
    return torch.cat(out)
