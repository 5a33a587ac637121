"""DeepCache feature caching: exact at interval 1 and when nothing changes, the promised
number of full passes, and it composes with every sampler and with guidance."""

from __future__ import annotations

import pytest
import torch

from effusion.config import ConfigError
from effusion.diffusion import SAMPLERS
from effusion.models import build_model
from effusion.models.cache import CachedUNet
from effusion.recipes import train
from effusion.runs import load_run
from effusion.sampling import generate


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory):
    from conftest import tiny_config

    run = tmp_path_factory.mktemp("cache") / "run"
    train(tiny_config("model.num_classes=10", "train.max_steps=3", "train.cond_drop=0.2",
                      "model.channel_mult=[1,2,2]", "model.attention_resolutions=[4]"),
          run, progress=False)
    return run


def _unet(make_cfg):
    torch.manual_seed(0)
    m = build_model(make_cfg("model.num_classes=10", "model.channel_mult=[1,2,2]")).eval()
    for p in m.parameters():  # the zero-initialised output conv would hide every difference
        p.data.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_split_forward_is_the_forward_and_shallow_branch_is_exact_on_the_same_input(make_cfg, depth):
    m = _unet(make_cfg)
    x, t, c = torch.randn(3, 1, 16, 16), torch.tensor([5, 20, 40]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        ref = m(x, t, c)
        full, deep = m.forward_split(x, t, c, depth=depth)
        shallow, _ = m.forward_split(x, t, c, depth=depth, deep=deep)
    assert torch.equal(full, ref)
    torch.testing.assert_close(shallow, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cache depth must be between 1 and"):
        m.forward_split(x, t, c, depth=m.num_skips)


def test_full_passes_every_interval_and_a_new_trajectory_starts_full(make_cfg):
    m = _unet(make_cfg)
    cached = CachedUNet(m, interval=3)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for t in range(10, 0, -1):  # 10 calls, decreasing t: full at calls 1, 4, 7, 10
            cached(x, torch.full((2,), t))
        assert (cached.full_calls, cached.shallow_calls) == (4, 6)
        cached(x, torch.full((2,), 10))  # t went up: a new trajectory, so a full pass
        cached(torch.randn(3, 1, 16, 16), torch.full((3,), 9))  # another batch size: full
    assert (cached.full_calls, cached.shallow_calls) == (6, 6)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_interval_one_is_uncached_sampling_exactly(guided_run, sampler):
    run = load_run(guided_run, device="cpu")
    steps = 4 if sampler != "ddpm" else 50
    a = generate(run, 6, sampler=sampler, steps=steps, seed=1)
    b = generate(run, 6, sampler=sampler, steps=steps, seed=1, cache_interval=1)
    assert torch.equal(a, b)


def test_cached_guided_sampling_stays_close_and_saves_calls(guided_run):
    run = load_run(guided_run, device="cpu")
    net = run.network(cache_interval=2)
    assert isinstance(net, CachedUNet)
    a = generate(run, 8, steps=6, seed=2).float()
    b = generate(run, 8, steps=6, seed=2, cache_interval=2).float()
    assert a.shape == b.shape and (a - b).abs().mean() < 8  # uint8 levels: near, not equal
    with pytest.raises(ConfigError, match="cache interval must be >= 1"):
        generate(run, 2, cache_interval=0)
    with pytest.raises(ConfigError, match="cache depth must be between"):
        run.network(cache_interval=2, cache_depth=99)


def test_caching_needs_the_eager_unet():
    with pytest.raises(ValueError, match="needs the eager effusion U-Net"):
        CachedUNet(torch.nn.Identity(), interval=2)
