"""The training objective as one function, shared by the loop and the benchmarks."""

from __future__ import annotations

from typing import Callable

import torch

from effusion.config import DiffusionConfig
from effusion.diffusion import Schedule, loss_weight, target
from effusion.precision import Precision


def diffusion_loss(forward: Callable[..., torch.Tensor], x0: torch.Tensor,
                   cond: torch.Tensor | None, dcfg: DiffusionConfig, schedule: Schedule,
                   gen: torch.Generator, prec: Precision,
                   memory_format: torch.memory_format = torch.contiguous_format,
                   cond_drop: float = 0.0, null_class: int = -1) -> torch.Tensor:
    """Weighted simple loss (Ho et al. 2020, eq. 14) for a CPU batch x0 (B, C, H, W).

    Draws t then the noise from `gen` (on CPU, so a run reproduces on any device), noises
    x0, runs `forward(x_t, t, cond)` under the precision's autocast and reduces in fp32.
    With labels, each is replaced by `null_class` with probability `cond_drop` (also drawn
    from `gen`), which teaches the network the unconditional prediction that classifier-free
    guidance needs.
    """
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = schedule.q_sample(x0, t, noise)
    tgt = target(dcfg.prediction, schedule, x0, noise, t)
    if cond is not None and cond_drop > 0:
        drop = torch.rand(x0.shape[0], generator=gen) < cond_drop
        cond = torch.where(drop.to(cond.device), torch.full_like(cond, null_class), cond)
    w = loss_weight(dcfg.prediction, dcfg.loss_weighting, schedule, t, dcfg.min_snr_gamma)
    dev = prec.device
    x_t = x_t.to(dev, memory_format=memory_format, non_blocking=True)
    with prec.autocast():
        out = forward(x_t, t.to(dev), cond)
    return ((out.float() - tgt.to(dev)) ** 2).mean(dim=(1, 2, 3)).mul(w.to(dev)).mean()
