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


def _cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith(field)), "")
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    return set(_cpuinfo("flags").split())


def hardware() -> dict:
    """What this machine offers effusion: CPU model and the flags that decide precision,
    the ISA PyTorch dispatches to (and any environment cap on it), threads, GPUs, and what
    `precision: auto` picks here and why. `effusion info --hardware` prints it; benchmarks
    record it beside their figures."""
    import os
    import platform

    flags = cpu_flags()
    model = _cpuinfo("model name") or platform.processor()
    device = resolve_device("auto")
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        isa = "unknown"
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "torch_cpu_isa": isa, "env_caps": caps,
            "bf16_fast": bf16_supported(torch.device("cpu")), "torch": torch.__version__,
            "gpus": gpus, "device_auto": str(device),
            "precision_auto": resolve_precision("auto", device),
            "precision_reason": precision_reason("auto", device)}


def precision_reason(requested: str, device: torch.device) -> str:
    """One line: which precision `requested` resolves to on `device`, and why."""
    chosen = resolve_precision(requested, device)
    if requested != "auto":
        return f"{chosen}: asked for in train.precision"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return (f"bf16: auto, {name} has bf16 tensor cores" if chosen == "bf16"
                else f"fp32: auto, {name} has no bf16 support")
    flags = cpu_flags()
    native = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16"))
    if chosen == "bf16":
        return f"bf16: auto, this CPU has native bf16 ({', '.join(native) or 'oneDNN reports it'})"
    if native:  # the instructions exist, but oneDNN was told not to use them
        import os

        cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
        return (f"fp32: auto, the CPU has {', '.join(native)} but oneDNN reports no fast bf16"
                + (f" (ONEDNN_MAX_CPU_ISA={cap})" if cap else ""))
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"fp32: auto, this CPU ({isa}) has no native bf16 instructions (avx512_bf16 / amx_bf16), "
            "where bf16 would be emulated and slower than fp32")


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
