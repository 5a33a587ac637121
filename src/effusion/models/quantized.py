"""Dynamic int8 quantization of Linear layers (torch.ao), and its tensors for safetensors.

Dynamic quantization stores Linear weights as int8 with a scale and zero point and
quantizes activations on the fly per batch; convolutions stay fp32. PyTorch marks its
eager-mode quantization API as deprecated in favour of torchao, but it is still the one
that runs on every CPU build with no extra install; its warnings are silenced here.

Only tensors cross the file boundary (never a pickled module): `quantized_tensors` turns a
quantized model into a flat dict, `from_quantized_tensors` rebuilds it bit-exactly on a
freshly built float model of the same config. Reading and writing the file is
`effusion.runs`' job.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from effusion.config import ConfigError

_SUFFIXES = ("weight_int8", "weight_scale", "weight_zero_point", "weight_axis")


def _quantize_dynamic(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}


def quantize_model(model: nn.Module) -> nn.Module:
    """An int8-dynamic copy of a float model (the original is left untouched)."""
    return _quantize_dynamic(copy.deepcopy(model).eval())


def quantized_tensors(qmodel: nn.Module, float_model: nn.Module) -> dict[str, torch.Tensor]:
    """Float tensors of everything but the Linear layers, plus each Linear's int8 weight,
    quantization parameters and fp32 bias."""
    qlin = quantized_linears(qmodel)
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
    return tensors


def from_quantized_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild the int8-dynamic model whose tensors `quantized_tensors` gave, on `model` (a
    freshly built float model of the same config). Mismatches raise ConfigError."""
    model = model.eval()
    qnames = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_int8")}
    float_part = {k: v for k, v in tensors.items()
                  if not k.endswith(_SUFFIXES) and k.rsplit(".", 1)[0] not in qnames}
    missing, unexpected = model.load_state_dict(float_part, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in qnames]
    if missing or unexpected:
        raise ConfigError(f"quantized weights do not match the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    qmodel = _quantize_dynamic(model)
    qlin = quantized_linears(qmodel)
    if set(qlin) != qnames:
        raise ConfigError(f"quantized weights hold Linear layers {sorted(qnames)} but the "
                          f"model has {sorted(qlin)}")
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
