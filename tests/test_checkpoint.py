"""Checkpoints: bit-exact save/load, retention, atomicity, clear errors on mismatch/corruption."""

from __future__ import annotations

import json

import pytest
import torch

from effusion.models import build_model
from effusion.runs.files import (CheckpointError, latest_checkpoint, list_checkpoints,
                                       load_checkpoint_state, load_weights, read_config,
                                       save_checkpoint, write_config)
from effusion.train.ema import EMA
from effusion.train.optim import build_optimizer


def _trained(cfg, steps=2):
    """A tiny model, its EMA and an AdamW that has taken `steps` real steps."""
    torch.manual_seed(0)
    model = build_model(cfg)
    ema = EMA(model, 0.9, warmup=False)
    opt = build_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(0)
    s = cfg.data.image_size
    for _ in range(steps):
        x = torch.randn(2, 1, s, s, generator=g)
        loss = ((model(x, torch.tensor([3, 40])) - x) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    return model, ema, opt


def _save(run, step, model, ema, opt, keep=3):
    rng = {"generator": torch.Generator().manual_seed(9).get_state(), "torch": torch.get_rng_state()}
    state = {"images_seen": 4 * step, "elapsed_s": 1.5, "skipped_steps": 0,
             "ema_updates": ema.updates, "data": {"epoch": 1, "index": 3}}
    return save_checkpoint(run, step, model=model.state_dict(), ema=ema.state_dict(),
                           optimizer=opt.state_dict(), rng=rng, state=state, keep=keep), rng


def test_save_then_load_is_bit_exact(tmp_path, make_cfg):
    cfg = make_cfg("train.weight_decay=0.01")
    model, ema, opt = _trained(cfg)
    ckpt, rng = _save(tmp_path, 2, model, ema, opt)
    assert ckpt == tmp_path / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng.safetensors",
        "state.json"]

    model2, ema2, opt2 = _trained(cfg, steps=0)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     model2.state_dict().values()))
    load_weights(ckpt / "model.safetensors", model2)
    load_weights(ckpt / "ema.safetensors", ema2.model)
    state, opt_state, rng2 = load_checkpoint_state(ckpt)
    opt2.load_state_dict(opt_state)

    for (k, a), (k2, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    for (k, a), b in zip(ema.state_dict().items(), ema2.state_dict().values()):
        assert torch.equal(a, b), k
    # EMA really differs from the raw weights (so the test above is not trivially the same)
    assert not all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(),
                                                     model.state_dict().values()))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) > 0
    for idx in s1["state"]:
        assert s1["state"][idx].keys() == s2["state"][idx].keys()
        for name, v in s1["state"][idx].items():
            assert torch.equal(v, s2["state"][idx][name]), (idx, name)
    for g1, g2 in zip(s1["param_groups"], s2["param_groups"]):
        assert g1["params"] == g2["params"]
        assert g1["lr"] == g2["lr"] and g1["weight_decay"] == g2["weight_decay"]
        assert tuple(g1["betas"]) == tuple(g2["betas"])
    for k in rng:
        assert torch.equal(rng[k], rng2[k])
    assert state == {"images_seen": 8, "elapsed_s": 1.5, "skipped_steps": 0, "ema_updates": 2,
                     "data": {"epoch": 1, "index": 3}, "step": 2}

    # and the restored optimizer continues exactly like the original
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    for m, o in ((model, opt), (model2, opt2)):
        ((m(x, torch.tensor([1, 2])) - x) ** 2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_keep_only_the_last_k(tmp_path, make_cfg):
    model, ema, opt = _trained(make_cfg(), steps=1)
    for step in (1, 2, 3, 10, 11):
        _save(tmp_path, step, model, ema, opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000010", "step-0000011"]
    assert latest_checkpoint(tmp_path).name == "step-0000011"
    _save(tmp_path, 12, model, ema, opt, keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000012"]


def test_leftover_tmp_and_incomplete_dirs_are_ignored(tmp_path, make_cfg):
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    model, ema, opt = _trained(make_cfg(), steps=1)
    _save(tmp_path, 5, model, ema, opt)
    # a crash mid-write leaves step-N.tmp (even with a state.json in it)
    tmp = tmp_path / "checkpoints" / "step-0000009.tmp"
    tmp.mkdir()
    (tmp / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-0000008").mkdir()  # no state.json: incomplete
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-0000005"
    # saving the same step again replaces a stale .tmp cleanly
    _save(tmp_path, 9, model, ema, opt)
    assert latest_checkpoint(tmp_path).name == "step-0000009"
    assert not tmp.exists()


def test_loading_into_a_different_model_fails_clearly(tmp_path, make_cfg):
    model, ema, opt = _trained(make_cfg(), steps=1)
    ckpt, _ = _save(tmp_path, 1, model, ema, opt)
    wider = build_model(make_cfg("model.channels=16"))
    before = [p.clone() for p in wider.parameters()]
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        load_weights(ckpt / "model.safetensors", wider)
    assert "different model config" in str(e.value)
    deeper = build_model(make_cfg("model.channel_mult=[1,2,2]"))
    with pytest.raises(CheckpointError, match="missing .* tensors"):
        load_weights(ckpt / "model.safetensors", deeper)
    shallower = build_model(make_cfg("model.channel_mult=[1]"))
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_weights(ckpt / "model.safetensors", shallower)
    assert all(torch.equal(a, b) for a, b in zip(before, wider.parameters()))  # left untouched


def test_corrupt_weights_file(tmp_path, make_cfg):
    model, ema, opt = _trained(make_cfg(), steps=1)
    ckpt, _ = _save(tmp_path, 1, model, ema, opt)
    (ckpt / "model.safetensors").write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_weights(ckpt / "model.safetensors", model)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_weights(tmp_path / "missing.safetensors", model)


def test_incomplete_checkpoint_state(tmp_path, make_cfg):
    model, ema, opt = _trained(make_cfg(), steps=1)
    ckpt, _ = _save(tmp_path, 1, model, ema, opt)
    (ckpt / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        load_checkpoint_state(ckpt)
    ckpt, _ = _save(tmp_path, 2, model, ema, opt)
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        load_checkpoint_state(ckpt)


@pytest.mark.parametrize("name", ["optimizer.safetensors", "rng.safetensors"])
def test_corrupt_state_safetensors_raise_checkpoint_error(tmp_path, make_cfg, name):
    """A truncated optimizer/rng file must be a CheckpointError like everything else."""
    model, ema, opt = _trained(make_cfg(), steps=1)
    ckpt, _ = _save(tmp_path, 1, model, ema, opt)
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        load_checkpoint_state(ckpt)


def test_config_round_trip_through_run_dir(tmp_path, tiny_cfg):
    write_config(tmp_path / "r", tiny_cfg)
    assert read_config(tmp_path / "r") == tiny_cfg
    assert not list((tmp_path / "r").glob("*.tmp"))
    with pytest.raises(CheckpointError, match="run directory not found"):
        read_config(tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a run directory"):
        read_config(tmp_path / "empty")


def test_state_json_is_readable_json(tmp_path, make_cfg):
    model, ema, opt = _trained(make_cfg(), steps=1)
    ckpt, _ = _save(tmp_path, 7, model, ema, opt)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 7 and state["ema_updates"] == 1
    assert state["optimizer"]["param_groups"][0]["lr"] == make_cfg().train.lr


def test_leftovers_of_an_interrupted_save_do_not_block_later_saves(tmp_path, make_cfg):
    """A kill between renaming an old checkpoint aside (`.old`) and deleting it, or while
    writing one (`.tmp`), leaves folders behind; the next saves still rotate cleanly."""
    from effusion.recipes import train
    from effusion.runs import list_checkpoints

    run = tmp_path / "run"
    cfg = ["train.checkpoint_every=1", "train.keep_checkpoints=1"]
    train(make_cfg("train.max_steps=1", *cfg), run, progress=False)
    for junk in ("step-0000001.old", "step-0000002.tmp"):  # step 1 is still the live one
        (run / "checkpoints" / junk).mkdir(parents=True)
        (run / "checkpoints" / junk / "model.safetensors").write_bytes(b"half")
    train(make_cfg("train.max_steps=3", *cfg), run, progress=False)  # rotates step 1 out
    assert [p.name for p in list_checkpoints(run)] == ["step-0000003"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000003"]
