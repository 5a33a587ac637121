"""Draw samples from a loaded diffusion run (`effusion.runs.load_run`)."""

from __future__ import annotations

from typing import Callable

import torch

from effusion.config import ConfigError
from effusion.data import to_uint8
from effusion.diffusion import SAMPLERS, sample
from effusion.runs import LoadedRun


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


def resolve_sampler(run: LoadedRun, sampler: str | None, steps: int | None) -> tuple[str, int]:
    """The sampler's name and step count: the run's `sample` config unless given; checked."""
    sc = run.config.sample
    name = sampler or sc.sampler
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if steps is not None and not 1 <= steps <= run.schedule.T:
        raise ConfigError(f"steps must be between 1 and {run.schedule.T}, got {steps}")
    if steps is None:
        # The config's step count belongs to the config's sampler; others get their usual
        # defaults (DDPM's ancestral chain needs all T steps to be accurate).
        steps = sc.steps if name == sc.sampler else {"ddim": 50, "dpmpp_2m": 25,
                                                      "ddpm": run.schedule.T,
                                                      "consistency": 4}[name]
    return name, steps


def generate(run: LoadedRun, n: int, *, sampler: str | None = None, steps: int | None = None,
             seed: int = 0, eta: float | None = None, batch_size: int = 256,
             cond: torch.Tensor | None = None, guidance: float | None = None,
             cache_interval: int | None = None,
             guidance_interval: tuple[float, ...] | None = None,
             size: tuple[int, int] | None = None) -> torch.Tensor:
    """Draw `n` samples as uint8 (N, C, H, W); deterministic for a given seed.

    `size` (H, W) samples at another size than the run's data.image_size (a pixel-space
    U-Net takes any size; quality holds near the sizes it trained on, e.g. its buckets).
    Sampler, steps and eta default to the run's `sample` config. A class-conditional run
    samples the labels in `cond` (default: an even spread over its classes) with
    classifier-free guidance weight `guidance` (default: the run's `sample.guidance`).
    `cache_interval` > 1 reuses the U-Net's deep features between full passes (DeepCache;
    default: the run's `sample.cache_interval`). `guidance_interval` (lo, hi) applies
    guidance only at noise levels sigma in [lo, hi] (default: the run's; () = everywhere).
    """
    name, steps = resolve_sampler(run, sampler, steps)
    if n < 1:
        raise ConfigError(f"number of samples must be >= 1, got {n}")
    sc = run.config.sample
    d = run.config.data
    gen = torch.Generator().manual_seed(seed)
    if cache_interval is not None and cache_interval < 1:
        raise ConfigError(f"cache interval must be >= 1 (1 = off), got {cache_interval}")
    den = run.denoiser(guidance=guidance, cache_interval=cache_interval,
                       guidance_interval=guidance_interval)
    if run.num_classes and cond is None:
        cond = class_labels(None, n, run.num_classes)
    elif cond is not None and not run.num_classes:
        raise ConfigError("class labels were given but this run is unconditional "
                          "(model.num_classes = 0)")
    hw = check_size(run, size)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        c = None if cond is None else cond[start:start + b].to(run.precision.device)
        shape = (b, *run.vae.latent_shape) if run.vae else (b, d.channels, *hw)
        x = sample(name, den, run.schedule, shape, steps, generator=gen,
                   device=run.precision.device, cond=c, eta=sc.eta if eta is None else eta,
                   spacing=sc.spacing)
        if run.vae is not None:
            x = run.vae.decode(x)
        out.append(to_uint8(x).cpu())
    return torch.cat(out)


def parse_size(text: str) -> tuple[int, int]:
    """`HxW` (or one number for a square) -> (H, W)."""
    try:
        parts = [int(p) for p in text.lower().replace("*", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ConfigError(f"--size: expected HxW, e.g. 24x40, got {text!r}")
    return parts[0], parts[1]


def check_size(run: LoadedRun, size: tuple[int, int] | None) -> tuple[int, int]:
    """The (H, W) to sample at: `size`, or the run's data.image_size square."""
    d = run.config.data
    if size is None:
        return d.image_size, d.image_size
    h, w = size
    if min(h, w) < 8:
        raise ConfigError(f"--size: sides must be >= 8 pixels, got {h}x{w}")
    if run.vae is not None:
        raise ConfigError("--size: a latent run samples its VAE's one image size")
    if not hasattr(run.model, "forward_split"):
        raise ConfigError("--size: this run's network is an exported engine with a fixed "
                          "image size; sample the run it was exported from")
    return h, w


class Stopped(Exception):
    """`generate_seeded` was told to stop between two sampler steps."""


def generate_seeded(run: LoadedRun, seeds: list[int], *, sampler: str | None = None,
                    steps: int | None = None, eta: float | None = None,
                    cond: torch.Tensor | None = None, guidance: float | None = None,
                    cache_interval: int | None = None,
                    should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """One uint8 sample per seed, in one sampler call: sample i's starting noise and any
    sampler noise come from its own generator seeded with `seeds[i]`, so an image depends
    on its seed (and class and settings), not on which others share the batch (up to the
    kernels' batch-size-dependent rounding; see docs/serving.md).

    `should_stop`, checked after every step, aborts the call with `Stopped`.
    """
    if not seeds:
        raise ConfigError("generate_seeded needs at least one seed")
    name, steps = resolve_sampler(run, sampler, steps)
    sc, d = run.config.sample, run.config.data
    if cache_interval is not None and cache_interval < 1:
        raise ConfigError(f"cache interval must be >= 1 (1 = off), got {cache_interval}")
    if cond is not None and not run.num_classes:
        raise ConfigError("class labels were given but this run is unconditional "
                          "(model.num_classes = 0)")
    if run.num_classes and cond is None:
        cond = torch.tensor([s % run.num_classes for s in seeds])
    den = run.denoiser(guidance=guidance, cache_interval=cache_interval)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    b = len(seeds)
    shape = (b, *run.vae.latent_shape) if run.vae else (b, d.channels, d.image_size, d.image_size)

    def check(*_: object) -> None:
        if should_stop is not None and should_stop():
            raise Stopped

    x = sample(name, den, run.schedule, shape, steps, generator=gens, device=run.precision.device,
               cond=None if cond is None else cond.to(run.precision.device),
               eta=sc.eta if eta is None else eta, spacing=sc.spacing, callback=check)
    if run.vae is not None:
        x = run.vae.decode(x)
    return to_uint8(x).cpu()
