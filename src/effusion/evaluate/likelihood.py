"""Bits per dimension: the discrete-time variational bound of Ho et al. (2020, eq. 5).

    -log p(x0) <= L_T + sum_{t=2..T} L_{t-1} + L_0
    L_T     = KL(q(x_T | x0) || N(0, I))                          (the prior term)
    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))        (the diffusion terms)
    L_0     = -log p(x0 | x_1), a Gaussian discretised to the 256 pixel levels

With the reverse variance fixed to the posterior's, each diffusion term is
0.5 * (SNR_{t-1} - SNR_t) * ||x0 - x0_hat(x_t, t)||^2 (Kingma et al. 2021, eq. 13).

Evaluating all T terms costs T network passes per image. `strata` < T-1 estimates their
sum without bias by stratified sampling: {1..T-1} is cut into `strata` ranges, one
timestep is drawn per range and weighted by the range's size. The terms are largest at
small t (where SNR changes fastest), so the ranges grow geometrically: the first ones hold
a single timestep and are exact. strata = T-1 is exact throughout.
Indices here are the code's 0..T-1 (the paper's t = index + 1).
"""

from __future__ import annotations

import math

import torch

from effusion.diffusion import Denoiser, Schedule


def _gaussian_kl_to_standard(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return 0.5 * (var + mean ** 2 - 1 - var.log())


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """-log P(x) per element for x on the 256 levels of [-1, 1], under N(mean, std^2)
    integrated over each level's bin (the end bins extend to +-infinity)."""
    half = 1.0 / 255.0
    upper = (x - mean + half) / std
    lower = (x - mean - half) / std
    log_cdf_upper = torch.special.log_ndtr(upper)          # bin [-inf, x + half]
    log_sf_lower = torch.special.log_ndtr(-lower)           # bin [x - half, +inf]
    mid = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-12).log()
    logp = torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, mid))
    return -logp


def strata_edges(T: int, strata: int) -> torch.Tensor:
    """strata + 1 increasing edges from 1 to T, geometrically spaced, at least 1 apart."""
    geo = torch.logspace(0, math.log10(T), strata + 1, dtype=torch.float64).round().long()
    edges = [1]
    for g in geo[1:].tolist():
        edges.append(max(edges[-1] + 1, g))
    edges[-1] = T
    return torch.tensor(edges)


@torch.no_grad()
def bits_per_dim(denoiser: Denoiser, schedule: Schedule, x0: torch.Tensor,
                 cond: torch.Tensor | None = None, strata: int = 50,
                 generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Per-image bound in bits/dim for a batch x0 (B, C, H, W) of 8-bit images in [-1, 1].

    Returns a dict of (B,) float64 tensors: `bpd` (the total) and its parts `prior`,
    `diffusion` and `decoder`, each in bits/dim.
    """
    T = schedule.T
    if not 1 <= strata <= T - 1:
        raise ValueError(f"strata must be between 1 and T-1 = {T - 1}, got {strata}")
    gen = generator or torch.Generator().manual_seed(0)
    x0 = x0.double()
    b, dims = x0.shape[0], x0[0].numel()
    ab = schedule.alphas_cumprod.double()
    abar = lambda i: torch.where(i >= 0, ab[i.clamp_min(0)], torch.ones((), dtype=ab.dtype))  # noqa: E731
    snr = lambda i: abar(i) / (1 - abar(i))  # noqa: E731
    c = None if cond is None else cond.to(device)

    def x0_hat(i: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        a = abar(i).view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).float()
        return denoiser(x_t.to(device), i.to(device), c).double().cpu()

    # Prior: KL(q(x_T | x0) || N(0, I)), summed over dimensions.
    a_T = ab[-1]
    prior = _gaussian_kl_to_standard(a_T.sqrt() * x0, (1 - a_T).expand_as(x0)).flatten(1).sum(1)

    # Diffusion terms, indices 1..T-1, stratified.
    edges = strata_edges(T, strata)
    diffusion = torch.zeros(b, dtype=torch.float64)
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        i = torch.randint(lo, hi, (b,), generator=gen)
        err = ((x0 - x0_hat(i)) ** 2).flatten(1).sum(1)
        diffusion += (hi - lo) * 0.5 * (snr(i - 1) - snr(i)) * err

    # Decoder: p(x0 | x_1) = N(x0_hat, beta_1) discretised (Ho et al. 2020, eq. 13).
    zero = torch.zeros(b, dtype=torch.long)
    decoder = discretized_gaussian_nll(x0, x0_hat(zero),
                                       math.sqrt(float(schedule.betas[0]))).flatten(1).sum(1)

    to_bits = 1.0 / (dims * math.log(2))
    parts = {"prior": prior * to_bits, "diffusion": diffusion * to_bits, "decoder": decoder * to_bits}
    return {"bpd": sum(parts.values()), **parts}
