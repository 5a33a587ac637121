"""A U-Net exported to ONNX, run by ONNX Runtime: the same network callable
`(x_t, t, cond) -> prediction` as the eager model, so every Denoiser, sampler and
guidance wrapper takes it unchanged.

ONNX Runtime applies its graph optimizations when the session is created (constant
folding, and fusions of the conv/norm/activation and attention patterns it knows), so the
file on disk stays the portable graph and the fused one lives in memory. Needs the
`onnx` extra: `pip install 'effusion[onnx]'`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from effusion.config import ConfigError

ONNX_HINT = "ONNX export and inference need onnx and onnxruntime: pip install 'effusion[onnx]'"


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(ONNX_HINT) from None
    return onnxruntime


class OnnxNetwork:
    """An ONNX Runtime session behind the network contract (CPU execution provider, or
    CUDA's when `device` is a CUDA device and onnxruntime-gpu is installed)."""

    def __init__(self, path: str | Path, device: torch.device = torch.device("cpu"),
                 threads: int | None = None):
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ConfigError(f"cannot load ONNX model {path}: {str(e).splitlines()[0][:300]}") from None
        self.path, self.device = Path(path), device
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.training = False

    def eval(self) -> "OnnxNetwork":
        return self

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                 w: torch.Tensor | None = None) -> torch.Tensor:
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
        (out,) = self.session.run(["out"], feeds)
        return torch.from_numpy(np.asarray(out)).to(x.device)
