"""Every kind of run directory, loaded into a ready object.

- diffusion (`model.arch=unet`, pixel or latent space) -> `LoadedRun`: the network, its
  schedule, precision and the Denoiser that samplers take; a latent run brings its VAE.
- VAE (`model.arch=vae`, finished: `vae.json` written) -> `LoadedVAE`: encode / decode.
- classifier (`model.arch=mlp|cnn|convnet`, float or int8) -> `LoadedClassifier`: predict.

A derived run (quantized, distilled, pruned, exported) is one of these kinds with a
`lineage` in its config.yaml; a pruned run's layer widths come from its weights. Everything that reads a run directory back goes
through here: sampling, evaluation, optimization passes, the benchmarks, the CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from effusion.config import Config, ConfigError, DataConfig
from effusion.data import to_model_range
from effusion.diffusion import GuidedDenoiser, NetworkDenoiser, Schedule, schedule_for
from effusion.diffusion.guidance import interval_weights
from effusion.models import VAE, UNet, build_model, latent_size
from effusion.models.cache import CachedUNet
from effusion.models.exported import OnnxNetwork, OpenVinoNetwork, load_graph
from effusion.models.pruned import shape_like
from effusion.models.quantized import from_quantized_tensors
from effusion.precision import Precision, bf16_supported, resolve_device, resolve_precision
from effusion.runs.files import (BF16_WEIGHTS, ONNX_MODEL, OPENVINO_INT8, QUANTIZED_WEIGHTS, VAE_INFO, CheckpointError,
                                 check_weights, checkpoint_step, latest_checkpoint, list_checkpoints, load_weights, read_config,
                                 lineage_step, read_lineage, read_tensors)

Kind = Literal["diffusion", "vae", "classifier"]
KIND_COMMANDS = {"diffusion": "effusion train", "vae": "effusion vae train",
                 "classifier": "effusion classifier train"}
KIND_NAMES = {"diffusion": "diffusion", "vae": "VAE", "classifier": "classifier"}


def kind_of(cfg: Config) -> Kind:
    if cfg.model.arch in ("unet", "diffusers_unet2d"):
        return "diffusion"
    return "vae" if cfg.model.arch == "vae" else "classifier"


def _open(run_dir: str | Path, want: Kind) -> tuple[Path, Config]:
    """The run's directory and config, checked to be of kind `want`."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    have = kind_of(cfg)
    if have != want:
        what = f"{cfg.model.arch} classifier" if have == "classifier" else KIND_NAMES[have]
        raise CheckpointError(f"{run_dir} is a {what} run (model.arch={cfg.model.arch}), not a "
                              f"{KIND_NAMES[want]} run; make one with `{KIND_COMMANDS[want]}`")
    return run_dir, cfg


def _latest(run_dir: Path) -> Path:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        if list_checkpoints(run_dir):
            raise CheckpointError(f"every checkpoint in {run_dir} is corrupt or truncated (see "
                                  "the warnings above); retrain it, or restore a copy")
        raise CheckpointError(f"{run_dir} has no checkpoint yet (train it first)")
    return ckpt


