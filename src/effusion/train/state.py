"""Everything a training run carries from step to step, saved and restored as one object.

`TrainState.state_dict()` is exactly what a checkpoint holds (see `effusion.runs.files`
for the layout), so resuming is `load_state_dict` of what `state_dict` wrote: the same
weights, EMA, optimizer moments, loss scale, RNG streams and data position, and the run
continues as if it had never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from effusion.config import Config
from effusion.data import BatchLoader, ImageSet, make_stream
from effusion.precision import Precision
from effusion.runs.files import (CheckpointError, check_weights, load_checkpoint_state,
                                 read_tensors, save_checkpoint)
from effusion.train.ema import EMA
from effusion.train.optim import build_optimizer
from effusion.train.distributed import SINGLE, Dist
from effusion.train.posthoc import PowerEMAs
from effusion.train.switches import apply_switches


@dataclass
class TrainState:
    model: nn.Module  # the weights that are trained, saved and averaged
    net: Any  # what the loss calls: the model, or its torch.compile wrapper
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: BatchLoader
    generator: torch.Generator  # timesteps, noise, label dropout
    device: torch.device
    mem_format: torch.memory_format
    switch_notes: list[str] = field(default_factory=list)
    posthoc: PowerEMAs | None = None  # train.posthoc_ema: the averages post-hoc EMA rebuilds from
    dist: Dist = SINGLE  # data-parallel: rank and world size
    ddp: Any = None  # the DistributedDataParallel wrapper (its no_sync), when world > 1
    fsdp: bool = False  # train.parallel=fsdp: model, EMA and optimizer moments sharded
    plain: nn.Module | None = None  # fsdp, rank 0: an unsharded copy the EMA is gathered into
    step: int = 0
    images_seen: int = 0
    elapsed_s: float = 0.0
    skipped_steps: int = 0

    @classmethod
    def create(cls, cfg: Config, build_model: Callable[[], nn.Module], train_set: ImageSet,
               prec: Precision, dist: Dist = SINGLE) -> "TrainState":
        """Fresh state: the model built under the run's seed, with the efficiency switches,
        its EMA, the optimizer, the loss scaler and a resumable batch loader; with a world
        size > 1, the model wrapped in DistributedDataParallel (every rank builds the same
        weights from the same seed, and DDP checks it by broadcasting rank 0's)."""
        tc, device = cfg.train, prec.device
        stream = make_stream(train_set, tc.batch_size, tc.seed, tc.reweight, tc.reweight_beta,
                             dist.world)
        loader = BatchLoader(stream, cfg.data, tc.seed,
                             tc.workers, tc.prefetch, pin=tc.pin_memory and device.type == "cuda")
        torch.manual_seed(tc.seed)  # parameter init and dropout
        model = build_model().to(device)
        ddps: list[nn.Module] = []

        def data_parallel(m: nn.Module) -> nn.Module:
            from torch.nn.parallel import DistributedDataParallel

            ddps.append(DistributedDataParallel(
                m, device_ids=[device.index] if device.type == "cuda" else None))
            return ddps[0]

        if dist.enabled and tc.parallel == "fsdp":
            return cls._sharded(tc, model, loader, prec, dist)
        net, mem_format, notes = apply_switches(model, tc, data_parallel if dist.enabled else None)
        ddp = ddps[0] if ddps else None
        return cls(model=model, net=net, ema=EMA(model, tc.ema_decay, tc.ema_warmup),
                   optimizer=build_optimizer(model, tc), scaler=prec.make_scaler(),
                   loader=loader, generator=torch.Generator().manual_seed(tc.seed + 1),
                   device=device, mem_format=mem_format, switch_notes=notes,
                   posthoc=PowerEMAs(model, tc.posthoc_ema) if tc.posthoc_ema else None,
                   dist=dist, ddp=ddp)

    @classmethod
    def _sharded(cls, tc, model: nn.Module, loader: BatchLoader, prec: Precision,
                 dist: Dist) -> "TrainState":
        """train.parallel=fsdp: the EMA copied before sharding, then both sharded alike
        (their shards line up, so the average needs no communication)."""
        import copy

        from effusion.train import fsdp

        device = prec.device
        net, mem_format, notes = apply_switches(model, tc, None)
        ema = EMA(model, tc.ema_decay, tc.ema_warmup)
        plain = copy.deepcopy(ema.model) if dist.main else None
        fsdp.shard(model, dist, device)
        fsdp.shard(ema.model, dist, device)
        notes.append(f"FSDP2: weights, gradients and optimizer moments sharded over {dist.world} "
                     "ranks; checkpoints gathered to rank 0")
        return cls(model=model, net=net, ema=ema, optimizer=build_optimizer(model, tc),
                   scaler=prec.make_scaler(), loader=loader,
                   generator=torch.Generator().manual_seed(tc.seed + 1), device=device,
                   mem_format=mem_format, switch_notes=notes, dist=dist, fsdp=True, plain=plain)

    def averaged_model(self) -> nn.Module | None:
        """The EMA model to sample with: itself, or with FSDP its weights gathered into an
        unsharded copy on rank 0 (None on the other ranks). With FSDP every rank must call
        it (the gather is collective)."""
        if not self.fsdp:
            return self.ema.model
        from effusion.train import fsdp

        return fsdp.gathered_copy(self.ema.model, self.plain)

    # ------------------------------------------------------------------ round trip

    def state_dict(self, task_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Tensors by file (model, ema, optimizer, rng) plus a JSON-able `state`."""
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"images_seen": self.images_seen, "elapsed_s": self.elapsed_s,
                 "skipped_steps": self.skipped_steps, "ema_updates": self.ema.updates,
                 "data": self.loader.state_dict(), "task": task_state or {}}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.fsdp:  # gathered (collective): the layout of an unsharded run
            from effusion.train import fsdp

            sd = {"model": fsdp.full_state(self.model), "ema": fsdp.full_state(self.ema.model),
                  "optimizer": fsdp.full_optimizer_state(self.optimizer)}
        else:
            sd = {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                  "optimizer": self.optimizer.state_dict()}
        sd.update({"rng": rng, "state": {**state, "step": self.step}})
        if self.posthoc is not None:
            sd["posthoc"] = self.posthoc.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> dict[str, Any]:
        """Restore everything `state_dict` returned; gives back the task's own state."""
        state, rng = sd["state"], sd["rng"]
        saved, built = len(sd["optimizer"]["param_groups"]), len(self.optimizer.param_groups)
        if saved != built:
            raise CheckpointError(
                f"the checkpoint's optimizer has {saved} parameter groups, this version builds "
                f"{built} (a guidance input trains at its own learning rate since 2026-11; see "
                "UNet.lr_scales): resume with the version that wrote it, or start afresh "
                "(--fresh); its weights still load for sampling")
        if self.fsdp:  # full tensors in, each rank keeps its shard
            from effusion.train import fsdp

            fsdp.load_full_state(self.model, sd["model"])
            fsdp.load_full_state(self.ema.model, sd["ema"])
            self.ema.updates = state["ema_updates"]
            fsdp.load_full_optimizer_state(self.optimizer, sd["optimizer"])
        else:
            self.model.load_state_dict(sd["model"])
            self.ema.load_state_dict(sd["ema"], state["ema_updates"])
            self.optimizer.load_state_dict(sd["optimizer"])
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.loader.load_state_dict(state["data"])
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.elapsed_s, self.skipped_steps = state["elapsed_s"], state["skipped_steps"]
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.posthoc is not None:
            self.posthoc.load_state_dict(sd["posthoc"])
        return state.get("task", {})

    def save(self, run_dir: Path, keep: int, task_state: dict[str, Any] | None = None,
             write: bool = True) -> Path | None:
        """Write a checkpoint; with FSDP every rank calls it (the gather), and only the one
        with `write` (rank 0) writes."""
        sd = self.state_dict(task_state)
        if not write:
            return None
        state = dict(sd["state"])
        step = state.pop("step")
        extra = {"posthoc": sd["posthoc"]} if "posthoc" in sd else None
        return save_checkpoint(run_dir, step, model=sd["model"], ema=sd["ema"],
                               optimizer=sd["optimizer"], rng=sd["rng"], state=state, keep=keep,
                               extra=extra)

    def restore(self, ckpt: Path) -> dict[str, Any]:
        """Load a checkpoint directory; mismatched or corrupt files are CheckpointErrors
        (checked before anything is changed). Returns the task's own state."""
        weights = {}
        for name, module in (("model", self.model), ("ema", self.ema.model)):
            path = ckpt / f"{name}.safetensors"
            weights[name] = read_tensors(path)
            check_weights(weights[name], module, path)
        if self.posthoc is not None:
            path = ckpt / "posthoc.safetensors"
            if not path.is_file():
                raise CheckpointError(f"{ckpt} holds no post-hoc EMA averages ({path.name}): "
                                      "the run was started without train.posthoc_ema")
            weights["posthoc"] = read_tensors(path)
        state, opt_state, rng = load_checkpoint_state(ckpt)
        return self.load_state_dict({**weights, "optimizer": opt_state, "rng": rng,
                                     "state": state})
