"""Distillation: a student network learns from a frozen teacher run, through the shared loop
(same precision, switches, EMA, checkpoints and resume as training).

Three targets, one task (`DistillTask`), and a fourth in `ConsistencyTask` (consistency
distillation: the student's x0 estimate must agree with its own at the point one teacher
DDIM step reaches; see there); each step draws real images (in the teacher's
space: pixels or VAE latents), timesteps t, noise and, for a student with a guidance
input, a weight w ~ U[lo, hi]:

- **guidance** (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage 1):
  the student (the teacher's U-Net plus a w embedding whose output layer starts at zero)
  matches the teacher's classifier-free-guided output in one call instead of two halves.
  Guiding in the network's own prediction space equals guiding x0: at fixed x_t and t,
  eps, v and x0 are affine in one another.
- **student** (soft targets, Hinton et al. 2015, for a denoiser): a narrower U-Net matches
  the teacher's prediction at every noise level. It keeps the teacher's label dropout, so
  it learns the unconditional prediction too and guidance still works on it; with a
  guidance-input teacher it takes w as well. `data_weight` adds the plain denoising loss.
- **steps** (progressive distillation, Salimans & Ho 2022, alg. 2): on the trailing
  N-step DDIM grid, the student's one step from t_i to t_{i+1} must land where the
  teacher's two DDIM steps (through the midpoint of the 2N-step grid) land. The target
  x0 solves the DDIM update for that point (their eq. 8); the loss is the squared error
  in the network's prediction space, which for v-prediction is their "SNR+1" weighting
  in x0. Trailing grids nest (the 2N grid's even points are the N grid), so each round's
  student is the next round's teacher: 32 -> 16 -> 8 -> 4 steps.

Students start from the teacher's EMA weights where the shapes allow (guidance, steps) or
from scratch (a narrower student); the matching loss is weighted like the run's own
training loss (e.g. min-SNR), except for steps (above).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from effusion.config import Config, ConfigError, config_from_dict, parse_overrides
from effusion.diffusion import from_x0, loss_weight, target, to_x0
from effusion.diffusion.samplers import timesteps
from effusion.models import build_model
from effusion.models.pruned import shape_like
from effusion.recipes.generative import DiffusionRecipe, DiffusionTask
from effusion.runs import (CheckpointError, LoadedRun, atomic_write, list_checkpoints, load_run,
                          read_lineage)
from effusion.train.loop import TaskContext, TrainResult
from effusion.train.loop import train as run_loop

# Fine-tuning from a teacher: a lower peak LR and a short warm-up; the EMA warm-up keeps
# early averages close to the (already good) initial weights.
DISTILL_DEFAULTS = ["train.lr=2e-4", "train.warmup_steps=20", "train.sample_every=0",
                    "train.eval_every=0", "train.max_steps=1000000"]
# A student from scratch needs the default recipe's learning rate and warm-up, not its
# teacher's (a distilled teacher's config holds the fine-tuning 2e-4: measured, a
# 16-channel student of the guidance student trained at it for 5 minutes gave noise).
SCRATCH_DEFAULTS = ["train.lr=2e-3", "train.warmup_steps=100", "train.sample_every=0",
                    "train.eval_every=0", "train.max_steps=1000000"]


class Teacher:
    """A frozen diffusion run's network, answering in its prediction space; with a weight
    w it gives the guided prediction (one call for a guidance-distilled run, two batched
    halves with classifier-free guidance otherwise)."""

    def __init__(self, run: LoadedRun):
        if not isinstance(run.model, nn.Module):
            raise ConfigError(f"{run.run_dir} is an exported run; distil from the run it was "
                              "exported from")
        self.run, self.model = run, run.model.eval().requires_grad_(False)
        cfg = run.config
        self.takes_w = cfg.model.guidance_input
        self.can_guide = bool(cfg.model.num_classes) and (self.takes_w or cfg.train.cond_drop > 0)

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                 w: torch.Tensor | None) -> torch.Tensor:
        if self.takes_w:
            return self.model(x_t, t, cond, w=w).float()
        if w is None or cond is None:
            return self.model(x_t, t, cond).float()
        b = x_t.shape[0]
        null = torch.full_like(cond, self.run.num_classes)
        both = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null])).float()
        out_c, out_u = both[:b], both[b:]
        return out_u + w.view(-1, 1, 1, 1) * (out_c - out_u)


class DistillTask(DiffusionTask):
    """The student's loss against the teacher (see the module doc for the three targets);
    grids come from the student at the run's default sampler and guidance."""

    def __init__(self, ctx: TaskContext, teacher: Teacher, w_range: tuple[float, float] | None,
                 data_weight: float = 0.0, steps: int | None = None, vae=None):
        super().__init__(ctx, vae)
        teacher.model.to(self.prec.device)  # loaded wherever its run was; used where we train
        self.teacher, self.w_range, self.data_weight = teacher, w_range, data_weight
        self.steps = steps
        if steps is not None:
            T = self.schedule.T
            self.grid = torch.tensor(timesteps(self.schedule, steps, "trailing") + [-1])
            self.fine = torch.tensor(timesteps(self.schedule, 2 * steps, "trailing") + [-1])
            if 2 * steps > T or not torch.equal(self.fine[::2], self.grid):
                raise ConfigError(f"the {steps}- and {2 * steps}-step grids do not nest for "
                                  f"{T} timesteps")

    def _ddim(self, z: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cond, w) -> torch.Tensor:
        """One deterministic DDIM step of the teacher from t to t_next (per sample)."""
        pred = self.cfg.diffusion.prediction
        x0 = to_x0(pred, self.schedule, self.teacher(z, t, cond, w), z, t)
        ab, ab_next = (self.schedule.alpha_bar(v, z.ndim).to(z.device) for v in (t, t_next))
        eps = (z - ab.sqrt() * x0) / (1 - ab).sqrt()
        return ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps

    def _step_target(self, z: torch.Tensor, t: torch.Tensor, i: torch.Tensor, cond, w) -> torch.Tensor:
        """The prediction that takes the student from z at grid point i to where the
        teacher's two steps land (Salimans & Ho 2022, alg. 2, eq. 8)."""
        dev = z.device
        t_mid, t_next = self.fine[2 * i + 1].to(dev), self.grid[i + 1].to(dev)
        z_next = self._ddim(self._ddim(z, t, t_mid, cond, w), t_mid, t_next, cond, w)
        ab, ab_next = (self.schedule.alpha_bar(v, z.ndim).to(dev) for v in (t, t_next))
        ratio = ((1 - ab_next) / (1 - ab)).sqrt()  # sigma_next / sigma
        x0 = (z_next - ratio * z) / (ab_next.sqrt() - ratio * ab.sqrt())
        return from_x0(self.cfg.diffusion.prediction, self.schedule, x0, z, t)

    def _cond_and_w(self, labels: torch.Tensor | None, b: int, gen: torch.Generator
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The batch's labels (with the run's label dropout, so a student without w keeps
        learning "no label") and guidance weights w ~ U[lo, hi], on the device."""
        dev = self.prec.device
        cond = w = None
        if self.cfg.model.num_classes:
            cond = labels.clone()
            if self.cfg.train.cond_drop > 0:
                drop = torch.rand(b, generator=gen) < self.cfg.train.cond_drop
                cond[drop] = self.cfg.model.num_classes
            cond = cond.to(dev)
        if self.w_range is not None:
            lo, hi = self.w_range
            w = (lo + (hi - lo) * torch.rand(b, generator=gen)).to(dev)
        return cond, w

    def loss(self, model: Any, x0: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator) -> torch.Tensor:
        dc, dev, b = self.cfg.diffusion, self.prec.device, x0.shape[0]
        if self.encode_batches:
            x0 = self.vae.encode(x0)  # augmented pixels: encoded on the fly
        if self.steps is None:
            i = None
            t = torch.randint(0, self.schedule.T, (b,), generator=gen)
        else:
            i = torch.randint(0, self.steps, (b,), generator=gen)
            t = self.grid[i]
        noise = torch.randn(x0.shape, generator=gen)
        cond, w = self._cond_and_w(labels, b, gen)
        x_t = self.schedule.q_sample(x0, t, noise).to(dev, memory_format=self.mem_format)
        t_dev = t.to(dev)
        with self.prec.autocast():
            if i is None:
                tgt = self.teacher(x_t, t_dev, cond, w)
            else:
                tgt = self._step_target(x_t.float(), t_dev, i, cond, w)
            out = model(x_t, t_dev, cond, **({"w": w} if w is not None else {}))
        err = ((out.float() - tgt.float()) ** 2).mean(dim=(1, 2, 3))
        if i is None:
            err = err * loss_weight(dc.prediction, dc.loss_weighting, self.schedule, t,
                                    dc.min_snr_gamma).to(dev)
        loss = err.mean()
        if self.data_weight:
            data_tgt = target(dc.prediction, self.schedule, x0, noise, t).to(dev)
            loss = loss + self.data_weight * ((out.float() - data_tgt) ** 2).mean()
        return loss


class ConsistencyTask(DistillTask):
    """Consistency distillation (Song et al. 2023, alg. 2, with iCT's choices, Song &
    Dhariwal 2023): on the grid t_0 = -1 < t_1 < ... < t_N = T-1 spaced `skip` timesteps
    apart, the student's x0 estimate at x_{t_{n+1}} must equal its own x0 estimate
    (without gradient) at the point the teacher's one DDIM step reaches at t_n. At t_0 the
    consistency function is the identity (abar = 1: that point is the data itself), which
    anchors the chain. The network's own x0 estimate is the consistency function (as in
    latent consistency models): no new parameters, the teacher's weights fit at once.

    Choices, and why: the target network is the student itself under stop-gradient (iCT
    found an EMA target biases the fixed point and slows training); the distance is iCT's
    pseudo-Huber in x0 space, c = 0.00054 sqrt(d); pairs are drawn uniformly. Each pair's
    loss is weighted `weighting="uniform"` (1, Song et al. 2023) or `"ict"`: iCT's
    lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n), in the noise levels sigma = sqrt((1 -
    abar) / abar) of the pair's ends, normalised to mean 1 over the grid, which puts the
    weight on the low-noise pairs whose targets are closest to the data."""

    WEIGHTINGS = ("uniform", "ict")

    def __init__(self, ctx: TaskContext, teacher: Teacher, w_range: tuple[float, float] | None,
                 skip: int, vae=None, weighting: str = "uniform"):
        super().__init__(ctx, teacher, w_range, vae=vae)
        T = self.schedule.T
        if skip < 1 or T % skip:
            raise ConfigError(f"--skip must divide the run's {T} timesteps, got {skip}")
        # ascending: -1 (data), skip-1, 2*skip-1, ..., T-1 (the trailing grid of T/skip steps)
        self.points = torch.tensor([-1] + timesteps(self.schedule, T // skip, "trailing")[::-1])
        self.pair_weights = pair_weights(self.schedule, self.points, weighting)

    def loss(self, model: Any, x0: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator) -> torch.Tensor:
        pred, dev, b = self.cfg.diffusion.prediction, self.prec.device, x0.shape[0]
        if self.encode_batches:
            x0 = self.vae.encode(x0)
        n = torch.randint(1, len(self.points), (b,), generator=gen)
        s, r = self.points[n], self.points[n - 1]
        noise = torch.randn(x0.shape, generator=gen)
        cond, w = self._cond_and_w(labels, b, gen)
        extra = {"w": w} if w is not None else {}
        x_s = self.schedule.q_sample(x0, s, noise).to(dev, memory_format=self.mem_format)
        s_dev, r_dev = s.to(dev), r.to(dev)
        with self.prec.autocast():
            x_r = self._ddim(x_s.float(), s_dev, r_dev, cond, w)
            with torch.no_grad():
                at_r = to_x0(pred, self.schedule, model(x_r, r_dev.clamp(min=0), cond, **extra).float(),
                             x_r, r_dev.clamp(min=0))
                at_r = torch.where((r_dev < 0).view(-1, 1, 1, 1), x_r, at_r)
            at_s = to_x0(pred, self.schedule, model(x_s, s_dev, cond, **extra).float(), x_s, s_dev)
        d = at_s[0].numel()
        c = 0.00054 * d ** 0.5
        dist = ((at_s - at_r.detach()) ** 2).flatten(1).sum(1)
        return (((dist + c * c).sqrt() - c) * self.pair_weights[n - 1].to(dev)).mean()


def _check_weighting(weighting: str) -> None:
    if weighting not in ConsistencyTask.WEIGHTINGS:
        raise ConfigError(f"--weighting must be one of {', '.join(ConsistencyTask.WEIGHTINGS)}, "
                          f"got {weighting!r}")


def pair_weights(schedule, points: torch.Tensor, weighting: str) -> torch.Tensor:
    """The loss weight of each consecutive pair (points[n-1], points[n]) of a consistency
    grid (see `ConsistencyTask`): all 1, or iCT's 1 / (sigma_n - sigma_{n-1}) with mean 1."""
    _check_weighting(weighting)
    pairs = len(points) - 1
    if weighting == "uniform":
        return torch.ones(pairs)
    ab = schedule.alpha_bar(points).double()
    sigma = ((1 - ab) / ab).sqrt()  # 0 at the data (t = -1)
    w = 1 / (sigma[1:] - sigma[:-1])
    return (w / w.mean()).float()


