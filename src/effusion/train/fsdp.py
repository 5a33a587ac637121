"""Fully sharded data parallelism (`train.parallel: fsdp`) on PyTorch's FSDP2.

`fully_shard` splits every parameter, its gradient and its optimizer moments over the
ranks (each U-Net block is one unit: its weights are all-gathered just before it runs and
freed after), so a model whose weights and Adam state do not fit one device trains on N.
The EMA copy is sharded the same way and averaged shard by shard, with no communication.

Checkpoints are gathered to rank 0 and written in the same layout as a one-process run
(full tensors; the optimizer keyed by parameter index), so a run trained with FSDP is
sampled, evaluated, served and resumed (with FSDP, DDP or one process) like any other.
Gathering and loading are collectives: every rank calls them, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from effusion.config import ConfigError
from effusion.train.distributed import Dist


def _api():
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError as e:  # pragma: no cover - every supported torch has FSDP2
        raise ConfigError(f"train.parallel=fsdp needs PyTorch's FSDP2 (torch >= 2.6): {e}") from None
    return fully_shard, DTensor, distribute_tensor


def shard(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """`fully_shard` each block of the U-Net, then the rest (embeddings, stem, head) as
    the root unit, over a 1-D mesh of all ranks. Changes `model` in place; returns it."""
    fully_shard, _, _ = _api()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (d.world,))
    blocks = [m for name in ("down", "up") for m in getattr(model, name, [])]
    if hasattr(model, "mid"):
        blocks.append(model.mid)
    if not blocks:
        raise ConfigError(f"train.parallel=fsdp shards the diffusion U-Net, not {type(model).__name__}")
    for block in blocks:
        # A unit (residual block + attention) is a ModuleList that FSDP2 before torch 2.13
        # refuses to shard as a container: its layers are sharded one by one instead.
        for layer in (block if isinstance(block, nn.ModuleList) else [block]):
            if any(p.numel() for p in layer.parameters()):
                fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(t: Any) -> bool:
    _, DTensor, _ = _api()
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value on every rank, on the CPU (an all-gather); others as they are."""
    return t.full_tensor().cpu() if is_sharded(t) else t.detach().cpu()


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict with every sharded tensor gathered (collective)."""
    return {k: full(v) for k, v in module.state_dict().items()}


@torch.no_grad()
def load_full_state(module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Put full tensors (as `full_state` returns, on every rank) into a sharded module:
    each rank keeps its own shard."""
    _, _, distribute_tensor = _api()
    own = module.state_dict()
    missing = set(own) ^ set(sd)
    if missing:
        raise KeyError(f"state keys differ: {sorted(missing)[:4]}")
    for k, v in own.items():
        src = sd[k].to(v.dtype)
        if is_sharded(v):
            v.to_local().copy_(distribute_tensor(src.to(v.device), v.device_mesh,
                                                 v.placements).to_local())
        else:
            v.copy_(src.to(v.device))


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """`opt.state_dict()` with its moments gathered: the layout of an unsharded run."""
    sd = opt.state_dict()
    return {"state": {i: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                      for i, st in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def load_full_optimizer_state(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a full (unsharded) optimizer state into an optimizer over sharded parameters:
    each moment is cut to its parameter's shard."""
    _, _, distribute_tensor = _api()
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: (distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements)
                        if isinstance(v, torch.Tensor) and is_sharded(p) and v.shape == p.shape
                        else v) for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def gathered_copy(module: nn.Module, template: nn.Module | None) -> nn.Module | None:
    """`template` (an unsharded module of the same architecture, on rank 0; None on the
    others) filled with `module`'s gathered weights: what rank 0 samples with. Every
    rank must call it (the gather is collective)."""
    sd = full_state(module)
    if template is not None:
        template.load_state_dict(sd)
    return template
