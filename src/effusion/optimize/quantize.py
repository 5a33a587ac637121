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

from effusion.data import load_source, split, to_model_range
from effusion.models.quantized import quantize_model, quantized_linears, quantized_tensors
from effusion.optimize.timing import latency_ms
from effusion.runs import (CheckpointError, LoadedClassifier, latest_checkpoint, load_classifier,
                           read_lineage, write_config, write_json)
from effusion.runs.files import QUANTIZED_WEIGHTS, REPORT

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
