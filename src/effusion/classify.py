"""Classifier runs: the default recipe, loading a trained (or int8-quantized) classifier
from its run directory, and batched prediction.

A classifier trains through the same loop as the diffusion model (`effusion.train.loop`),
selected by `model.arch: mlp | cnn`; its run directory has the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from effusion.config import Config, load_config
from effusion.data import to_model_range
from effusion.models import build_model, is_classifier
from effusion.train.checkpoint import CheckpointError, latest_checkpoint, load_weights, read_config

# The classifier recipe (MISSION.md section 1): Adam, step decay of the LR, dropout,
# rotation + translation augmentation, a held-out 10%. `effusion classifier train` flags
# and `--set` override these.
CLASSIFIER_DEFAULTS: list[str] = [
    "model.arch=cnn", "model.dropout=0.2",
    "data.rotate=10", "data.translate=2", "data.val_fraction=0.1",
    "train.optimizer=adam", "train.lr=0.002", "train.batch_size=64", "train.warmup_steps=0",
    "train.lr_schedule=step", "train.lr_step_every=5", "train.lr_gamma=0.3",
    "train.epochs=15", "train.max_minutes=0", "train.max_steps=1000000",
    "train.ema_decay=0", "train.ema_warmup=false", "train.grad_clip=0",
    "train.log_every=10", "train.checkpoint_every=1000000", "train.sample_every=0",
]

QUANTIZED_WEIGHTS = "quantized.safetensors"


def classifier_config(overrides: list[str] | None = None) -> Config:
    """The classifier recipe with `section.key=value` overrides applied last."""
    return load_config(None, CLASSIFIER_DEFAULTS + list(overrides or []))


@dataclass
class LoadedClassifier:
    run_dir: Path
    config: Config
    model: nn.Module
    quantized: bool

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, C, H, W) images -> (float64 features (N, D), class probabilities (N, K))."""
        d = self.config.data
        if tuple(images.shape[1:]) != (d.channels, d.image_size, d.image_size):
            raise CheckpointError(
                f"images are {tuple(images.shape[1:])} (C, H, W) but the classifier in "
                f"{self.run_dir} was trained on {(d.channels, d.image_size, d.image_size)}")
        feats, probs = [], []
        for i in range(0, images.shape[0], batch_size):
            x = to_model_range(images[i:i + batch_size])
            f = self.model.features(x)
            logits = self.model.head(f)
            feats.append(f.double())
            probs.append(logits.float().softmax(1))
        return torch.cat(feats), torch.cat(probs)


def load_classifier(run_dir: str | Path) -> LoadedClassifier:
    """Rebuild a classifier (fp32, CPU, eval mode) from its run directory alone."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"classifier run directory not found: {run_dir}")
    cfg = read_config(run_dir)
    if not is_classifier(cfg):
        raise CheckpointError(f"{run_dir} is a model.arch={cfg.model.arch} run, not a classifier "
                              "(train one with `effusion classifier train`)")
    if (run_dir / QUANTIZED_WEIGHTS).is_file():
        from effusion.optimize.quantize import load_quantized

        return LoadedClassifier(run_dir, cfg, load_quantized(cfg, run_dir / QUANTIZED_WEIGHTS),
                                True)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet (train it first)")
    model = build_model(cfg)
    load_weights(ckpt / "ema.safetensors", model)
    return LoadedClassifier(run_dir, cfg, model.eval(), False)
