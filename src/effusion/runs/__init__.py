"""Run directories: the one place that reads them back, and the format they are written in.

    from effusion.runs import load, load_run
    run = load_run("runs/demo")          # a diffusion run: model, schedule, Denoiser
    anything = load("runs/classifier")   # whatever kind the directory holds
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effusion.config import Config
from effusion.models import count_params
from effusion.runs.files import (CheckpointError, atomic_write, checkpoint_name, checkpoint_step,
                                 latest_checkpoint, lineage_step, list_checkpoints, load_weights,
                                 read_config, read_lineage, read_metrics, read_tensors,
                                 write_config, write_json)
from effusion.runs.loaded import (Kind, LoadedClassifier, LoadedRun, LoadedVAE, build_run_model,
                                  inference_precision, is_pruned, kind_of, load, load_classifier,
                                  load_run, load_vae)


@dataclass
class RunInfo:
    """What a run directory holds, without loading its weights."""

    run_dir: Path
    config: Config
    kind: Kind
    params: int
    checkpoints: list[str]
    step: int
    lineage: list[dict[str, Any]]
    last_metrics: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {"run": str(self.run_dir), "kind": self.kind, "params": self.params,
                "checkpoints": self.checkpoints, "step": self.step, "lineage": self.lineage,
                "last_metrics": self.last_metrics, "config": self.config.to_dict()}


def describe(run_dir: str | Path) -> RunInfo:
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    ckpts = list_checkpoints(run_dir)
    metrics = read_metrics(run_dir)
    lineage = read_lineage(run_dir)
    # a derived run without checkpoints (an export) is at its base run's step
    step = checkpoint_step(ckpts[-1]) if ckpts else lineage_step(lineage)
    if is_pruned(lineage) and ckpts:  # its widths are in its weights, not its config
        params = sum(v.numel() for v in read_tensors(ckpts[-1] / "ema.safetensors").values())
    else:
        params = count_params(build_run_model(cfg))
    return RunInfo(run_dir, cfg, kind_of(cfg), params,
                   [p.name for p in ckpts], step, lineage, metrics[-1] if metrics else None)


__all__ = ["CheckpointError", "Kind", "LoadedClassifier", "LoadedRun", "LoadedVAE", "RunInfo",
           "atomic_write", "build_run_model", "checkpoint_name", "checkpoint_step", "describe",
           "inference_precision", "is_pruned", "kind_of", "latest_checkpoint", "list_checkpoints", "load",
           "load_classifier", "load_run", "load_vae", "load_weights", "read_config",
           "read_lineage", "read_metrics", "read_tensors", "write_config", "write_json"]
