"""`shapes`: a procedural RGB data set of coloured shapes on varied backgrounds.

Each image holds one shape (its class) at a random position, size and rotation, in a
colour whose hue is opposite the background's, over a linear gradient between two random
colours with mild pixel noise. Everything is drawn from one seeded generator, so the same
(n, size, seed) always gives the same images. Shapes are rendered at 2x and averaged down
(antialiased edges). `make_shapes` takes any height and width; the `shapes` data source
uses square `data.image_size` images like every other source.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Rotation is random, so no class may be a rotation of another (a diamond would be a square).
SHAPE_CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]


def _inside(cls: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Is the point (x, y) in the shape's own frame (unit size) inside shape `cls`? (B, H, W)."""
    r = torch.sqrt(x ** 2 + y ** 2)
    # Five points: a triangle wave in the polar angle, 1 at each tip, 0 between them.
    star_wave = 1 - (((torch.atan2(y, x) / (2 * math.pi) * 5) % 1) * 2 - 1).abs()
    tri = torch.ones_like(x, dtype=torch.bool)
    for k in range(3):  # an equilateral triangle as three half-planes
        a = math.radians(90 + 120 * k)
        tri &= x * math.cos(a) + y * math.sin(a) <= 0.5
    masks = torch.stack([
        r <= 1.0,
        torch.maximum(x.abs(), y.abs()) <= 0.8,
        tri,
        r <= 0.45 + 0.55 * star_wave,
        ((x.abs() <= 0.3) & (y.abs() <= 1.0)) | ((y.abs() <= 0.3) & (x.abs() <= 1.0)),
        (r <= 1.0) & (r >= 0.55),
    ])  # (K, B, H, W)
    return masks.gather(0, cls.view(1, -1, 1, 1).expand(1, *x.shape)).squeeze(0)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B,) each in [0, 1] -> (B, 3) RGB in [0, 1]."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


CHUNK = 512  # images rendered at a time (the random stream depends on it: keep it fixed)


def make_shapes(n: int, height: int, width: int | None = None,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (n, 3, H, W), int64 labels (n,)), deterministic for `seed`."""
    width = width or height
    if n < 1 or min(height, width) < 8:
        raise ValueError(f"shapes: need n >= 1 and images of at least 8x8, got n={n}, "
                         f"{height}x{width}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SHAPE_CLASSES), (n,), generator=g)
    out = []
    for start in range(0, n, CHUNK):
        cls = labels[start:start + CHUNK]
        b = len(cls)
        u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=g)  # noqa: E731
        # Supersampled pixel grid in [-1, 1] (aspect-correct: the short side spans [-1, 1]).
        hh, ww = 2 * height, 2 * width
        scale = min(hh, ww)
        ys = (torch.arange(hh) + 0.5 - hh / 2) / (scale / 2)
        xs = (torch.arange(ww) + 0.5 - ww / 2) / (scale / 2)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        size, angle = u(0.45, 0.8), u(0, 2 * math.pi)
        cx, cy = u(-1, 1) * (xs[-1] - size), u(-1, 1) * (ys[-1] - size)
        dx, dy = xx[None] - cx.view(-1, 1, 1), yy[None] - cy.view(-1, 1, 1)
        cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
        sx = (cos * dx + sin * dy) / size.view(-1, 1, 1)
        sy = (-sin * dx + cos * dy) / size.view(-1, 1, 1)
        mask = F.avg_pool2d(_inside(cls, sx, sy).float()[:, None], 2)  # (b, 1, H, W)
        # Background: a gradient between two colours of one hue family; the shape takes the
        # opposite hue at full saturation, so it stands out whatever the background.
        bg_h = u(0, 1)
        c0 = _hsv_to_rgb(bg_h, u(0.2, 0.7), u(0.25, 0.9))
        c1 = _hsv_to_rgb((bg_h + u(-0.1, 0.1)) % 1, u(0.2, 0.7), u(0.25, 0.9))
        fg = _hsv_to_rgb((bg_h + 0.5 + u(-0.15, 0.15)) % 1, u(0.75, 1.0), u(0.75, 1.0))
        theta = u(0, 2 * math.pi)
        ramp = F.avg_pool2d((xx[None] * theta.cos().view(-1, 1, 1)
                             + yy[None] * theta.sin().view(-1, 1, 1))[:, None], 2)
        ramp = (ramp - ramp.amin((2, 3), keepdim=True)) / (
            ramp.amax((2, 3), keepdim=True) - ramp.amin((2, 3), keepdim=True) + 1e-6)
        bg = c0.view(b, 3, 1, 1) + (c1 - c0).view(b, 3, 1, 1) * ramp
        img = bg * (1 - mask) + fg.view(b, 3, 1, 1) * mask
        img = img + 0.02 * torch.randn(img.shape, generator=g)
        out.append((img * 255).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out), labels
