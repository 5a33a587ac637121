"""Optimizer construction and the learning-rate schedule (shared by every model type)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from effusion.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer; fused kernels on CUDA, foreach (multi-tensor) on CPU.

    - adamw: Adam with decoupled weight decay (Loshchilov & Hutter 2019), betas (0.9, 0.99).
    - adam: Adam (Kingma & Ba 2015); weight decay, if any, is L2 added to the gradient.
    - rmsprop: RMSProp (Tieleman & Hinton 2012), alpha 0.99, with `momentum`.
    - sgd: SGD with Nesterov `momentum`.

    Weight decay applies to weight matrices and conv kernels only, not to biases or norm
    gains, whose decay toward zero only hurts.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    on_cuda = params[0].is_cuda
    fast = {"fused": True} if on_cuda else {"foreach": True}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), **fast)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.99), **fast)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=0.99, momentum=cfg.momentum,
                                   foreach=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0, **fast)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")  # config validation prevents this


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
