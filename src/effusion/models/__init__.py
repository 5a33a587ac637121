"""Networks: the U-Net denoiser, the VAE, the small classifiers and their building blocks.

Building a model is pure: no file is read. A latent-space U-Net is told the shape of the
latents it denoises by whoever knows the VAE (`effusion.runs` when loading a run, the
diffusion recipe when training one).
"""

from dataclasses import replace

import torch.nn as nn

from effusion.config import Config, ConfigError
from effusion.models.classifier import CLASSIFIERS, CNNClassifier, ConvNetClassifier, MLPClassifier
from effusion.models.unet import UNet, count_params
from effusion.models.vae import VAE, latent_size


def build_model(cfg: Config, num_classes: int | None = None,
                latent_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """The network a run's config describes: the U-Net (for model.space=latent, of the VAE
    latents `latent_shape` = (C, H, W)), the VAE, or a classifier for `model.arch`
    mlp / cnn / convnet (whose class count is `model.num_classes`, or `num_classes`)."""
    if cfg.model.num_classes < 0 and num_classes is None:
        raise ConfigError("model.num_classes=-1 (auto) must be resolved against the data first "
                          "(effusion.train.loop.resolve_for_data)")
    if not (cfg.data.channels and cfg.data.image_size):
        raise ConfigError(f"data.image_size={cfg.data.image_size} / data.channels={cfg.data.channels}: "
                          "0 means 'from the data'; resolve them first "
                          "(effusion.data.resolve_data(cfg.data), as `effusion train` does)")
    if cfg.model.arch == "unet":
        if num_classes is not None:
            cfg = replace(cfg, model=replace(cfg.model, num_classes=num_classes))
        channels, size = denoiser_input(cfg, latent_shape)
        return UNet(cfg.model, in_channels=channels, image_size=size)
    if cfg.model.arch == "diffusers_unet2d":
        from effusion.models.diffusers_unet import DiffusersUNet, unet_config_of

        k = cfg.model.num_classes if num_classes is None else num_classes
        channels, size = denoiser_input(cfg, latent_shape)
        return DiffusersUNet(unet_config_of(cfg.model, channels, size), k,
                             cfg.model.guidance_input)
    if cfg.model.arch == "vae":
        return VAE(cfg.vae, cfg.data.channels, cfg.data.image_size, cfg.model.channels,
                   cfg.model.norm_groups)
    k = num_classes or cfg.model.num_classes
    if k < 2:
        raise ConfigError(f"a {cfg.model.arch} classifier needs model.num_classes >= 2 (got {k})")
    return CLASSIFIERS[cfg.model.arch](cfg.data.channels, cfg.data.image_size, k,
                                       cfg.model.dropout)


def denoiser_input(cfg: Config, latent_shape: tuple[int, int, int] | None = None
                   ) -> tuple[int, int]:
    """(channels, size) of what the U-Net denoises: the images, or for model.space=latent
    the VAE's latents, whose shape the caller passes (it lives in the VAE run)."""
    if cfg.model.space == "pixel":
        return cfg.data.channels, cfg.data.image_size
    if latent_shape is None:
        raise ConfigError(f"model.space=latent: the U-Net needs the latent shape of the VAE in "
                          f"{cfg.model.vae or '(model.vae is empty)'}; load the run through "
                          "effusion.runs, which reads it")
    return latent_shape[0], latent_shape[-1]


def is_classifier(cfg: Config) -> bool:
    return cfg.model.arch in CLASSIFIERS


__all__ = ["CNNClassifier", "ConvNetClassifier", "MLPClassifier", "UNet", "VAE", "build_model",
           "count_params", "denoiser_input", "is_classifier", "latent_size"]
