"""The run-directory format, read and written in one place: config (with the lineage of
an optimized variant), checkpoints, metrics. Safetensors for tensors, JSON or YAML for
everything else; every file is written to a temporary name and renamed into place.

    RUN/config.yaml            the full resolved config (+ `lineage:` for a derived run)
    RUN/metrics.jsonl          one JSON object per logged step
    RUN/vae.json               a finished VAE: latent scale factor, PSNR, latent shape
    RUN/quantized.safetensors  an int8 classifier written by `effusion classifier quantize`
    RUN/model.onnx             an exported U-Net (`effusion optimize export`), instead of checkpoints
    RUN/report.json            what an optimization pass changed, measured
    RUN/narrowed.json          the U-Net width the config asked for and the one a slow
                               machine trained instead (train.budget_min_steps)
    RUN/runtime.json           what really ran: device, precision and why, threads, whether
                               torch.compile worked (config.yaml holds what was asked)

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
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from effusion.config import Config, ConfigError, config_from_dict
from effusion.fileio import write_file

CKPT_DIR = "checkpoints"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
VAE_INFO = "vae.json"
QUANTIZED_WEIGHTS = "quantized.safetensors"  # int8 Linear layers (classifiers, diffusion)
BF16_WEIGHTS = "weights-bf16.safetensors"  # a diffusion run's weights stored in bf16
REPORT = "report.json"
ONNX_MODEL = "model.onnx"
OPENVINO_INT8 = "openvino-int8.xml"  # export --format openvino --int8: NNCF int8 IR (+ .bin)
RUNTIME = "runtime.json"
NARROWED = "narrowed.json"


class CheckpointError(ConfigError):
    """A run directory or checkpoint that cannot be used (missing, corrupt, mismatched)."""


def atomic_write(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename, so a reader (or a crash)
    never sees half a file; creates the folder (`effusion.fileio.write_file`)."""
    return write_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=1))


def write_config(run_dir: Path, cfg: Config, lineage: list[dict[str, Any]] | None = None) -> None:
    """The run's resolved config; a derived run (distilled, pruned, quantized...) also records
    its lineage: the base run and each pass with its settings, oldest first."""
    text = cfg.to_yaml()
    if lineage:
        text += yaml.safe_dump({"lineage": lineage}, sort_keys=False)
    atomic_write(Path(run_dir) / CONFIG, text)


def update_runtime(run_dir: str | Path, values: dict[str, Any], reset: bool = False) -> None:
    """Merge `values` into RUN/runtime.json (`reset`: start it over)."""
    path = Path(run_dir) / RUNTIME
    current: dict[str, Any] = {}
    if not reset and path.is_file():
        try:
            current = json.loads(path.read_text())
        except ValueError:
            current = {}
    write_json(path, {**current, **values})


def _read_config_yaml(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG})")
    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path} is not readable YAML: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a config mapping")
    return d


def read_config(run_dir: str | Path) -> Config:
    d = _read_config_yaml(run_dir)
    d.pop("lineage", None)
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise CheckpointError(f"{Path(run_dir) / CONFIG}: {e}") from None


def read_lineage(run_dir: str | Path) -> list[dict[str, Any]]:
    """The passes that made this run from another ([] for a trained run)."""
    lineage = _read_config_yaml(run_dir).get("lineage") or []
    if not isinstance(lineage, list):
        raise CheckpointError(f"{Path(run_dir) / CONFIG}: lineage must be a list of passes")
    return lineage


def lineage_step(lineage: list[dict[str, Any]]) -> int:
    """The training step a derived run without checkpoints (an export) stands at: its
    latest pass's record of the base run's step (0 if none says)."""
    return next((int(p["step"]) for p in reversed(lineage) if "step" in p), 0)


