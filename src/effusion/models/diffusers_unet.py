"""A diffusers `UNet2DModel` as an effusion network (`model.arch: diffusers_unet2d`).

The adapter gives diffusers' U-Net effusion's network contract, `net(x_t, t, cond=None,
w=None) -> prediction`, so it trains, samples, evaluates, distils and exports through the
same paths as effusion's own U-Net. What it maps:

- timesteps: both count integer steps 0..T-1 of the same discrete schedule, so `t` passes
  through unchanged (diffusers embeds it with its own `time_proj`);
- classes: effusion's labels are 0..K-1 and K is the null class ("no label") of
  classifier-free guidance. A model whose `num_class_embeds` is K + 1 has that null class
  (effusion trains and exports it that way); one with exactly K embeddings has none, and
  asking it for unconditional or guided predictions is an error that says so;
- the guidance input of a guidance-distilled student (`model.guidance_input`): w is embedded
  like a timestep and added to diffusers' time embedding through a forward hook, zero at
  initialisation, so the parameter names of the diffusers model stay its own.

The prediction type and the noise schedule live in effusion's `diffusion` config, filled in
from the diffusers scheduler on import (`effusion.interop.diffusers`).
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn

from effusion.config import ConfigError, ModelConfig
from effusion.models.layers import timestep_embedding

DIFFUSERS_HINT = "pip install 'effusion[diffusers]' (or: pip install 'diffusers>=0.30')"
GUIDANCE_LR_SCALE = 10.0  # as effusion's U-Net: the new w input learns at 10x the LR


def require_diffusers():
    """The diffusers module, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"model.arch=diffusers_unet2d needs diffusers: {DIFFUSERS_HINT}") from exc
    return diffusers


def default_unet_config(mc: ModelConfig, in_channels: int, image_size: int) -> dict[str, Any]:
    """A `UNet2DModel` config from effusion's model fields, for a run trained from scratch:
    block widths `channels * channel_mult`, `num_res_blocks` per level (the decoder one
    more, as in both libraries), attention blocks at the levels whose feature-map size is
    in `attention_resolutions`, GroupNorm(`norm_groups`), heads of `head_channels`, and a
    class embedding with effusion's extra null class."""
    levels = len(mc.channel_mult)
    if image_size % (2 ** (levels - 1)):
        raise ConfigError(f"model.arch=diffusers_unet2d: image size {image_size} must be divisible "
                          f"by 2^{levels - 1} (diffusers' U-Net upsamples by exactly 2 and cannot "
                          "meet an odd skip size); change data.image_size or model.channel_mult")
    down, res = [], image_size
    for level in range(levels):
        down.append("AttnDownBlock2D" if res in mc.attention_resolutions else "DownBlock2D")
        res //= 2
    up = ["AttnUpBlock2D" if d == "AttnDownBlock2D" else "UpBlock2D" for d in reversed(down)]
    widths = [mc.channels * m for m in mc.channel_mult]
    bad = [w for w in widths if w % mc.norm_groups]
    if bad:
        raise ConfigError(f"model.norm_groups={mc.norm_groups} must divide every block width "
                          f"{widths} of the diffusers U-Net")
    return {"sample_size": image_size, "in_channels": in_channels, "out_channels": in_channels,
            "block_out_channels": widths, "layers_per_block": mc.num_res_blocks,
            "down_block_types": down, "up_block_types": up, "norm_num_groups": mc.norm_groups,
            "attention_head_dim": mc.head_channels, "dropout": mc.dropout,
            "num_class_embeds": mc.num_classes + 1 if mc.num_classes else None}


def unet_config_of(mc: ModelConfig, in_channels: int, image_size: int) -> dict[str, Any]:
    """The run's `UNet2DModel` config: the imported one (`model.diffusers_config`, JSON), or
    the one effusion's model fields describe."""
    if mc.diffusers_config:
        return json.loads(mc.diffusers_config)
    return default_unet_config(mc, in_channels, image_size)


class DiffusersUNet(nn.Module):
    """effusion's network contract around a diffusers `UNet2DModel` (see the module doc).

    Args:
        unet_config: the `UNet2DModel` config (as `UNet2DModel.config`, a dict).
        num_classes: effusion's class count K (0 = unconditional).
        guidance_input: add the w input of a guidance-distilled student.
    """

    def __init__(self, unet_config: dict[str, Any], num_classes: int, guidance_input: bool = False):
        super().__init__()
        UNet2DModel = require_diffusers().UNet2DModel
        embeds = unet_config.get("num_class_embeds")
        if unet_config.get("class_embed_type") not in (None,):
            raise ConfigError(f"a UNet2DModel with class_embed_type="
                              f"{unet_config['class_embed_type']!r} cannot be used: effusion "
                              "conditions on integer labels through num_class_embeds only")
        if num_classes == 0 and embeds:
            raise ConfigError(f"the UNet2DModel has {embeds} class embeddings but "
                              "model.num_classes=0 (unconditional)")
        if num_classes and embeds not in (num_classes, num_classes + 1):
            raise ConfigError(f"model.num_classes={num_classes} does not fit the UNet2DModel's "
                              f"num_class_embeds={embeds} (K classes, or K + 1 with a null class)")
        self.unet = UNet2DModel.from_config(dict(unet_config))
        self.num_classes = num_classes
        self.has_null_class = bool(num_classes) and embeds == num_classes + 1
        self.in_channels = int(unet_config.get("in_channels", 3))
        self.image_size = unet_config.get("sample_size")
        self._w: torch.Tensor | None = None
        self.guidance_mlp = None
        if guidance_input:
            self._w_dim = self.unet.config.block_out_channels[0]
            emb_dim = self.unet.time_embedding.linear_2.out_features
            self.guidance_mlp = nn.Sequential(nn.Linear(self._w_dim, emb_dim), nn.SiLU(),
                                              nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.guidance_mlp[2].weight)  # a student starts as its teacher
            nn.init.zeros_(self.guidance_mlp[2].bias)
            self.unet.time_embedding.register_forward_hook(self._add_guidance)

    def _add_guidance(self, module: nn.Module, args: Any, emb: torch.Tensor) -> torch.Tensor:
        if self._w is None:
            raise ValueError("this guidance-distilled student needs w (the guidance weight)")
        return emb + self.guidance_mlp(timestep_embedding(100 * self._w, self._w_dim).to(emb.dtype))

    def lr_scales(self) -> dict[str, float]:
        """The guidance input learns at 10x the LR (see effusion's U-Net, `lr_scales`)."""
        return {"guidance_mlp.": GUIDANCE_LR_SCALE} if self.guidance_mlp is not None else {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                w: torch.Tensor | None = None) -> torch.Tensor:
        labels = None
        if self.num_classes:
            if cond is None:
                cond = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            if not self.has_null_class and not torch.jit.is_tracing() \
                    and bool((cond >= self.num_classes).any()):
                raise ValueError(
                    f"this UNet2DModel has {self.num_classes} class embeddings and no null class, "
                    "so it cannot predict without a label: sample with guidance 1 "
                    "(--guidance 1) and a label for every image")
            labels = cond
        elif cond is not None:
            raise ValueError("this model is unconditional (model.num_classes = 0) but class "
                             "labels were given")
        if self.guidance_mlp is not None:
            if w is None:
                raise ValueError("this guidance-distilled student needs w (the guidance weight)")
            self._w = w.to(x.dtype).expand(x.shape[0]) if w.ndim <= 1 else w
        try:
            return self.unet(x, t, class_labels=labels, return_dict=False)[0]
        finally:
            self._w = None
