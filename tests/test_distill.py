"""Guidance distillation: the student learns the guided teacher (its error falls below the
untrained student's), runs in one network call, and its run dir is a run like any other."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from effusion.config import ConfigError
from effusion.diffusion import GuidedDenoiser, NetworkDenoiser
from effusion.recipes import distill_guidance, train
from effusion.recipes.distill import GuidanceDistillRecipe
from effusion.runs import describe, load_run, read_config, read_lineage
from effusion.sampling import generate

TEACHER = ["model.num_classes=10", "train.cond_drop=0.3", "train.max_steps=40", "train.lr=3e-3",
           "train.ema_decay=0"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("distill") / "teacher"
    train(tiny_config(*TEACHER), run, progress=False)
    return run


def _guided_error(student, teacher_run, w: float) -> float:
    """Mean squared error of the student's x0 to the guided teacher's on a fixed batch."""
    t_run = load_run(teacher_run, device="cpu")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 1, 16, 16, generator=g)
    t = torch.randint(5, 50, (32,), generator=g)
    c = torch.arange(32) % 10
    with torch.no_grad():
        ref = t_run.denoiser(guidance=w, clip_x0=False)(x, t, c)
        s = NetworkDenoiser(lambda a, b, k: student(a, b, k, w=torch.tensor(w)), t_run.schedule,
                            t_run.config.diffusion.prediction)(x, t, c)
    return float((s - ref).square().mean())


def test_student_learns_the_guided_teacher(teacher, tmp_path):
    out = tmp_path / "student"
    res = distill_guidance(teacher, out, guidance_range=(1.0, 4.0), minutes=0, progress=False,
                           overrides=["train.max_steps=100", "train.lr=3e-4", "train.ema_decay=0",
                                      "train.warmup_steps=5"])
    assert res.step == 100
    cfg = read_config(out)
    untrained = GuidanceDistillRecipe(load_run(teacher, device="cpu"), (1.0, 4.0)).build_model(cfg)
    trained = load_run(out, device="cpu").model
    for w in (2.0, 3.5):
        before, after = _guided_error(untrained.eval(), teacher, w), _guided_error(trained, teacher, w)
        assert after < 0.8 * before, (w, before, after)
    # the untrained student is the plain conditional teacher: exact at w = 1
    assert _guided_error(untrained.eval(), teacher, 1.0) < 1e-10


def test_student_run_is_one_call_per_step_and_records_its_lineage(teacher, tmp_path):
    out = tmp_path / "s"
    distill_guidance(teacher, out, minutes=0, progress=False, overrides=["train.max_steps=2"])
    run = load_run(out, device="cpu")
    den = run.denoiser()
    assert isinstance(den, NetworkDenoiser) and not isinstance(den, GuidedDenoiser)
    calls = []
    real = run.model.forward
    run.model.forward = lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k)
    images = generate(run, 6, steps=3, seed=0, guidance=2.0)
    assert images.shape == (6, 1, 16, 16) and calls == [6, 6, 6]  # no doubled batch
    (step,) = read_lineage(out)
    assert step["pass"] == "distill-guidance" and step["guidance_range"] == [1.0, 3.0]
    assert describe(out).lineage == [step]
    with pytest.raises(ConfigError, match="guidance must be >= 0"):
        run.denoiser(guidance=-1)


def test_distilling_needs_a_guidance_trained_conditional_run(tmp_path, teacher):
    plain = tmp_path / "plain"
    train(tiny_config("model.num_classes=10", "train.cond_drop=0", "train.max_steps=1"), plain,
          progress=False)
    with pytest.raises(ConfigError, match="cannot be guidance-distilled"):
        distill_guidance(plain, tmp_path / "x", minutes=0, progress=False)
    with pytest.raises(ConfigError, match="own directory"):
        distill_guidance(teacher, teacher, minutes=0, progress=False)
    with pytest.raises(ConfigError, match="guidance-range"):
        distill_guidance(teacher, tmp_path / "y", guidance_range=(3.0, 1.0), progress=False)


def test_student_exports_to_onnx_with_its_guidance_input(teacher, tmp_path):
    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    from effusion.optimize.export import export_run

    student = tmp_path / "s"
    distill_guidance(teacher, student, minutes=0, progress=False,
                     overrides=["train.max_steps=3", "train.lr=3e-3", "train.ema_decay=0"])
    report = export_run(student, tmp_path / "onnx", repeats=1)
    assert report["max_abs_diff_fp32"] < 1e-4
    eager, onnx = load_run(student, device="cpu"), load_run(tmp_path / "onnx", device="cpu")
    a = generate(eager, 4, steps=3, seed=1, guidance=2.5).float()
    b = generate(onnx, 4, steps=3, seed=1, guidance=2.5).float()
    assert (a - b).abs().max() <= 1  # uint8 rounding at most
    assert [p["pass"] for p in read_lineage(tmp_path / "onnx")] == ["distill-guidance", "export"]