def parse_lines(text: str) -> list[dict[str, Any]]:
    """JSON Lines; a line cut short (a process killed mid-write) is left out."""
    out = []
    for ln in text.splitlines():
        if ln.strip():
            try:
                out.append(json.loads(ln))
            except ValueError:
                continue
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return parse_lines(path.read_text())


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint directory (or a sample grid) named `step-NNNNNNN[.ext]`."""
    name = Path(path).name.split(".")[0]
    try:
        return int(name.split("-", 1)[1])
    except (IndexError, ValueError):
        raise CheckpointError(f"{path} is not named step-NNNNNNN") from None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoints, oldest first (`.tmp` ones being written and `.old` ones being
    deleted are ignored)."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and "." not in p.name and (p / "state.json").is_file())


CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors",
                    "rng.safetensors")


def verify_checkpoint(ckpt: Path) -> None:
    """Check that every file of a checkpoint is whole: state.json parses, and each
    safetensors header is complete and covers its file exactly (what a cut-short copy or a
    full disk breaks; the tensor bytes themselves are read only when loaded). A missing,
    truncated or corrupt file is a CheckpointError naming it."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
            raise ValueError("state.json lacks step or optimizer")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: state.json: {e}") from None
    for name in CHECKPOINT_FILES:
        try:
            with safe_open(str(ckpt / name), "pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot read weights {ckpt / name}: {e}") from None


def warn(message: str) -> None:
    print(f"effusion: warning: {message}", file=sys.stderr, flush=True)


def latest_checkpoint(run_dir: str | Path, verify: bool = True) -> Path | None:
    """The newest checkpoint that reads back whole. A corrupt or truncated one (a disk
    that filled up, a copy cut short) is skipped with a warning naming it, and the one
    before is used; None if there is none."""
    ckpts = list_checkpoints(run_dir)
    if not verify:
        return ckpts[-1] if ckpts else None
    for ckpt in reversed(ckpts):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CheckpointError as e:
            warn(f"checkpoint {ckpt.name} is corrupt or truncated, skipped"
                 + (" (using the one before)" if ckpt != ckpts[0] else "") + f": {e}")
    return None


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


def save_checkpoint(run_dir: str | Path, step: int, *, model: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor], optimizer: dict[str, Any],
                    rng: dict[str, torch.Tensor], state: dict[str, Any], keep: int,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint atomically and delete all but the newest `keep`. `model`, `ema`
    and `optimizer` are state_dicts; `extra` maps more file stems to tensors (the
    post-hoc EMA averages: `posthoc`)."""
    root = Path(run_dir) / CKPT_DIR
    final = root / checkpoint_name(step)
    tmp = root / (checkpoint_name(step) + ".tmp")
    _remove_leftovers(root)  # an earlier save cut short must not block the renames below
    tmp.mkdir(parents=True)

    def cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    save_file(cpu(model), tmp / "model.safetensors")
    save_file(cpu(ema), tmp / "ema.safetensors")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file(cpu(rng), tmp / "rng.safetensors")
    for stem, tensors in (extra or {}).items():
        save_file(cpu(tensors), tmp / f"{stem}.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_meta},
                                               indent=1))
    if final.exists():  # the same step saved again: move the old one aside first
        os.replace(final, final.with_name(final.name + ".old"))
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        # Renamed before it is deleted, so a crash mid-delete never leaves a half-deleted
        # checkpoint where a resume would look.
        os.replace(old, old.with_name(old.name + ".old"))
    _remove_leftovers(root, ".old")
    return final


def _remove_leftovers(root: Path, *suffixes: str) -> None:
    """Delete `step-*` folders with these suffixes (default: `.tmp` and `.old`): checkpoints
    being written or deleted when a process stopped."""
    if root.is_dir():
        for junk in root.iterdir():
            if junk.name.startswith("step-") and junk.suffix in (suffixes or (".tmp", ".old")):
                shutil.rmtree(junk, ignore_errors=True)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing or truncated file is a CheckpointError."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read weights {path}: {e}") from None


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load a safetensors state dict into `model`, with a clear error on mismatch."""
    sd = read_tensors(path)
    check_weights(sd, model, path)
    model.load_state_dict(sd)


def check_weights(sd: dict[str, torch.Tensor], model: torch.nn.Module, path: Path) -> None:
    """Raise a CheckpointError naming what differs if `sd` does not fit `model`."""
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
