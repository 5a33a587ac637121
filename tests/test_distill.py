"""Guidance distillation: the student learns the guided teacher (its error falls below the
untrained student's), runs in one network call, and its run dir is a run like any other."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from effusion.config import ConfigError
from effusion.diffusion import GuidedDenoiser, NetworkDenoiser
from effusion.recipes import distill_guidance, train
from effusion.recipes.distill import from_teacher
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
    untrained = from_teacher(load_run(teacher, device="cpu").model)(cfg)
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


# ------------------------------------------------------------------ step distillation

def _x0_errors(teacher_model, student_dir, x, t, c, w, target) -> list[float]:
    """Mean squared error of the x0 estimate to `target`: the untrained student (the
    teacher's weights in the student's config) first, the trained one second."""
    from effusion.diffusion import to_x0

    student = load_run(student_dir, device="cpu")
    cfg = student.config
    with torch.no_grad():
        untrained = from_teacher(teacher_model)(cfg).eval()
        return [float((to_x0(cfg.diffusion.prediction, student.schedule, m(x, t, c, w=w), x, t)
                       - target).square().mean()) for m in (untrained, student.model)]


def _step_task(run_dir, steps: int):
    """A DistillTask for `steps` student steps with the run as teacher, without a loop."""
    from effusion.diffusion import schedule_for
    from effusion.diffusion.samplers import timesteps
    from effusion.recipes.distill import DistillTask, Teacher

    run = load_run(run_dir, device="cpu")
    task = DistillTask.__new__(DistillTask)
    task.cfg, task.schedule, task.steps = run.config, schedule_for(run.config), steps
    task.teacher = Teacher(run)
    task.grid = torch.tensor(timesteps(task.schedule, steps, "trailing") + [-1])
    task.fine = torch.tensor(timesteps(task.schedule, 2 * steps, "trailing") + [-1])
    return task, run


def test_step_target_is_exact_when_the_teacher_knows_x0(teacher):
    """If the teacher's x0 estimate is the same everywhere, its two DDIM steps equal one
    DDIM step with that x0, so the student's target must imply exactly that x0."""
    from effusion.diffusion import from_x0, to_x0

    task, run = _step_task(teacher, 4)
    assert torch.equal(task.fine[::2], task.grid)  # trailing grids nest
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 16, 16, generator=g).clamp(-1, 1)
    pred = run.config.diffusion.prediction

    class Oracle:  # returns, in prediction space, the output that implies x0
        def __call__(self, z, t, cond, w):
            return from_x0(pred, task.schedule, x0, z, t)

    task.teacher = Oracle()
    i = torch.tensor([0, 1, 2, 3, 0, 3])
    t = task.grid[i]
    z = task.schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    out = task._step_target(z, t, i, None, None)
    assert torch.allclose(to_x0(pred, task.schedule, out, z, t), x0, atol=1e-4)


def test_step_student_learns_two_teacher_steps_in_one(teacher, tmp_path):
    from effusion.diffusion import to_x0
    from effusion.recipes import distill_steps

    out = tmp_path / "steps"
    res = distill_steps(teacher, out, steps=2, from_steps=4, minutes=0, progress=False,
                        overrides=["train.max_steps=60", "train.lr=1e-3", "train.ema_decay=0",
                                   "train.warmup_steps=5"])
    assert res.step == 60  # the last round's steps
    cfg = read_config(out)
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.spacing) == ("ddim", 2, "trailing")
    assert cfg.model.guidance_input  # a guided teacher gives a student with a w input
    (entry,) = read_lineage(out)
    assert entry["pass"] == "distill-steps" and entry["rounds"] == [2]
    task, _ = _step_task(teacher, 2)
    task.w_range = (1.0, 3.0)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(32, 1, 16, 16, generator=g).clamp(-1, 1)
    i = torch.randint(0, 2, (32,), generator=g)
    t, c, w = task.grid[i], torch.arange(32) % 10, torch.full((32,), 2.0)
    z = task.schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        tgt = to_x0(cfg.diffusion.prediction, task.schedule, task._step_target(z, t, i, c, w), z, t)
    err = _x0_errors(load_run(teacher, device="cpu").model, out, z, t, c, w, tgt)
    assert err[1] < 0.8 * err[0], err
    images = generate(load_run(out, device="cpu"), 4, seed=0)  # its own 2 DDIM steps
    assert images.shape == (4, 1, 16, 16)


