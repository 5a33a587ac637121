"""Device and precision policy, chosen once and written into the run's config.

bf16 autocast where the hardware has fast bf16 (AVX-512 BF16 / AMX CPUs, Ampere+ GPUs);
fp16 autocast with a GradScaler as an option; fp32 otherwise.

What stays in fp32 under autocast, and where that is decided:
- the loss: every task casts the network output to fp32 before reducing it;
- GroupNorm statistics: CUDA autocast runs group_norm in fp32 (its fp32 op list); CPU
  autocast passes bf16 through, but the bf16 kernel accumulates mean and variance in fp32
  (tests/test_switches.py checks this on data where bf16 statistics would fail);
- softmax: inside scaled_dot_product_attention, whose kernels accumulate in fp32;
- weights, gradients and optimizer state: always fp32 (autocast casts copies per op).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from effusion.config import ConfigError

Resolved = Literal["fp32", "bf16", "fp16"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available on this machine; "
                          "use train.device=cpu or auto")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # mkldnn reports whether the CPU has native bf16 (AVX-512 BF16 or AMX); without it
    # bf16 is emulated and slower than fp32.
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> Resolved:
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision {precision!r} is not one of 'auto', 'fp32', 'bf16', 'fp16'")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise ConfigError(f"train.precision=bf16 but {device.type} has no native bf16 support; "
                          "use fp32 (or fp16 on CUDA)")
    return precision  # type: ignore[return-value]


@dataclass
class Precision:
    """How the forward pass runs and whether gradients are scaled."""

    device: torch.device
    mode: Resolved

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mode]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling (its 5-bit exponent underflows small gradients).
        return torch.amp.GradScaler(self.device.type, enabled=self.mode == "fp16")


def apply_tf32(enabled: bool, device: torch.device) -> str:
    """TF32 matmuls and cuDNN convolutions (Ampere+ GPUs: fp32 storage, 10-bit mantissa
    products, several times faster). Set process-wide; on CPU the flags exist but nothing
    uses them. Returns a one-line note for the run's log."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if device.type != "cuda":
        return f"train.tf32={str(enabled).lower()}: no effect on {device.type} (TF32 is a CUDA feature)"
    return f"train.tf32={str(enabled).lower()}: TF32 matmul and cuDNN convolutions " + (
        "on" if enabled else "off")