# --------------------------------------------------------------------------- VAE

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
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"VAE run directory not found: {run_dir}")
    run_dir, cfg = _open(run_dir, "vae")
    ckpt = latest_checkpoint(run_dir)
    info_path = run_dir / VAE_INFO
    if ckpt is None or not info_path.is_file():
        raise CheckpointError(f"{run_dir} holds no finished VAE (no checkpoint or no {VAE_INFO}); "
                              "finish training it first (the command that started it resumes it)")
    try:
        info = json.loads(info_path.read_text())
        scale = float(info["scale_factor"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{info_path} is corrupt: {e}") from None
    model = build_model(cfg)
    load_weights(ckpt / "ema.safetensors", model)
    model.to(device).eval()
    return LoadedVAE(run_dir, cfg, model, scale, info)


def vae_latent_shape(vae_dir: str | Path, image_size: int) -> tuple[int, int, int]:
    """The latent shape of the VAE run in `vae_dir` for images of `image_size` (its config
    alone: no weights are read)."""
    if not str(vae_dir):
        raise CheckpointError("model.space=latent needs model.vae: the directory of a VAE run")
    _, vcfg = _open(vae_dir, "vae")
    s = latent_size(image_size, vcfg.vae.downsample)
    return vcfg.vae.latent_channels, s, s


def is_pruned(lineage: list[dict[str, Any]]) -> bool:
    """Whether a pass in the lineage narrowed the network's layers (its widths are then
    its checkpoint's, not its config's)."""
    return any(p.get("pass") == "prune" for p in lineage)


def build_run_model(cfg: Config) -> nn.Module:
    """`models.build_model` for a run's config, with what it needs from other runs (the
    latent shape of a latent diffusion run's VAE) read here."""
    if cfg.model.arch == "unet" and cfg.model.space == "latent":
        return build_model(cfg, latent_shape=vae_latent_shape(cfg.model.vae, cfg.data.image_size))
    return build_model(cfg)


# --------------------------------------------------------------------------- diffusion

@dataclass
class LoadedRun:
    """A diffusion run's config, its network (EMA or raw weights), schedule and step."""

    run_dir: Path
    config: Config
    model: UNet | OnnxNetwork | OpenVinoNetwork
    schedule: Schedule
    step: int
    precision: Precision
    vae: LoadedVAE | None = None  # latent runs: decodes the sampled latents
    lineage: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    def network(self, cache_interval: int | None = None, cache_depth: int | None = None
                ) -> Callable[..., torch.Tensor]:
        """The network callable `(x_t, t, cond) -> prediction`: the model itself, or with
        DeepCache feature caching every `cache_interval` calls (default: the run's
        `sample.cache_interval`; 1 = off)."""
        sc = self.config.sample
        interval = sc.cache_interval if cache_interval is None else cache_interval
        if interval == 1:
            return self.model
        try:
            return CachedUNet(self.model, interval, sc.cache_depth if cache_depth is None
                              else cache_depth)
        except ValueError as e:
            raise ConfigError(f"--cache-interval: {e}") from None

    def denoiser(self, clip_x0: bool | None = None, guidance: float | None = None,
                 cache_interval: int | None = None,
                 guidance_interval: tuple[float, ...] | None = None
                 ) -> NetworkDenoiser | GuidedDenoiser:
        """The network as a Denoiser; class-conditional runs are wrapped in classifier-free
        guidance with weight `guidance` (default: the run's `sample.guidance`), applied where
        the noise level is in `guidance_interval` ([lo, hi] in sigma; default: the run's
        `sample.guidance_interval`; () = everywhere). A fresh denoiser per call: a cached
        one keeps per-trajectory state."""
        clip = self.config.sample.clip_x0 if clip_x0 is None else clip_x0
        clip = clip and self.vae is None  # latents have no fixed range to clip to
        net = self.network(cache_interval)
        gi = self.config.sample.guidance_interval if guidance_interval is None else guidance_interval
        if gi and not (len(gi) == 2 and 0 <= gi[0] < gi[1]):
            raise ConfigError(f"guidance interval must be lo,hi noise levels (sigma) with "
                              f"0 <= lo < hi, got {list(gi)}")
        interval = (float(gi[0]), float(gi[1])) if gi else None
        if self.config.model.guidance_input:  # a guidance-distilled student: one call
            w = self.config.sample.guidance if guidance is None else guidance
            if w < 0:
                raise ConfigError(f"guidance must be >= 0, got {w}")
            def student(x, t, c=None):
                w_rows = interval_weights(float(w), interval, self.schedule, t, x.shape[0])
                w_in = torch.as_tensor(w_rows, dtype=torch.float32)
                return net(x, t, c, w=w_in.to(x.device))

            return NetworkDenoiser(student, self.schedule, self.config.diffusion.prediction,
                                   clip_x0=clip, autocast=self.precision.autocast)
        if not self.num_classes:
            if guidance is not None:
                raise ConfigError("guidance needs a class-conditional run (model.num_classes > 0)")
            return NetworkDenoiser(net, self.schedule, self.config.diffusion.prediction,
                                   clip_x0=clip, autocast=self.precision.autocast)
        learned_uncond = self.config.train.cond_drop > 0
        if guidance is None:  # the run's default; plain conditional if it cannot guide
            w = self.config.sample.guidance if learned_uncond else 1.0
        else:
            w = guidance
            if w != 1.0 and not learned_uncond:
                raise ConfigError("this run was trained with train.cond_drop=0, so it never "
                                  "learned the unconditional prediction that guidance needs; "
                                  "use guidance 1 (plain conditional)")
        if w < 0:
            raise ConfigError(f"guidance must be >= 0, got {w}")
        inner = NetworkDenoiser(net, self.schedule, self.config.diffusion.prediction,
                                clip_x0=False, autocast=self.precision.autocast)
        return GuidedDenoiser(inner, self.num_classes, w, clip_x0=clip, interval=interval,
                              schedule=self.schedule)


def inference_precision(cfg: Config, device: str | torch.device,
                        precision: str | None = None) -> Precision:
    """The run's precision on this machine: a bf16/fp16 run trained on hardware that had it
    falls back to `auto` here if this machine lacks it; `precision` overrides."""
    dev = resolve_device(str(device))
    wanted = precision or cfg.train.precision
    if precision is None and wanted != "fp32" and not (dev.type == "cuda" or bf16_supported(dev)):
        wanted = "auto"
    return Precision(dev, resolve_precision(wanted, dev))


def load_run(run_dir: str | Path, ema: bool = True, device: str = "auto",
             precision: str | None = None) -> LoadedRun:
    """Load the latest checkpoint of a diffusion run; needs nothing but the directory.

    Args:
        run_dir: a directory written by `effusion train` (or an optimization pass).
        ema: use the EMA weights (usually much better samples) instead of the raw ones.
        device: auto | cpu | cuda | cuda:N.
        precision: override the run's precision for inference (default: the run's).
    """
    run_dir, cfg = _open(run_dir, "diffusion")
    lineage = read_lineage(run_dir)
    if (run_dir / ONNX_MODEL).is_file():
        return _load_exported(run_dir, cfg, lineage, device)
    if (run_dir / QUANTIZED_WEIGHTS).is_file() or (run_dir / BF16_WEIGHTS).is_file():
        return _load_quantized(run_dir, cfg, lineage, device, precision)
    ckpt = _latest(run_dir)
    prec = inference_precision(cfg, device, precision)
    vae = load_vae(cfg.model.vae, prec.device) if cfg.model.space == "latent" else None
    model = build_model(cfg, latent_shape=vae.latent_shape if vae else None)
    path = ckpt / ("ema.safetensors" if ema else "model.safetensors")
    if is_pruned(lineage):
        shape_like(model, read_tensors(path))
    load_weights(path, model)
    model.to(prec.device).eval()
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return LoadedRun(run_dir, cfg, model, schedule_for(cfg), checkpoint_step(ckpt), prec, vae,
                     lineage)


def _load_quantized(run_dir: Path, cfg: Config, lineage: list[dict[str, Any]], device: str,
                    precision: str | None) -> LoadedRun:
    """A run written by `optimize quantize`: int8 Linear layers (torch.ao dynamic, CPU
    only) or bf16-stored weights upcast to fp32 and run at the run's precision."""
    q = run_dir / QUANTIZED_WEIGHTS
    if q.is_file():
        dev = resolve_device(str(device))
        if dev.type != "cpu":
            raise CheckpointError(f"{run_dir} holds dynamic int8 layers, which run on the CPU "
                                  "only (--device cpu); quantize with --method bf16-weights "
                                  "or static-int8 for other devices")
        prec = Precision(dev, "fp32")
    else:
        prec = inference_precision(cfg, device, precision)
    vae = load_vae(cfg.model.vae, prec.device) if cfg.model.space == "latent" else None
    model = build_model(cfg, latent_shape=vae.latent_shape if vae else None)
    if q.is_file():
        try:
            model = from_quantized_tensors(model, read_tensors(q))
        except CheckpointError:
            raise
        except ConfigError as e:
            raise CheckpointError(f"{q}: {e}") from None
    else:
        sd = read_tensors(run_dir / BF16_WEIGHTS)
        check_weights(sd, model, run_dir / BF16_WEIGHTS)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    model.to(prec.device).eval()
    return LoadedRun(run_dir, cfg, model, schedule_for(cfg), lineage_step(lineage), prec, vae,
                     lineage)


def _load_exported(run_dir: Path, cfg: Config, lineage: list[dict[str, Any]],
                   device: str) -> LoadedRun:
    """An exported run: the graph runs in its engine (ONNX Runtime or OpenVINO, as the
    export pass recorded), fp32 or int8 as exported, from the base run's EMA weights."""
    dev = resolve_device(str(device))
    vae = load_vae(cfg.model.vae, dev) if cfg.model.space == "latent" else None
    exports = [p for p in lineage if p.get("pass") == "export"]
    engine = exports[-1].get("engine", "onnxruntime") if exports else "onnxruntime"
    graph = run_dir / ONNX_MODEL
    if engine == "openvino" and (run_dir / OPENVINO_INT8).is_file():
        graph = run_dir / OPENVINO_INT8  # NNCF's int8 IR (the ONNX file is its fp32 graph)
    return LoadedRun(run_dir, cfg, load_graph(graph, engine, dev), schedule_for(cfg),
                     lineage_step(lineage), Precision(dev, "fp32"), vae, lineage)


# --------------------------------------------------------------------------- classifier

@dataclass
class LoadedClassifier:
    run_dir: Path
    config: Config
    model: nn.Module
    quantized: bool

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, C, H, W) images -> (float64 features (N, D), class probabilities (N, K))."""
        d = self.config.data
        if tuple(images.shape[1:]) != (d.channels, d.image_size, d.image_size):
            raise CheckpointError(
                f"images are {tuple(images.shape[1:])} (C, H, W) but the classifier in "
                f"{self.run_dir} was trained on {(d.channels, d.image_size, d.image_size)}")
        feats, probs = [], []
        for i in range(0, images.shape[0], batch_size):
            x = to_model_range(images[i:i + batch_size])
            f = self.model.features(x)
            logits = self.model.head(f)
            feats.append(f.double())
            probs.append(logits.float().softmax(1))
        return torch.cat(feats), torch.cat(probs)


def load_classifier(run_dir: str | Path) -> LoadedClassifier:
    """Rebuild a classifier (fp32 or its int8 variant, CPU, eval mode) from its directory."""
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"classifier run directory not found: {run_dir}")
    run_dir, cfg = _open(run_dir, "classifier")
    qpath = run_dir / QUANTIZED_WEIGHTS
    if qpath.is_file():
        try:
            qmodel = from_quantized_tensors(build_model(cfg), read_tensors(qpath))
        except CheckpointError:
            raise
        except ConfigError as e:
            raise CheckpointError(f"{qpath}: {e}") from None
        return LoadedClassifier(run_dir, cfg, qmodel, True)
    model = build_model(cfg)
    load_weights(_latest(run_dir) / "ema.safetensors", model)
    return LoadedClassifier(run_dir, cfg, model.eval(), False)


def load(run_dir: str | Path, device: str = "auto"
         ) -> LoadedRun | LoadedVAE | LoadedClassifier:
    """Any run directory, loaded as what it is (diffusion: EMA weights at the run's
    precision; VAE and classifier: fp32)."""
    kind = kind_of(read_config(run_dir))
    if kind == "diffusion":
        return load_run(run_dir, device=device)
    if kind == "vae":
        return load_vae(run_dir, resolve_device(device))
    return load_classifier(run_dir)
