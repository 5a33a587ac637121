"""Exponential moving average of the weights, with a warm-up of the decay."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """Keeps a copy of `model` whose weights trail the training weights.

    With warm-up the decay at update n is min(decay, (1 + n) / (10 + n)), so early
    averages are not dominated by the random initial weights — it matters for short runs.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module, gate: torch.Tensor | None = None) -> None:
        """Move the average towards `model`'s weights; `gate` (a 0/1 tensor on the
        weights' device) = 0 leaves it where it is, decided on the device (no host sync)."""
        d = self.current_decay()
        ema_p = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if gate is None:
            torch._foreach_lerp_(ema_p, params, 1 - d)
        else:
            step = torch._foreach_sub(params, ema_p)
            torch._foreach_mul_(step, gate.to(ema_p[0].dtype) * (1 - d))
            torch._foreach_add_(ema_p, step)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict(state)
        self.updates = updates
