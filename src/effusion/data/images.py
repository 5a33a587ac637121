"""Writing images: grids as PNG, sample arrays as .npy (uint8, N x H x W [x C])."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from effusion.fileio import write_file


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """uint8 (N, C, H, W) -> one uint8 (C, H', W') image, `nrow` images per row."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def to_hwc_numpy(images: torch.Tensor) -> np.ndarray:
    """uint8 (N, C, H, W) -> numpy N x H x W (C = 1) or N x H x W x C."""
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def save_png(image: torch.Tensor, path: str | Path, upscale: int = 1) -> Path:
    """Save a uint8 (C, H, W) image; `upscale` enlarges small images (nearest) for viewing."""
    from PIL import Image

    arr = image.permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    return write_file(path, img.save)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save uint8 (N, C, H, W) as a PNG grid, enlarged so 28-pixel digits are legible."""
    h = images.shape[-2]
    return save_png(make_grid(images, nrow), path, upscale=max(1, 64 // h))


def save_npy(images: torch.Tensor, path: str | Path) -> Path:
    arr = to_hwc_numpy(images)
    return write_file(path, lambda tmp: np.save(tmp, arr))
