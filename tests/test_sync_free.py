"""The GPU training step's device-side decisions, run on the CPU: a fused AdamW takes the
`found_inf` flag on any device, so the path that skips non-finite steps without a host
sync (`loop.decides_on_device`) is exercised here with the CPU's fused kernels."""

from __future__ import annotations

import pytest
import torch

import effusion.recipes.generative as generative
import effusion.train.loop as loop
import effusion.train.state as state_mod
from effusion.recipes import train
from effusion.runs import read_metrics
from effusion.runs.files import list_checkpoints
from effusion.train.loop import TrainingError

from test_train import _NaNAfter


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setattr(loop, "decides_on_device", lambda state: True)
    monkeypatch.setattr(state_mod, "build_optimizer", lambda model, tc: torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=(0.9, 0.99), fused=True))


def test_device_decided_steps_skip_updates_and_count_them_at_the_log(run_dir, make_cfg,
                                                                     monkeypatch, device_path):
    real_build = generative.build_model
    built = {}

    def build(cfg, **kw):
        built["m"] = _NaNAfter(real_build(cfg, **kw), {1, 2})
        return built["m"]

    monkeypatch.setattr(generative, "build_model", build)
    snapshots = []
    real_step = loop.train_step

    def watch(state, task, tc, *args):
        before = ([p.detach().clone() for p in state.model.parameters()],
                  [p.detach().clone() for p in state.ema.model.parameters()])
        out = real_step(state, task, tc, *args)
        snapshots.append((before, out[0].finite))
        return out

    monkeypatch.setattr(loop, "train_step", watch)
    res = train(make_cfg("train.max_steps=4", "train.log_every=1"), run_dir, progress=False)
    # on the device path a skipped step still counts as a step
    assert res.step == 4 and built["m"].calls == 4
    m = read_metrics(run_dir)
    assert [r["skipped_steps"] for r in m if "loss" in r] == [0, 1, 2, 2]
    assert all(r["loss"] == r["loss"] for r in m if "loss" in r)  # skipped losses left out
    assert [bool(f) for _, f in snapshots] == [True, False, False, True]
    # a skipped step (calls 1 and 2) moved neither the weights nor the EMA
    (w2, e2), _ = snapshots[2]
    (w3, e3), _ = snapshots[3]
    assert all(torch.equal(a, b) for a, b in zip(w2, w3))
    assert all(torch.equal(a, b) for a, b in zip(e2, e3))


def test_device_decided_persistent_nan_stops_at_the_log(run_dir, make_cfg, monkeypatch, device_path):
    real_build = generative.build_model
    built = {}

    def build(cfg, **kw):
        built["m"] = _NaNAfter(real_build(cfg, **kw), range(10 ** 9))
        built["init"] = {k: v.clone() for k, v in built["m"].state_dict().items()}
        return built["m"]

    monkeypatch.setattr(generative, "build_model", build)
    with pytest.raises(TrainingError, match=f"{loop.MAX_NONFINITE_IN_A_ROW} steps in a row"):
        train(make_cfg("train.max_steps=50", "train.log_every=5"), run_dir, progress=False)
    assert built["m"].calls == 10  # read back at the log line of step 10
    for k, v in built["m"].state_dict().items():
        assert torch.equal(v, built["init"][k]), k
    assert list_checkpoints(run_dir) == []


def test_device_decided_losses_equal_the_host_checked_ones(make_cfg, tmp_path, monkeypatch):
    fused = lambda model, tc: torch.optim.AdamW(model.parameters(), lr=tc.lr,  # noqa: E731
                                                betas=(0.9, 0.99), fused=True)
    monkeypatch.setattr(state_mod, "build_optimizer", fused)
    cfg = make_cfg("train.max_steps=5", "train.log_every=1")
    train(cfg, tmp_path / "host", progress=False)
    monkeypatch.setattr(loop, "decides_on_device", lambda state: True)
    train(cfg, tmp_path / "device", progress=False)
    a = [r["loss"] for r in read_metrics(tmp_path / "host") if "loss" in r]
    b = [r["loss"] for r in read_metrics(tmp_path / "device") if "loss" in r]
    assert b == pytest.approx(a, abs=1e-6)
