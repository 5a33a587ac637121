"""A network whose layers were narrowed by structured channel pruning, rebuilt from its
weights: a pruned U-Net's widths differ layer by layer, so its config alone cannot
describe it. `shape_like` resizes the layers of a freshly built network to the shapes of
a state dict (a pruned run's checkpoint); what the config fixes (attention heads, kernel sizes,
strides) stays as built, and a GroupNorm keeps its group count unless its new width
needs fewer (`group_count`, applied the same way when pruning).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from effusion.config import ConfigError


def group_count(groups: int, channels: int) -> int:
    """The GroupNorm group count for `channels` after pruning: the configured `groups`
    if it divides them, else the largest count that divides both."""
    return math.gcd(groups, channels)


def _resized(module: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> nn.Module | None:
    """A new layer like `module` with the shapes its tensors in `tensors` have, or None if
    they already fit (or the layer has no weight there)."""
    w = tensors.get(f"{name}.weight" if name else "weight")
    if w is None or tuple(w.shape) == tuple(module.weight.shape):
        return None
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Conv2d) and module.groups == 1 and w.dim() == 4:
        return nn.Conv2d(w.shape[1], w.shape[0], module.kernel_size, module.stride,
                         module.padding, module.dilation, bias=has_bias)
    if isinstance(module, nn.Linear) and w.dim() == 2:
        return nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
    if isinstance(module, nn.GroupNorm) and w.dim() == 1:
        return nn.GroupNorm(group_count(module.num_groups, w.shape[0]), w.shape[0], module.eps,
                            module.affine)
    if isinstance(module, nn.Embedding) and w.dim() == 2:
        return nn.Embedding(w.shape[0], w.shape[1])
    raise ConfigError(f"{name}: cannot resize a {type(module).__name__} from "
                      f"{tuple(module.weight.shape)} to {tuple(w.shape)}")


def shape_like(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Resize `model`'s Conv2d, Linear, GroupNorm and Embedding layers in place to the
    shapes in `tensors` (a state dict of the same architecture, possibly pruned); returns
    the model. Loading `tensors` afterwards still checks every name and shape."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)):
            continue
        new = _resized(module, name, tensors)
        if new is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new.to(module.weight.device, module.weight.dtype))
    return model


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d (what pruning narrows), by name."""
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