class StudentRecipe(DiffusionRecipe):
    """The teacher's data (pixels or its VAE's latents); the student network from
    `make_student(cfg)`."""

    def __init__(self, make_student: Callable[[Config], nn.Module],
                 make_task: Callable[[TaskContext, Any], DistillTask]):
        super().__init__()
        self._make_student, self._make_task = make_student, make_task

    def build_model(self, cfg: Config) -> nn.Module:
        return self._make_student(cfg)

    def fit_to_budget(self, cfg: Config, data, prec) -> tuple[Config, str | None]:
        return cfg, None  # the student's width is the pass's choice, never the budget's

    def make_task(self, ctx: TaskContext) -> DistillTask:
        return self._make_task(ctx, self.vae)


def from_teacher(teacher: nn.Module, widths: dict[str, torch.Tensor] | None = None
                 ) -> Callable[[Config], nn.Module]:
    """A student builder: the config's U-Net (resized like `widths`, a pruned state dict,
    if given) with every teacher tensor that fits; only a new guidance input may be
    missing."""
    def build(cfg: Config) -> nn.Module:
        student = build_model(cfg, latent_shape=_latent_shape(teacher))
        own = teacher.state_dict()
        shape_like(student, widths if widths is not None else own)
        missing, unexpected = student.load_state_dict(own, strict=False)
        if unexpected or not all(k.startswith("guidance_mlp.") for k in missing):
            raise CheckpointError(f"the teacher does not fit its student (missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]})")
        return student
    return build


