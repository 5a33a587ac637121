"""`effusion optimize export`: a diffusion run's U-Net (EMA weights) as an ONNX graph run by
ONNX Runtime, written as a new run directory that `sample` and `evaluate` load unchanged.

The pass checks the exported graph against the eager network (max abs difference on a
fixed batch, fp32) and times both at batch 1, 8 and 64 on this machine; `report.json`
holds the figures and `config.yaml` the lineage.

With `int8=True` the graph is quantized statically: for ONNX Runtime by its tooling (QDQ
format, int8 weights per channel, uint8 activations, MinMax ranges), for OpenVINO by
NNCF's post-training quantization (OpenVINO's own: its mixed preset, per-channel weights,
fast bias correction; written as an OpenVINO IR beside the fp32 ONNX graph, which stays
the portable one). Both are calibrated on
what the network really sees when sampling, real training images noised at timesteps
spread over the whole schedule, with their labels (and the null class) and guidance
weights. Whether int8 is faster depends on the CPU's int8 dot-product instructions
(VNNI); the report measures it against the fp32 graph on this machine.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from effusion.config import ConfigError
from effusion.data import to_model_range
from effusion.models.exported import ONNX_HINT, import_onnxruntime, import_openvino, load_graph
from effusion.optimize.timing import latency_ms
from effusion.runs import CheckpointError, LoadedRun, load_run, read_lineage, write_config, write_json
from effusion.runs.files import ONNX_MODEL, OPENVINO_INT8, REPORT
from effusion.train.loop import load_training_data

FORMATS = {"onnx": "onnxruntime", "openvino": "openvino"}  # --format: the engine that runs it
FP32_TMP = "model-fp32.onnx.tmp"  # the graph before int8 quantization (removed after)
NNCF_HINT = ("OpenVINO int8 (NNCF post-training quantization) needs nncf: "
             "pip install 'effusion[openvino]'")


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


class _Half(nn.Module):
    """An fp16 copy of the U-Net behind fp32 inputs and output: x is cast on the way in and
    the prediction on the way out; the sinusoidal t and w embeddings stay fp32 (the U-Net
    computes them in fp32 before casting to x's dtype: fp16 cannot hold t * freq to the
    precision sin and cos need at t ~ 1000)."""

    def __init__(self, sig: _Signature):
        super().__init__()
        self.sig = sig.half()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                w: torch.Tensor | None = None):
        return self.sig(x.half(), t, cond, w).float()


def export_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path,
                fp16: bool = False) -> Path:
    """Export `model(x, t[, cond[, w]])` to ONNX with a dynamic batch dimension (opset 18);
    `fp16`: weights and activations in fp16, inputs and output still fp32."""
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        raise ConfigError(ONNX_HINT)  # the exporter needs both
    names = ["x", "t", "cond", "w"][:len(example)]
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {n: {0: batch} for n in names}
    sig = _Signature(model, len(example)).eval()
    if fp16:
        sig = _Half(copy.deepcopy(sig)).eval()
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


def calibration_feeds(run: LoadedRun, batches: int, batch: int = 16, seed: int = 0
                      ) -> list[dict[str, np.ndarray]]:
    """Network inputs as sampling produces them: the run's training images (or their VAE
    latents) noised at timesteps stratified over the schedule, with labels (10% null)
    and guidance weights in [1, 4] for a student that takes them."""
    data = load_training_data(run.config).train_set
    g = torch.Generator().manual_seed(seed)
    feeds, n = [], batches * batch
    idx = torch.randint(0, len(data), (n,), generator=g)
    x0 = to_model_range(data.images[idx])
    if run.vae is not None:
        x0 = run.vae.encode(x0)
    T = run.schedule.T
    t = ((torch.arange(n) + torch.rand(n, generator=g)) * T / n).long().clamp(max=T - 1)
    t = t[torch.randperm(n, generator=g)]
    x_t = run.schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    for i in range(0, n, batch):
        f = {"x": x_t[i:i + batch].numpy(), "t": t[i:i + batch].numpy()}
        if run.num_classes:
            c = data.labels[idx[i:i + batch]].clone()
            c[torch.rand(len(c), generator=g) < 0.1] = run.num_classes
            f["cond"] = c.numpy()
        if run.config.model.guidance_input:
            f["w"] = (1 + 3 * torch.rand(len(f["t"]), generator=g)).numpy()
        feeds.append(f)
    return feeds


def quantize_onnx_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """Static int8 quantization of an ONNX graph, calibrated on `feeds` (QDQ format)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    pre = dst.with_name(dst.name + ".pre")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the tooling's advice to do what is done here
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)  # shapes + folding
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    root.setLevel(level)
    pre.unlink()
    return dst


