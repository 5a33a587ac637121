"""Noise schedules: betas, cumulative alphas, SNR and the forward process q(x_t | x0)."""

from __future__ import annotations

import math

import pytest
import torch

from effusion.diffusion import Schedule, make_betas
from effusion.diffusion.schedule import MAX_BETA

SCHEDULES = ["linear", "cosine", "sigmoid"]


def test_linear_betas_match_ho_et_al_at_1000_steps():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64
    assert torch.equal(betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    # And the float32 reference of the paper's code, to float32 precision.
    torch.testing.assert_close(betas.float(), torch.linspace(1e-4, 0.02, 1000))


def test_linear_betas_scale_with_T():
    betas = make_betas("linear", 250)
    assert betas[0].item() == pytest.approx(4e-4)
    assert betas[-1].item() == pytest.approx(0.08)


def test_cosine_alphas_cumprod_closed_form():
    T, s = 1000, 0.008
    sch = Schedule.make("cosine", T)
    betas = sch.betas
    assert betas.max().item() <= MAX_BETA == 0.999
    clipped = (betas >= MAX_BETA).nonzero()
    first_clipped = int(clipped[0]) if len(clipped) else T
    assert first_clipped > 900  # clipping only bites at the very end
    t = torch.arange(first_clipped, dtype=torch.float64)
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    closed = f((t + 1) / T) / f(torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(sch.alphas_cumprod[:first_clipped], closed, rtol=1e-10, atol=1e-12)


def test_sigmoid_alphas_cumprod_monotone_in_open_unit_interval():
    ac = Schedule.make("sigmoid", 1000).alphas_cumprod
    assert (ac > 0).all() and (ac < 1).all()
    assert (ac[1:] < ac[:-1]).all()


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [2, 10, 1000, 4000])
def test_any_T_gives_a_valid_schedule(name, T):
    sch = Schedule.make(name, T)
    assert sch.T == T
    assert sch.betas.shape == (T,)
    assert (sch.betas > 0).all() and (sch.betas <= MAX_BETA).all()
    ac = sch.alphas_cumprod
    assert ac.shape == (T,)
    assert (ac > 0).all() and (ac < 1).all()
    assert (ac[1:] < ac[:-1]).all()
    # The chain ends (almost) in pure noise whatever T is.
    assert ac[-1].item() < 1e-3
    if T >= 10:
        assert ac[0].item() > 0.9  # and starts (almost) clean


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="linear, cosine or sigmoid"):
        make_betas("quadratic", 10)


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_bar_lookup(name):
    sch = Schedule.make(name, 100)
    assert sch.alpha_bar(-1).item() == 1.0
    assert sch.alpha_bar(torch.tensor(-1)).item() == 1.0
    t = torch.tensor([0, 5, 99])
    ab = sch.alpha_bar(t)
    assert ab.dtype == torch.float32 and ab.shape == (3,)
    torch.testing.assert_close(ab, sch.alphas_cumprod[t].float())
    assert sch.alpha_bar(t, ndim=4).shape == (3, 1, 1, 1)
    assert sch.alpha_bar(7).item() == pytest.approx(sch.alphas_cumprod[7].item(), rel=1e-6)


@pytest.mark.parametrize("name", SCHEDULES)
def test_snr_strictly_decreasing(name):
    sch = Schedule.make(name, 1000)
    snr = sch.snr(torch.arange(1000))
    assert snr.shape == (1000,)
    assert torch.isfinite(snr).all() and (snr > 0).all()
    assert (snr[1:] < snr[:-1]).all()
    ab = sch.alphas_cumprod.float()
    torch.testing.assert_close(snr, ab / (1 - ab), rtol=1e-4, atol=0)


@pytest.mark.parametrize("t", [0, 250, 600, 999])
def test_q_sample_moments(t):
    sch = Schedule.make("cosine", 1000)
    c, n = 0.7, 200_000
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((n,), c)
    noise = torch.randn(n, generator=g)
    xt = sch.q_sample(x0, torch.full((n,), t), noise)
    ab = sch.alphas_cumprod[t].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * c, abs=0.01)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.01, abs=1e-3)


def test_q_sample_per_sample_timesteps_broadcast():
    sch = Schedule.make("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = sch.q_sample(x0, t, noise)
    assert xt.shape == x0.shape
    for i, ti in enumerate(t.tolist()):
        ab = sch.alphas_cumprod[ti].item()
        expected = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        torch.testing.assert_close(xt[i], expected, rtol=1e-5, atol=1e-5)  # float32 lookup
    # t = -1 is clean data.
    torch.testing.assert_close(sch.q_sample(x0, torch.full((3,), -1), noise), x0)