def _latent_shape(unet: nn.Module) -> tuple[int, int, int] | None:
    if getattr(getattr(unet, "cfg", None), "space", "pixel") != "latent":  # diffusers': pixels
        return None
    return unet.in_channels, unet.image_size, unet.image_size


def _scratch(teacher: nn.Module) -> Callable[[Config], nn.Module]:
    return lambda cfg: build_model(cfg, latent_shape=_latent_shape(teacher))


def _check_out(run_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError("the student needs its own directory (--out)")


def _w_range(guidance_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = guidance_range
    if not 0 <= lo <= hi:
        raise ConfigError(f"--guidance-range must be two weights 0 <= lo <= hi, got {lo},{hi}")
    return float(lo), float(hi)


def _inherited_range(teacher: LoadedRun, default: tuple[float, float]) -> tuple[float, float]:
    """The weights a guidance-distilled teacher learned (from its lineage)."""
    for p in reversed(teacher.lineage):
        if "guidance_range" in p:
            return tuple(p["guidance_range"])  # type: ignore[return-value]
    return default


def _lineage(teacher: LoadedRun, run_dir: Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    return teacher.lineage + [{"pass": entry.pop("pass"), "base": str(run_dir.resolve()),
                               "step": teacher.step, **entry}]


def distill_guidance(run_dir: str | Path, out_dir: str | Path, *,
                     guidance_range: tuple[float, float] = (1.0, 3.0), minutes: float = 5.0,
                     overrides: list[str] | None = None, resume: bool = False,
                     fresh: bool = False, progress: bool = True) -> TrainResult:
    """Distill a class-conditional, guidance-trained run into a one-call student written to
    `out_dir` (a run directory; its config.yaml records the lineage)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out(run_dir, out_dir)
    w_range = _w_range(guidance_range)
    teacher = load_run(run_dir, precision="fp32")
    tc = teacher.config
    if not teacher.num_classes or tc.train.cond_drop <= 0:
        raise ConfigError(f"{run_dir} cannot be guidance-distilled: it needs a class-conditional "
                          "run trained with label dropout (train.cond_drop > 0)")
    if tc.model.guidance_input:
        raise ConfigError(f"{run_dir} is already a guidance-distilled student")
    cfg = replace(tc, model=replace(tc.model, guidance_input=True),
                  train=replace(tc.train, cond_drop=0.0))
    cfg = config_from_dict(parse_overrides(DISTILL_DEFAULTS + [f"train.max_minutes={minutes}"]
                                           + list(overrides or [])), cfg)
    t = Teacher(teacher)
    recipe = StudentRecipe(from_teacher(teacher.model),
                           lambda ctx, vae: DistillTask(ctx, t, w_range, vae=vae))
    lineage = _lineage(teacher, run_dir, {"pass": "distill-guidance",
                                          "guidance_range": list(w_range), "minutes": minutes})
    return run_loop(cfg, out_dir, recipe, resume=resume, fresh=fresh, progress=progress,
                    lineage=lineage)


def distill_student(run_dir: str | Path, out_dir: str | Path, *, channels: int,
                    channel_mult: tuple[int, ...] | None = None, minutes: float = 5.0,
                    data_weight: float = 0.0, overrides: list[str] | None = None,
                    resume: bool = False, fresh: bool = False, progress: bool = True
                    ) -> TrainResult:
    """Train a narrower U-Net (`channels`, optionally `channel_mult`) on the teacher's
    predictions over all noise levels (plus `data_weight` x the denoising loss)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out(run_dir, out_dir)
    teacher = load_run(run_dir, precision="fp32")
    tc = teacher.config
    if channels < 1:
        raise ConfigError(f"--channels must be >= 1, got {channels}")
    if data_weight < 0:
        raise ConfigError(f"--data-weight must be >= 0, got {data_weight}")
    mult = tuple(channel_mult) if channel_mult else tuple(tc.model.channel_mult)
    head = min(tc.model.head_channels, channels * min(mult))
    cfg = replace(tc, model=replace(tc.model, channels=channels, channel_mult=list(mult),
                                    head_channels=head))
    cfg = config_from_dict(parse_overrides(SCRATCH_DEFAULTS + [f"train.max_minutes={minutes}"]
                                           + list(overrides or [])), cfg)
    t = Teacher(teacher)
    w_range = _inherited_range(teacher, (1.0, 3.0)) if t.takes_w else None
    recipe = StudentRecipe(_scratch(teacher.model),
                           lambda ctx, vae: DistillTask(ctx, t, w_range, data_weight, vae=vae))
    lineage = _lineage(teacher, run_dir, {"pass": "distill-student", "channels": channels,
                                          "channel_mult": list(mult), "data_weight": data_weight,
                                          "minutes": minutes})
    return run_loop(cfg, out_dir, recipe, resume=resume, fresh=fresh, progress=progress,
                    lineage=lineage)


ROUNDS_FILE = "rounds.json"


def _step_w_range(base: LoadedRun, guidance_range: tuple[float, float]
                  ) -> tuple[float, float] | None:
    """The weights a step-distilled student learns: its guidance-distilled teacher's, the
    asked range for a plain guided run (both stages at once), none for an unguided run."""
    if base.config.model.guidance_input:
        return _inherited_range(base, _w_range(guidance_range))
    if base.num_classes and base.config.train.cond_drop > 0:
        return _w_range(guidance_range)
    return None


METHODS = ("progressive", "consistency")


def _step_student_config(tc: Config, w_range: tuple[float, float] | None, minutes: float,
                         overrides: list[str] | None, **sample: Any) -> Config:
    """A step student's config: its teacher's, with a guidance input where it learns w
    (then without label dropout), its own sampler settings (trailing spacing) and the
    fine-tuning defaults for `minutes`."""
    cfg = replace(tc, model=replace(tc.model, guidance_input=w_range is not None),
                  train=replace(tc.train, cond_drop=0.0 if w_range else tc.train.cond_drop),
                  sample=replace(tc.sample, spacing="trailing", **sample))
    return config_from_dict(parse_overrides(DISTILL_DEFAULTS + [f"train.max_minutes={minutes}"]
                                            + list(overrides or [])), cfg)


def distill_steps(run_dir: str | Path, out_dir: str | Path, *, steps: int = 4,
                  from_steps: int = 32, minutes: float = 10.0,
                  guidance_range: tuple[float, float] = (1.0, 3.0),
                  method: str = "progressive", skip: int = 25, weighting: str = "uniform",
                  overrides: list[str] | None = None, resume: bool = False,
                  fresh: bool = False, progress: bool = True) -> TrainResult:
    """Progressive distillation from `from_steps` DDIM steps down to `steps`, halving each
    round; `minutes` is split evenly over the rounds. A class-conditional run that can
    guide gets a guidance input on the way (Meng et al. 2023, stage 2 on a stage-1
    student, or both stages at once from a plain guided run).

    The student samples with DDIM at its own step count (trailing spacing) by default.
    Each round writes `out_dir` afresh from the last round's student; `rounds.json`
    records finished rounds, so `resume=True` skips them and resumes the current one.

    `method="consistency"` trains a consistency student instead (`ConsistencyTask`: one
    round of `minutes`, the teacher's DDIM steps `skip` timesteps long; `from_steps` is
    not used). It samples with the multistep consistency sampler at `steps` steps by
    default, and any other step count works without retraining.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out(run_dir, out_dir)
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "consistency":
        return _distill_consistency(run_dir, out_dir, steps=steps, skip=skip, weighting=weighting,
                                    minutes=minutes,
                                    guidance_range=guidance_range, overrides=overrides,
                                    resume=resume, fresh=fresh, progress=progress)
    if steps < 1 or from_steps <= steps or from_steps % steps or (from_steps // steps) & (
            from_steps // steps - 1):
        raise ConfigError(f"--from-steps must be --steps times a power of two greater than 1, "
                          f"got --steps {steps} --from-steps {from_steps}")
    base = load_run(run_dir, precision="fp32")
    w_range = _step_w_range(base, guidance_range)
    schedule_n = [from_steps // 2 ** k for k in range(1, 64) if from_steps // 2 ** k >= steps]
    per_round = minutes / len(schedule_n)
    rounds_path = out_dir / ROUNDS_FILE
    done: list[dict[str, Any]] = []
    current = None  # the round a resumed run was in
    if resume and fresh:
        raise ConfigError("--resume and --fresh cannot be used together")
    if fresh:
        rounds_path.unlink(missing_ok=True)
    elif rounds_path.is_file():
        resume = True  # the same command resumes where it stopped
    elif list_checkpoints(out_dir):
        raise CheckpointError(f"{out_dir} holds another run (no {ROUNDS_FILE}); --fresh "
                              "discards it, or choose another --out")
    if resume and rounds_path.is_file():
        recorded = json.loads(rounds_path.read_text())
        done, current = recorded["rounds"], recorded.get("current")
    result: TrainResult | None = None
    for n in schedule_n:
        if any(r["steps"] == n for r in done):
            continue
        teacher = load_run(out_dir, precision="fp32") if done else base
        cfg = _step_student_config(teacher.config, w_range, per_round, overrides,
                                   sampler="ddim", steps=n)
        t = Teacher(teacher)
        recipe = StudentRecipe(from_teacher(teacher.model),
                               lambda ctx, vae, t=t, n=n: DistillTask(ctx, t, w_range, steps=n,
                                                                      vae=vae))
        lineage = read_lineage(run_dir) + [{
            "pass": "distill-steps", "base": str(run_dir.resolve()), "step": base.step,
            "from_steps": from_steps, "steps": n, "rounds": [r["steps"] for r in done] + [n],
            "minutes": minutes, **({"guidance_range": list(w_range)} if w_range else {})}]
        resuming = resume and current == n and (out_dir / "checkpoints").is_dir()
        if not resuming:
            atomic_write(rounds_path, json.dumps({"rounds": done, "current": n}))
        # fresh: the last round's student is already in memory as this round's teacher
        result = run_loop(cfg, out_dir, recipe, resume=resuming, fresh=not resuming,
                          progress=progress, lineage=lineage)
        done = done + [{"steps": n, "train_steps": result.step, "minutes": result.minutes}]
        atomic_write(rounds_path, json.dumps({"rounds": done, "current": None}, indent=1))
    if result is None:
        raise ConfigError(f"{out_dir} already holds every round (down to {steps} steps); "
                          "--fresh redoes them, or choose another --out")
    return result


def _distill_consistency(run_dir: Path, out_dir: Path, *, steps: int, skip: int, weighting: str,
                         minutes: float, guidance_range: tuple[float, float],
                         overrides: list[str] | None, resume: bool, fresh: bool,
                         progress: bool) -> TrainResult:
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    _check_weighting(weighting)  # before anything is written
    if (out_dir / ROUNDS_FILE).is_file():
        if not fresh:
            raise CheckpointError(f"{out_dir} holds a progressive student ({ROUNDS_FILE}); "
                                  "--fresh discards it, or choose another --out")
        (out_dir / ROUNDS_FILE).unlink()
    base = load_run(run_dir, precision="fp32")
    if steps > base.schedule.T:
        raise ConfigError(f"--steps must be at most the run's {base.schedule.T} timesteps")
    w_range = _step_w_range(base, guidance_range)
    cfg = _step_student_config(base.config, w_range, minutes, overrides,
                               sampler="consistency", steps=steps, cache_interval=1)
    t = Teacher(base)
    recipe = StudentRecipe(from_teacher(base.model),
                           lambda ctx, vae: ConsistencyTask(ctx, t, w_range, skip, vae=vae,
                                                            weighting=weighting))
    lineage = _lineage(base, run_dir, {"pass": "distill-steps", "method": "consistency",
                                       "steps": steps, "skip": skip, "weighting": weighting,
                                       "minutes": minutes,
                                       **({"guidance_range": list(w_range)} if w_range else {})})
    return run_loop(cfg, out_dir, recipe, resume=resume, fresh=fresh, progress=progress,
                    lineage=lineage)
