"""Optimizer construction and the learning-rate schedule (shared by every model type)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from effusion.config import ConfigError, TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer; fused kernels on CUDA, foreach (multi-tensor) on CPU.

    - adamw: Adam with decoupled weight decay (Loshchilov & Hutter 2019), betas (0.9, 0.99).
    - adamw8bit: the same update with both moments stored block-wise quantised to 8 bits
      (Dettmers et al. 2022), from bitsandbytes (CPU and CUDA). Tensors under 4096
      elements keep fp32 moments.
    - adam: Adam (Kingma & Ba 2015); weight decay, if any, is L2 added to the gradient.
    - rmsprop: RMSProp (Tieleman & Hinton 2012), alpha 0.99, with `momentum`.
    - sgd: SGD with Nesterov `momentum`.

    Weight decay applies to weight matrices and conv kernels only, not to biases or norm
    gains, whose decay toward zero only hurts. A model may ask for a higher learning rate
    on parameters it names (`model.lr_scales()`: {name prefix: factor}); those get their
    own groups with `lr_scale`, which `set_lr` applies.
    """
    scales = model.lr_scales() if hasattr(model, "lr_scales") else {}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    def scale(name: str) -> float:
        return next((f for prefix, f in scales.items() if name.startswith(prefix)), 1.0)

    groups = []
    for factor in [1.0] + sorted(set(scales.values()) - {1.0}):
        mine = [p for n, p in named if scale(n) == factor]
        extra = {} if factor == 1.0 else {"lr_scale": factor}
        groups += [{"params": [p for p in mine if p.ndim >= 2], "weight_decay": cfg.weight_decay,
                    **extra},
                   {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, **extra}]
    on_cuda = params[0].is_cuda
    fast = {"fused": True} if on_cuda else {"foreach": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), **fast)
    if cfg.optimizer == "adamw8bit":
        return _adamw8bit(groups, cfg)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.99), **fast)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=0.99, momentum=cfg.momentum,
                                   foreach=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0, **fast)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")  # config validation prevents this


EIGHT_BIT_HINT = ("train.optimizer=adamw8bit needs bitsandbytes: pip install 'effusion[8bit]' "
                  "(or pip install bitsandbytes)")


def _adamw8bit(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    # torchao's AdamW8bit was tried as a second backend: its state is a tensor subclass
    # that safetensors cannot store and its LR must stay a tensor, so resumable checkpoints
    # would need special cases; bitsandbytes keeps plain uint8 tensors.
    try:
        import logging

        # bitsandbytes logs about optional CUDA/4-bit kernels at import; not our concern.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(EIGHT_BIT_HINT) from None
    return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=(0.9, 0.99))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (times its `lr_scale`, if it has one)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state (moments, quantisation maps...)."""
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def lr_factor(step: int, progress: float, warmup_steps: int, schedule: str = "cosine",
              epoch: int = 0, step_every: int = 1, gamma: float = 0.5) -> float:
    """Multiplier of the base LR: linear warm-up over `warmup_steps`, then

    - cosine: decay to 0 as progress goes 0 -> 1 (Loshchilov & Hutter 2017, no restarts);
    - step: multiply by `gamma` every `step_every` epochs;
    - none: constant.

    `progress` is the largest of steps/max_steps, elapsed/max_minutes and epochs done /
    train.epochs, so a run limited by a time budget still ends its decay when the budget does.
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    if schedule == "step":
        return warm * gamma ** (epoch // step_every)
    return warm
