"""Discrete noise schedules: betas, cumulative alphas, SNR and the forward process.

Pure tensors, no nn.Module. Timesteps are integers 0..T-1; x_t = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from effusion.config import Config

ScheduleName = Literal["linear", "cosine", "sigmoid"]
MAX_BETA = 0.999  # Nichol & Dhariwal 2021 clip betas to avoid a singularity near t = T


def _betas_from_alpha_bar(alpha_bar_fn, timesteps: int) -> torch.Tensor:
    """beta_t = 1 - abar(t+1)/abar(t) on a continuous abar(u), u in [0, 1], clipped."""
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    ab = alpha_bar_fn(u)
    return (1 - ab[1:] / ab[:-1]).clamp(max=MAX_BETA)


def make_betas(name: ScheduleName, timesteps: int) -> torch.Tensor:
    """Betas (T,) float64 for a named schedule.

    - linear: Ho et al. 2020, 1e-4 to 0.02 at T = 1000; for other T both ends are scaled
      by 1000/T so the total noise stays comparable (as in improved-DDPM's code).
    - cosine: Nichol & Dhariwal 2021, eq. 17, abar(u) = cos^2((u + s)/(1 + s) * pi/2), s = 0.008.
    - sigmoid: Chen 2023 ("On the importance of noise scheduling"), abar(u) from a sigmoid
      over [start, end] = [-3, 3] with temperature 1.
    """
    if name == "linear":
        scale = 1000.0 / timesteps
        return torch.linspace(scale * 1e-4, min(scale * 0.02, MAX_BETA), timesteps,
                              dtype=torch.float64)
    if name == "cosine":
        s = 0.008
        return _betas_from_alpha_bar(
            lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2, timesteps)
    if name == "sigmoid":
        start, end, tau = -3.0, 3.0, 1.0
        v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
        v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

        def alpha_bar(u: torch.Tensor) -> torch.Tensor:
            out = (-torch.sigmoid((u * (end - start) + start) / tau) + v_end) / (v_end - v_start)
            return out.clamp(min=1e-9)

        return _betas_from_alpha_bar(alpha_bar, timesteps)
    raise ValueError(f"unknown schedule {name!r}; choose linear, cosine or sigmoid")


@dataclass(frozen=True)
class Schedule:
    """A discrete diffusion schedule. Tables are float64 (T,); lookups return float32."""

    betas: torch.Tensor
    # abar with a leading 1 for t = -1 ("before the first step", clean data), built once.
    _table: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ac = torch.cumprod(1.0 - self.betas.to(torch.float64), dim=0)
        object.__setattr__(self, "_table", torch.cat([ac.new_ones(1), ac]))

    @classmethod
    def make(cls, name: ScheduleName, timesteps: int = 1000) -> "Schedule":
        return cls(make_betas(name, timesteps))

    @property
    def T(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._table[1:]

    def alpha_bar(self, t: torch.Tensor | int, ndim: int = 1) -> torch.Tensor:
        """abar_t for integer t (scalar or (B,)), shaped to broadcast against `ndim` dims.

        t = -1 gives abar = 1 (clean data), which samplers use as their final target.
        """
        t = torch.as_tensor(t)
        ab = self.table_on(t.device)[t.long() + 1].to(torch.float32)
        return ab.view(-1, *([1] * (ndim - 1)))

    def table_on(self, device: torch.device) -> torch.Tensor:
        """The abar table on `device` (copied once per device), so a lookup on a GPU needs
        no copy of t back to the host."""
        if device.type == "cpu":
            return self._table
        cache = self.__dict__.setdefault("_device_tables", {})
        if device not in cache:
            cache[device] = self._table.to(device)
        return cache[device]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t), shape (B,)."""
        ab = self.alpha_bar(t).view(-1)
        return ab / (1 - ab)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x0) given the noise (Ho et al. 2020, eq. 4)."""
        ab = self.alpha_bar(t, x0.ndim).to(x0.device)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def schedule_for(cfg: Config) -> Schedule:
    """The schedule a run's config names (`diffusion.schedule`, `diffusion.timesteps`)."""
    return Schedule.make(cfg.diffusion.schedule, cfg.diffusion.timesteps)