def quantize_openvino_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """NNCF post-training int8 of the ONNX graph `src` for OpenVINO, calibrated on `feeds`
    (every batch of them); written as the OpenVINO IR `dst` (.xml, weights in .bin)."""
    try:
        import nncf
    except ImportError:
        raise ConfigError(NNCF_HINT) from None
    ov = import_openvino()
    model = ov.Core().read_model(str(src))
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        q = nncf.quantize(model, nncf.Dataset(feeds), preset=nncf.QuantizationPreset.MIXED,
                          subset_size=len(feeds), fast_bias_correction=True)
    nncf_log.setLevel(level)
    ov.save_model(q, str(dst), compress_to_fp16=False)
    return dst


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str = "onnx",
               repeats: int = 10, int8: bool = False, calib_batches: int = 16,
               fp16: bool = False) -> dict[str, Any]:
    """Export a diffusion run and write `out_dir` as a run directory; returns the report.
    `int8`: quantize the graph statically, calibrated on `calib_batches` batches of 16.
    `fp16` (ONNX): an fp16 graph for GPUs (ONNX Runtime's CUDA or TensorRT execution
    provider); it runs on CPUs too, but CPUs have no fast fp16 arithmetic (the report
    times it against the fp32 graph on this machine)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    if fp16 and int8:
        raise ConfigError("--fp16 and --int8 are two different graphs: choose one")
    if fp16 and fmt != "onnx":
        raise ConfigError("--fp16 is an ONNX graph for ONNX Runtime on GPUs; OpenVINO picks "
                          "its own inference precision per device (use --format onnx --fp16)")
    engine = FORMATS[fmt]
    import_onnxruntime()  # the exporter's check and int8 tooling
    if engine == "openvino":
        import_openvino()
        if int8 and importlib.util.find_spec("nncf") is None:
            raise ConfigError(NNCF_HINT)
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run_dir.resolve():
        raise CheckpointError("the exported run needs its own directory (--out)")
    src = load_run(run_dir, device="cpu", precision="fp32")
    if not isinstance(src.model, nn.Module):
        raise CheckpointError(f"{run_dir} is already an exported run")
    model = src.model.float().to(memory_format=torch.contiguous_format).eval()
    out.mkdir(parents=True, exist_ok=True)
    nncf_int8 = int8 and engine == "openvino"
    reduced = int8 or fp16  # a graph timed against the fp32 one
    fp32_path = out / (FP32_TMP if reduced and not nncf_int8 else ONNX_MODEL)
    export_onnx(model, example_inputs(src, 2), fp32_path)
    graph, how = out / ONNX_MODEL, "static, QDQ, calibrated"
    if fp16:
        export_onnx(model, example_inputs(src, 2), graph, fp16=True)
    elif nncf_int8:
        graph, how = out / OPENVINO_INT8, "NNCF post-training, mixed preset, calibrated"
        quantize_openvino_int8(fp32_path, graph, calibration_feeds(src, calib_batches))
    elif int8:
        quantize_onnx_int8(fp32_path, graph, calibration_feeds(src, calib_batches))
    lineage = read_lineage(run_dir) + [{"pass": "export", "base": str(run_dir.resolve()),
                                        "format": "onnx", "engine": engine, "step": src.step,
                                        **({"int8": how} if int8 else {}),
                                        **({"fp16": True} if fp16 else {})}]
    write_config(out, src.config, lineage)  # a latent run's VAE stays eager (model.vae)
    net = load_graph(graph, engine)
    check = example_inputs(src, 8, seed=1)
    kw = {"w": check[3]} if len(check) == 4 else {}
    with torch.no_grad():
        diff = (net(*check[:3], **kw) - model(*check[:3], **kw)).abs().max().item()
    report: dict[str, Any] = {"source": str(run_dir), "format": "onnx", "engine": engine,
                              "opset": 18,
                              "int8": how if int8 else False, "fp16": fp16,
                              "max_abs_diff_fp32": diff,
                              "bytes": _graph_bytes(graph),
                              "threads": torch.get_num_threads(), "latency_ms": {}}
    fp32_net = load_graph(fp32_path, engine) if reduced else None
    if reduced:
        report["bytes_fp32_graph"] = _graph_bytes(fp32_path)
        report["max_abs_diff_note"] = (f"{'int8' if int8 else 'fp16'} graph against the "
                                       "eager fp32 network")
    for b in (1, 8, 64):
        inputs = example_inputs(src, b)
        eager = latency_ms(model, *inputs, repeats=repeats)
        ort = latency_ms(net, *inputs, repeats=repeats)
        report["latency_ms"][str(b)] = {"eager_fp32": eager, "engine": ort,
                                        "speedup": eager / ort}
        if fp32_net is not None:
            report["latency_ms"][str(b)]["engine_fp32"] = latency_ms(fp32_net, *inputs,
                                                                     repeats=repeats)
    if reduced and not nncf_int8:
        fp32_path.unlink()  # (NNCF's run keeps its fp32 ONNX graph as the portable one)
    write_json(out / REPORT, report)
    return report


def _graph_bytes(path: Path) -> int:
    """Size on disk of a graph: an ONNX file, or an OpenVINO IR (.xml and its .bin)."""
    return sum(p.stat().st_size for p in (path, path.with_suffix(".bin")) if p.is_file())
