"""Dynamic int8 quantization of a classifier's Linear layers (torch.ao), stored in
safetensors (never pickle).

Dynamic quantization stores Linear weights as int8 with a scale and zero point and
quantizes activations on the fly per batch; convolutions stay fp32. PyTorch marks its
eager-mode quantization API as deprecated in favour of torchao, but it is still the one
that runs on every CPU build with no extra install; its warnings are silenced here.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from effusion.config import Config
from effusion.models import build_model

_SUFFIXES = ("weight_int8", "weight_scale", "weight_zero_point", "weight_axis")


def _quantize_dynamic(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}


def quantize_model(model: nn.Module) -> nn.Module:
    """An int8-dynamic copy of a float model (the original is left untouched)."""
    import copy

    return _quantize_dynamic(copy.deepcopy(model).eval())


def save_quantized(qmodel: nn.Module, float_model: nn.Module, path: Path) -> None:
    """Float tensors of everything but the Linear layers, plus each Linear's int8 weight,
    quantization parameters and fp32 bias."""
    qlin = _quantized_linears(qmodel)
    tensors = {k: v.detach().contiguous() for k, v in float_model.state_dict().items()
               if k.rsplit(".", 1)[0] not in qlin}
    for name, m in qlin.items():
        w, b = m.weight(), m.bias()
        tensors[f"{name}.weight_int8"] = w.int_repr().contiguous()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            tensors[f"{name}.weight_scale"] = w.q_per_channel_scales().double()
            tensors[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().long()
            tensors[f"{name}.weight_axis"] = torch.tensor(w.q_per_channel_axis())
        else:
            tensors[f"{name}.weight_scale"] = torch.tensor(w.q_scale(), dtype=torch.float64)
            tensors[f"{name}.weight_zero_point"] = torch.tensor(w.q_zero_point())
        if b is not None:
            tensors[f"{name}.bias"] = b.detach().contiguous()
    save_file(tensors, str(path))


def load_quantized(cfg: Config, path: Path) -> nn.Module:
    """Rebuild the int8-dynamic model saved by `save_quantized` (bit-exact weights)."""
    from effusion.train.checkpoint import CheckpointError

    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"cannot read quantized weights {path}: {e}") from None
    model = build_model(cfg).eval()
    float_part = {k: v for k, v in tensors.items() if not k.endswith(_SUFFIXES)}
    qnames = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_int8")}
    float_part = {k: v for k, v in float_part.items() if k.rsplit(".", 1)[0] not in qnames}
    missing, unexpected = model.load_state_dict(float_part, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in qnames]
    if missing or unexpected:
        raise CheckpointError(f"quantized weights {path} do not match the run's model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    qmodel = _quantize_dynamic(model)
    qlin = _quantized_linears(qmodel)
    if set(qlin) != qnames:
        raise CheckpointError(f"quantized weights {path} hold Linear layers {sorted(qnames)} "
                              f"but the model has {sorted(qlin)}")
    for name, m in qlin.items():
        q, scale, zp = (tensors[f"{name}.weight_int8"], tensors[f"{name}.weight_scale"],
                        tensors[f"{name}.weight_zero_point"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if f"{name}.weight_axis" in tensors:
                w = torch._make_per_channel_quantized_tensor(
                    q, scale, zp, int(tensors[f"{name}.weight_axis"]))
            else:
                w = torch._make_per_tensor_quantized_tensor(q, float(scale), int(zp))
            m.set_weight_bias(w, tensors.get(f"{name}.bias"))
    return qmodel


def _latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 15) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def quantize_classifier(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Quantize a classifier run's Linear layers to int8 and write a new run directory.

    Reports model bytes (safetensors file size), median latency per batch of 256 and
    held-out accuracy, before and after; the report is also `OUT/report.json`.
    """
    from effusion.classify import QUANTIZED_WEIGHTS, load_classifier
    from effusion.data import load_source, split, to_model_range
    from effusion.train.checkpoint import CheckpointError, latest_checkpoint

    src = load_classifier(run_dir)
    if src.quantized:
        raise CheckpointError(f"{run_dir} is already quantized")
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir.with_name(run_dir.name + "-int8")
    if out.resolve() == run_dir.resolve():
        raise CheckpointError("the quantized run needs its own directory (--out)")
    qmodel = quantize_model(src.model)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / "config.yaml", out / "config.yaml")
    save_quantized(qmodel, src.model, out / QUANTIZED_WEIGHTS)

    _, val = split(load_source(src.config.data), src.config.data.val_fraction)
    if val is None or val.labels is None:
        raise CheckpointError(f"{run_dir} has no held-out split to measure accuracy on")
    dst = load_classifier(out)  # what a user of the new run gets, not the in-memory model

    def accuracy(lc) -> float:
        _, probs = lc.predict(val.images)
        return float((probs.argmax(1) == val.labels).double().mean())

    x = to_model_range(val.images[:256])
    if x.shape[0] < 256:
        x = x.repeat((256 + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:256]
    fp32_bytes = (latest_checkpoint(run_dir) / "ema.safetensors").stat().st_size
    report = {
        "source": str(run_dir), "method": "dynamic int8 (torch.ao), Linear layers",
        "linear_layers": sorted(_quantized_linears(qmodel)),
        "bytes_fp32": fp32_bytes, "bytes_int8": (out / QUANTIZED_WEIGHTS).stat().st_size,
        "latency_ms_per_256_fp32": _latency_ms(src.model, x),
        "latency_ms_per_256_int8": _latency_ms(dst.model, x),
        "val_acc_fp32": accuracy(src), "val_acc_int8": accuracy(dst),
        "val_images": len(val), "threads": torch.get_num_threads(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report
