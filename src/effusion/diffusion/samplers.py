"""Samplers: stateless functions over a Denoiser and a Schedule.

Each has the signature `sample_<name>(denoiser, schedule, x_T, steps, *, cond=None,
generator=None, callback=None, ...) -> x0` and is deterministic given the generator.
Timesteps are integers of the discrete schedule; the final step targets t = -1 (abar = 1).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence, Union

import torch

from effusion.diffusion.objective import Denoiser
from effusion.diffusion.schedule import Schedule

Spacing = Literal["linspace", "leading", "trailing"]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (i, t, x_t, x0_hat)
# One generator for the whole batch, or one per row: then each row's noise depends on its
# own generator only, not on which other rows share the batch (the server's batching).
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def timesteps(schedule: Schedule, steps: int, spacing: Spacing = "linspace") -> list[int]:
    """Descending timesteps to visit; spacings as in Lin et al. 2024, Table 2.

    linspace: round(linspace(0, T-1, steps)); leading: multiples of T // steps;
    trailing: round(T - k * T / steps) - 1, which always starts at t = T-1.
    """
    T = schedule.T
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {steps}")
    if spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps).round().long()
    elif spacing == "leading":
        ts = torch.arange(steps) * (T // steps)
    elif spacing == "trailing":
        # k = 0..steps-1 only, so the smallest is round(T / steps) - 1 >= 0.
        ts = (T - torch.arange(steps) * (T / steps)).round().long() - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose linspace, leading or trailing")
    return sorted(set(ts.tolist()), reverse=True)


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device | str
          ) -> torch.Tensor:
    """Standard normal of `shape` on `device`, drawn on the generator's device (reproducible
    across devices); with a sequence of generators, row i comes from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else torch.device(device)
        return torch.randn(shape, generator=generator, device=dev, dtype=torch.float32).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32)
                        for g in generator]).to(device)


def _randn(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(tuple(x.shape), generator, x.device)


def _batched_t(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


@torch.inference_mode()
def sample_ddim(denoiser: Denoiser, schedule: Schedule, x_T: torch.Tensor, steps: int = 50, *,
                cond: torch.Tensor | None = None, eta: float = 0.0, spacing: Spacing = "linspace",
                generator: Generators = None,
                callback: Callback | None = None) -> torch.Tensor:
    """DDIM, Song et al. 2021, eq. 12: eta = 0 is the deterministic ODE-like sampler,
    eta = 1 is DDPM ancestral sampling on the respaced schedule."""
    ts = timesteps(schedule, steps, spacing)
    x = x_T.float()
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ab, ab_prev = schedule.alpha_bar(t).item(), schedule.alpha_bar(t_prev).item()
        x0 = denoiser(x, _batched_t(t, x), cond)
        eps = (x - ab ** 0.5 * x0) / (1 - ab) ** 0.5
        # sigma_t(eta), eq. 16: eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _randn(x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_ddpm(denoiser: Denoiser, schedule: Schedule, x_T: torch.Tensor,
                steps: int | None = None, *, cond: torch.Tensor | None = None,
                spacing: Spacing = "linspace", generator: Generators = None,
                callback: Callback | None = None) -> torch.Tensor:
    """DDPM ancestral sampling, Ho et al. 2020, Alg. 2 (all T steps by default).

    With fewer steps it samples the respaced chain (Nichol & Dhariwal 2021, sec. 4), whose
    posterior q(x_s | x_t, x0) is exactly DDIM's eta = 1 update, so it is computed by it.
    """
    return sample_ddim(denoiser, schedule, x_T, steps or schedule.T, cond=cond, eta=1.0,
                       spacing=spacing, generator=generator, callback=callback)


@torch.inference_mode()
def sample_dpmpp_2m(denoiser: Denoiser, schedule: Schedule, x_T: torch.Tensor, steps: int = 25, *,
                    cond: torch.Tensor | None = None, spacing: Spacing = "linspace",
                    generator: Generators = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++"), Alg. 2, in lambda = log(alpha/sigma).

    Second-order multistep in data prediction; the first step is first order and the last
    step (to sigma = 0) returns the denoised estimate ("lower order final").
    """
    del generator  # deterministic: no noise is injected
    ts = timesteps(schedule, steps, spacing)
    x = x_T.float()
    old_x0, h_last = None, None
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        x0 = denoiser(x, _batched_t(t, x), cond)
        if t_next < 0:
            x_new = x0
        else:
            ab, ab_next = schedule.alpha_bar(t).double(), schedule.alpha_bar(t_next).double()
            lam, lam_next = 0.5 * torch.log(ab / (1 - ab)), 0.5 * torch.log(ab_next / (1 - ab_next))
            h = (lam_next - lam).item()
            if old_x0 is None:
                d = x0
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            sig_ratio = ((1 - ab_next) / (1 - ab)).sqrt().item()
            alpha_next = ab_next.sqrt().item()
            x_new = sig_ratio * x - alpha_next * torch.expm1(torch.tensor(-h)).item() * d
            h_last = h
        old_x0 = x0
        x = x_new
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.inference_mode()
def sample_consistency(denoiser: Denoiser, schedule: Schedule, x_T: torch.Tensor, steps: int = 4, *,
                       cond: torch.Tensor | None = None, spacing: Spacing = "trailing",
                       generator: Generators = None,
                       callback: Callback | None = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, alg. 1): at each visited t the
    network's x0 estimate is taken as the answer, then noised afresh to the next t.

    Made for consistency-distilled students (`distill-steps --method consistency`), whose
    x0 estimate is already the end of the ODE path through x_t; one step is one network
    call. Unlike DDIM, the next point reuses none of x_t's noise.
    """
    ts = timesteps(schedule, steps, spacing)
    x = x_T.float()
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        x0 = denoiser(x, _batched_t(t, x), cond)
        if t_next < 0:
            x = x0
        else:
            ab_next = schedule.alpha_bar(t_next).item()
            x = ab_next ** 0.5 * x0 + (1 - ab_next) ** 0.5 * _randn(x0, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "consistency": sample_consistency,
}


def sample(name: str, denoiser: Denoiser, schedule: Schedule, shape: tuple[int, ...],
           steps: int | None = None, *, generator: Generators = None,
           device: torch.device | str = "cpu", **kwargs) -> torch.Tensor:
    """Draw x_T ~ N(0, I) of `shape` from `generator` and run the named sampler."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    x_T = randn(shape, generator, device)
    if name != "ddim":
        kwargs.pop("eta", None)
    args = (steps,) if steps is not None else ()
    return SAMPLERS[name](denoiser, schedule, x_T, *args, generator=generator, **kwargs)
