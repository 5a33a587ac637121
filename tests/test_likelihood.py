"""Bits/dim: the variational bound's parts against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from effusion.diffusion import Schedule
from effusion.evaluate.likelihood import bits_per_dim, discretized_gaussian_nll

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1


def digits_like(b: int = 4, size: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (b, 1, size, size), generator=g).double() / 127.5 - 1)


@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.37, 0.2), (-0.999, 0.003), (1.2, 0.5)])
def test_discretized_gaussian_is_a_distribution_over_the_256_levels(mean, std):
    p = (-discretized_gaussian_nll(LEVELS, torch.full_like(LEVELS, mean), std)).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert LEVELS[p.argmax()].item() == pytest.approx(min(max(mean, -1), 1), abs=1 / 127.5)


def _prior_bits(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    a = schedule.alphas_cumprod[-1].double()
    kl = 0.5 * ((1 - a) + a * x0 ** 2 - 1 - torch.log(1 - a))
    return kl.flatten(1).sum(1) / (x0[0].numel() * math.log(2))


def test_oracle_denoiser_leaves_only_prior_and_decoder():
    s = Schedule.make("cosine", 100)
    x0 = digits_like()
    oracle = lambda x_t, t, c=None: x0.float()  # noqa: E731 - knows the answer
    out = bits_per_dim(oracle, s, x0, strata=99)
    assert torch.allclose(out["diffusion"], torch.zeros(4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(out["prior"], _prior_bits(s, x0))
    # Decoder centred on the true pixel: -log2(P(bin)) with bin half-width 1/255.
    sd = math.sqrt(float(s.betas[0]))
    inner = -math.log2(math.erf((1 / 255) / (sd * math.sqrt(2))))
    edge = -math.log2(0.5 * (1 + math.erf((1 / 255) / (sd * math.sqrt(2)))))
    is_edge = (x0.abs() > 0.999).double().flatten(1).mean(1)
    want = is_edge * edge + (1 - is_edge) * inner
    assert torch.allclose(out["decoder"], want, rtol=1e-3)
    assert torch.allclose(out["bpd"], out["prior"] + out["diffusion"] + out["decoder"])


def test_full_sum_telescopes_and_stratified_estimate_is_unbiased():
    s = Schedule.make("linear", 100)
    x0 = digits_like(1).expand(400, -1, -1, -1).contiguous()
    zero = lambda x_t, t, c=None: torch.zeros_like(x_t)  # noqa: E731 - error = ||x0||^2, noise-free
    ab = s.alphas_cumprod.double()
    snr = ab / (1 - ab)
    want = 0.5 * (snr[0] - snr[-1]) * (x0[0] ** 2).sum() / (x0[0].numel() * math.log(2))
    exact = bits_per_dim(zero, s, x0[:2], strata=99)["diffusion"]
    assert torch.allclose(exact, want.expand(2), rtol=1e-9)
    est = bits_per_dim(zero, s, x0, strata=7, generator=torch.Generator().manual_seed(1))
    assert est["diffusion"].mean().item() == pytest.approx(want.item(), rel=0.05)
    assert est["diffusion"].std() > 0  # it is an estimate, not the exact sum


def test_strata_range_is_checked():
    s = Schedule.make("cosine", 10)
    with pytest.raises(ValueError, match="strata"):
        bits_per_dim(lambda x, t, c=None: x, s, digits_like(), strata=10)


@pytest.mark.parametrize("T,strata", [(1000, 50), (100, 7), (100, 99), (10, 3)])
def test_strata_edges_partition_the_timesteps(T, strata):
    from effusion.evaluate.likelihood import strata_edges

    e = strata_edges(T, strata)
    assert len(e) == strata + 1 and e[0] == 1 and e[-1] == T
    assert (e[1:] > e[:-1]).all()
    assert e[1] == 2  # the first (largest) term is always computed exactly
