"""Prediction targets, conversions between eps / v / x0, loss weights, NetworkDenoiser."""

from __future__ import annotations

import contextlib

import pytest
import torch

from effusion.diffusion import NetworkDenoiser, Schedule, from_x0, loss_weight, target, to_x0

PREDICTIONS = ["eps", "v", "x0"]


@pytest.fixture(scope="module")
def sch() -> Schedule:
    return Schedule.make("cosine", 1000)


def _batch(seed: int = 0, b: int = 16, t_max: int = 950):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(b, 1, 4, 4, generator=g)
    t = torch.randint(0, t_max, (b,), generator=g)
    t[0], t[1] = 0, t_max - 1  # always include both ends of the range
    return x0, noise, t


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_to_x0_of_exact_target_recovers_x0(sch, pred):
    x0, noise, t = _batch()
    xt = sch.q_sample(x0, t, noise)
    tgt = target(pred, sch, x0, noise, t)
    torch.testing.assert_close(to_x0(pred, sch, tgt, xt, t), x0, rtol=0, atol=2e-4)


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_from_x0_reproduces_the_training_target(sch, pred):
    x0, noise, t = _batch(1)
    xt = sch.q_sample(x0, t, noise)
    torch.testing.assert_close(from_x0(pred, sch, x0, xt, t), target(pred, sch, x0, noise, t),
                               rtol=0, atol=2e-4)


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_round_trips(sch, pred):
    x0, noise, t = _batch(2)
    xt = sch.q_sample(x0, t, noise)
    # x0 -> network output -> x0
    out = from_x0(pred, sch, x0, xt, t)
    torch.testing.assert_close(to_x0(pred, sch, out, xt, t), x0, rtol=0, atol=2e-4)
    # arbitrary network output -> x0 -> network output (t away from the noisiest end,
    # where eps -> x0 divides by a tiny sqrt(abar))
    t_mid = torch.randint(0, 700, t.shape, generator=torch.Generator().manual_seed(3))
    xt = sch.q_sample(x0, t_mid, noise)
    out = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    back = from_x0(pred, sch, to_x0(pred, sch, out, xt, t_mid), xt, t_mid)
    torch.testing.assert_close(back, out, rtol=0, atol=1e-4)


