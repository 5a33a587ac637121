"""Run directories and checkpoints: safetensors for tensors, JSON for everything else.

Layout of a checkpoint (written to `step-NNNNNNN.tmp/`, then renamed, so a crash never
leaves a half-written checkpoint where resume would find it):

    checkpoints/step-0001000/
        model.safetensors      training weights
        ema.safetensors        EMA weights
        optimizer.safetensors  optimizer tensors (flattened), param groups in state.json
        rng.safetensors        torch CPU/CUDA RNG and the training generator's state
        state.json             step, images seen, data position, elapsed time, ...
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from effusion.config import Config, ConfigError, config_from_dict

CKPT_DIR = "checkpoints"


class CheckpointError(ConfigError):
    """A run directory or checkpoint that cannot be used (missing, corrupt, mismatched)."""


def write_config(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / "config.yaml", cfg.to_yaml())


def read_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoints, oldest first (temporary `.tmp` directories are ignored)."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and not p.name.endswith(".tmp") and (p / "state.json").is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest.

    Keys are "param_index.name"; nested dicts (bitsandbytes packs its quantisation state
    into one) continue the key with "/": "3.__bnb_optimizer_quant_state__/state1"."""
    tensors, scalars, seen = {}, {}, set()

    def put(key: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            # safetensors refuses shared storage (bitsandbytes shares its quantisation maps)
            tensors[key] = t.clone() if ptr in seen else t
            seen.add(ptr)
        elif isinstance(v, dict):
            for k, sub in v.items():
                put(f"{key}/{k}", sub)
        else:
            scalars[key] = v

    for idx, pstate in state["state"].items():
        for name, v in pstate.items():
            put(f"{idx}.{name}", v)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, path = key.split(".", 1)
        *parents, name = path.split("/")
        node = state.setdefault(int(idx), {})
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module,
                    ema: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    rng: dict[str, torch.Tensor], state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically and delete all but the newest `keep`."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    save_file(cpu(model.state_dict()), tmp / "model.safetensors")
    save_file(cpu(ema), tmp / "ema.safetensors")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file(cpu(rng), tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_meta},
                                               indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load a safetensors state dict into `model`, with a clear error on mismatch."""
    try:
        sd = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read weights {path}: {e}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape_bad = [k for k in set(own) & set(sd) if own[k].shape != sd[k].shape]
    if missing or unexpected or shape_bad:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if shape_bad:
            k = shape_bad[0]
            detail.append(f"{len(shape_bad)} shape mismatches (e.g. {k}: checkpoint "
                          f"{tuple(sd[k].shape)} vs model {tuple(own[k].shape)})")
        raise CheckpointError(f"checkpoint {path} does not match this model: " + "; ".join(detail)
                              + ". Was it written by a run with a different model config?")
    model.load_state_dict(sd)


def load_checkpoint_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any],
                                                dict[str, torch.Tensor]]:
    """(state.json contents, optimizer state_dict, rng tensors) of a checkpoint."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        opt = _unflatten_optimizer(load_file(str(ckpt / "optimizer.safetensors")),
                                   state.pop("optimizer"))
        rng = load_file(str(ckpt / "rng.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or corrupt: {e}") from None
    return state, opt, rng
