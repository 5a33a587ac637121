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


class GuidedDenoiser:
    """Wraps an unclipped Denoiser; both halves go through the network in one batch."""

    def __init__(self, denoiser: Denoiser, null_class: int, weight: float,
                 clip_x0: bool = False):
        self.denoiser, self.null_class, self.weight = denoiser, null_class, weight
        self.clip_x0 = clip_x0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | int,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight
        if cond is None or w == 1.0:
            x0 = self.denoiser(x_t, t, cond)
        elif w == 0.0:
            x0 = self.denoiser(x_t, t, torch.full_like(cond, self.null_class))
        else:
            b = x_t.shape[0]
            t = torch.as_tensor(t, device=x_t.device)
            t = t.expand(b) if t.ndim == 0 else t
            both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                 torch.cat([cond, torch.full_like(cond, self.null_class)]))
            x0_c, x0_u = both[:b], both[b:]
            x0 = x0_u + w * (x0_c - x0_u)
        return x0.clamp(-1, 1) if self.clip_x0 else x0
