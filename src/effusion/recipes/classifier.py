"""The classifier recipe: a worked example of the training recipe (Adam, step decay of the
LR, dropout, augmentation, int8 quantization), and the feature network that the
sample-quality metrics are computed in (no Inception weights can be downloaded).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from effusion.config import ConfigError, DataConfig, config_from_dict, parse_overrides
from effusion.data import resolve_data, to_model_range
from effusion.evaluate.features import feature_arch, feature_run_dir
from effusion.plots import figure
from effusion.recipes.configs import classifier_config
from effusion.runs import (LoadedClassifier, latest_checkpoint, load_classifier, read_lineage,
                           read_metrics)
from effusion.train.loop import PlainRecipe, TaskContext
from effusion.train.loop import train as run_loop


class ClassifierTask:
    """Cross-entropy on labels; after each epoch, loss and accuracy on the training epoch
    and the held-out split; at the end, a PNG of the curves."""

    def __init__(self, ctx: TaskContext):
        if ctx.val_set is None:
            raise ConfigError("classifier training needs a held-out split: set "
                              "data.val_fraction > 0 (e.g. 0.1)")
        self.cfg, self.run_dir, self.prec, self.logger = ctx.cfg, ctx.run_dir, ctx.prec, ctx.logger
        self.mem_format = ctx.mem_format
        self.val = ctx.val_set
        self.sums = {"loss": 0.0, "correct": 0, "n": 0}  # over the current training epoch

    def loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator) -> torch.Tensor:
        return self.hard_loss(self.logits(model, x), labels)

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with self.prec.autocast():
            return model(x.to(self.prec.device, memory_format=self.mem_format,
                              non_blocking=True)).float()  # fp32 log-softmax at any precision

    def hard_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the labels, counted into the epoch's loss and accuracy."""
        y = labels.to(logits.device)
        loss = F.cross_entropy(logits, y)
        if torch.isfinite(loss):
            self.sums["loss"] += loss.item() * len(y)
            self.sums["correct"] += int((logits.argmax(1) == y).sum())
            self.sums["n"] += len(y)
        return loss

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss, correct = 0.0, 0
        for i in range(0, len(self.val), 512):
            x = to_model_range(self.val.images[i:i + 512]).to(self.prec.device)
            y = self.val.labels[i:i + 512].to(self.prec.device)
            with self.prec.autocast():
                logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
        model.train(was_training)
        return {"val_loss": loss / len(self.val), "val_acc": correct / len(self.val)}

    def periodic(self, ema_model: nn.Module, step: int, epoch_done: bool) -> dict[str, float]:
        if not epoch_done:
            return {}
        out = {}
        if self.sums["n"]:
            out = {"train_loss": self.sums["loss"] / self.sums["n"],
                   "train_acc": self.sums["correct"] / self.sums["n"]}
        self.sums = {"loss": 0.0, "correct": 0, "n": 0}
        return {**out, **self.validate(ema_model)}

    def finish(self, ema_model: nn.Module, step: int) -> Path:
        rows = [m for m in read_metrics(self.run_dir) if "val_acc" in m]
        if not rows or rows[-1]["step"] != step:
            # Training ended mid-epoch (time or step budget): validate the final weights too.
            m = self.validate(ema_model)
            self.logger.log(step, {**m, "epoch": rows[-1]["epoch"] if rows else 0.0})
            rows.append({"step": step, **m})
        return plot_curves(rows, self.run_dir / "curves.png")

    def state_dict(self) -> dict[str, Any]:
        return dict(self.sums)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {"loss": float(state["loss"]), "correct": int(state["correct"]),
                     "n": int(state["n"])}


def plot_curves(rows: list[dict[str, Any]], path: Path) -> Path:
    """Loss and accuracy per epoch (training and held-out) as a two-panel PNG."""
    with figure(path, ncols=2, figsize=(9, 3.5)) as (_, (ax_l, ax_a)):
        for key, ax, label in [("train_loss", ax_l, "train"), ("val_loss", ax_l, "held-out"),
                               ("train_acc", ax_a, "train"), ("val_acc", ax_a, "held-out")]:
            pts = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(rows)
                   if r.get(key) is not None and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax_l.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        ax_a.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        for ax in (ax_l, ax_a):
            ax.grid(alpha=0.3)
            ax.legend()
    return Path(path)


