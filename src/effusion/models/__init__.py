"""Networks: the U-Net denoiser and its building blocks."""

from effusion.config import Config
from effusion.models.unet import UNet, count_params


def build_model(cfg: Config) -> UNet:
    """The U-Net described by a run's config."""
    return UNet(cfg.model, in_channels=cfg.data.channels, image_size=cfg.data.image_size)


__all__ = ["UNet", "build_model", "count_params"]
