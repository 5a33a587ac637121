"""Latent diffusion's first stage at use time: load a trained VAE run, encode images to
scaled latents, decode latents to images.

A VAE run (`effusion vae train`) writes `vae.json` when it finishes: the latent scaling
factor (1 / std of the latents over its training data), the held-out reconstruction PSNR
and the latent shape. A latent diffusion run records the VAE's directory in
`model.vae`, so sampling and evaluating it need no extra flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from effusion.config import Config, ConfigError, DataConfig
from effusion.data import ImageSet, to_model_range
from effusion.models import VAE, build_model
from effusion.train.checkpoint import CheckpointError, latest_checkpoint, load_weights, read_config

VAE_INFO = "vae.json"


@dataclass
class LoadedVAE:
    run_dir: Path
    config: Config
    model: VAE
    scale_factor: float
    info: dict

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.model.latent_shape

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images (uint8 0..255, or float in [-1, 1]) -> scaled latents: the posterior mean
        times the scale factor (deterministic; fp32)."""
        out = []
        dev = next(self.model.parameters()).device
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            xb = to_model_range(xb) if xb.dtype == torch.uint8 else xb.float()
            mean, _ = self.model.encode(xb.to(dev))
            out.append(mean.float() * self.scale_factor)
        return torch.cat(out).to(x.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Scaled latents -> images as floats clamped to [-1, 1]."""
        out = []
        dev = next(self.model.parameters()).device
        for i in range(0, z.shape[0], batch_size):
            zb = z[i:i + batch_size].to(dev).float() / self.scale_factor
            out.append(self.model.decode(zb).float().clamp(-1, 1))
        return torch.cat(out).to(z.device)

    def check_data(self, data: DataConfig) -> None:
        """The latent run's images must be what the VAE was trained on (shape-wise)."""
        v = self.config.data
        if (v.channels, v.image_size) != (data.channels, data.image_size):
            raise ConfigError(
                f"the VAE in {self.run_dir} was trained on {v.channels}-channel "
                f"{v.image_size}x{v.image_size} images, but this run has {data.channels}-channel "
                f"{data.image_size}x{data.image_size} ones; set data.image_size / data.channels "
                "to match, or train a VAE for this data")


def load_vae(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedVAE:
    """Rebuild a finished VAE run (EMA weights, fp32, eval mode) from its directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"VAE run directory not found: {run_dir}")
    cfg = read_config(run_dir)
    if cfg.model.arch != "vae":
        raise CheckpointError(f"{run_dir} is a model.arch={cfg.model.arch} run, not a VAE "
                              "(train one with `effusion vae train`)")
    ckpt = latest_checkpoint(run_dir)
    info_path = run_dir / VAE_INFO
    if ckpt is None or not info_path.is_file():
        raise CheckpointError(f"{run_dir} holds no finished VAE (no checkpoint or no {VAE_INFO}); "
                              "finish training it first (effusion vae train ... --resume)")
    info = json.loads(info_path.read_text())
    model = build_model(cfg)
    load_weights(ckpt / "ema.safetensors", model)
    model.to(device).eval()
    return LoadedVAE(run_dir, cfg, model, float(info["scale_factor"]), info)


def encode_set(vae: LoadedVAE, data: ImageSet) -> ImageSet:
    """An ImageSet of scaled latents (float32) with the same labels: encoded once, so the
    U-Net trains without running the encoder (used when augmentation is off)."""
    return ImageSet(vae.encode(data.images), data.labels, data.class_names)


# `effusion vae train` defaults: a short run (the VAE only has to reconstruct), evaluated
# by held-out PSNR. Any of these can be changed with --set.
VAE_DEFAULTS = ["model.arch=vae", "model.num_classes=0", "model.channels=32",
                "train.lr=1e-3", "train.batch_size=64", "train.max_minutes=5",
                "train.warmup_steps=100", "train.ema_decay=0.999", "train.sample_every=500",
                "train.cond_drop=0.0"]


def vae_config(overrides: list[str] | None = None, config_file: str | Path | None = None) -> Config:
    """The VAE defaults, then a YAML file's values (if any), then `overrides`."""
    from effusion.config import config_from_dict, load_config, parse_overrides, read_yaml_mapping

    cfg = load_config(None, VAE_DEFAULTS)
    if config_file is not None:
        cfg = config_from_dict(read_yaml_mapping(config_file), cfg)
    return config_from_dict(parse_overrides(list(overrides or [])), cfg)


def latent_training_set(cfg: Config, train_set: ImageSet, device: torch.device) -> ImageSet:
    """What a diffusion run trains on: for model.space=latent without augmentation, the
    training images encoded once to scaled latents; otherwise the images themselves
    (latent runs with augmentation encode each augmented batch on the fly)."""
    if cfg.model.space != "latent" or has_augmentation(cfg.data):
        return train_set
    import time

    vae = load_vae(cfg.model.vae, device)
    vae.check_data(cfg.data)
    t0 = time.perf_counter()
    out = encode_set(vae, train_set)
    print(f"effusion: encoded {len(out)} images to {tuple(vae.latent_shape)} latents with the "
          f"VAE in {cfg.model.vae} ({time.perf_counter() - t0:.1f} s, once)")
    return out


def has_augmentation(data: DataConfig) -> bool:
    return bool(data.hflip or data.rotate > 0 or data.translate > 0)
