"""Feature caching for sampling: DeepCache (Ma et al. 2024, "DeepCache: Accelerating
Diffusion Models for Free").

Adjacent sampler steps see nearly the same x_t, and the U-Net's deep, low-resolution
features change slowly between them. Every `interval` network calls the full U-Net runs
and its decoder input at skip `depth` is kept; the calls in between run only the shallow
branch (the first `depth` encoder blocks and the decoder from that skip on), reusing the
kept deep feature. Nothing is trained; interval 1 is the uncached network exactly.
"""

from __future__ import annotations

import torch

from effusion.models.unet import UNet


class CachedUNet:
    """A network callable `(x_t, t, cond) -> prediction` that reuses the deep features.

    A new trajectory (a batch of another shape, or a timestep that does not decrease,
    as when a sampler starts over) always gets a full pass, so one wrapper can serve
    many sampling calls in a row. Classifier-free guidance batches both halves in one
    call, so both are cached together.
    """

    def __init__(self, unet: UNet, interval: int, depth: int = 1):
        if not isinstance(unet, UNet):
            raise ValueError(f"feature caching needs the eager effusion U-Net, not "
                             f"{type(unet).__name__} (an exported model has no split forward)")
        if interval < 1:
            raise ValueError(f"cache interval must be >= 1, got {interval}")
        if not 1 <= depth < unet.num_skips:
            raise ValueError(f"cache depth must be between 1 and {unet.num_skips - 1}, got {depth}")
        self.unet, self.interval, self.depth = unet, interval, depth
        self.full_calls = self.shallow_calls = 0
        self._deep: torch.Tensor | None = None
        self._last_t: float | None = None
        self._since_full = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                 w: torch.Tensor | None = None) -> torch.Tensor:
        if self.interval == 1:
            self.full_calls += 1
            return self.unet(x, t, cond, w=w)
        t_now = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        new_trajectory = (self._deep is None or self._last_t is None or t_now >= self._last_t
                          or self._deep.shape[0] != x.shape[0])
        self._last_t = t_now
        if new_trajectory or self._since_full >= self.interval - 1:
            out, self._deep = self.unet.forward_split(x, t, cond, depth=self.depth, w=w)
            self._since_full = 0
            self.full_calls += 1
            return out
        self._since_full += 1
        self.shallow_calls += 1
        return self.unet.forward_split(x, t, cond, depth=self.depth, deep=self._deep, w=w)[0]
