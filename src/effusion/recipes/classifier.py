"""The classifier recipe: a worked example of the training recipe (Adam, step decay of the
LR, dropout, augmentation, int8 quantization), and the feature network that the
sample-quality metrics are computed in (no Inception weights can be downloaded).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from effusion.config import ConfigError, DataConfig
from effusion.data import to_model_range
from effusion.evaluate.features import feature_arch, feature_run_dir
from effusion.plots import figure
from effusion.recipes.configs import classifier_config
from effusion.runs import LoadedClassifier, latest_checkpoint, load_classifier, read_metrics
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
        dev = self.prec.device
        y = labels.to(dev)
        with self.prec.autocast():
            logits = model(x.to(dev, memory_format=self.mem_format, non_blocking=True))
        loss = F.cross_entropy(logits.float(), y)  # fp32 log-softmax whatever the precision
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