def test_step_distillation_rounds_resume_and_refuse_bad_counts(teacher, tmp_path):
    from effusion.recipes import distill_steps

    out = tmp_path / "r"
    small = ["train.max_steps=2", "train.ema_decay=0"]
    distill_steps(teacher, out, steps=2, from_steps=8, minutes=0, progress=False, overrides=small)
    assert read_lineage(out)[-1]["rounds"] == [4, 2]
    with pytest.raises(ConfigError, match="every round"):
        distill_steps(teacher, out, steps=2, from_steps=8, minutes=0, progress=False,
                      overrides=small, resume=True)
    with pytest.raises(Exception, match="--fresh"):  # a trained --out is not overwritten
        distill_steps(teacher, out, steps=2, from_steps=8, minutes=0, progress=False,
                      overrides=small)
    for bad in ((4, 4), (4, 12), (0, 8)):
        with pytest.raises(ConfigError, match="power of two"):
            distill_steps(teacher, tmp_path / "x", steps=bad[0], from_steps=bad[1], progress=False)


# ------------------------------------------------------------------ consistency distillation

def test_consistency_sampler_returns_the_x0_of_a_consistent_denoiser():
    """A denoiser whose x0 is the same everywhere is a perfect consistency function: the
    multistep sampler returns that x0 at any step count, and redraws noise between steps."""
    from effusion.diffusion import Schedule, make_betas, sample_consistency, timesteps

    sched = Schedule(make_betas("cosine", 50))
    target_x0 = torch.rand(3, 1, 4, 4)
    seen = []

    def den(x, t, cond):
        seen.append((int(t[0]), x.clone()))
        return target_x0

    for steps in (1, 2, 4):
        seen.clear()
        out = sample_consistency(den, sched, torch.randn(3, 1, 4, 4), steps,
                                 generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, target_x0)
        assert [t for t, _ in seen] == timesteps(sched, steps, "trailing")
    # the second point is x0 noised afresh to t = 24: its noise is not the first point's
    x1 = seen[1][1]
    ab = float(sched.alpha_bar(seen[1][0]))
    eps = (x1 - ab ** 0.5 * target_x0) / (1 - ab) ** 0.5
    assert 0.5 < float(eps.std()) < 1.5


def _consistency_task(run_dir, skip: int):
    from effusion.diffusion import schedule_for
    from effusion.diffusion.samplers import timesteps
    from effusion.recipes.distill import ConsistencyTask, Teacher

    run = load_run(run_dir, device="cpu")
    task = ConsistencyTask.__new__(ConsistencyTask)
    task.cfg, task.schedule, task.steps = run.config, schedule_for(run.config), None
    task.teacher, task.w_range, task.encode_batches = Teacher(run), None, False
    task.mem_format = torch.contiguous_format
    task.prec = run.precision
    T = task.schedule.T
    task.points = torch.tensor([-1] + timesteps(task.schedule, T // skip, "trailing")[::-1])
    task.pair_weights = torch.ones(len(task.points) - 1)
    return task, run


def test_consistency_loss_vanishes_for_a_consistent_student_and_anchors_at_the_data(teacher):
    from effusion.diffusion import from_x0

    task, run = _consistency_task(teacher, 5)
    assert task.points.tolist() == [-1, 4, 9, 14, 19, 24, 29, 34, 39, 44, 49]
    pred = run.config.diffusion.prediction
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 1, 16, 16, generator=g).clamp(-1, 1)

    class Knows(torch.nn.Module):  # answers, at every x_t and t, the output implying x0
        def forward(self, z, t, cond, w=None):
            return from_x0(pred, task.schedule, x0, z, t)

    task.teacher = lambda z, t, cond, w: from_x0(pred, task.schedule, x0, z, t)
    assert float(task.loss(Knows(), x0, torch.arange(16) % 10, g)) < 1e-4

    class Off(Knows):  # self-consistent, but to other images than the teacher's
        def forward(self, z, t, cond, w=None):
            return from_x0(pred, task.schedule, x0 + 0.5, z, t)

    # Only pairs ending at t_0 (the data: the target is the teacher's step there, x0) see
    # it; without that anchor any consistent function would do.
    x0 = x0[:1].expand(64, -1, -1, -1).contiguous()
    task.teacher = lambda z, t, cond, w: from_x0(pred, task.schedule, x0, z, t)
    assert float(task.loss(Off(), x0, torch.arange(64) % 10, g)) > 0.1
    task.points = task.points[1:]  # no anchor: the same student costs nothing
    task.pair_weights = task.pair_weights[1:]
    assert float(task.loss(Off(), x0, torch.arange(64) % 10, g)) < 1e-4


def test_consistency_student_gets_closer_to_the_teacher_ode_end(teacher, tmp_path):
    from effusion.diffusion import sample_ddim
    from effusion.recipes import distill_steps

    out = tmp_path / "cd"
    distill_steps(teacher, out, steps=2, method="consistency", skip=5, minutes=0, progress=False,
                  overrides=["train.max_steps=80", "train.lr=1e-3", "train.ema_decay=0",
                             "train.warmup_steps=5"])
    cfg = read_config(out)
    assert (cfg.sample.sampler, cfg.sample.steps) == ("consistency", 2)
    assert cfg.model.guidance_input
    (entry,) = read_lineage(out)
    assert entry["pass"] == "distill-steps" and entry["method"] == "consistency"
    assert entry["skip"] == 5
    t_run = load_run(teacher, device="cpu")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 1, 16, 16, generator=g)
    c, w = torch.arange(32) % 10, torch.full((32,), 2.0)
    t = torch.full((32,), 49)
    # the ODE's end from x at t = T-1: the guided teacher's 10-step DDIM on the same grid
    end = sample_ddim(t_run.denoiser(guidance=2.0, clip_x0=False), t_run.schedule, x, 10,
                      cond=c, spacing="trailing")
    err = _x0_errors(t_run.model, out, x, t, c, w, end)
    assert err[1] < 0.8 * err[0], err
    images = generate(load_run(out, device="cpu"), 4, seed=0)  # its own 2 consistency steps
    assert images.shape == (4, 1, 16, 16)
    assert torch.equal(images, generate(load_run(out, device="cpu"), 4, seed=0))


