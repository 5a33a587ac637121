"""The int8 pass for classifiers: dynamic quantization of the Linear layers, written as a
new run directory that `effusion.runs` loads like any classifier run.

The quantized module and its tensors are `effusion.models.quantized`; this pass measures
what it changed (bytes, latency, held-out accuracy) and records it in `report.json`,
with the lineage (base run, pass, settings) in the new run's config.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from effusion.config import ConfigError
from effusion.data import load_source, split, to_model_range
from effusion.models.quantized import quantize_model, quantized_linears, quantized_tensors
from effusion.optimize.timing import latency_ms
from effusion.runs import (CheckpointError, LoadedClassifier, latest_checkpoint, load_classifier,
                           read_lineage, write_config, write_json)
from effusion.runs import is_pruned, load_run
from effusion.runs.files import BF16_WEIGHTS, QUANTIZED_WEIGHTS, REPORT

METHOD = "dynamic int8 (torch.ao), Linear layers"


def _accuracy(clf: LoadedClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, probs = clf.predict(images)
    return float((probs.argmax(1) == labels).double().mean())


def quantize_classifier(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Quantize a classifier run's Linear layers to int8 and write a new run directory.

    Reports model bytes (safetensors file size), median latency per batch of 256 and
    held-out accuracy, before and after; the report is also `OUT/report.json`.
    """
    src = load_classifier(run_dir)
    if src.quantized:
        raise CheckpointError(f"{run_dir} is already quantized")
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir.with_name(run_dir.name + "-int8")
    if out.resolve() == run_dir.resolve():
        raise CheckpointError("the quantized run needs its own directory (--out)")
    _, val = split(load_source(src.config.data), src.config.data.val_fraction)
    if val is None or val.labels is None:
        raise CheckpointError(f"{run_dir} has no held-out split to measure accuracy on")

    qmodel = quantize_model(src.model)
    lineage = read_lineage(run_dir) + [{"pass": "quantize", "base": str(run_dir.resolve()),
                                        "method": METHOD}]
    out.mkdir(parents=True, exist_ok=True)
    save_file(quantized_tensors(qmodel, src.model), str(out / QUANTIZED_WEIGHTS))
    write_config(out, src.config, lineage)
    dst = load_classifier(out)  # what a user of the new run gets, not the in-memory model

    x = to_model_range(val.images[:256])
    if x.shape[0] < 256:
        x = x.repeat((256 + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:256]
    report = {
        "source": str(run_dir), "method": METHOD,
        "linear_layers": sorted(quantized_linears(qmodel)),
        "bytes_fp32": (latest_checkpoint(run_dir) / "ema.safetensors").stat().st_size,
        "bytes_int8": (out / QUANTIZED_WEIGHTS).stat().st_size,
        "latency_ms_per_256_fp32": latency_ms(src.model, x, repeats=15, warmup=3),
        "latency_ms_per_256_int8": latency_ms(dst.model, x, repeats=15, warmup=3),
        "val_acc_fp32": _accuracy(src, val.images, val.labels),
        "val_acc_int8": _accuracy(dst, val.images, val.labels),
        "val_images": len(val), "threads": torch.get_num_threads(),
    }
    write_json(out / REPORT, report)
    return report


# --------------------------------------------------------------------------- diffusion runs

DIFFUSION_METHODS = ("dynamic-int8", "bf16-weights", "static-int8")


def _prediction_error(ref: torch.nn.Module, other: Any, feeds: list[dict[str, Any]]) -> float:
    """Mean |other - ref| / mean |ref| of the network's output over calibration inputs
    (the run's training images noised across the schedule, with labels)."""
    num = den = 0.0
    with torch.no_grad():
        for f in feeds:
            args = [torch.from_numpy(f["x"]), torch.from_numpy(f["t"])]
            args.append(torch.from_numpy(f["cond"]) if "cond" in f else None)
            kw = {"w": torch.from_numpy(f["w"])} if "w" in f else {}
            a, b = ref(*args, **kw), other(*args, **kw)
            num += float((b - a).abs().sum())
            den += float(a.abs().sum())
    return num / max(den, 1e-12)


def quantize_run(run_dir: str | Path, out_dir: str | Path, method: str = "dynamic-int8",
                 fmt: str = "onnx", calib_batches: int = 16) -> dict[str, Any]:
    """Quantize a diffusion run into a new run directory that `load_run` loads.

    - `dynamic-int8`: the U-Net's Linear layers (time and guidance embeddings, each block's
      embedding projection) stored and run as int8 with per-batch activation scales
      (torch.ao); its convolutions, which hold nearly all the compute, stay fp32.
    - `bf16-weights`: every weight stored in bf16 (half the bytes) and upcast on load; the
      arithmetic is the run's precision as before.
    - `static-int8`: every convolution too, calibrated on the run's own noisy training
      images across timesteps: the graph is exported and quantized for an inference engine
      (`fmt`: onnx = ONNX Runtime, openvino) - the same pass as `optimize export --int8`.

    Reports bytes, the share of parameters quantized, per-call latency at batch 1/8/64
    against the base, and the relative error of the network's output over the calibration
    inputs (`prediction_rel_error`).
    """
    from effusion.optimize.export import calibration_feeds, example_inputs, export_run

    if method not in DIFFUSION_METHODS:
        raise ConfigError(f"--method {method!r}: choose {', '.join(DIFFUSION_METHODS)}")
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run_dir.resolve():
        raise CheckpointError("the quantized run needs its own directory (--out)")
    if method == "static-int8":
        report = export_run(run_dir, out, fmt=fmt, int8=True, calib_batches=calib_batches)
        return {"method": method, **report}
    src = load_run(run_dir, device="cpu", precision="fp32")
    if not isinstance(src.model, torch.nn.Module):
        raise CheckpointError(f"{run_dir} is an exported graph; quantize the run it was "
                              "exported from (or export it with --int8)")
    if any(p.get("pass") == "quantize" for p in src.lineage):
        raise CheckpointError(f"{run_dir} is already quantized")
    if is_pruned(src.lineage):
        raise CheckpointError(f"{run_dir} is pruned: quantize it with --method static-int8 "
                              "(export), which takes any network shape")
    model = src.model.float().eval()
    lineage = src.lineage + [{"pass": "quantize", "base": str(run_dir.resolve()),
                              "method": method, "step": src.step}]
    out.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() for p in model.parameters())
    if method == "dynamic-int8":
        qmodel = quantize_model(model)
        lin = quantized_linears(qmodel)
        if not lin:
            raise CheckpointError(f"{run_dir}'s network has no Linear layers to quantize")
        path = out / QUANTIZED_WEIGHTS
        save_file(quantized_tensors(qmodel, model), str(path))
        share = sum(m.weight().numel() for m in lin.values()) / total
        layers = sorted(lin)
    else:
        path = out / BF16_WEIGHTS
        save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
                   for k, v in model.state_dict().items()}, str(path))
        share, layers = 1.0, ["all"]
    write_config(out, src.config, lineage)
    dst = load_run(out, device="cpu", precision="fp32")  # what a user of the new run gets
    feeds = calibration_feeds(src, calib_batches)
    report: dict[str, Any] = {
        "source": str(run_dir), "method": method, "layers": layers,
        "params_quantized_share": round(share, 4),
        "bytes_base": (latest_checkpoint(run_dir) / "ema.safetensors").stat().st_size,
        "bytes": path.stat().st_size,
        "prediction_rel_error": _prediction_error(model, dst.model, feeds),
        "threads": torch.get_num_threads(), "latency_ms": {}}
    for b in (1, 8, 64):
        inputs = example_inputs(src, b)
        base, new = latency_ms(model, *inputs), latency_ms(dst.model, *inputs)
        report["latency_ms"][str(b)] = {"base": base, "quantized": new, "speedup": base / new}
    write_json(out / REPORT, report)
    return report
