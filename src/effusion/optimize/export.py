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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from effusion.config import ConfigError
from effusion.data import to_model_range
from effusion.models.exported import ONNX_HINT, import_onnxruntime, import_openvino, load_graph
from effusion.optimize.timing import latency_ms
from effusion.runs import (CheckpointError, LoadedRun, latest_checkpoint, load_run, read_lineage,
                          write_config, write_json)
from effusion.runs.files import ONNX_MODEL, OPENVINO_INT8, REPORT
from effusion.train.loop import load_training_data

FORMATS = {"onnx": "onnxruntime", "openvino": "openvino"}  # --format: the engine that runs it
AUTO = "auto"  # --format auto: time every engine here, keep the fastest within the tolerance
# --format auto's tolerance: the relative RMS error of a candidate's output against eager
# fp32 on a fixed batch, ||out - ref|| / ||ref||. bf16 eager, the default on CPUs with
# native bf16, sits near 0.5% on the digits runs; 2% admits it and int8 graphs that stay
# as close, and refuses int8 graphs that drift further (measured in the report).
AUTO_TOLERANCE = 0.02
AUTO_BATCHES = (1, 8, 256)  # one image (serving), a small batch, `sample`'s batch
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
               fp16: bool = False, tolerance: float = AUTO_TOLERANCE) -> dict[str, Any]:
    """Export a diffusion run and write `out_dir` as a run directory; returns the report.
    `fmt="auto"`: `export_auto` at `tolerance`.
    `int8`: quantize the graph statically, calibrated on `calib_batches` batches of 16.
    `fp16` (ONNX): an fp16 graph for GPUs (ONNX Runtime's CUDA or TensorRT execution
    provider); it runs on CPUs too, but CPUs have no fast fp16 arithmetic (the report
    times it against the fp32 graph on this machine)."""
    if fmt == AUTO:
        if fp16 or int8:
            raise ConfigError("--format auto tries fp32 and int8 engines itself: drop --int8 "
                              "and --fp16")
        return export_auto(run_dir, out_dir, tolerance=tolerance, repeats=repeats,
                           calib_batches=calib_batches)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose {', '.join([*FORMATS, AUTO])}")
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


class _Autocast(nn.Module):
    """An eager network under autocast at `dtype`, fp32 in and out."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.model(*args, **kwargs).float()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the whole batch (--format auto's tolerance measure)."""
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))


def choose_engine(candidates: list[dict[str, Any]], tolerance: float, batch: int
                  ) -> dict[str, Any]:
    """The fastest candidate at `batch` whose `error` is within `tolerance` (each has
    `name`, `error` and `latency_ms` by batch); eager fp32, error 0, always qualifies."""
    ok = [c for c in candidates if c.get("error") is not None and c["error"] <= tolerance
          and str(batch) in c.get("latency_ms", {})]
    if not ok:
        raise ConfigError(f"no engine stays within --tolerance {tolerance} of eager fp32")
    return min(ok, key=lambda c: c["latency_ms"][str(batch)])


