"""Where a training step's memory goes: weights, gradients, optimizer state, activations.

`measure_step_memory` runs one training step under PyTorch's tensor-level memory tracker
(`torch.distributed._tools.mem_tracker.MemTracker`, which works on CPU and CUDA alike) and
returns the breakdown at the moment of peak memory. Tensor-level accounting is exact and
unaffected by allocator caching, unlike process RSS; the tracker slows the step it
watches, so timing must come from other steps. The tracker is a private PyTorch API: if it
is missing, the fallback reports RSS growth instead, and says so in `method`.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass
from typing import Callable

import torch

MB = 2**20


@dataclass
class StepMemory:
    weights_mb: float  # parameters and buffers
    grads_mb: float  # gradients alive at the peak
    optimizer_mb: float  # optimizer state (moments, quantisation maps)
    activations_mb: float  # everything else at the peak: saved activations and temporaries
    peak_mb: float
    method: str  # "tensors" (exact) or "rss" (process growth; approximate)

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MB


def measure_step_memory(step: Callable[[], None], model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> StepMemory:
    """Run `step()` once (it must do a full forward, backward and optimizer step; call it
    after at least one step, so the optimizer state exists) and break down its peak."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    except ImportError:  # private API; approximate with the process's resident memory
        return _measure_rss(step, model, optimizer)

    class Tracker(MemTracker):
        # Gradient accumulation calls the root module more than once per step, which the
        # tracker's per-module statistics refuse; those are not used here, so start them
        # afresh at each root call (the device-wide peak is kept).
        def _pre_fw_hook(self, module, inputs):
            if module is model and module in self.memory_tracking and not self._mod_tracker.is_bw:
                self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)

    tracker = Tracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")
    if not peak:
        return _measure_rss(step, model, optimizer)
    dev = max(peak, key=lambda d: peak[d]["Total"])  # the accelerator, if one is used
    snap = peak[dev]

    def mb(*kinds) -> float:
        return sum(snap.get(k, 0) for k in kinds) / MB

    return StepMemory(weights_mb=mb(_MemRefType.PARAM, _MemRefType.BUFFER),
                      grads_mb=mb(_MemRefType.GRAD), optimizer_mb=mb(_MemRefType.OPT),
                      activations_mb=mb(_MemRefType.ACT, _MemRefType.TEMP, _MemRefType.OTH),
                      peak_mb=snap["Total"] / MB, method="tensors")


def _measure_rss(step: Callable[[], None], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> StepMemory:
    from effusion.train.optim import optimizer_state_bytes

    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt = optimizer_state_bytes(optimizer)
    before = _rss_mb()
    try:  # reset the kernel's high-water mark (Linux >= 4.0), then read VmHWM after
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    step()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    act = max(0.0, hwm - before - grads / MB)
    return StepMemory(weights_mb=weights / MB, grads_mb=grads / MB, optimizer_mb=opt / MB,
                      activations_mb=act, peak_mb=(weights + grads + opt) / MB + act, method="rss")
