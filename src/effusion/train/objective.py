"""The training objective as one function, shared by the loop and the benchmarks, and
the extra terms on the predicted x0 that the remedies table measures (docs/recipe.md, Remedies):

- multi-scale: the x0 error again at 1/2, 1/4 ... resolution (average-pooled), so the
  coarse structure is weighted more than the per-pixel loss weights it;
- feature: the x0 error in a frozen classifier's feature space, at low noise only
  (SNR >= 1, where x0_hat is sharp enough for the classifier to see detail);
- diversity: the within-class spread of that feature-space error (below).

All three use the x0-space weight of the run's loss weighting (min(SNR, gamma) under
min-SNR: the weight the plain loss puts on the x0 error), so their scale matches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from effusion.config import DiffusionConfig
from effusion.diffusion import Schedule, loss_weight, target, to_x0
from effusion.precision import Precision

Features = Callable[[torch.Tensor], torch.Tensor]  # images in [-1, 1] (B, C, H, W) -> (B, D)


@dataclass
class X0Terms:
    """Extra loss terms on the predicted x0 (all off by default)."""

    multiscale: tuple[float, ...] = ()  # weights[0] scales the plain loss, weights[k] 1/2^k
    feature_weight: float = 0.0
    diversity_weight: float = 0.0
    features: Features | None = None  # needed by the feature and diversity terms

    @property
    def active(self) -> bool:
        return bool(self.multiscale) or self.feature_weight > 0 or self.diversity_weight > 0


def pooled(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool (B, C, H, W) by `factor` (a partial last cell is averaged too)."""
    h, w = x.shape[-2:]
    return F.adaptive_avg_pool2d(x, (math.ceil(h / factor), math.ceil(w / factor)))


def multiscale_loss(x0_hat: torch.Tensor, x0: torch.Tensor, weights: tuple[float, ...],
                    w: torch.Tensor) -> torch.Tensor:
    """sum_k weights[k] * mean_b w_b * MSE(pool_2^k(x0_hat), pool_2^k(x0)) for k >= 1
    (weights[0] belongs to the plain loss)."""
    total = x0_hat.new_zeros(())
    for k, wk in enumerate(weights[1:], start=1):
        if wk:
            err = (pooled(x0_hat, 2 ** k) - pooled(x0, 2 ** k)).square().mean(dim=(1, 2, 3))
            total = total + wk * (err * w).mean()
    return total


def within_class_spread(err: torch.Tensor, groups: torch.Tensor | None,
                        w: torch.Tensor) -> torch.Tensor:
    """The diversity term: sum_i w_i ||e_i - mean_c(i) e|| ^2 / (D sum_i w_i), where e_i is
    sample i's feature-space error and mean_c the w-weighted mean error of its class in
    the batch. It equals the pairwise term sum_{i<j same class} ||(f_hat_i - f_hat_j) -
    (f_i - f_j)||^2 up to weights: the predicted pairs must differ as their targets differ
    (the distance-wise relation of Park et al. 2019's relational distillation, here between
    a batch's predictions and its data). An error that all same-class samples share (e.g.
    every prediction drawn towards the class average) costs nothing here; an error that
    makes two of them alike where their data differ does, so two identical predictions of
    different images are pushed apart, towards their own targets. Unlike a pure repulsion
    (a minibatch-similarity penalty, or MSGAN's mode-seeking ratio), it does not move the
    optimum away from the posterior mean, so the denoiser stays unbiased."""
    if groups is None:
        groups = torch.zeros(err.shape[0], dtype=torch.long, device=err.device)
    onehot = F.one_hot(groups, int(groups.max()) + 1).to(err.dtype) * w[:, None]  # (B, K)
    mean = (onehot.T @ err) / onehot.sum(0).clamp_min(1e-12)[:, None]
    dev = err - mean[groups]
    return (w * dev.square().mean(1)).sum() / w.sum().clamp_min(1e-12)