def test_v_target_formula(sch):
    x0, noise, t = _batch(5)
    a = sch.alphas_cumprod[t].sqrt().float().view(-1, 1, 1, 1)
    s = (1 - sch.alphas_cumprod[t]).sqrt().float().view(-1, 1, 1, 1)
    torch.testing.assert_close(target("v", sch, x0, noise, t), a * noise - s * x0,
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(target("eps", sch, x0, noise, t), noise)
    assert torch.equal(target("x0", sch, x0, noise, t), x0)


def test_unknown_prediction_raises(sch):
    x0, noise, t = _batch()
    for fn in (lambda: target("score", sch, x0, noise, t),
               lambda: to_x0("score", sch, x0, x0, t),
               lambda: from_x0("score", sch, x0, x0, t)):
        with pytest.raises(ValueError, match="unknown prediction 'score'"):
            fn()


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights(sch, gamma):
    t = torch.arange(0, 1000, 7)
    snr = sch.snr(t)
    m = snr.clamp(max=gamma)
    assert (snr > gamma).any() and (snr < gamma).any()  # both branches of the min are hit
    torch.testing.assert_close(loss_weight("x0", "min_snr", sch, t, gamma), m)
    torch.testing.assert_close(loss_weight("eps", "min_snr", sch, t, gamma), m / snr)
    torch.testing.assert_close(loss_weight("v", "min_snr", sch, t, gamma), m / (snr + 1))
    # eps weights are 1 where snr <= gamma and gamma / snr (< 1) above it
    w_eps = loss_weight("eps", "min_snr", sch, t, gamma)
    assert torch.allclose(w_eps[snr <= gamma], torch.ones(1))
    assert (w_eps[snr > gamma] < 1).all()


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_min_snr_weighted_native_loss_equals_weighted_x0_loss(sch, pred):
    """w * |out - target|^2 == min(snr, gamma) * |x0_hat - x0|^2 for any network error."""
    x0, noise, t = _batch(6, t_max=900)
    xt = sch.q_sample(x0, t, noise)
    tgt = target(pred, sch, x0, noise, t)
    out = tgt + 0.1 * torch.randn(tgt.shape, generator=torch.Generator().manual_seed(7))
    native = ((out - tgt) ** 2).mean(dim=(1, 2, 3)) * loss_weight(pred, "min_snr", sch, t, 5.0)
    x0_err = ((to_x0(pred, sch, out, xt, t) - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(native, sch.snr(t).clamp(max=5.0) * x0_err, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("pred", PREDICTIONS)
def test_uniform_weights_are_ones(sch, pred):
    t = torch.tensor([0, 10, 999])
    w = loss_weight(pred, "uniform", sch, t)
    assert torch.equal(w, torch.ones(3))


def test_unknown_weighting_raises(sch):
    with pytest.raises(ValueError, match="uniform or min_snr"):
        loss_weight("v", "p2", sch, torch.tensor([1]))


class _Net:
    """Fake network: returns a fixed value in a chosen dtype and records its calls."""

    def __init__(self, value: float, dtype: torch.dtype):
        self.value, self.dtype, self.calls = value, dtype, []

    def __call__(self, x, t, cond):
        self.calls.append((x.shape, t.clone(), cond))
        return torch.full(x.shape, self.value, dtype=self.dtype)


def test_network_denoiser_returns_float32_from_bf16_net(sch):
    net = _Net(0.25, torch.bfloat16)
    den = NetworkDenoiser(net, sch, "x0", clip_x0=False)
    x = torch.randn(2, 1, 4, 4)
    out = den(x, torch.tensor([3, 4]))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.full_like(x, 0.25))
    # v-prediction through the conversion is float32 too, and matches to_x0 in fp32.
    den_v = NetworkDenoiser(_Net(0.5, torch.bfloat16), sch, "v")
    t = torch.tensor([100, 200])
    out_v = den_v(x, t)
    assert out_v.dtype == torch.float32
    torch.testing.assert_close(out_v, to_x0("v", sch, torch.full_like(x, 0.5), x, t))


def test_network_denoiser_clamps_only_when_asked(sch):
    x = torch.zeros(2, 1, 4, 4)
    t = torch.tensor([10, 10])
    assert torch.equal(NetworkDenoiser(_Net(5.0, torch.float32), sch, "x0", clip_x0=True)(x, t),
                       torch.ones_like(x))
    assert torch.equal(NetworkDenoiser(_Net(-5.0, torch.float32), sch, "x0", clip_x0=True)(x, t),
                       -torch.ones_like(x))
    assert torch.equal(NetworkDenoiser(_Net(5.0, torch.float32), sch, "x0", clip_x0=False)(x, t),
                       torch.full_like(x, 5.0))


def test_network_denoiser_scalar_t_cond_and_autocast(sch):
    net = _Net(0.0, torch.float32)
    entered = []

    @contextlib.contextmanager
    def fake_autocast():
        entered.append(True)
        yield

    den = NetworkDenoiser(net, sch, "eps", autocast=fake_autocast)
    cond = torch.tensor([1, 2, 3])
    x = torch.randn(3, 1, 4, 4)
    out = den(x, 42, cond)
    shape, t, c = net.calls[0]
    assert torch.equal(t, torch.full((3,), 42))  # scalar t broadcast to the batch
    assert c is cond
    assert entered == [True]
    # eps = 0  =>  x0 = x_t / sqrt(abar_t)
    torch.testing.assert_close(out, x / sch.alphas_cumprod[42].sqrt().float())
