"""The U-Net denoiser network (Ronneberger et al. 2015; Ho et al. 2020, appendix B).

Input (B, C, H, W) plus integer timesteps (B,) and optional class labels (B,); output has
the input's shape and means whatever the objective says (eps, v or x0). Any H, W >= 8
works: downsampling rounds odd sizes up and upsampling restores the skip's exact size, so
28x28 needs no padding.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from effusion.config import ModelConfig
from effusion.models.layers import (Attention, Downsample, ResBlock, Upsample, norm,
                                    timestep_embedding)

GUIDANCE_LR_SCALE = 10.0  # see UNet.lr_scales


def _saved_ops() -> frozenset:
    """Ops whose outputs `grad_checkpointing=blocks` keeps: the expensive ones (convolutions,
    linear layers, attention kernels). Everything else in a block — GroupNorm, SiLU, the
    adaptive scale/shift, dropout, concatenation, dtype casts — is recomputed in backward."""
    aten = torch.ops.aten
    names = ["convolution", "addmm", "mm", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention"]
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _keep_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_expensive)


def _cat_then(block: nn.Module, h: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    # Inside the checkpointed function, so the (large) concatenation is not stored either.
    return block(torch.cat([h, skip], dim=1), emb)


class EmbedSequential(nn.ModuleList):
    """A residual block optionally followed by attention, both taking the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


