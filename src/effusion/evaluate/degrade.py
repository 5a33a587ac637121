"""The degradation ladder: versions of real images that a person ranks by how broken they
look, to check that a feature space ranks them the same way (benchmarks/feature_ranking.py,
tests/test_features.py). Every function maps uint8 (N, C, H, W) to uint8 of the same shape
and is deterministic given its seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of `sigma` pixels (kernel to 3 sigma, reflected borders)."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(_unit(x), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # rows
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # columns
    return _uint8(y)


def noise(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """Additive Gaussian noise of `std` (on the 0..1 scale), clipped."""
    g = torch.Generator().manual_seed(seed)
    return _uint8(_unit(x) + std * torch.randn(x.shape, generator=g))


def patch_shuffle(x: torch.Tensor, patch: int = 8, seed: int = 0) -> torch.Tensor:
    """Each image's `patch` x `patch` tiles in a random order (its own permutation): every
    local detail kept, the object gone. Sides must be multiples of `patch`."""
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"patch_shuffle: {h}x{w} images do not tile into {patch}x{patch} patches")
    g = torch.Generator().manual_seed(seed)
    tiles = x.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, -1, c, patch, patch)  # (N, T, C, p, p)
    order = torch.stack([torch.randperm(tiles.shape[1], generator=g) for _ in range(n)])
    tiles = tiles[torch.arange(n)[:, None], order]
    tiles = tiles.reshape(n, h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return tiles.reshape(n, c, h, w).contiguous()


def colour_jitter(x: torch.Tensor, strength: float = 0.3, seed: int = 0) -> torch.Tensor:
    """Per image, brightness and contrast scaled by factors in [1 - s, 1 + s], and for RGB
    saturation too, plus a hue rotation of up to s/6 of the circle (torchvision's
    ColorJitter(s, s, s, s/6) in spirit)."""
    g = torch.Generator().manual_seed(seed)
    n, c = x.shape[:2]

    def factor() -> torch.Tensor:
        return (1 + strength * (2 * torch.rand(n, generator=g) - 1)).view(n, 1, 1, 1)

    y = _unit(x) * factor()  # brightness
    mean = y.mean((1, 2, 3), keepdim=True)
    y = (y - mean) * factor() + mean  # contrast
    if c == 3:
        gray = (y * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        y = (y - gray) * factor() + gray  # saturation
        y = _rotate_hue(y.clamp(0, 1), strength / 6 * (2 * torch.rand(n, generator=g) - 1))
    return _uint8(y)


def _rotate_hue(rgb: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `turns` (N,) of the circle: a rotation about the gray axis in RGB."""
    a = (2 * math.pi * turns).view(-1, 1, 1)
    cos, sin = torch.cos(a), torch.sin(a)
    u = torch.full((3,), 3 ** -0.5)  # the gray axis, unit length
    ux = torch.tensor([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    rot = cos * torch.eye(3) + sin * ux + (1 - cos) * torch.outer(u, u)  # Rodrigues, (N, 3, 3)
    return torch.einsum("nij,njhw->nihw", rot, rgb)


def ladder(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The named degradations of issue 26, mildest first within each family (the patch is
    8 px where the sides allow, else a quarter of the side: 7 px for 28 px digits)."""
    h, w = x.shape[-2:]
    p = 8 if h % 8 == 0 and w % 8 == 0 else math.gcd(h, w) // 4
    return {"blur 0.5px": blur(x, 0.5), "blur 1px": blur(x, 1.0),
            "noise 0.05": noise(x, 0.05, seed), "noise 0.1": noise(x, 0.1, seed),
            "colour jitter": colour_jitter(x, 0.3, seed), "patch shuffle": patch_shuffle(x, p, seed)}


# (worse, better) pairs a person agrees on; a pair whose sets are missing is left out.
MILD = ("blur 0.5px", "noise 0.05", "colour jitter")
PERSON_PAIRS = (
    [(d, "real") for d in ("blur 0.5px", "blur 1px", "noise 0.05", "noise 0.1", "colour jitter",
                           "patch shuffle", "early checkpoint", "late checkpoint")]
    + [("blur 1px", "blur 0.5px"), ("noise 0.1", "noise 0.05"),
       ("early checkpoint", "late checkpoint")]
    + [("patch shuffle", m) for m in MILD] + [("early checkpoint", m) for m in MILD])


# For a run whose last samples a person sees as unrecognisable (coloured blobs: the grid is
# looked at, not assumed), every degradation that leaves the objects recognisable is better.
BLOB_PAIRS = [("late checkpoint", d) for d in ("blur 0.5px", "blur 1px", "noise 0.05",
                                               "noise 0.1", "colour jitter")]


def ranking_checks(table: dict[str, dict[str, float]], late_is_blobs: bool = False
                   ) -> list[dict]:
    """For each pair in PERSON_PAIRS (and BLOB_PAIRS with `late_is_blobs`) present in
    `table` ({set: {"fid", "kid", ...}}): does the worse set score a higher FID (and KID)
    than the better one?"""
    pairs = PERSON_PAIRS + (BLOB_PAIRS if late_is_blobs else [])
    return [{"worse": w, "better": b, "fid_ok": table[w]["fid"] > table[b]["fid"],
             "kid_ok": table[w]["kid"] > table[b]["kid"]}
            for w, b in pairs if w in table and b in table]
