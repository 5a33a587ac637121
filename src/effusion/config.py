"""Typed configuration: nested dataclasses, YAML presets, `--set a.b=value` overrides.

The dataclass defaults *are* the default recipe (`configs/mnist.yaml` spells the same
values out). Unknown keys and badly typed values raise `ConfigError` naming the valid
choices, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem (bad key, bad value, unreadable file)."""


@dataclass
class DataConfig:
    # mnist5k | digits | shapes[:N[:SEED]] | icons[:THEME,...] | folder:PATH | npz:PATH
    source: str = "mnist5k"
    # 0 = from the data (effusion.data.resolve_data): the built-in sources' own size and
    # channels (mnist5k 28 px gray, icons 32 px RGB); folders and arrays: the median shorter
    # side, at most 32 px, and RGB if any image is in colour. Runs record the resolved values.
    image_size: int = 0
    channels: Literal[0, 1, 3] = 0  # 1 = grayscale, 3 = RGB, 0 = from the data
    limit: int = 0  # use at most this many images (0 = all)
    hflip: bool = False  # random horizontal flip (wrong for digits, fine for photos)
    rotate: float = 0.0  # max random rotation in degrees
    translate: int = 0  # max random shift in pixels (reflect-padded random crop)
    val_fraction: float = 0.1  # held out from training (fixed split): validation, bits/dim
    skip_bad_images: bool = False  # folder: an unreadable image file is an error unless true
    # Long-tailed subset of a labelled source: class k (0 = head) keeps
    # n_max * imbalance^(-k / (K - 1)) images, n_max = the smallest class's count; 0 = off
    imbalance: float = 0.0
    imbalance_seed: int = 0  # which images the long-tailed subset keeps
    # Mixed sizes and aspect ratios (training only): each image goes, resized whole (no
    # crop), to the bucket nearest its aspect ratio, and every batch holds one bucket.
    # [[H, W], ...], or "auto" / "auto:PIXELS": buckets at the data's aspect ratios with
    # about image_size^2 (or PIXELS) pixels, sides multiples of 8. () = square images only
    buckets: tuple[tuple[int, ...], ...] | str = ()
    # shapes sources: draw images at these aspect ratios (width / height), in turn, at
    # about image_size^2 pixels each. () = square
    aspect_ratios: tuple[float, ...] = ()


@dataclass
class ModelConfig:
    # unet = diffusion; diffusers_unet2d = diffusion with a diffusers UNet2DModel (extra
    # `effusion[diffusers]`); mlp / cnn / convnet = classifier; vae = latent diffusion's autoencoder
    arch: Literal["unet", "diffusers_unet2d", "mlp", "cnn", "convnet", "vae"] = "unet"
    space: Literal["pixel", "latent"] = "pixel"  # unet: denoise pixels, or the latents of model.vae
    vae: str = ""  # latent space: the VAE's run directory (effusion vae train)
    channels: int = 32  # base width of the U-Net
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per resolution level
    num_res_blocks: int = 1  # residual blocks per level (decoder gets one more)
    attention_resolutions: tuple[int, ...] = (7,)  # feature-map sizes that get self-attention
    head_channels: int = 32
    dropout: float = 0.0
    # >0 adds a class embedding with an extra null class; -1 = auto: the data's class
    # count if it has labels, else 0 (unconditional). Runs record the resolved value.
    num_classes: int = -1
    norm_groups: int = 8
    # A guidance-distilled student (Meng et al. 2023): the guidance weight w is an input,
    # embedded like the timestep, so one call gives what guidance needs two halves for.
    guidance_input: bool = False
    # model.arch=diffusers_unet2d: the UNet2DModel config as JSON (what `effusion import
    # diffusers` records); "" = built from the fields above (widths, levels, attention).
    diffusers_config: str = ""


@dataclass
class VAEConfig:
    """The autoencoder of latent diffusion (model.arch=vae); widths from model.channels."""

    latent_channels: int = 4
    downsample: int = 4  # spatial factor, a power of 2 (one stride-2 level per factor 2)
    recon: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-4  # on the per-element KL to N(0, I), next to the per-pixel loss
    feature_weight: float = 0.0  # > 0: add a feature loss through the data's classifier


@dataclass
class DiffusionConfig:
    schedule: Literal["linear", "cosine", "sigmoid"] = "cosine"
    timesteps: int = 1000
    prediction: Literal["eps", "v", "x0"] = "v"
    loss_weighting: Literal["uniform", "min_snr"] = "min_snr"
    min_snr_gamma: float = 5.0