class ClassifierRecipe(PlainRecipe):
    """The labelled images as they are; the classifier `model.arch` names."""

    def make_task(self, ctx: TaskContext) -> ClassifierTask:
        return ClassifierTask(ctx)


def feature_classifier(data: DataConfig, progress: bool = False) -> LoadedClassifier:
    """The explicit step behind every feature-space metric: the cached feature classifier
    for `data` (see `effusion.evaluate.features`), trained once first if there is none.
    `effusion.evaluate` itself only loads it."""
    data = resolve_data(data)
    run = feature_run_dir(data)
    if latest_checkpoint(run) is None:
        cfg = classifier_config([f"model.arch={feature_arch(data)}",
                                 f"data.source={data.source}",
                                 f"data.image_size={data.image_size}",
                                 f"data.channels={data.channels}"])
        print(f"effusion: training the feature classifier for {data.source} "
              f"(once; cached in {run})")
        run_loop(cfg, run, ClassifierRecipe(), fresh=True, progress=progress)
    return load_classifier(run)


class ClassifierDistillTask(ClassifierTask):
    """Knowledge distillation (Hinton et al. 2015, sec. 2): the student matches the
    teacher's class probabilities softened by a temperature T, on the same (augmented)
    batch, plus the hard-label cross-entropy:

        loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE

    The T^2 keeps the soft term's gradients on the scale of the hard one's as T changes
    (their sec. 2.1). Accuracy bookkeeping and validation are the classifier task's."""

    def __init__(self, ctx: TaskContext, teacher: nn.Module, temperature: float, alpha: float):
        super().__init__(ctx)
        self.teacher, self.T, self.alpha = teacher.eval(), temperature, alpha

    def loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator) -> torch.Tensor:
        logits = self.logits(model, x)
        with torch.no_grad():
            soft_t = F.log_softmax(self.teacher(x.to(logits.device)).float() / self.T, dim=1)
        soft_s = F.log_softmax(logits / self.T, dim=1)
        hard = self.hard_loss(logits, labels)
        kl = F.kl_div(soft_s, soft_t, log_target=True, reduction="batchmean")
        return self.alpha * self.T ** 2 * kl + (1 - self.alpha) * hard


class ClassifierDistillRecipe(ClassifierRecipe):
    def __init__(self, teacher: nn.Module, temperature: float, alpha: float):
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def make_task(self, ctx: TaskContext) -> ClassifierDistillTask:
        return ClassifierDistillTask(ctx, self.teacher, self.temperature, self.alpha)


def distill_classifier(teacher_dir: str | Path, out_dir: str | Path, *, arch: str = "mlp",
                       temperature: float = 4.0, alpha: float = 0.9,
                       overrides: list[str] | None = None, resume: bool = False,
                       fresh: bool = False, progress: bool = True):
    """Train a `model.arch=arch` classifier on `teacher_dir`'s data with soft targets from
    its (fp32 or int8) network; the teacher's recipe (optimizer, schedule, augmentation,
    epochs) otherwise. Returns the loop's TrainResult."""
    teacher = load_classifier(teacher_dir)
    if temperature <= 0:
        raise ConfigError(f"--temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"--alpha must be between 0 and 1 (the soft targets' share), got {alpha}")
    if Path(out_dir).resolve() == Path(teacher_dir).resolve():
        raise ConfigError("the student needs its own directory (--run)")
    tc = teacher.config
    cfg = replace(tc, model=replace(tc.model, arch=arch))
    cfg = config_from_dict(parse_overrides(list(overrides or [])), cfg)
    lineage = read_lineage(teacher_dir) + [{
        "pass": "distill-classifier", "base": str(Path(teacher_dir).resolve()),
        "teacher_arch": tc.model.arch, "temperature": temperature, "alpha": alpha}]
    return run_loop(cfg, out_dir, ClassifierDistillRecipe(teacher.model, temperature, alpha),
                    resume=resume, fresh=fresh, progress=progress, lineage=lineage)
