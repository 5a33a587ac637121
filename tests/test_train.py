"""The training loop: exact resume, learning, run-directory rules, NaN handling."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import effusion.recipes.generative as generative
import effusion.train.loop as loop
from effusion.config import ConfigError
from effusion.data import BatchStream, load_source, to_model_range
from effusion.diffusion import loss_weight, schedule_for, target
from effusion.models import build_model
from effusion.recipes import train
from effusion.runs import read_metrics
from effusion.runs.files import CheckpointError, list_checkpoints, load_weights, read_config
from effusion.train.loop import TrainingError

# Augmentation and dropout on, so resuming must restore the training generator *and*
# torch's global RNG to reproduce the uninterrupted run.
RESUME_OVERRIDES = ["train.max_steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=3",
                    "data.translate=2", "data.hflip=true", "data.rotate=10",
                    "model.dropout=0.1", "train.warmup_steps=3"]


def _weights(path):
    return load_file(str(path))


@pytest.mark.parametrize("switches", [
    [],
    # 8-bit moments (a wider model, so some tensors reach bitsandbytes' 4096-element
    # minimum) and background loader workers with augmentation
    ["train.optimizer=adamw8bit", "model.channels=32", "model.norm_groups=8",
     "train.workers=2", "data.translate=2", "data.hflip=true"],
], ids=["default", "8bit-workers-augment"])
def test_resume_equals_uninterrupted(tmp_path, make_cfg, switches):
    if "train.optimizer=adamw8bit" in switches:
        pytest.importorskip("bitsandbytes")
    cfg = make_cfg(*RESUME_OVERRIDES, *switches)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    res_a = train(cfg, run_a, progress=False)
    assert res_a.step == 8 and res_a.images_seen == 8 * cfg.train.batch_size
    assert [p.name for p in list_checkpoints(run_a)] == ["step-0000004", "step-0000008"]

    # B is A "crashed" right after the step-4 checkpoint: the step-8 checkpoint is gone
    # and metrics.jsonl still holds lines past step 4 that the resume must drop.
    shutil.copytree(run_a, run_b)
    shutil.rmtree(run_b / "checkpoints" / "step-0000008")
    res_b = train(read_config(run_b), run_b, resume=True, progress=False)
    assert res_b.step == 8 and res_b.images_seen == res_a.images_seen

    ma, mb = read_metrics(run_a), read_metrics(run_b)
    assert [m["step"] for m in ma] == list(range(1, 9))
    assert [m["step"] for m in mb] == list(range(1, 9))  # no duplicated or missing steps
    for a, b in zip(ma, mb):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6, rel=0), a["step"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
        assert b["images_seen"] == a["images_seen"]
    assert res_b.loss == pytest.approx(res_a.loss, abs=1e-6)

    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        wa = _weights(run_a / "checkpoints" / "step-0000008" / name)
        wb = _weights(run_b / "checkpoints" / "step-0000008" / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=f"{name}:{k}")
    sa = (run_a / "checkpoints" / "step-0000008" / "state.json").read_text()
    sb = (run_b / "checkpoints" / "step-0000008" / "state.json").read_text()
    ja, jb = json.loads(sa), json.loads(sb)
    for k in ("images_seen", "ema_updates", "data", "skipped_steps", "step"):
        assert ja[k] == jb[k], k


def _fixed_eval_loss(cfg, model, n=64):
    """Weighted training loss of `model` on a fixed batch, timesteps and noise."""
    data = load_source(cfg.data)
    x0 = to_model_range(BatchStream(data, n, seed=123).next()[0])
    sch = schedule_for(cfg)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, sch.T, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = sch.q_sample(x0, t, noise)
    tgt = target(cfg.diffusion.prediction, sch, x0, noise, t)
    w = loss_weight(cfg.diffusion.prediction, cfg.diffusion.loss_weighting, sch, t,
                    cfg.diffusion.min_snr_gamma)
    model.eval()
    with torch.no_grad():
        out = model(x_t, t)
    return (((out - tgt) ** 2).mean(dim=(1, 2, 3)) * w).mean().item()


def test_training_lowers_the_loss(run_dir, make_cfg):
    cfg = make_cfg("train.max_steps=60", "train.batch_size=16", "train.log_every=5",
                   "train.warmup_steps=5", "train.ema_decay=0.9")
    res = train(cfg, run_dir, progress=False)
    assert res.step == 60 and res.images_seen == 960
    untrained = build_model(cfg)
    trained = build_model(cfg)
    load_weights(run_dir / "checkpoints" / "step-0000060" / "model.safetensors", trained)
    before, after = _fixed_eval_loss(cfg, untrained), _fixed_eval_loss(cfg, trained)
    assert after < 0.7 * before, (before, after)
    ema = build_model(cfg)
    load_weights(run_dir / "checkpoints" / "step-0000060" / "ema.safetensors", ema)
    assert _fixed_eval_loss(cfg, ema) < 0.85 * before
    m = read_metrics(run_dir)
    assert [r["step"] for r in m] == list(range(5, 61, 5))
    assert m[-1]["lr"] < m[1]["lr"]  # cosine decay after warm-up
    assert all(r["skipped_steps"] == 0 for r in m)
    # the end-of-run sample grid exists and is a PNG
    assert res.grid is not None and res.grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_directory_rules(run_dir, make_cfg, capsys):
    cfg = make_cfg("train.max_steps=2")
    with pytest.raises(ConfigError, match="cannot be used together"):
        train(cfg, run_dir, resume=True, fresh=True, progress=False)
    # --resume on a run dir without a checkpoint (killed before its first one) starts it
    first = train(cfg, run_dir, resume=True, progress=False)
    assert "no checkpoint in" in capsys.readouterr().out
    w1 = _weights(run_dir / "checkpoints" / "step-0000002" / "model.safetensors")
    # the same command again resumes (here: already at max_steps, so no extra work)
    again = train(cfg, run_dir, progress=False)
    assert again.step == first.step == 2
    assert "resuming" in capsys.readouterr().out
    # a changed config is refused, naming what changed and the ways out
    with pytest.raises(CheckpointError, match=r"train.lr: 0.002 in the run, 0.001 now.*--fresh"):
        train(make_cfg("train.max_steps=2", "train.lr=1e-3"), run_dir, progress=False)
    with pytest.raises(CheckpointError, match=r"model.channels"):
        train(make_cfg("train.max_steps=2", "model.channels=16"), run_dir, resume=True,
              progress=False)
    # --fresh starts over; training is deterministic, so it lands on the same weights
    train(cfg, run_dir, fresh=True, progress=False)
    w2 = _weights(run_dir / "checkpoints" / "step-0000002" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    # the same command may extend the run's budget
    more = train(make_cfg("train.max_steps=3"), run_dir, progress=False)
    assert more.step == 3
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000002", "step-0000003"]
    # --resume (the run's own config + --set) may change training hyper-parameters
    lr = train(make_cfg("train.max_steps=4", "train.lr=1e-3"), run_dir, resume=True, progress=False)
    assert lr.step == 4 and "train.lr 0.002 -> 0.001" in capsys.readouterr().out


def test_corrupt_checkpoint_is_skipped_with_a_warning(run_dir, make_cfg, capsys):
    cfg = make_cfg("train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    train(cfg, run_dir, progress=False)
    ref = _weights(run_dir / "checkpoints" / "step-0000004" / "model.safetensors")
    bad = run_dir / "checkpoints" / "step-0000004" / "ema.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # cut in half
    capsys.readouterr()
    result = train(cfg, run_dir, progress=False)  # resumes from step 2, redoes 3 and 4
    out, err = capsys.readouterr()
    assert "warning" in err and "step-0000004" in err and "skipped" in err
    assert "resuming" in out and "step-0000002" in out
    assert result.step == 4
    new = _weights(run_dir / "checkpoints" / "step-0000004" / "model.safetensors")
    assert all(torch.equal(ref[k], new[k]) for k in ref)  # exact, as if never broken
    # every checkpoint corrupt: a clear error, nothing deleted
    before = list_checkpoints(run_dir)
    for ck in before:
        (ck / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="every checkpoint .* corrupt"):
        train(cfg, run_dir, progress=False)
    assert list_checkpoints(run_dir) == before


def test_time_budget_becomes_a_recorded_step_plan_and_resume_is_exact(run_dir, tmp_path,
                                                                      make_cfg, monkeypatch):
    """max_minutes is planned into train.budget_steps at step PLAN_AT; the LR follows steps
    only, so pinning the plan reproduces the run, also across an interruption."""
    import effusion.train.loop as loop
    from effusion.runs import read_config

    budget = ["train.max_minutes=0.08", "train.checkpoint_every=7", "train.max_steps=100000",
              "train.budget_min_steps=0"]
    monkeypatch.setattr(loop, "TIME_GUARD", 1000.0)  # a busy machine must not cut a run short
    a = train(make_cfg(*budget), run_dir, progress=False)
    planned = read_config(run_dir).train.budget_steps
    assert planned >= loop.PLAN_AT and a.step == planned
    assert any(m.get("budget_steps") == planned for m in read_metrics(run_dir))
    lrs = {m["step"]: m["lr"] for m in read_metrics(run_dir) if "lr" in m}
    # the same plan, pinned, in a run interrupted half-way and resumed by the same command
    pinned = make_cfg(*budget, f"train.budget_steps={planned}")
    real_step, calls = loop.train_step, {"n": 0}

    def flaky(state, task, tc, *args):
        calls["n"] += 1
        if calls["n"] == planned // 2:
            raise KeyboardInterrupt
        return real_step(state, task, tc, *args)

    monkeypatch.setattr(loop, "train_step", flaky)
    b_dir = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(pinned, b_dir, progress=False)
    monkeypatch.setattr(loop, "train_step", real_step)
    b = train(pinned, b_dir, progress=False)
    assert b.step == planned and read_config(b_dir).train.budget_steps == planned
    wa = _weights(run_dir / "checkpoints" / f"step-{planned:07d}" / "model.safetensors")
    wb = _weights(b_dir / "checkpoints" / f"step-{planned:07d}" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert {m["step"]: m["lr"] for m in read_metrics(b_dir) if "lr" in m} == lrs


def test_labels_required_for_class_conditional_model(tmp_path, make_cfg):
    import numpy as np

    np.savez(tmp_path / "nolabels.npz", images=np.zeros((8, 16, 16), np.uint8))
    cfg = make_cfg(f"data.source=npz:{tmp_path / 'nolabels.npz'}", "model.num_classes=10")
    with pytest.raises(ConfigError, match="needs labels.*has none"):
        train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="data has 10 classes but model.num_classes=3"):
        train(make_cfg("model.num_classes=3"), tmp_path / "run2", progress=False)


class _NaNAfter(torch.nn.Module):
    """Wraps the real U-Net; its output is NaN on the calls listed in `nan_calls`."""

    def __init__(self, inner, nan_calls):
        super().__init__()
        self.inner, self.nan_calls, self.calls = inner, nan_calls, 0

    def forward(self, x, t, cond=None):
        out = self.inner(x, t, cond)
        self.calls += 1
        return out * float("nan") if (self.calls - 1) in self.nan_calls else out


def test_persistent_nan_loss_stops_training_without_updating(run_dir, make_cfg, monkeypatch):
    built = {}
    real_build = generative.build_model

    def build(cfg, **kw):
        m = _NaNAfter(real_build(cfg, **kw), nan_calls=range(10**9))
        built["model"] = m
        built["init"] = {k: v.clone() for k, v in m.state_dict().items()}
        return m

    monkeypatch.setattr(generative, "build_model", build)
    cfg = make_cfg("train.max_steps=50")
    with pytest.raises(TrainingError, match="NaN") as e:
        train(cfg, run_dir, progress=False)
    assert f"{loop.MAX_NONFINITE_IN_A_ROW} steps in a row at step 0" in str(e.value)
    m = built["model"]
    assert m.calls == loop.MAX_NONFINITE_IN_A_ROW
    for k, v in m.state_dict().items():
        assert torch.equal(v, built["init"][k]), k
    assert all(p.grad is None for p in m.parameters())
    assert list_checkpoints(run_dir) == []


def test_occasional_nan_steps_are_skipped(run_dir, make_cfg, monkeypatch):
    real_build = generative.build_model
    monkeypatch.setattr(generative, "build_model",
                        lambda cfg, **kw: _NaNAfter(real_build(cfg, **kw), {1, 2, 5}))
    res = train(make_cfg("train.max_steps=4"), run_dir, progress=False)
    assert res.step == 4
    m = read_metrics(run_dir)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in m] == [0, 2, 2, 3]  # NaN on forward calls 1, 2 and 5
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in m)


def test_lr_schedules():
    from effusion.train.optim import lr_factor

    # Warm-up then cosine to 0 over progress.
    assert lr_factor(0, 0.0, 10) == pytest.approx(0.1)
    assert lr_factor(20, 0.5, 10) == pytest.approx(0.5)
    assert lr_factor(20, 1.0, 10) == pytest.approx(0.0)
    # Step: gamma every `step_every` epochs, independent of progress.
    f = [lr_factor(100, 0.9, 0, "step", epoch=e, step_every=5, gamma=0.3) for e in range(12)]
    assert f[:5] == [1.0] * 5 and f[5:10] == [pytest.approx(0.3)] * 5 and f[10] == pytest.approx(0.09)
    assert lr_factor(100, 0.9, 0, "none", epoch=7) == 1.0


@pytest.mark.parametrize("opt", ["adamw", "adam", "rmsprop", "sgd"])
def test_every_optimizer_builds_and_lowers_a_loss(opt, make_cfg):
    from effusion.train.optim import build_optimizer

    cfg = make_cfg(f"train.optimizer={opt}", "train.lr=0.01", "train.weight_decay=0.1")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    o = build_optimizer(model, cfg.train)
    name = {"adamw": "AdamW", "adam": "Adam", "rmsprop": "RMSprop", "sgd": "SGD"}[opt]
    assert type(o).__name__ == name
    decays = [g["weight_decay"] for g in o.param_groups]
    assert decays == [0.1, 0.0]  # matrices decay, biases do not
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    first = None
    for _ in range(30):
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        o.zero_grad()
        loss.backward()
        o.step()
    assert loss.item() < first


def test_epochs_limit_training(run_dir, make_cfg):
    res = train(make_cfg("train.epochs=2", "train.max_steps=1000"), run_dir, progress=False)
    # 58 training images (64 minus the 10% held out), batch 8: 2 epochs end within step 15.
    assert res.step == 15 and res.images_seen == 120


def test_num_classes_auto_follows_the_data(tmp_path, make_cfg):
    import numpy as np

    from effusion.runs.files import read_config

    train(make_cfg("model.num_classes=-1", "train.max_steps=1"), tmp_path / "a", progress=False)
    assert read_config(tmp_path / "a").model.num_classes == 10  # mnist5k is labelled
    np.savez(tmp_path / "u.npz", images=np.zeros((16, 16, 16), np.uint8))
    train(make_cfg("model.num_classes=-1", "train.max_steps=1", f"data.source=npz:{tmp_path / 'u.npz'}"),
          tmp_path / "b", progress=False)
    assert read_config(tmp_path / "b").model.num_classes == 0  # unlabelled: unconditional
    from effusion.models import build_model

    with pytest.raises(ConfigError, match="resolved against the data"):
        build_model(make_cfg("model.num_classes=-1"))


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """4 micro-batches of 4 give the same update as one batch of 16 (fp32, 1e-5; plain SGD,
    whose step scales with the gradient, so a wrong accumulation scale shows): a
    deterministic loss (mlp classifier, no dropout, no augmentation) on the same images."""
    from effusion.recipes import classifier_config

    def weights(batch: int, accum: int, name: str) -> dict:
        cfg = classifier_config(["model.arch=mlp", "model.dropout=0", "data.rotate=0",
                                 "data.translate=0", "data.image_size=16", "data.limit=200",
                                 f"train.batch_size={batch}", f"train.grad_accum={accum}",
                                 "train.max_steps=2", "train.epochs=0", "train.precision=fp32",
                                 "train.threads=1", "train.grad_clip=0", "train.optimizer=sgd",
                                 "train.momentum=0", "train.lr=0.1"])
        res = train(cfg, tmp_path / name, progress=False)
        assert res.step == 2 and res.images_seen == 32
        ckpt = sorted((tmp_path / name / "checkpoints").iterdir())[-1]
        return load_file(str(ckpt / "model.safetensors"))

    big, small = weights(16, 1, "big"), weights(4, 4, "small")
    for k in big:
        assert torch.allclose(big[k], small[k], atol=1e-5), k
    with pytest.raises(ConfigError, match="grad_accum"):
        weights(4, 0, "bad")


def test_tf32_switch_sets_the_flags_and_says_cpu_is_a_no_op(run_dir, make_cfg, capsys):
    from effusion.precision import apply_tf32

    try:
        train(make_cfg("train.tf32=false", "train.max_steps=1"), run_dir, progress=False)
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert "train.tf32=false: no effect on cpu" in capsys.readouterr().out
        note = apply_tf32(True, torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32
        assert "no effect on cpu" in note
    finally:
        apply_tf32(False, torch.device("cpu"))  # torch's own default for matmul


def test_train_state_round_trip(make_cfg):
    """`TrainState.state_dict` is everything a checkpoint holds; loading it into a fresh
    state gives the same weights, EMA, optimizer moments, RNG streams and data position."""
    from effusion.models import build_model as build
    from effusion.precision import Precision
    from effusion.recipes import DiffusionRecipe
    from effusion.train.loop import PlainRecipe, TaskContext, load_training_data, train_step
    from effusion.train.state import TrainState

    cfg = load_training_data(make_cfg()).cfg
    prec = Precision(torch.device("cpu"), "fp32")
    data = load_training_data(cfg)
    a = TrainState.create(cfg, lambda: build(cfg), data.train_set, prec)
    task = DiffusionRecipe().make_task(TaskContext(cfg, None, prec, a.mem_format, None,
                                                   data.train_set, data.val_set))
    for _ in range(2):
        train_step(a, task, cfg.train)
        a.ema.update(a.model)
        a.step += 1
    sd = a.state_dict({"k": 1})
    b = TrainState.create(cfg, lambda: build(cfg), data.train_set, prec)
    assert b.load_state_dict(sd) == {"k": 1}
    assert b.step == 2 and b.ema.updates == 2 and b.loader.state_dict() == a.loader.state_dict()
    for x, y in [(a.model, b.model), (a.ema.model, b.ema.model)]:
        assert all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    ma = a.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(ma, b.optimizer.state_dict()["state"][0]["exp_avg"])
    assert isinstance(PlainRecipe().build_model(cfg), torch.nn.Module)


def test_guidance_input_learns_at_its_own_rate_and_old_optimizer_states_are_refused(make_cfg):
    """A guidance student's new w embedding trains at GUIDANCE_LR_SCALE x the LR (its own
    groups); a checkpoint whose optimizer was built with other groups is a clear error."""
    from effusion.models import build_model as build
    from effusion.models.unet import GUIDANCE_LR_SCALE
    from effusion.precision import Precision
    from effusion.runs import CheckpointError
    from effusion.train.loop import load_training_data
    from effusion.train.optim import build_optimizer, set_lr
    from effusion.train.state import TrainState

    cfg = load_training_data(make_cfg("model.num_classes=10", "model.guidance_input=true",
                                      "train.weight_decay=0.01")).cfg
    model = build(cfg)
    opt = build_optimizer(model, cfg.train)
    set_lr(opt, 1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        fast = [names[id(p)].startswith("guidance_mlp.") for p in g["params"]]
        assert all(fast) or not any(fast)
        assert g["lr"] == pytest.approx(1e-3 * (GUIDANCE_LR_SCALE if fast and fast[0] else 1))
    scaled = [p for g in opt.param_groups if g.get("lr_scale") for p in g["params"]]
    assert len(scaled) == len(list(model.guidance_mlp.parameters())) == 4
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0, 0.01, 0.0]
    plain = build_optimizer(build(load_training_data(make_cfg()).cfg), cfg.train)
    assert len(plain.param_groups) == 2  # models without a guidance input: as before

    prec = Precision(torch.device("cpu"), "fp32")
    data = load_training_data(cfg)
    state = TrainState.create(cfg, lambda: build(cfg), data.train_set, prec)
    sd = state.state_dict({})
    sd["optimizer"] = {**sd["optimizer"], "param_groups": sd["optimizer"]["param_groups"][:2]}
    with pytest.raises(CheckpointError, match="parameter groups.*--fresh"):
        state.load_state_dict(sd)


def test_a_slow_machine_trains_a_narrower_unet_for_its_time_budget(run_dir, make_cfg, monkeypatch,
                                                                    capsys):
    """The probe at the start of a time-budgeted run halves model.channels when fewer than
    train.budget_min_steps would fit; the choice is recorded and the same command resumes."""
    from effusion.recipes.generative import DiffusionRecipe
    from effusion.runs import read_config

    budget = ["train.max_minutes=10", "train.max_steps=3", "train.budget_min_steps=600"]
    monkeypatch.setattr(DiffusionRecipe, "step_seconds", lambda self, cfg, data, prec: 2.0)  # 300 fit
    train(make_cfg(*budget), run_dir, progress=False)
    out = capsys.readouterr().out
    assert "300 steps fit" in out and "training model.channels=4 instead" in out
    stored = read_config(run_dir)
    assert stored.model.channels == 4 and stored.model.head_channels == 4
    more = train(make_cfg(*budget[:1], "train.max_steps=4", *budget[2:]), run_dir, progress=False)
    assert more.step == 4 and "resuming" in capsys.readouterr().out  # same command, no conflict
    # a fast machine keeps the width; budget_min_steps=0 never probes
    monkeypatch.setattr(DiffusionRecipe, "step_seconds", lambda self, cfg, data, prec: 0.1)
    train(make_cfg(*budget), run_dir, fresh=True, progress=False)
    assert read_config(run_dir).model.channels == 8 and "6000 steps fit" in capsys.readouterr().out
    monkeypatch.setattr(DiffusionRecipe, "step_seconds", lambda *a: 1 / 0)
    train(make_cfg(*budget[:2], "train.budget_min_steps=0"), run_dir, fresh=True, progress=False)
    assert read_config(run_dir).model.channels == 8


def test_the_width_probe_times_real_steps(make_cfg):
    from effusion.precision import Precision
    from effusion.recipes.generative import DiffusionRecipe

    recipe = DiffusionRecipe()
    cfg = make_cfg("model.num_classes=10")
    data = recipe.prepare_data(cfg, torch.device("cpu"))
    before = torch.get_rng_state()
    s = recipe.step_seconds(data.cfg, data, Precision(torch.device("cpu"), "fp32"))
    assert 0 < s < 5 and torch.equal(before, torch.get_rng_state())


def test_time_guard_only_cuts_a_run_far_behind_its_plan():
    from types import SimpleNamespace

    import effusion.train.loop as loop

    tc = SimpleNamespace(max_minutes=1.0, budget_steps=0)
    state = SimpleNamespace(elapsed_s=59.0)
    assert not loop.out_of_time(state, tc)
    state.elapsed_s = 60.0
    assert loop.out_of_time(state, tc)  # no plan yet: the budget itself
    tc.budget_steps = 500
    assert not loop.out_of_time(state, tc)  # planned: steps decide ...
    state.elapsed_s = 60.0 * loop.TIME_GUARD
    assert loop.out_of_time(state, tc)  # ... until the guard
    assert not loop.out_of_time(state, SimpleNamespace(max_minutes=0, budget_steps=0))
