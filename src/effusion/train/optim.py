"""Optimizer construction and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from effusion.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019); fused kernels on CUDA, foreach on CPU.

    Weight decay applies to weight matrices and conv kernels only, not to biases or norm
    gains, whose decay toward zero only hurts.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99),
                             fused=on_cuda or None, foreach=None if on_cuda else True)


def lr_factor(step: int, progress: float, warmup_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to 0 as progress goes 0 -> 1.

    `progress` is the larger of steps/max_steps and elapsed/max_minutes, so a run limited
    by a time budget still ends its decay when the budget does.
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
