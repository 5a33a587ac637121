"""Classifier-free guidance (Ho & Salimans 2022) as a Denoiser wrapper.

One network trained with labels dropped to a null class (`train.cond_drop`) predicts both
conditionally and unconditionally; at sampling time

    x0_guided = x0_uncond + w * (x0_cond - x0_uncond)

w = 0 is the unconditional model, w = 1 the plain conditional one, w > 1 trades diversity
for fidelity to the class. At fixed x_t and t, eps, v and x0 are affine in one another, so
guiding the x0 estimate equals guiding eps or v; clipping (if any) comes after mixing.
"""

from __future__ import annotations

import torch

from effusion.diffusion.objective import Denoiser
from effusion.diffusion.schedule import Schedule


def sigma_of_t(schedule: Schedule, t: torch.Tensor | int) -> torch.Tensor:
    """The noise level sigma = sqrt((1 - abar_t) / abar_t) of integer timesteps (EDM's sigma
    for a variance-preserving schedule), per row."""
    ab = schedule.alpha_bar(torch.as_tensor(t)).flatten().double()
    return ((1 - ab) / ab).sqrt()


def interval_weights(weight: float, interval: tuple[float, float] | None,
                     schedule: Schedule | None, t: torch.Tensor | int, b: int
                     ) -> torch.Tensor | float:
    """Guidance weight per row of a batch of `b` at timesteps `t`: `weight` where sigma_t is
    in `interval` (or everywhere when it is None), 1 (plain conditional) elsewhere."""
    if interval is None:
        return weight
    lo, hi = interval
    sig = sigma_of_t(schedule, t)
    sig = sig.expand(b) if sig.numel() == 1 else sig
    inside = (sig >= lo) & (sig <= hi)
    return torch.where(inside, torch.tensor(float(weight), dtype=torch.float64),
                       torch.tensor(1.0, dtype=torch.float64)).float()


class GuidedDenoiser:
    """Wraps an unclipped Denoiser; both halves go through the network in one batch.

    `interval` = (lo, hi) with a `schedule`: guidance only where lo <= sigma_t <= hi
    (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample and
    distribution quality"); elsewhere the plain conditional prediction in one call.
    """

    def __init__(self, denoiser: Denoiser, null_class: int, weight: float,
                 clip_x0: bool = False, interval: tuple[float, float] | None = None,
                 schedule: Schedule | None = None):
        if interval and schedule is None:
            raise ValueError("a guidance interval needs the schedule (to turn t into sigma)")
        self.denoiser, self.null_class, self.weight = denoiser, null_class, weight
        self.clip_x0, self.interval, self.schedule = clip_x0, interval or None, schedule

    def weights(self, t: torch.Tensor | int, b: int) -> torch.Tensor | float:
        """The guidance weight per row: `weight` inside the interval, 1 outside."""
        return interval_weights(self.weight, self.interval, self.schedule, t, b)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | int,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        b = x_t.shape[0]
        w = self.weights(t, b)
        if isinstance(w, torch.Tensor) and bool((w == w[0]).all()):
            w = float(w[0])  # one weight for the batch: the cheap paths below apply
        if cond is None or (isinstance(w, float) and w == 1.0):
            x0 = self.denoiser(x_t, t, cond)
        elif isinstance(w, float) and w == 0.0:
            x0 = self.denoiser(x_t, t, torch.full_like(cond, self.null_class))
        else:
            t = torch.as_tensor(t, device=x_t.device)
            t = t.expand(b) if t.ndim == 0 else t
            both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                 torch.cat([cond, torch.full_like(cond, self.null_class)]))
            x0_c, x0_u = both[:b], both[b:]
            if isinstance(w, torch.Tensor):
                w = w.to(x0_c.device, x0_c.dtype).view(-1, *([1] * (x0_c.ndim - 1)))
            x0 = x0_u + w * (x0_c - x0_u)
        return x0.clamp(-1, 1) if self.clip_x0 else x0
