"""Data-parallel training on PyTorch's own engine: torchrun's environment, a process group
(gloo on CPU, nccl on CUDA), DistributedDataParallel, and the few agreements the loop needs.

How a run is split: every rank builds the same batch stream (same seed), so each optimizer
step's *global* batch (`train.batch_size` images) is known to all of them; rank r trains on
its r-th contiguous slice of it. The diffusion loss draws the timesteps, noise and label
dropout for the whole global batch and keeps the slice's share, and DDP averages the
gradients, so N processes take exactly the step one process takes on the global batch (up
to float summation order; tested to 1e-5). The price of that exactness: each rank gathers,
augments and draws noise for the global batch, which is small beside the network's forward
and backward but grows with the world size; it keeps a run's result independent of how
many processes trained it.

Rank 0 alone logs, draws sample grids, evaluates and writes checkpoints and config.yaml;
every rank resumes from the same checkpoint and keeps the same EMA. Decisions that depend
on time (the step plan of `train.max_minutes`, its guard, the width probe) are made on
rank 0 and broadcast, so every rank stops at the same step.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from effusion.config import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (world 1: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (a process group even at world size 1)

    @property
    def enabled(self) -> bool:
        return self.world > 1 or self.launched

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: int) -> slice:
        """This rank's contiguous slice of a global batch of `batch` items (parts differ
        by at most one item when the world does not divide the batch)."""
        return slice(self.rank * batch // self.world, (self.rank + 1) * batch // self.world)


SINGLE = Dist()


def from_env() -> Dist:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process. A
    process torchrun started joins a process group even alone (`torchrun
    --nproc_per_node=1`), so one GPU runs the same DDP/NCCL path as eight."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    world = int(os.environ["WORLD_SIZE"])
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")),
                launched=True)


def setup(d: Dist, device: torch.device) -> torch.device:
    """Join the process group (gloo for CPU, nccl for CUDA) and return this rank's
    device: cuda:LOCAL_RANK on GPUs, the CPU otherwise."""
    if not d.enabled:
        return device
    if device.type == "cuda":
        if torch.cuda.device_count() <= d.local_rank:
            raise ConfigError(f"local rank {d.local_rank} has no GPU: this machine has "
                              f"{torch.cuda.device_count()}; start at most that many processes "
                              "per node (--nproc)")
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")


def all_true(d: Dist, flag: bool | torch.Tensor) -> bool:
    """True on every rank only if `flag` is true on every rank (one small all-reduce)."""
    if not d.enabled:
        return bool(flag)
    t = torch.as_tensor(flag, dtype=torch.int32).reshape(1).to(_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_true_on_device(d: Dist, flag: torch.Tensor) -> torch.Tensor:
    """`all_true` without a host round trip: a bool tensor on the flag's device (a GPU
    all-reduce runs on the stream; the host reads it only when it must)."""
    if not d.enabled:
        return flag
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0].bool()


def mean(d: Dist, value: float) -> float:
    """The mean of a float over the ranks."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t.item()) / d.world


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_flag(d: Dist, flag: bool) -> bool:
    """Rank 0's flag on every rank (a one-element tensor broadcast)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def check_batch(d: Dist, batch_size: int) -> None:
    if d.enabled and batch_size % d.world:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch and must divide "
                          f"evenly over the {d.world} processes (e.g. "
                          f"{batch_size // d.world * d.world or d.world})")


# ------------------------------------------------------------------------ launching

def launch(nproc: int, args: list[str], nnodes: int = 1, rdzv_endpoint: str | None = None,
           rdzv_id: str = "effusion") -> None:
    """Start `python -m effusion ARGS` in `nproc` processes per node through torchrun's
    own launcher (torch.distributed.launcher), with a c10d rendezvous at `rdzv_endpoint`
    (default: a free local port for one node; with several nodes, the same HOST:PORT on
    each, where the first to arrive hosts the store and ranks are assigned). Called in-process rather than through the
    `torchrun` command line, whose parser would take effusion's `--run` for an abbreviation
    of its own `--run-path`. Raises if a worker failed."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1 or nnodes < 1:
        raise ConfigError("--nproc and --nnodes must be >= 1")
    if nnodes > 1 and not rdzv_endpoint:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if rdzv_endpoint is None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            rdzv_endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc,
                          run_id=rdzv_id, rdzv_backend="c10d", rdzv_endpoint=rdzv_endpoint,
                          max_restarts=0, monitor_interval=0.5)
    elastic_launch(config, sys.executable)("-m", "effusion", *args)