def export_auto(run_dir: str | Path, out_dir: str | Path, *, tolerance: float = AUTO_TOLERANCE,
                repeats: int = 5, calib_batches: int = 16,
                batches: tuple[int, ...] = AUTO_BATCHES,
                given_ms: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """`--format auto`: build every engine this machine has for the run (eager fp32 and,
    where the CPU has native bf16, eager bf16; ONNX Runtime fp32 and int8; OpenVINO fp32
    and int8 when installed), check each against eager fp32 on a fixed batch, time each at
    `batches`, and write `out_dir` with the fastest at the largest batch (the one `sample`
    uses) among those within `tolerance`. An eager winner is written as a run of the same
    checkpoint at that precision. `report.json` records every candidate: its error, its
    latencies, why any was left out, and the choice. `given_ms` (name -> batch -> ms)
    replaces measured latencies, for tests and for choosing on another machine's figures."""
    import shutil

    from effusion.precision import bf16_supported

    run_dir, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run_dir.resolve():
        raise CheckpointError("the exported run needs its own directory (--out)")
    if not 0 < tolerance:
        raise ConfigError(f"--tolerance must be > 0, got {tolerance}")
    src = load_run(run_dir, device="cpu", precision="fp32")
    if not isinstance(src.model, nn.Module):
        raise CheckpointError(f"{run_dir} is already an exported run")
    model = src.model.float().to(memory_format=torch.contiguous_format).eval()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose another --out")
    work = out / ".candidates"
    work.mkdir(parents=True, exist_ok=True)
    check = example_inputs(src, 8, seed=1)
    kw = {"w": check[3]} if len(check) == 4 else {}
    with torch.no_grad():
        ref = model(*check[:3], **kw)
    candidates: list[dict[str, Any]] = []

    def add(name: str, make) -> None:
        entry: dict[str, Any] = {"name": name}
        candidates.append(entry)
        try:
            net = make()
        except (ConfigError, ImportError, RuntimeError) as e:  # an engine this machine lacks
            entry.update(error=None, skipped=str(e).splitlines()[0][:300])
            return
        with torch.no_grad():
            entry["error"] = relative_error(net(*check[:3], **kw), ref)
        entry["latency_ms"] = {}
        for b in batches:
            if given_ms and name in given_ms:
                entry["latency_ms"][str(b)] = float(given_ms[name][str(b)])
            else:
                entry["latency_ms"][str(b)] = latency_ms(net, *example_inputs(src, b),
                                                         repeats=repeats)

    onnx32 = work / ONNX_MODEL
    add("eager fp32", lambda: model)
    if bf16_supported(torch.device("cpu")):
        add("eager bf16", lambda: _Autocast(model, torch.bfloat16))
    else:
        candidates.append({"name": "eager bf16", "error": None,
                           "skipped": "this CPU has no native bf16 (emulated bf16 is slower "
                                      "than fp32)"})

    def onnx_fp32():
        import_onnxruntime()
        export_onnx(model, example_inputs(src, 2), onnx32)
        return load_graph(onnx32, "onnxruntime")

    add("onnxruntime fp32", onnx_fp32)
    have_onnx = onnx32.is_file()
    feeds = calibration_feeds(src, calib_batches) if have_onnx else []

    def onnx_int8():
        (work / "ort-int8").mkdir(exist_ok=True)
        return load_graph(quantize_onnx_int8(onnx32, work / "ort-int8" / ONNX_MODEL, feeds),
                          "onnxruntime")

    def ov(int8: bool):
        def make():
            if not have_onnx:
                raise ConfigError("needs the ONNX graph, which could not be made")
            import_openvino()
            if not int8:
                return load_graph(onnx32, "openvino")
            if importlib.util.find_spec("nncf") is None:
                raise ConfigError(NNCF_HINT)
            return load_graph(quantize_openvino_int8(onnx32, work / OPENVINO_INT8, feeds),
                              "openvino")
        return make

    if have_onnx:
        add("onnxruntime int8", onnx_int8)
    add("openvino fp32", ov(False))
    add("openvino int8", ov(True))
    chosen = choose_engine(candidates, tolerance, max(batches))
    name = chosen["name"]
    lineage_entry: dict[str, Any] = {"pass": "export", "base": str(run_dir.resolve()),
                                     "step": src.step, "auto": True}
    cfg = src.config
    if name.startswith("eager"):
        precision = name.split()[1]
        ckpt = latest_checkpoint(run_dir)
        shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
        cfg = replace(cfg, train=replace(cfg.train, precision=precision))
        lineage_entry.update(format="checkpoint", engine="torch", precision=precision)
    else:
        engine = "openvino" if name.startswith("openvino") else "onnxruntime"
        shutil.copy2(onnx32, out / ONNX_MODEL)  # OpenVINO int8 keeps it as the portable graph
        if name == "onnxruntime int8":
            shutil.copy2(work / "ort-int8" / ONNX_MODEL, out / ONNX_MODEL)
        if name == "openvino int8":
            for suffix in (".xml", ".bin"):
                shutil.copy2((work / OPENVINO_INT8).with_suffix(suffix),
                             (out / OPENVINO_INT8).with_suffix(suffix))
        lineage_entry.update(format="onnx", engine=engine)
        if name.endswith("int8"):
            lineage_entry["int8"] = "static, calibrated"
    shutil.rmtree(work)
    write_config(out, cfg, read_lineage(run_dir) + [lineage_entry])
    report = {"source": str(run_dir), "format": AUTO, "chosen": name, "tolerance": tolerance,
              "tolerance_measure": "relative RMS error of the network output against eager "
                                   "fp32 on a fixed batch of 8",
              "chosen_at_batch": max(batches), "threads": torch.get_num_threads(),
              "timings": "given" if given_ms else "measured",
              "candidates": candidates}
    for c in report["candidates"]:
        if c.get("error") is not None:
            c["within_tolerance"] = c["error"] <= tolerance
    write_json(out / REPORT, report)
    return report
