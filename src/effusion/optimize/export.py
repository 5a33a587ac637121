"""`effusion optimize export`: a diffusion run's U-Net (EMA weights) as an ONNX graph run by
ONNX Runtime, written as a new run directory that `sample` and `evaluate` load unchanged.

The pass checks the exported graph against the eager network (max abs difference on a
fixed batch, fp32) and times both at batch 1, 8 and 64 on this machine; `report.json`
holds the figures and `config.yaml` the lineage.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from effusion.config import ConfigError
from effusion.models.exported import ONNX_HINT, OnnxNetwork, import_onnxruntime
from effusion.optimize.timing import latency_ms
from effusion.runs import CheckpointError, LoadedRun, load_run, read_lineage, write_config, write_json
from effusion.runs.files import ONNX_MODEL, REPORT


class _Signature(nn.Module):
    """The U-Net with the inputs the graph takes, all required: (x, t), (x, t, cond), or
    (x, t, cond, w) for a guidance-distilled student."""

    def __init__(self, unet: nn.Module, n_inputs: int):
        super().__init__()
        self.unet, self.n_inputs = unet, n_inputs

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                w: torch.Tensor | None = None):
        if self.n_inputs == 4:
            return self.unet(x, t, cond, w=w)
        return self.unet(x, t, cond if self.n_inputs == 3 else None)


def example_inputs(run: LoadedRun, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random network inputs for `run` at `batch`: (x, t[, cond[, w]]), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    shape = run.vae.latent_shape if run.vae else (run.config.data.channels,
                                                  run.config.data.image_size,
                                                  run.config.data.image_size)
    x = torch.randn((batch, *shape), generator=g)
    t = torch.randint(0, run.schedule.T, (batch,), generator=g)
    if not run.num_classes:
        return x, t
    cond = torch.randint(0, run.num_classes + 1, (batch,), generator=g)
    if not run.config.model.guidance_input:
        return x, t, cond
    return x, t, cond, 1 + 3 * torch.rand(batch, generator=g)  # guidance weights


def export_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """Export `model(x, t[, cond])` to ONNX with a dynamic batch dimension (opset 18)."""
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        raise ConfigError(ONNX_HINT)  # the exporter needs both
    names = ["x", "t", "cond", "w"][:len(example)]
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {n: {0: batch} for n in names}
    sig = _Signature(model, len(example)).eval()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping ..."
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter
        torch.onnx.export(sig, example, str(path), input_names=names, output_names=["out"],
                          dynamic_shapes=dynamic, opset_version=18, dynamo=True,
                          external_data=False)
    quiet.setLevel(level)
    return path


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str = "onnx",
               repeats: int = 10) -> dict[str, Any]:
    """Export a diffusion run and write `out_dir` as a run directory; returns the report."""
    if fmt != "onnx":
        raise ConfigError(f"--format {fmt!r}: only onnx is built so far (OpenVINO is not)")
    import_onnxruntime()
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run_dir.resolve():
        raise CheckpointError("the exported run needs its own directory (--out)")
    src = load_run(run_dir, device="cpu", precision="fp32")
    if not isinstance(src.model, nn.Module):
        raise CheckpointError(f"{run_dir} is already an exported run")
    model = src.model.float().to(memory_format=torch.contiguous_format).eval()
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, example_inputs(src, 2), out / ONNX_MODEL)
    lineage = read_lineage(run_dir) + [{"pass": "export", "base": str(run_dir.resolve()),
                                        "format": "onnx", "step": src.step}]
    write_config(out, src.config, lineage)  # a latent run's VAE stays eager (model.vae)
    net = OnnxNetwork(out / ONNX_MODEL)
    check = example_inputs(src, 8, seed=1)
    kw = {"w": check[3]} if len(check) == 4 else {}
    with torch.no_grad():
        diff = (net(*check[:3], **kw) - model(*check[:3], **kw)).abs().max().item()
    report: dict[str, Any] = {"source": str(run_dir), "format": "onnx", "opset": 18,
                              "max_abs_diff_fp32": diff, "bytes": (out / ONNX_MODEL).stat().st_size,
                              "threads": torch.get_num_threads(), "latency_ms": {}}
    for b in (1, 8, 64):
        inputs = example_inputs(src, b)
        eager = latency_ms(model, *inputs, repeats=repeats)
        ort = latency_ms(net, *inputs, repeats=repeats)
        report["latency_ms"][str(b)] = {"eager_fp32": eager, "onnxruntime": ort,
                                        "speedup": eager / ort}
    write_json(out / REPORT, report)
    return report
