"""Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models",
stage 1): a student with the guidance weight w as an input learns, in one network call,
what the teacher gives with classifier-free guidance in two (both halves batched).

The student is the teacher's U-Net plus a w embedding whose output layer starts at zero,
initialised from the teacher's EMA weights, so it starts as the plain conditional model.
Each step draws real images, timesteps, noise and w ~ U[w_min, w_max]; the target is the
teacher's guided output in the network's own prediction space (at fixed x_t and t, eps,
v and x0 are affine in one another, so guiding there equals guiding x0), weighted like the
run's own training loss (e.g. min-SNR). Everything else is the shared loop: the same
precision, switches, EMA, checkpoints and resume.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from effusion.config import Config, ConfigError, config_from_dict, parse_overrides
from effusion.diffusion import loss_weight
from effusion.models import build_model
from effusion.recipes.generative import DiffusionTask
from effusion.runs import CheckpointError, LoadedRun, load_run
from effusion.train.loop import PlainRecipe, TaskContext, TrainResult
from effusion.train.loop import train as run_loop

# Fine-tuning from the teacher: a lower peak LR and a short warm-up; the EMA warm-up keeps
# early averages close to the (already good) initial weights.
DISTILL_DEFAULTS = ["train.lr=2e-4", "train.warmup_steps=20", "train.cond_drop=0.0",
                    "train.sample_every=0", "train.eval_every=0", "train.max_steps=1000000"]


class GuidanceDistillTask(DiffusionTask):
    """The student's loss against the guided teacher; grids come from the student at the
    run's default guidance weight."""

    def __init__(self, ctx: TaskContext, teacher: LoadedRun, w_range: tuple[float, float]):
        super().__init__(ctx, None)
        self.teacher, self.w_range = teacher, w_range
        self.teacher.model.eval().requires_grad_(False)

    def loss(self, model: Any, x0: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator) -> torch.Tensor:
        dc, dev, b = self.cfg.diffusion, self.prec.device, x0.shape[0]
        t = torch.randint(0, self.schedule.T, (b,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        lo, hi = self.w_range
        w = lo + (hi - lo) * torch.rand(b, generator=gen)
        x_t = self.schedule.q_sample(x0, t, noise).to(dev, memory_format=self.mem_format)
        t, w, cond = t.to(dev), w.to(dev), labels.to(dev)
        null = torch.full_like(cond, self.cfg.model.num_classes)
        with torch.no_grad(), self.prec.autocast():
            both = self.teacher.model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                      torch.cat([cond, null])).float()
        out_c, out_u = both[:b], both[b:]
        target = out_u + w.view(-1, 1, 1, 1) * (out_c - out_u)  # guided, in prediction space
        with self.prec.autocast():
            out = model(x_t, t, cond, w=w)
        weight = loss_weight(dc.prediction, dc.loss_weighting, self.schedule, t.cpu(),
                             dc.min_snr_gamma).to(dev)
        return ((out.float() - target) ** 2).mean(dim=(1, 2, 3)).mul(weight).mean()


class GuidanceDistillRecipe(PlainRecipe):
    """The teacher's data; the student U-Net with a guidance input, from the teacher."""

    def __init__(self, teacher: LoadedRun, w_range: tuple[float, float]):
        self.teacher, self.w_range = teacher, w_range

    def build_model(self, cfg: Config) -> nn.Module:
        student = build_model(cfg)
        missing, unexpected = student.load_state_dict(self.teacher.model.state_dict(), strict=False)
        if unexpected or not all(k.startswith("guidance_mlp.") for k in missing):
            raise CheckpointError(f"the teacher {self.teacher.run_dir} does not fit its student "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return student

    def make_task(self, ctx: TaskContext) -> GuidanceDistillTask:
        return GuidanceDistillTask(ctx, self.teacher, self.w_range)


def distill_guidance(run_dir: str | Path, out_dir: str | Path, *,
                     guidance_range: tuple[float, float] = (1.0, 3.0), minutes: float = 5.0,
                     overrides: list[str] | None = None, resume: bool = False,
                     fresh: bool = False, progress: bool = True) -> TrainResult:
    """Distill a class-conditional, guidance-trained run into a one-call student written to
    `out_dir` (a run directory; its config.yaml records the lineage)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError("the student needs its own directory (--out)")
    lo, hi = guidance_range
    if not 0 <= lo <= hi:
        raise ConfigError(f"--guidance-range must be two weights 0 <= lo <= hi, got {lo},{hi}")
    teacher = load_run(run_dir, precision="fp32")
    tc = teacher.config
    if not teacher.num_classes or tc.train.cond_drop <= 0:
        raise ConfigError(f"{run_dir} cannot be guidance-distilled: it needs a class-conditional "
                          "run trained with label dropout (train.cond_drop > 0)")
    if tc.model.guidance_input:
        raise ConfigError(f"{run_dir} is already a guidance-distilled student")
    if tc.model.space != "pixel":
        raise ConfigError("guidance distillation of latent runs is not built yet")
    cfg = replace(tc, model=replace(tc.model, guidance_input=True))
    cfg = config_from_dict(parse_overrides(DISTILL_DEFAULTS + [f"train.max_minutes={minutes}"]
                                           + list(overrides or [])), cfg)
    lineage = teacher.lineage + [{"pass": "distill-guidance", "base": str(run_dir.resolve()),
                                  "step": teacher.step, "guidance_range": [lo, hi],
                                  "minutes": minutes}]
    return run_loop(cfg, out_dir, GuidanceDistillRecipe(teacher, (lo, hi)), resume=resume,
                    fresh=fresh, progress=progress, lineage=lineage)
