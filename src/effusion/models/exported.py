"""A U-Net exported to ONNX, run by ONNX Runtime or OpenVINO: the same network callable
`(x_t, t, cond[, w]) -> prediction` as the eager model, so every Denoiser, sampler and
guidance wrapper takes it unchanged.

Both engines optimize the graph when they load it (constant folding, fusions of the
conv/norm/activation and attention patterns they know; an int8 QDQ graph runs as int8),
so the file on disk stays the portable graph and the fused one lives in memory. Needs the
`onnx` extra (`pip install 'effusion[onnx]'`), and for OpenVINO `effusion[openvino]`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from effusion.config import ConfigError

ONNX_HINT = "ONNX export and inference need onnx and onnxruntime: pip install 'effusion[onnx]'"
OPENVINO_HINT = "the OpenVINO engine needs openvino: pip install 'effusion[openvino]'"
ENGINES = ("onnxruntime", "openvino")
# ONNX Runtime's GPU execution providers, in order of preference (an fp16 graph runs in
# fp16 on both; TensorRT also fuses further and builds an engine per input shape)
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(ONNX_HINT) from None
    return onnxruntime


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise ConfigError(OPENVINO_HINT) from None
    return openvino


class _GraphNetwork:
    """The network contract over a compiled graph: builds the feeds, checks the inputs."""

    inputs: list[str]
    training = False

    def eval(self):
        return self

    def _feeds(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
               w: torch.Tensor | None) -> dict[str, np.ndarray]:
        feeds = {"x": x.detach().float().cpu().numpy(),
                 "t": t.detach().to(torch.int64).cpu().numpy()}
        if "cond" in self.inputs:
            if cond is None:
                raise ValueError("this exported model is class-conditional: pass cond")
            feeds["cond"] = cond.detach().to(torch.int64).cpu().numpy()
        elif cond is not None:
            raise ValueError("this exported model has no class input but class labels were given")
        if "w" in self.inputs:  # a guidance-distilled student
            if w is None:
                raise ValueError("this exported model takes the guidance weight: pass w")
            feeds["w"] = torch.as_tensor(w, dtype=torch.float32).expand(x.shape[0]).cpu().numpy()
        elif w is not None:
            raise ValueError("this exported model has no guidance input")
        return feeds


class OpenVinoNetwork(_GraphNetwork):
    """An OpenVINO compiled model (CPU plugin) behind the network contract."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ov = import_openvino()
        try:
            core = ov.Core()
            self.compiled = core.compile_model(
                core.read_model(str(path)), "CPU",
                # f32: on CPUs with native bf16 the plugin's default is bf16 (measured: 4e-4
                # off the fp32 graph on an AVX-512 BF16 EPYC); an fp32 export must run fp32
                {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
                 "INFERENCE_PRECISION_HINT": "f32"})
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise ConfigError(f"cannot load {path} in OpenVINO: {str(e).splitlines()[0][:300]}") from None
        self.path, self.device = Path(path), torch.device("cpu")
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                 w: torch.Tensor | None = None) -> torch.Tensor:
        out = self.compiled(self._feeds(x, t, cond, w))[0]
        return torch.from_numpy(np.array(out)).to(x.device)


class OnnxNetwork(_GraphNetwork):
    """An ONNX Runtime session behind the network contract (CPU execution provider, or
    CUDA's when `device` is a CUDA device and onnxruntime-gpu is installed)."""

    def __init__(self, path: str | Path, device: torch.device = torch.device("cpu"),
                 threads: int | None = None):
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":  # TensorRT first where installed, then CUDA, then the CPU
            have = ort.get_available_providers()
            providers = [p for p in GPU_PROVIDERS if p in have] + providers
            if len(providers) == 1:
                warnings.warn("onnxruntime has no CUDA execution provider here (pip install "
                              "onnxruntime-gpu): the graph runs on the CPU", stacklevel=2)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ConfigError(f"cannot load ONNX model {path}: {str(e).splitlines()[0][:300]}") from None
        self.path, self.device = Path(path), device
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                 w: torch.Tensor | None = None) -> torch.Tensor:
        (out,) = self.session.run(["out"], self._feeds(x, t, cond, w))
        return torch.from_numpy(np.asarray(out)).to(x.device)


def load_graph(path: str | Path, engine: str = "onnxruntime",
               device: torch.device = torch.device("cpu")) -> OnnxNetwork | OpenVinoNetwork:
    """The exported graph at `path` in the named engine."""
    if engine == "openvino":
        return OpenVinoNetwork(path)
    if engine != "onnxruntime":
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    return OnnxNetwork(path, device)