def diffusion_loss(forward: Callable[..., torch.Tensor], x0: torch.Tensor,
                   cond: torch.Tensor | None, dcfg: DiffusionConfig, schedule: Schedule,
                   gen: torch.Generator, prec: Precision,
                   memory_format: torch.memory_format = torch.contiguous_format,
                   cond_drop: float = 0.0, null_class: int = -1,
                   terms: X0Terms | None = None, shard: slice | None = None) -> torch.Tensor:
    """Weighted simple loss (Ho et al. 2020, eq. 14) for a CPU batch x0 (B, C, H, W).

    Draws t then the noise from `gen` (on the CPU; on a GPU, from a device generator
    seeded from `gen`, so the step needs no host round trip), noises x0, runs `forward(x_t, t, cond)` under the precision's autocast and reduces in fp32.
    With labels, each is replaced by `null_class` with probability `cond_drop` (also drawn
    from `gen`), which teaches the network the unconditional prediction that classifier-free
    guidance needs. `terms` adds the x0 terms (module docstring); the diversity term groups
    samples by their data class (`cond` before dropping). `shard`: this process's part of a
    global batch (data-parallel training): everything random is drawn for the whole batch,
    as one process would, and only the shard is noised and run.
    """
    dev = prec.device
    rng_dev = torch.device("cpu")
    if dev.type == "cuda":
        # Drawn on the GPU from a generator seeded by the (CPU) run generator: no host
        # round trip, and still one stream per run (resume, and every data-parallel rank,
        # draw the same global batch)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
        gen, rng_dev = torch.Generator(device=dev).manual_seed(seed), dev
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=gen, device=rng_dev)
    noise = torch.randn(x0.shape, generator=gen, device=rng_dev)
    drop = None
    if cond is not None and cond_drop > 0:
        drop = torch.rand(x0.shape[0], generator=gen, device=rng_dev) < cond_drop
    if shard is not None:  # only this rank's images travel to its device
        x0, t, noise = x0[shard], t[shard], noise[shard]
        cond = None if cond is None else cond[shard]
        drop = None if drop is None else drop[shard]
    x0 = x0.to(rng_dev, non_blocking=True)
    x_t = schedule.q_sample(x0, t, noise)
    tgt = target(dcfg.prediction, schedule, x0, noise, t)
    groups = cond
    if drop is not None:
        cond = torch.where(drop.to(cond.device), torch.full_like(cond, null_class), cond)
    w = loss_weight(dcfg.prediction, dcfg.loss_weighting, schedule, t, dcfg.min_snr_gamma)
    x_t = x_t.to(dev, memory_format=memory_format, non_blocking=True)
    with prec.autocast():
        out = forward(x_t, t.to(dev), cond)
    plain = ((out.float() - tgt.to(dev)) ** 2).mean(dim=(1, 2, 3)).mul(w.to(dev)).mean()
    if terms is None or not terms.active:
        return plain
    td = t.to(dev)
    x0_hat = to_x0(dcfg.prediction, schedule, out.float(), x_t.float(), td)
    x0 = x0.to(dev)
    wx0 = loss_weight("x0", dcfg.loss_weighting, schedule, t, dcfg.min_snr_gamma).to(dev)
    loss = (terms.multiscale[0] if terms.multiscale else 1.0) * plain
    loss = loss + multiscale_loss(x0_hat, x0, terms.multiscale, wx0)
    if terms.feature_weight > 0 or terms.diversity_weight > 0:
        if terms.features is None:
            raise ValueError("the feature and diversity terms need X0Terms.features")
        low = (schedule.snr(t) >= 1.0).to(dev)
        # The classifier costs more than a narrow U-Net: the feature term alone runs it on
        # the low-noise samples only (the same loss: the others have weight 0).
        sel = torch.arange(len(t), device=dev) if terms.diversity_weight > 0 else low.nonzero().flatten()
        if len(sel) == 0:
            return loss
        with prec.autocast():
            f_hat = terms.features(x0_hat[sel].clamp(-1, 1))
            with torch.no_grad():
                f = terms.features(x0[sel])
        err = f_hat.float() - f.float()
        if terms.feature_weight > 0:
            per = err.square().mean(1) * low[sel].to(err.dtype)
            loss = loss + terms.feature_weight * per.sum() / len(t)
        if terms.diversity_weight > 0:
            loss = loss + terms.diversity_weight * within_class_spread(err, groups, wx0)
    return loss
