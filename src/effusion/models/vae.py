"""A small convolutional VAE with a KL-regularised latent (Kingma & Welling 2014), the
first stage of latent diffusion (Rombach et al. 2022).

The encoder maps (B, C, H, W) images in [-1, 1] to a diagonal Gaussian over latents
(B, latent_channels, ceil(H / f), ceil(W / f)), f = `vae.downsample`; the decoder maps a
latent back to an image. Diffusion then runs on `scale_factor * z` (scale = 1 / std of the
latents over the data, measured after training), which gives the latents about unit
variance as the noise schedule assumes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from effusion.config import VAEConfig
from effusion.models.layers import Downsample, ResBlock, Upsample, norm


def latent_size(size: int, downsample: int) -> int:
    """Spatial size after log2(downsample) stride-2 convs (padding 1: odd sizes round up)."""
    for _ in range(int(math.log2(downsample))):
        size = (size + 1) // 2
    return size


class VAE(nn.Module):
    """Encoder and decoder of `levels = log2(downsample)` resolution levels each; level i
    has width `channels * min(2**i, 4)`, one residual block, then a stride-2 conv (encoder)
    or a resize to the matching encoder size and a conv (decoder)."""

    def __init__(self, vcfg: VAEConfig, in_channels: int, image_size: int, channels: int = 32,
                 groups: int = 8):
        super().__init__()
        self.vcfg, self.in_channels, self.image_size = vcfg, in_channels, image_size
        levels = int(math.log2(vcfg.downsample))
        widths = [channels * min(2 ** i, 4) for i in range(levels + 1)]
        self.sizes = [image_size]
        for _ in range(levels):
            self.sizes.append((self.sizes[-1] + 1) // 2)
        zc = vcfg.latent_channels

        self.enc_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        enc: list[nn.Module] = []
        cur = widths[0]
        for i in range(levels):
            enc += [ResBlock(cur, widths[i], 0, groups, 0.0), Downsample(widths[i])]
            cur = widths[i]
        enc += [ResBlock(cur, widths[-1], 0, groups, 0.0), ResBlock(widths[-1], widths[-1], 0, groups, 0.0)]
        self.encoder = nn.ModuleList(enc)
        self.enc_out = nn.Sequential(norm(widths[-1], groups), nn.SiLU(),
                                     nn.Conv2d(widths[-1], 2 * zc, 3, padding=1))

        self.dec_in = nn.Conv2d(zc, widths[-1], 3, padding=1)
        dec: list[nn.Module] = [ResBlock(widths[-1], widths[-1], 0, groups, 0.0)]
        cur = widths[-1]
        for i in reversed(range(levels)):
            dec += [Upsample(cur), ResBlock(cur, widths[i], 0, groups, 0.0)]
            cur = widths[i]
        self.decoder = nn.ModuleList(dec)
        self.dec_out = nn.Sequential(norm(cur, groups), nn.SiLU(),
                                     nn.Conv2d(cur, in_channels, 3, padding=1))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.sizes[-1]
        return (self.vcfg.latent_channels, s, s)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (mean, log-variance) of the posterior, each (B, *latent_shape)."""
        h = self.enc_in(x)
        for layer in self.encoder:
            h = layer(h)
        mean, logvar = self.enc_out(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images (unclamped; [-1, 1] is the data range)."""
        h = self.dec_in(z)
        sizes = iter(reversed(self.sizes[:-1]))
        for layer in self.decoder:
            h = layer(h, next(sizes)) if isinstance(layer, Upsample) else layer(h)
        return self.dec_out(h)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Reconstruct through a posterior sample z = mean + std * eps (the
        reparameterisation trick). Returns (reconstruction, mean, logvar)."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * eps.to(mean.dtype)
        return self.decode(z), mean, logvar


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per latent element, averaged (fp32)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    diff = recon.float() - x.float()
    return diff.abs().mean() if kind == "l1" else diff.square().mean()


def psnr(recon: torch.Tensor, x: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak range 2)."""
    mse = (recon.float().clamp(-1, 1) - x.float()).square().mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


__all__ = ["VAE", "kl_to_standard_normal", "latent_size", "psnr", "reconstruction_loss"]
