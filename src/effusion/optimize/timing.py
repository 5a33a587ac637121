"""Latency and cost of a network call, as every optimization pass reports them."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def latency_ms(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, repeats: int = 10,
               warmup: int = 1) -> float:
    """Median wall time of `fn(*inputs)` in ms over `repeats` calls, after `warmup` calls,
    without autograd. On CUDA each call is waited for (kernels run asynchronously)."""
    cuda = [x.device for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(cuda[0])

    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn(*inputs)
            sync()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def macs(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one call `model(*inputs)` (convolutions, matmuls and
    attention, counted by torch's FlopCounterMode: MACs = FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2