class UNet(nn.Module):
    """U-Net with time (and optional class) conditioning.

    Args:
        cfg: widths, depth, attention resolutions, dropout, classes (see ModelConfig).
        in_channels: image (or latent) channels.
        image_size: spatial size, used to decide where attention goes.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, image_size: int):
        super().__init__()
        if cfg.num_classes < 0:
            raise ValueError("model.num_classes=-1 (auto) must be resolved against the data "
                             "before building the U-Net (effusion.train.loop.resolve_for_data)")
        self.cfg, self.in_channels, self.image_size = cfg, in_channels, image_size
        self.num_classes = cfg.num_classes
        self.grad_checkpointing = "none"  # none | blocks | all (see TrainConfig)
        ch, g, emb_dim = cfg.channels, cfg.norm_groups, 4 * cfg.channels
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Index num_classes is the null class ("no label"), used for unconditional samples and
        # for label dropout in classifier-free guidance training.
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.guidance_mlp = None
        if cfg.guidance_input:
            # Zero-initialised output: a student made from a teacher starts as its plain
            # conditional prediction, whatever w is, and learns the guided one.
            self.guidance_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(),
                                              nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.guidance_mlp[2].weight)
            nn.init.zeros_(self.guidance_mlp[2].bias)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        def unit(cin: int, cout: int, res: int) -> EmbedSequential:
            layers = [ResBlock(cin, cout, emb_dim, g, cfg.dropout)]
            if res in cfg.attention_resolutions:
                layers.append(Attention(cout, cfg.head_channels, g))
            return EmbedSequential(layers)

        self.down = nn.ModuleList()
        skips, res, cur = [ch], image_size, ch
        level_res = []  # feature-map size at each level, reused by the decoder
        for level, mult in enumerate(cfg.channel_mult):
            level_res.append(res)
            for _ in range(cfg.num_res_blocks):
                self.down.append(unit(cur, ch * mult, res))
                cur = ch * mult
                skips.append(cur)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)
                res = (res + 1) // 2
        self.mid = EmbedSequential([ResBlock(cur, cur, emb_dim, g, cfg.dropout),
                                    Attention(cur, cfg.head_channels, g),
                                    ResBlock(cur, cur, emb_dim, g, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(unit(cur + skips.pop(), ch * mult, level_res[level]))
                cur = ch * mult
            if level > 0:
                self.up.append(Upsample(cur))  # to the skip's exact size
        self.norm_out = norm(cur, g)
        self.conv_out = nn.Conv2d(cur, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # predicts 0 at init: a stable start for any objective
        nn.init.zeros_(self.conv_out.bias)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))

    def _runner(self):
        """How to call each block: directly, or checkpointed (its activations recomputed in
        backward instead of stored; only when training with grad)."""
        mode = self.grad_checkpointing
        if mode not in ("none", "blocks", "all"):
            raise ValueError(f"grad_checkpointing must be none, blocks or all, got {mode!r}")
        if mode == "none" or not (self.training and torch.is_grad_enabled()):
            return lambda fn, *args: fn(*args)
        extra = {"context_fn": _selective_context} if mode == "blocks" else {}
        return functools.partial(checkpoint, use_reentrant=False, **extra)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate factors for `build_optimizer`: the guidance input is new and starts
        at zero in a student that is otherwise its teacher, so at the fine-tuning LR it
        stays too small to tell weights apart (measured: after 5 minutes its embedding's
        norm was 0.2-0.5 against the class embedding's 7.7, and the student gave about
        the same output at every w); it learns at GUIDANCE_LR_SCALE x the LR."""
        return {"guidance_mlp.": GUIDANCE_LR_SCALE} if self.guidance_mlp is not None else {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                w: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_split(x, t, cond, w=w)[0]

    @property
    def num_skips(self) -> int:
        """Skip tensors the encoder hands the decoder (conv_in's output and each down block's)."""
        return 1 + len(self.down)

    def forward_split(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                      depth: int | None = None, deep: torch.Tensor | None = None,
                      w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward pass, optionally split at skip `depth` for feature caching.

        With `depth` and no `deep`: the full pass, also returning the decoder's input to the
        block that consumes skip `depth` (the deep feature). With `deep` too: only the
        shallow branch runs (conv_in, the first `depth` encoder blocks, the decoder from that
        block on), taking the deep feature from an earlier call (DeepCache, Ma et al. 2024,
        sec. 3.2). Without `depth` it is the plain forward pass (returns (out, None)).
        """
        emb = self.time_mlp(timestep_embedding(t, self.cfg.channels).to(x.dtype))  # (B, 4ch)
        if self.class_emb is not None:
            if cond is None:
                cond = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(cond)
        elif cond is not None:
            raise ValueError("this model has no class embedding (model.num_classes = 0) "
                             "but class labels were given")
        if self.guidance_mlp is not None:
            if w is None:
                raise ValueError("this model takes the guidance weight as input: pass w")
            w = torch.as_tensor(w, dtype=torch.float32, device=x.device).expand(x.shape[0])
            # w in [0, ~10]: scaled so the sinusoid's frequencies resolve tenths of a unit
            emb = emb + self.guidance_mlp(timestep_embedding(100 * w, self.cfg.channels).to(x.dtype))
        elif w is not None:
            raise ValueError("this model has no guidance input (model.guidance_input = false)")
        if depth is not None and not 1 <= depth < self.num_skips:
            raise ValueError(f"cache depth must be between 1 and {self.num_skips - 1}, got {depth}")
        run = self._runner()
        h = self.conv_in(x)
        hs = [h]  # the skips are kept in every mode: the decoder needs them
        for block in self.down if deep is None else self.down[:depth]:
            h = run(block, h, emb)
            hs.append(h)
        captured = None
        if deep is None:
            h = run(self.mid, h, emb)
            up = self.up
        else:
            h, up = deep, self.up[self._consumer_of(depth):]
        for block in up:
            if isinstance(block, Upsample):
                h = run(block, h, hs[-1].shape[-2:])
            else:
                if depth is not None and deep is None and len(hs) - 1 == depth:
                    captured = h  # the decoder's input at skip `depth`: what caching reuses
                h = run(_cat_then, block, h, hs.pop(), emb)
        return run(self._head, h), captured

    def _consumer_of(self, depth: int) -> int:
        """Index in `self.up` of the block that consumes skip `depth`."""
        remaining = self.num_skips
        for i, block in enumerate(self.up):
            if not isinstance(block, Upsample):
                remaining -= 1
                if remaining == depth:
                    return i
        raise ValueError(f"no decoder block consumes skip {depth}")  # unreachable for valid depth


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