def test_consistency_distillation_refuses_bad_settings(teacher, tmp_path):
    from effusion.recipes import distill_steps

    with pytest.raises(ConfigError, match="--method"):
        distill_steps(teacher, tmp_path / "a", method="lcm", progress=False)
    from typer.testing import CliRunner

    from effusion.cli import app
    r = CliRunner().invoke(app, ["optimize", "distill-steps", "--run", str(teacher), "--out",
                                 str(tmp_path / "c"), "--method", "consistency", "--skip", "7"])
    assert r.exit_code != 0 and "--skip must divide" in r.output  # both flags reach the pass
    with pytest.raises(ConfigError, match="--skip must divide"):
        distill_steps(teacher, tmp_path / "b", method="consistency", skip=7, minutes=0,
                      progress=False, overrides=["train.max_steps=1"])
    pd = tmp_path / "pd"
    distill_steps(teacher, pd, steps=2, from_steps=4, minutes=0, progress=False,
                  overrides=["train.max_steps=1"])
    with pytest.raises(Exception, match="progressive student"):
        distill_steps(teacher, pd, method="consistency", minutes=0, progress=False)


# ------------------------------------------------------------------ smaller student

def test_narrow_student_learns_the_teacher_and_still_guides(teacher, tmp_path):
    from effusion.models import count_params
    from effusion.recipes import distill_student

    out = tmp_path / "narrow"
    distill_student(teacher, out, channels=4, minutes=0, progress=False,
                    overrides=["train.max_steps=80", "train.lr=3e-3", "train.ema_decay=0"])
    cfg = read_config(out)
    assert cfg.model.channels == 4 and cfg.train.cond_drop == 0.3
    t_run, s_run = load_run(teacher, device="cpu"), load_run(out, device="cpu")
    assert count_params(s_run.model) < 0.4 * count_params(t_run.model)
    assert isinstance(s_run.denoiser(guidance=2.0), GuidedDenoiser)  # guidance still works
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 1, 16, 16, generator=g)
    t = torch.randint(0, 50, (32,), generator=g)
    c = torch.arange(32) % 11  # labels and the null class
    from effusion.models import build_model
    untrained = build_model(cfg).eval()
    with torch.no_grad():
        ref = t_run.model(x, t, c)
        err = [float((m(x, t, c) - ref).square().mean()) for m in (untrained, s_run.model)]
    assert err[1] < 0.5 * err[0], err
    assert read_lineage(out)[-1]["pass"] == "distill-student"
    with pytest.raises(ConfigError, match="--channels"):
        distill_student(teacher, tmp_path / "y", channels=0, progress=False)


# ------------------------------------------------------------------ one and two calls per image

def _loss_task(run_dir, steps, w_range):
    """A DistillTask ready to compute `loss` outside the loop (fp32, no VAE)."""
    from effusion.precision import Precision
    from effusion.recipes.distill import Teacher

    task, run = _step_task(run_dir, steps or 1)
    task.steps, task.w_range, task.data_weight = steps, w_range, 0.0
    task.encode_batches, task.mem_format = False, torch.contiguous_format
    task.prec = Precision(torch.device("cpu"), "fp32")
    task.teacher = Teacher(load_run(run_dir, device="cpu", precision="fp32"))
    return task, run


