"""Networks: the U-Net denoiser, its building blocks, and the small classifiers."""

from dataclasses import replace

import torch.nn as nn

from effusion.config import Config, ConfigError
from effusion.models.classifier import CLASSIFIERS, CNNClassifier, MLPClassifier
from effusion.models.unet import UNet, count_params
from effusion.models.vae import VAE, latent_size


def build_model(cfg: Config, num_classes: int | None = None) -> nn.Module:
    """The network a run's config describes: the U-Net, or a classifier for `model.arch`
    mlp / cnn (whose class count is `model.num_classes`, or `num_classes` when given)."""
    if cfg.model.num_classes < 0 and num_classes is None:
        raise ConfigError("model.num_classes=-1 (auto) must be resolved against the data first "
                          "(effusion.train.loop.resolve_for_data)")
    if cfg.model.arch == "unet":
        if num_classes is not None:
            cfg = replace(cfg, model=replace(cfg.model, num_classes=num_classes))
        channels, size = denoiser_input(cfg)
        return UNet(cfg.model, in_channels=channels, image_size=size)
    if cfg.model.arch == "vae":
        return VAE(cfg.vae, cfg.data.channels, cfg.data.image_size, cfg.model.channels,
                   cfg.model.norm_groups)
    k = num_classes or cfg.model.num_classes
    if k < 2:
        raise ConfigError(f"a {cfg.model.arch} classifier needs model.num_classes >= 2 (got {k})")
    return CLASSIFIERS[cfg.model.arch](cfg.data.channels, cfg.data.image_size, k,
                                       cfg.model.dropout)


def denoiser_input(cfg: Config) -> tuple[int, int]:
    """(channels, size) of what the U-Net denoises: the images, or for model.space=latent
    the latents of the VAE run in model.vae (read from that run's config)."""
    if cfg.model.space == "pixel":
        return cfg.data.channels, cfg.data.image_size
    from effusion.train.checkpoint import read_config

    vcfg = read_config(cfg.model.vae)
    return vcfg.vae.latent_channels, latent_size(cfg.data.image_size, vcfg.vae.downsample)


def is_classifier(cfg: Config) -> bool:
    return cfg.model.arch in CLASSIFIERS


__all__ = ["CNNClassifier", "MLPClassifier", "UNet", "VAE", "build_model", "count_params",
           "denoiser_input", "is_classifier"]
