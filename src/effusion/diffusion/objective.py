"""Prediction types (eps | v | x0), training targets, conversions, loss weights, Denoiser.

With a = sqrt(abar_t), s = sqrt(1 - abar_t) and x_t = a x0 + s eps:
- eps-prediction (Ho et al. 2020):   x0 = (x_t - s eps) / a
- v-prediction (Salimans & Ho 2022): v = a eps - s x0,  x0 = a x_t - s v,  eps = s x_t + a v
- x0-prediction:                     the network outputs x0 directly
"""

from __future__ import annotations

import contextlib
from typing import Callable, Literal, Protocol

import torch

from effusion.diffusion.schedule import Schedule

Prediction = Literal["eps", "v", "x0"]
Weighting = Literal["uniform", "min_snr"]
PREDICTIONS: tuple[str, ...] = ("eps", "v", "x0")


class Denoiser(Protocol):
    """The one contract samplers see: (x_t, t, cond=None) -> x0_hat, float32."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor,
                 cond: torch.Tensor | None = None) -> torch.Tensor: ...


def _a_s(schedule: Schedule, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    ab = schedule.alpha_bar(t, ndim)
    return ab.sqrt(), (1 - ab).sqrt()


def target(prediction: Prediction, schedule: Schedule, x0: torch.Tensor, noise: torch.Tensor,
           t: torch.Tensor) -> torch.Tensor:
    """What the network is trained to output for (x0, noise, t)."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        a, s = (v.to(x0.device) for v in _a_s(schedule, t, x0.ndim))
        return a * noise - s * x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def to_x0(prediction: Prediction, schedule: Schedule, out: torch.Tensor, x_t: torch.Tensor,
          t: torch.Tensor) -> torch.Tensor:
    """Convert a network output of the given type to the x0 estimate."""
    a, s = (v.to(x_t.device) for v in _a_s(schedule, t, x_t.ndim))
    if prediction == "eps":
        return (x_t - s * out) / a
    if prediction == "v":
        return a * x_t - s * out
    if prediction == "x0":
        return out
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def from_x0(prediction: Prediction, schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor,
            t: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_x0`: the network output of the given type that implies this x0."""
    a, s = (v.to(x_t.device) for v in _a_s(schedule, t, x_t.ndim))
    if prediction == "x0":
        return x0
    eps = (x_t - a * x0) / s
    if prediction == "eps":
        return eps
    if prediction == "v":
        return a * eps - s * x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def loss_weight(prediction: Prediction, weighting: Weighting, schedule: Schedule,
                t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weight (B,).

    min-SNR-gamma (Hang et al. 2023) weights the x0-space error by min(SNR, gamma). The
    eps-space MSE equals SNR times the x0-space MSE and the v-space MSE equals (SNR + 1)
    times it, so the weight on each native loss is divided by that factor.
    """
    if weighting == "uniform":
        return torch.ones(t.shape[0], device=t.device)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose uniform or min_snr")
    snr = schedule.snr(t).to(t.device)
    w = snr.clamp(max=gamma)
    if prediction == "eps":
        return w / snr
    if prediction == "v":
        return w / (snr + 1)
    return w


class NetworkDenoiser:
    """Adapt a network predicting eps, v or x0 to the Denoiser contract.

    Args:
        net: callable `(x_t, t, cond) -> prediction` (typically the U-Net).
        schedule: the schedule the network was trained with.
        prediction: what the network predicts.
        clip_x0: clamp the x0 estimate to [-1, 1] (right for pixel space, wrong for latents).
        autocast: optional context factory; the network may run in bf16/fp16 inside it,
            the returned x0 is always float32.
    """

    def __init__(self, net: Callable[..., torch.Tensor], schedule: Schedule,
                 prediction: Prediction, clip_x0: bool = False,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.clip_x0 = clip_x0
        self.autocast = autocast or contextlib.nullcontext

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | int,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        with self.autocast():
            out = self.net(x_t, t, cond)
        x0 = to_x0(self.prediction, self.schedule, out.float(), x_t.float(), t)
        return x0.clamp(-1, 1) if self.clip_x0 else x0