def test_each_distillation_loss_vanishes_for_a_student_that_matches_its_target(teacher):
    """guidance: a student answering the guided teacher; steps (down to 1): a student
    answering the two-teacher-step target at its grid points. Off by 0.1: a clear loss."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 1, 16, 16, generator=g).clamp(-1, 1)
    labels = torch.arange(16) % 10
    task, _ = _loss_task(teacher, None, (1.0, 3.0))

    def guided(off):
        return lambda x, t, c, w=None: task.teacher(x, t, c, w) + off

    assert float(task.loss(guided(0.0), x0, labels, torch.Generator().manual_seed(1))) < 1e-10
    assert float(task.loss(guided(0.1), x0, labels, torch.Generator().manual_seed(1))) > 1e-3
    for steps in (1, 2, 4):
        task, _ = _loss_task(teacher, steps, (1.0, 3.0))
        grid = task.grid.tolist()

        def stepper(off, task=task, grid=grid):
            def f(x, t, c, w=None):
                i = torch.tensor([grid.index(int(v)) for v in t])
                return task._step_target(x.float(), t, i, c, w) + off
            return f

        assert float(task.loss(stepper(0.0), x0, labels, torch.Generator().manual_seed(2))) < 1e-10
        assert float(task.loss(stepper(0.1), x0, labels, torch.Generator().manual_seed(2))) > 1e-3


def test_one_step_student_takes_one_network_call_per_image_and_learns_two_teacher_steps(
        teacher, tmp_path):
    from effusion.diffusion import sample_ddim
    from effusion.recipes import distill_steps

    out = tmp_path / "one"
    distill_steps(teacher, out, steps=1, from_steps=2, minutes=0, progress=False,
                  overrides=["train.max_steps=80", "train.lr=1e-3", "train.ema_decay=0",
                             "train.warmup_steps=5"])
    cfg = read_config(out)
    assert (cfg.sample.sampler, cfg.sample.steps) == ("ddim", 1)
    student = load_run(out, device="cpu")
    calls = []
    student.model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    images = generate(student, 24, seed=0)
    assert images.shape == (24, 1, 16, 16) and sum(calls) == 24  # one call per image
    # the 1-step output moves toward the guided teacher's 2-step DDIM output from the same x_T
    t_run = load_run(teacher, device="cpu")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 1, 16, 16, generator=g)
    c, w = torch.arange(32) % 10, torch.full((32,), 2.0)
    end = sample_ddim(t_run.denoiser(guidance=2.0, clip_x0=False), t_run.schedule, x, 2,
                      cond=c, spacing="trailing")
    err = _x0_errors(t_run.model, out, x, torch.full((32,), 49), c, w, end)
    assert err[1] < 0.8 * err[0], err


def test_ict_pair_weights_favour_low_noise_pairs_and_reach_the_lineage(teacher, tmp_path):
    from effusion.diffusion import schedule_for
    from effusion.recipes import distill_steps
    from effusion.recipes.distill import pair_weights

    sched = schedule_for(read_config(teacher))
    points = torch.tensor([-1, 4, 9, 14, 19, 24, 29, 34, 39, 44, 49])  # the skip-5 grid
    assert torch.equal(pair_weights(sched, points, "uniform"), torch.ones(10))
    w = pair_weights(sched, points, "ict")
    # Mean 1; falling with the noise level past the anchor pair (sigma(t_0) > 0 already,
    # so the anchor pair spans more sigma than the next one); the top pair all but ignored.
    assert abs(float(w.mean()) - 1) < 1e-5 and bool((w[2:] < w[1:-1]).all())
    assert float(w[-1]) < 0.01 * float(w[0])
    ab = sched.alpha_bar(points).double()
    sig = ((1 - ab) / ab).sqrt()
    assert torch.allclose(w[0] / w[1], ((sig[2] - sig[1]) / (sig[1] - sig[0])).float())
    with pytest.raises(ConfigError, match="--weighting"):
        distill_steps(teacher, tmp_path / "bad", method="consistency", skip=5,
                      weighting="snr", progress=False)
    out = tmp_path / "ict"
    distill_steps(teacher, out, steps=1, method="consistency", skip=5, weighting="ict",
                  minutes=0, progress=False, overrides=["train.max_steps=2"])
    assert read_lineage(out)[-1]["weighting"] == "ict"