@dataclass
class TrainConfig:
    batch_size: int = 128  # per micro-batch; one optimizer step sees batch_size * grad_accum
    grad_accum: int = 1  # micro-batches per optimizer step (gradient accumulation)
    lr: float = 2e-3
    weight_decay: float = 0.0
    # adamw8bit: AdamW with block-wise 8-bit moments (bitsandbytes; CPU and CUDA)
    optimizer: Literal["adamw", "adamw8bit", "adam", "rmsprop", "sgd"] = "adamw"
    momentum: float = 0.9  # sgd (Nesterov) and rmsprop
    lr_schedule: Literal["cosine", "step", "none"] = "cosine"  # after the warm-up
    lr_step_every: int = 1  # step schedule: multiply the LR by lr_gamma every N epochs
    lr_gamma: float = 0.5
    warmup_steps: int = 100
    max_steps: int = 100_000  # whichever of max_steps / max_minutes / epochs comes first ends training
    epochs: int = 0  # passes over the training split; 0 = no epoch limit
    max_minutes: float = 11.0  # wall-clock training budget; 0 = no budget
    # The step count max_minutes stands for, measured once at the start of a run (throughput
    # over its first steps) and recorded here, so the LR schedule and the end follow steps
    # only: a resumed or busy run ends exactly where it would have. 0 = plan at the start;
    # set it to reproduce a run's plan exactly.
    budget_steps: int = 0
    # A time-budgeted diffusion run from scratch first times a few training steps of its
    # U-Net: if fewer than this many steps would fit in max_minutes, it trains at half the
    # width (model.channels, recorded in config.yaml). Measured at 11 minutes on 2 cores:
    # width 16 beat width 32 on digits with bf16 (1,765 vs 995 steps: FID 16.3 vs 22.9),
    # on digits without bf16 (1,152 vs 337: 19.9 vs 98) and on colour icons (1,767 vs 724:
    # 32.6 vs 60.7), so under ~1,200 steps more steps beat width. 0 = never.
    budget_min_steps: int = 1200
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    cond_drop: float = 0.1  # class-conditional models: share of labels replaced by the null class
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay ramps as min(decay, (1+n)/(10+n))
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tf32: bool = True  # CUDA (Ampere+): TF32 matmul/cuDNN for fp32 work; no effect on CPU
    channels_last: bool = False  # NCHW is faster on CPU: GroupNorm in channels_last bf16 is ~7x slower
    compile: bool = False  # torch.compile the model (falls back to eager if compiling fails)
    # Recompute activations in backward instead of storing them: none; blocks = each U-Net
    # block, keeping conv/attention outputs (recomputes only cheap norm/activation work);
    # all = each block in full, plus skip concatenation, resampling and the output head.
    grad_checkpointing: Literal["none", "blocks", "all"] = "none"
    workers: int = 0  # background threads that assemble the next batches (0 = main thread)
    prefetch: int = 2  # batches prepared ahead per worker
    pin_memory: bool = True  # CUDA: page-locked host batches, copied asynchronously
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    log_every: int = 25
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int = 1000  # EMA sample grid every N steps; 0 = only at the end
    sample_n: int = 64
    eval_every: int = 0  # diffusion: FID on eval_n EMA samples every N steps (0 = off)
    eval_n: int = 256
    eval_features: str = ""  # classifier run for eval_every's FID; "" = the cached default
    # Long-tailed data: a class-balanced sampler draws image i with probability proportional
    # to w(n_class(i)) / n_class(i): none (w = n: the data as it is), inverse (w = 1: every
    # class equally often), sqrt (w = sqrt n), effective_number (w = n (1 - beta) /
    # (1 - beta^n), Cui et al. 2019, beta = reweight_beta)
    reweight: Literal["none", "inverse", "sqrt", "effective_number"] = "none"
    reweight_beta: float = 0.999
    # Post-hoc EMA (Karras et al. 2024): power-function EMAs with these relative widths
    # (sigma_rel), saved every posthoc_every steps to posthoc/; `effusion ema` rebuilds the
    # EMA of any width from them. () = off
    posthoc_ema: tuple[float, ...] = ()
    posthoc_every: int = 50
    # Remedies (docs/recipe.md, Remedies): within-class spread of the feature-space x0 error,
    # x0 losses at 1/2, 1/4 ... resolution (weights[0] scales the plain loss), and a
    # feature-space x0 loss at low noise (SNR >= 1), all through the data's feature classifier
    diversity_weight: float = 0.0
    multiscale_weights: tuple[float, ...] = ()
    feature_loss_weight: float = 0.0
    # Progressive resolution: [[size, until], ...] trains at `size` (images scaled by
    # size / data.image_size) until that fraction of the run, e.g.
    # [[16, 0.3], [28, 1.0]]; the same network, EMA and optimizer throughout. () = off
    progressive: tuple[tuple[float, ...], ...] = ()
    # Data-parallel training (torchrun / --nproc): ddp = a full replica per rank
    # (DistributedDataParallel); fsdp = weights, gradients and optimizer moments sharded
    # over the ranks (FSDP2 fully_shard), for models too large for one device
    parallel: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class SampleConfig:
    sampler: Literal["ddim", "ddpm", "dpmpp_2m", "consistency"] = "dpmpp_2m"
    steps: int = 25
    eta: float = 0.0  # DDIM noise; 0 = deterministic
    spacing: Literal["linspace", "leading", "trailing"] = "trailing"
    clip_x0: bool = True  # clamp the denoised estimate to [-1, 1] (pixel space)
    guidance: float = 1.5  # class-conditional runs: classifier-free guidance weight (0 = unconditional)
    # DeepCache: recompute the U-Net's deep features every N network calls, reuse them in
    # between (1 = off); `cache_depth` = how many encoder blocks the cheap calls still run.
    cache_interval: int = 1
    cache_depth: int = 1
    # Guidance only on an interval of noise levels (Kynkaanniemi et al. 2024): [lo, hi] in
    # sigma = sqrt((1 - abar) / abar); outside it the plain conditional prediction, one
    # network call instead of two. [] = guidance at every step.
    guidance_interval: tuple[float, ...] = ()


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

        return {
            f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
            for f in dataclasses.fields(self)
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # the first alternative that fits
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[-1])
        raise ConfigError(f"{key}: " + "; or ".join(errors))
    if origin is Literal:
        choices = typing.get_args(tp)
        # Compare types too: True == 1 and 3.0 == 3 would otherwise slip through.
        if not any(type(value) is type(c) and value == c for c in choices):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if value is None:
            value = []
        elem = next((a for a in typing.get_args(tp) if a is not Ellipsis), int)
        if isinstance(value, dict) and key == "train.progressive":
            value = [value]
        if not isinstance(value, (list, tuple)):
            kind = {int: "integers", float: "numbers"}.get(elem, "lists")
            raise ConfigError(f"{key}: expected a list of {kind}, got {value!r}")
        if key == "train.progressive":  # stages as {size: S, until: U} or [S, U]
            value = [_stage(v, key) for v in value]
        return tuple(_coerce(v, elem, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # programming error


def _stage(v: Any, key: str) -> Any:
    if isinstance(v, dict):
        if set(v) != {"size", "until"}:
            raise ConfigError(f"{key}: each stage is {{size: S, until: FRACTION}}, got {v!r}")
        return [v["size"], v["until"]]
    return v


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def config_from_dict(d: dict[str, Any] | None, base: Config | None = None) -> Config:
    """Build a Config from a nested dict, starting from `base` (defaults if None)."""
    cfg = dataclasses.replace(base) if base is not None else Config()
    sections = _section_types(Config)
    for sec_name, values in (d or {}).items():
        if sec_name not in sections:
            raise ConfigError(
                f"unknown config section {sec_name!r}; valid sections: {', '.join(sections)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section {sec_name!r} must be a mapping, got {values!r}")
        sec_cls = sections[sec_name]
        types_ = _section_types(sec_cls)
        updates = {}
        for k, v in values.items():
            if k not in types_:
                near = difflib.get_close_matches(str(k), list(types_), n=1, cutoff=0.6)
                hint = f"did you mean {sec_name}.{near[0]}? " if near else ""
                raise ConfigError(
                    f"unknown config key {sec_name}.{k}; {hint}valid keys in {sec_name}: "
                    f"{', '.join(types_)}"
                )
            updates[k] = _coerce(v, types_[k], f"{sec_name}.{k}")
        setattr(cfg, sec_name, dataclasses.replace(getattr(cfg, sec_name), **updates))
    validate(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `["train.lr=3e-4", "model.channel_mult=[1,2]"]` into a nested dict."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"--set key must look like section.key (e.g. train.lr), got {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads "3e-4" as a string; numbers the user obviously meant get fixed.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def read_yaml_mapping(path: str | Path) -> dict[str, Any] | None:
    """A config file's contents: a mapping of sections (or None if empty)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {p} must contain a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then `--set` overrides; validated."""
    cfg = Config()
    if path is not None:
        cfg = config_from_dict(read_yaml_mapping(path), cfg)
    if overrides:
        cfg = config_from_dict(parse_overrides(overrides), cfg)
    return cfg


def bucket_budget(data: DataConfig) -> int | None:
    """The pixel budget of `data.buckets: auto[:PIXELS]` (None: explicit buckets or off)."""
    b = data.buckets
    if not isinstance(b, str):
        return None
    if b == "auto":
        return data.image_size ** 2
    if b.startswith("auto:") and b[5:].isdigit() and int(b[5:]) >= 64:
        return int(b[5:])
    raise ConfigError(f"data.buckets {b!r} is not valid; give [[H, W], ...], auto, or "
                      "auto:PIXELS (a pixel budget >= 64)")


def _validate_shapes(cfg: Config) -> None:
    d = cfg.data
    bucket_budget(d)
    if not isinstance(d.buckets, str):
        for hw in d.buckets:
            if len(hw) != 2 or min(hw) < 8:
                raise ConfigError(f"data.buckets: each bucket is [height, width] with sides "
                                  f">= 8, got {list(hw)}")
        if len(set(d.buckets)) != len(d.buckets):
            raise ConfigError("data.buckets lists a bucket twice")
    if any(r <= 0 for r in d.aspect_ratios):
        raise ConfigError("data.aspect_ratios are width / height ratios > 0, e.g. [0.5, 1, 2]")
    stages = cfg.train.progressive
    for i, st in enumerate(stages):
        if len(st) != 2 or st[0] < 8 or st[0] != int(st[0]) or not 0 < st[1] <= 1:
            raise ConfigError(f"train.progressive stage {i}: expected [size >= 8, until in "
                              f"(0, 1]], got {list(st)}")
    if stages:
        if cfg.model.arch != "unet" or cfg.model.space != "pixel":
            raise ConfigError("train.progressive trains pixel-space diffusion U-Nets "
                              "(model.arch=unet, model.space=pixel)")
        ends = [st[1] for st in stages]
        if any(b <= a for a, b in zip(ends, ends[1:])) or ends[-1] != 1.0:
            raise ConfigError("train.progressive: the stages' `until` must increase and the "
                              f"last must be 1.0, got {ends}")


def validate(cfg: Config) -> None:
    """Cross-field and range checks that types alone cannot express."""
    checks = [
        (cfg.data.image_size == 0 or cfg.data.image_size >= 8,
         "data.image_size must be >= 8, or 0 for the data's own size"),
        (cfg.data.limit >= 0, "data.limit must be >= 0"),
        (cfg.model.channels > 0 and cfg.model.channels % cfg.model.norm_groups == 0,
         "model.channels must be a positive multiple of model.norm_groups"),
        (len(cfg.model.channel_mult) >= 1 and all(m > 0 for m in cfg.model.channel_mult),
         "model.channel_mult must be a non-empty list of positive integers"),
        (cfg.model.num_res_blocks >= 1, "model.num_res_blocks must be >= 1"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (cfg.model.num_classes >= -1, "model.num_classes must be >= 0, or -1 for auto"),
        (cfg.diffusion.timesteps >= 2, "diffusion.timesteps must be >= 2"),
        (cfg.diffusion.min_snr_gamma > 0, "diffusion.min_snr_gamma must be > 0"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (cfg.train.max_minutes >= 0, "train.max_minutes must be >= 0 (0 = no time budget)"),
        (cfg.train.budget_steps >= 0, "train.budget_steps must be >= 0 (0 = planned from "
         "train.max_minutes at the start)"),
        (cfg.train.budget_min_steps >= 0, "train.budget_min_steps must be >= 0 (0 = never "
         "narrow the network for the time budget)"),
        (0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay must be in [0, 1)"),
        (cfg.data.imbalance == 0 or cfg.data.imbalance >= 1, "data.imbalance must be 0 (off) "
         "or a head-to-tail ratio >= 1"),
        (0.0 < cfg.train.reweight_beta < 1.0, "train.reweight_beta must be in (0, 1)"),
        (all(0.0 < s < 0.3 for s in cfg.train.posthoc_ema), "train.posthoc_ema holds relative "
         "EMA widths sigma_rel in (0, 0.3), e.g. [0.05, 0.1]"),
        (cfg.train.posthoc_every >= 1, "train.posthoc_every must be >= 1"),
        (cfg.train.diversity_weight >= 0, "train.diversity_weight must be >= 0"),
        (cfg.train.feature_loss_weight >= 0, "train.feature_loss_weight must be >= 0"),
        (all(w >= 0 for w in cfg.train.multiscale_weights), "train.multiscale_weights must "
         "be >= 0, e.g. [1, 0.5, 0.25]"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (cfg.train.parallel == "ddp" or not cfg.train.compile, "train.parallel=fsdp with "
         "train.compile is not supported yet; leave one of them off"),
        (cfg.train.parallel == "ddp" or not cfg.train.posthoc_ema, "train.parallel=fsdp with "
         "train.posthoc_ema is not supported yet (the power EMAs are kept unsharded)"),
        (cfg.train.parallel == "ddp" or cfg.model.arch == "unet", "train.parallel=fsdp shards "
         "the diffusion U-Net (model.arch=unet)"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (cfg.train.workers >= 0, "train.workers must be >= 0 (0 = load in the main thread)"),
        (cfg.train.prefetch >= 1, "train.prefetch must be >= 1"),
        (0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)"),
        (cfg.train.epochs >= 0, "train.epochs must be >= 0 (0 = no epoch limit)"),
        (cfg.train.lr_step_every >= 1, "train.lr_step_every must be >= 1"),
        (0.0 < cfg.train.lr_gamma <= 1.0, "train.lr_gamma must be in (0, 1]"),
        (cfg.train.momentum >= 0, "train.momentum must be >= 0"),
        (0.0 <= cfg.train.cond_drop < 1.0, "train.cond_drop must be in [0, 1)"),
        (cfg.sample.guidance >= 0, "sample.guidance must be >= 0"),
        (cfg.train.eval_every >= 0, "train.eval_every must be >= 0 (0 = off)"),
        (cfg.train.eval_n >= 2, "train.eval_n must be >= 2"),
        (cfg.sample.steps >= 1, "sample.steps must be >= 1"),
        (cfg.sample.cache_interval >= 1, "sample.cache_interval must be >= 1 (1 = no caching)"),
        (cfg.sample.cache_depth >= 1, "sample.cache_depth must be >= 1"),
        (cfg.sample.eta >= 0, "sample.eta must be >= 0"),
        (len(cfg.sample.guidance_interval) == 0 or (len(cfg.sample.guidance_interval) == 2
         and 0 <= cfg.sample.guidance_interval[0] < cfg.sample.guidance_interval[1]),
         "sample.guidance_interval must be [] or [lo, hi] noise levels (sigma) with 0 <= lo < hi"),
        (cfg.vae.latent_channels >= 1, "vae.latent_channels must be >= 1"),
        (cfg.vae.downsample >= 1 and cfg.vae.downsample & (cfg.vae.downsample - 1) == 0,
         "vae.downsample must be a power of 2 (1, 2, 4, 8, ...)"),
        (cfg.vae.kl_weight >= 0, "vae.kl_weight must be >= 0"),
        (cfg.vae.feature_weight >= 0, "vae.feature_weight must be >= 0"),
        (cfg.model.space == "pixel" or cfg.model.vae,
         "model.space=latent needs model.vae: the run directory of a trained VAE "
         "(effusion vae train; then effusion train --vae RUN_DIR)"),
        (cfg.model.space == "pixel" or cfg.model.arch == "unet",
         "model.space=latent applies to the diffusion U-Net (model.arch=unet) only"),
        (cfg.model.arch == "diffusers_unet2d" or not cfg.model.diffusers_config,
         "model.diffusers_config is the UNet2DModel config of model.arch=diffusers_unet2d"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    _validate_shapes(cfg)
    src = cfg.data.source
    if not (src in ("mnist5k", "digits", "shapes", "icons")
            or src.startswith(("folder:", "npz:", "shapes:", "icons:"))):
        raise ConfigError(f"data.source {src!r} is not valid; choose mnist5k, digits, "
                          "shapes[:N[:SEED]], icons[:THEME,...], folder:PATH or npz:PATH")
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"train.device {dev!r} is not valid; choose auto, cpu, cuda or cuda:N")

