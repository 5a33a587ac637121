"""The model-side efficiency switches, applied in one place: memory format, gradient
checkpointing and torch.compile (precision and TF32 live in `precision.py`, the optimizer
in `optim.py`, loader workers in `effusion.data.loader`).

`apply_switches` returns the callable the loss should run (`net`) next to the module whose
weights are trained, saved and averaged (`model`): a compiled wrapper must never reach a
checkpoint (its state_dict keys differ) and EMA copies the plain module.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from effusion.config import ConfigError, TrainConfig


class CompiledWithFallback:
    """`torch.compile(model)` that falls back to eager if compiling fails.

    Compilation is lazy: it happens in the first call, so that call is timed
    (`compile_s`) and any compiler error there (no C++ compiler, an unsupported backend,
    an op Dynamo cannot trace) switches to the eager model with a warning instead of
    ending the run.
    """

    def __init__(self, model: nn.Module, **compile_kwargs: Any):
        self.model = model
        self.compiled = torch.compile(model, **compile_kwargs)
        self.compile_s: float | None = None
        self.error: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.compiled is None:
            return self.model(*args, **kwargs)
        if self.compile_s is not None:
            return self.compiled(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # any compiler failure: keep training, eagerly
            self.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            warnings.warn(f"train.compile: torch.compile failed ({self.error}); "
                          "continuing in eager mode", RuntimeWarning, stacklevel=2)
            self.compiled = None
            torch._dynamo.reset()
            return self.model(*args, **kwargs)
        self.compile_s = time.perf_counter() - t0
        return out


def apply_switches(model: nn.Module, tc: TrainConfig,
                   wrap: Callable[[nn.Module], nn.Module] | None = None
                   ) -> tuple[Any, torch.memory_format, list[str]]:
    """Set the model's memory format and gradient checkpointing from the config, then
    `wrap` it (DistributedDataParallel, in data-parallel training), then wrap that for
    torch.compile if asked. Returns (net to call in the loss, input memory format, notes)."""
    notes = []
    mem_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    model.to(memory_format=mem_format)
    if tc.grad_checkpointing != "none":
        if not hasattr(model, "grad_checkpointing"):
            raise ConfigError(f"train.grad_checkpointing={tc.grad_checkpointing} is only "
                              f"implemented for the U-Net, not for {type(model).__name__}")
        model.grad_checkpointing = tc.grad_checkpointing
        notes.append(f"gradient checkpointing: {tc.grad_checkpointing}")
    if tc.channels_last:
        notes.append("channels_last memory format")
    net: Any = model if wrap is None else wrap(model)
    if tc.compile:
        net = CompiledWithFallback(net)
        notes.append("torch.compile (compiled in the first step; its time is logged as compile_s)")
    return net, mem_format, notes
