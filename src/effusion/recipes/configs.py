"""The preset configs of the non-default recipes; the diffusion default is `Config()`."""

from __future__ import annotations

from pathlib import Path

from effusion.config import Config, config_from_dict, load_config, parse_overrides, read_yaml_mapping

# The classifier recipe (Adam, step decay of the learning rate, dropout, rotation and
# translation augmentation, a held-out 10%): the classic recipe for a small MNIST
# classifier, here also the feature network of the metrics. `effusion classifier train`
# flags and `--set` override these.
CLASSIFIER_DEFAULTS: list[str] = [
    "model.arch=cnn", "model.dropout=0.2",
    "data.rotate=10", "data.translate=2", "data.val_fraction=0.1",
    "train.optimizer=adam", "train.lr=0.002", "train.batch_size=64", "train.warmup_steps=0",
    "train.lr_schedule=step", "train.lr_step_every=5", "train.lr_gamma=0.3",
    "train.epochs=15", "train.max_minutes=0", "train.max_steps=1000000",
    "train.ema_decay=0", "train.ema_warmup=false", "train.grad_clip=0",
    "train.log_every=10", "train.checkpoint_every=1000000", "train.sample_every=0",
]

# `effusion vae train` defaults: a short run (the VAE only has to reconstruct), evaluated
# by held-out PSNR. Any of these can be changed with --set.
VAE_DEFAULTS = ["model.arch=vae", "model.num_classes=0", "model.channels=32",
                "train.lr=1e-3", "train.batch_size=64", "train.max_minutes=5",
                "train.warmup_steps=100", "train.ema_decay=0.999", "train.sample_every=500",
                "train.cond_drop=0.0"]


def classifier_config(overrides: list[str] | None = None) -> Config:
    """The classifier recipe with `section.key=value` overrides applied last."""
    return load_config(None, CLASSIFIER_DEFAULTS + list(overrides or []))


def vae_config(overrides: list[str] | None = None, config_file: str | Path | None = None) -> Config:
    """The VAE defaults, then a YAML file's values (if any), then `overrides`."""
    cfg = load_config(None, VAE_DEFAULTS)
    if config_file is not None:
        cfg = config_from_dict(read_yaml_mapping(config_file), cfg)
    return config_from_dict(parse_overrides(list(overrides or [])), cfg)
