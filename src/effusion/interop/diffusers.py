"""diffusers folders in and out: `effusion import diffusers DIR --out RUN` and
`effusion export --format diffusers --run RUN --out DIR`.

Import reads a `UNet2DModel` saved with `save_pretrained` (the folder itself, or a pipeline
folder's `unet/`) and the scheduler config beside it (`scheduler_config.json`, or a
pipeline's `scheduler/`), and writes an effusion run directory: `config.yaml` with
`model.arch: diffusers_unet2d`, the UNet2DModel config, the schedule and prediction type
mapped onto effusion's `diffusion` section and the lineage of the import, and one
checkpoint (step 0) whose weights are the diffusers model's, in safetensors. From there
the run goes through `sample`, `evaluate`, `optimize ...` and `serve` like any other.

What maps exactly (checked on import; anything else is an error that names it):

| diffusers scheduler config | effusion |
|---|---|
| `beta_schedule: linear`, 1e-4 .. 0.02 at T = 1000 (scaled by 1000/T) | `diffusion.schedule: linear` |
| `beta_schedule: squaredcos_cap_v2` | `diffusion.schedule: cosine` (same formula, s = 0.008, betas capped at 0.999) |
| `prediction_type: epsilon / v_prediction / sample` | `diffusion.prediction: eps / v / x0` |
| `num_train_timesteps` | `diffusion.timesteps` |
| `timestep_spacing: leading / trailing / linspace` | `sample.spacing` |
| `clip_sample` (range 1) | `sample.clip_x0` |

Export writes the other direction for a `diffusers_unet2d` run: the UNet2DModel
(`save_pretrained`, safetensors) and a `DDIMScheduler` config in one folder, plus
`effusion.json` (the class count, whether the last class embedding is the null class of
classifier-free guidance, the run's lineage), which a later import reads back.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from effusion.config import Config, ConfigError, DataConfig, DiffusionConfig, SampleConfig, validate
from effusion.models.diffusers_unet import DIFFUSERS_HINT, DiffusersUNet, require_diffusers
from effusion.runs import load_run
from effusion.runs.files import (CheckpointError, read_config, read_lineage, save_checkpoint,
                                 write_config)

UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
SIDECAR = "effusion.json"  # what diffusers' config has no field for
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} holds no JSON object")
    return obj


def find_unet(src: Path) -> Path:
    """The folder of the UNet2DModel: `src` itself or a pipeline folder's `unet/`."""
    if not src.is_dir():
        raise ConfigError(f"{src} is not a folder (expected a diffusers UNet2DModel saved with "
                          "save_pretrained, or a pipeline folder with unet/)")
    for d in (src, src / "unet"):
        if (d / UNET_CONFIG).is_file():
            cls = _read_json(d / UNET_CONFIG).get("_class_name")
            if cls == "UNet2DModel":
                return d
            if cls is not None:
                raise ConfigError(f"{d / UNET_CONFIG} describes a {cls}; effusion imports "
                                  "UNet2DModel (unconditional or class-conditional through "
                                  "num_class_embeds) only")
    raise ConfigError(f"{src} holds no UNet2DModel ({UNET_CONFIG} with _class_name UNet2DModel, "
                      "in the folder or its unet/)")


def find_scheduler(src: Path, unet_dir: Path) -> dict[str, Any] | None:
    """The scheduler config beside the UNet (`scheduler_config.json`, or `scheduler/`)."""
    for d in (unet_dir, src, src / "scheduler"):
        if (d / SCHEDULER_CONFIG).is_file():
            return _read_json(d / SCHEDULER_CONFIG)
    return None


def diffusion_from_scheduler(sched: dict[str, Any] | None) -> tuple[DiffusionConfig, dict[str, Any]]:
    """effusion's diffusion config and the sample settings a diffusers scheduler config
    stands for; an error naming the field for anything effusion cannot represent."""
    if sched is None:  # diffusers' DDPMScheduler defaults
        sched = {"_class_name": "DDPMScheduler"}
    name = sched.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler {name}: effusion maps {', '.join(SCHEDULERS)} (a discrete "
                          "beta schedule); re-save the model with one of them")
    T = int(sched.get("num_train_timesteps", 1000))
    if sched.get("trained_betas") is not None:
        raise ConfigError("the scheduler has trained_betas (a custom beta table), which effusion's "
                          "named schedules cannot represent")
    beta = sched.get("beta_schedule", "linear")
    if beta not in BETA_SCHEDULES:
        raise ConfigError(f"scheduler beta_schedule={beta!r}: effusion represents "
                          f"{' and '.join(BETA_SCHEDULES)} only")
    if beta == "linear":
        lo, hi = float(sched.get("beta_start", 1e-4)), float(sched.get("beta_end", 0.02))
        want = (1e-4 * 1000 / T, min(0.02 * 1000 / T, 0.999))
        if not (math.isclose(lo, want[0], rel_tol=1e-6) and math.isclose(hi, want[1], rel_tol=1e-6)):
            raise ConfigError(f"scheduler linear betas {lo:g}..{hi:g} at T={T}: effusion's linear "
                              f"schedule is {want[0]:g}..{want[1]:g} there (Ho et al. 2020, "
                              "scaled by 1000/T)")
    pred = sched.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise ConfigError(f"scheduler prediction_type={pred!r}: effusion represents "
                          f"{', '.join(PREDICTIONS)}")
    for key, bad in (("thresholding", True), ("rescale_betas_zero_snr", True)):
        if sched.get(key) == bad:
            raise ConfigError(f"scheduler {key}={bad} is not supported by effusion's samplers")
    if sched.get("clip_sample") and float(sched.get("clip_sample_range", 1.0)) != 1.0:
        raise ConfigError(f"scheduler clip_sample_range={sched['clip_sample_range']}: effusion "
                          "clips the denoised estimate to [-1, 1] only")
    spacing = sched.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        raise ConfigError(f"scheduler timestep_spacing={spacing!r}: choose leading, trailing or "
                          "linspace")
    if int(sched.get("steps_offset", 0)):
        raise ConfigError(f"scheduler steps_offset={sched['steps_offset']}: effusion's spacings "
                          "start at t = 0; re-save the scheduler with steps_offset 0")
    diff = DiffusionConfig(schedule=BETA_SCHEDULES[beta], timesteps=T,
                           prediction=PREDICTIONS[pred])
    sample = {"spacing": spacing, "clip_x0": bool(sched.get("clip_sample", name != "DPMSolverMultistepScheduler"))}
    return diff, {"scheduler": name, **sample}


def import_diffusers(src: str | Path, out: str | Path, *, data: str | None = None,
                     null_class: bool | None = None, overwrite: bool = False) -> Path:
    """Make an effusion run directory `out` from the diffusers folder `src`.

    Args:
        data: the data source the model was trained on (for evaluate and distillation);
            default: the one built-in source of the model's size and channels, else an
            error asking for it.
        null_class: whether the last of `num_class_embeds` is the null class ("no label")
            of classifier-free guidance. Default: what `effusion.json` says (written by
            effusion's export), else False (every embedding is a class; guidance off).
    """
    diffusers = require_diffusers()
    src, out = Path(src), Path(out)
    unet_dir = find_unet(src)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another --out (or --overwrite)")
    sidecar = _read_json(src / SIDECAR) if (src / SIDECAR).is_file() else {}
    sched = find_scheduler(src, unet_dir)
    diff, sample = diffusion_from_scheduler(sched)
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"diffusers could not load the UNet2DModel in {unet_dir}: {e}") from None
    ucfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items()
            if not k.startswith("_")}
    embeds = ucfg.get("num_class_embeds") or 0
    has_null = sidecar.get("null_class", False) if null_class is None else null_class
    if has_null and not embeds:
        raise ConfigError("--null-class: this UNet2DModel is unconditional (no num_class_embeds)")
    k = (embeds - 1 if has_null else embeds) if embeds else 0
    size, channels = int(ucfg.get("sample_size") or 0), int(ucfg.get("in_channels", 3))
    if not size:
        raise ConfigError(f"{unet_dir / UNET_CONFIG} has no sample_size; set it to the image size "
                          "the model was trained at")
    if ucfg.get("out_channels", channels) != channels:
        raise ConfigError("effusion's denoiser predicts as many channels as it takes: "
                          f"in_channels={channels}, out_channels={ucfg.get('out_channels')}")
    source = data or sidecar.get("data") or _native_source(size, channels)
    model = DiffusersUNet(ucfg, k)
    model.unet.load_state_dict(unet.state_dict())
    base = Config()
    cfg = replace(base,
                  data=DataConfig(source=source, image_size=size, channels=channels),
                  model=replace(base.model, arch="diffusers_unet2d", num_classes=k,
                                diffusers_config=json.dumps(ucfg, sort_keys=True)),
                  diffusion=diff,
                  train=replace(base.train, cond_drop=0.1 if has_null else 0.0),
                  sample=replace(base.sample, spacing=sample["spacing"], clip_x0=sample["clip_x0"]))
    validate(cfg)
    out.mkdir(parents=True, exist_ok=True)
    lineage = [{"pass": "import", "from": "diffusers", "source": str(src.resolve()),
                "unet": "UNet2DModel", "scheduler": sample["scheduler"] if sched else None,
                "null_class": bool(has_null), "data": source,
                "diffusers_version": diffusers.__version__, "step": 0}]
    if sidecar.get("lineage"):
        lineage = list(sidecar["lineage"]) + lineage
    write_config(out, cfg, lineage)
    sd = model.state_dict()
    save_checkpoint(out, 0, model=sd, ema=sd, optimizer={"state": {}, "param_groups": []},
                    rng={}, state={"images_seen": 0, "imported_from": str(src.resolve())}, keep=1)
    return out


def _native_source(size: int, channels: int) -> str:
    """The one built-in source of this native size and channel count, else an error asking
    for --data (a model's folder does not say what it was trained on)."""
    from effusion.data.sources import NATIVE

    names = [name for name, sc in NATIVE.items() if sc == (size, channels)]
    if len(names) != 1:
        kind = "RGB" if channels == 3 else "grayscale"
        raise ConfigError(f"which data was this {size} px {kind} model trained on? Say it with "
                          f"--data ({' | '.join(names + ['folder:PATH', 'npz:PATH'])}); "
                          "evaluate and distillation use it")
    return names[0]


def export_diffusers(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write run `run_dir` as a diffusers folder `out` (UNet2DModel + DDIMScheduler); an
    error that says why for a run no UNet2DModel can represent exactly."""
    diffusers = require_diffusers()
    run_dir, out = Path(run_dir), Path(out)
    cfg = read_config(run_dir)
    lineage = read_lineage(run_dir)
    if cfg.model.arch == "unet":
        raise ConfigError(
            "effusion's own U-Net has no exact UNet2DModel mapping (its residual blocks, "
            "attention and time embedding are laid out differently, so no weight-for-weight "
            "copy gives the same function); train with --set model.arch=diffusers_unet2d (the "
            "same recipe on diffusers' network) to get a run that exports")
    if cfg.model.arch != "diffusers_unet2d":
        raise ConfigError(f"{run_dir} is a model.arch={cfg.model.arch} run, not a diffusion run")
    if cfg.model.guidance_input:
        raise ConfigError(f"{run_dir} is a guidance-distilled student: its w input has no place in "
                          "a UNet2DModel (export its teacher, or export this one as ONNX)")
    passes = [p.get("pass") for p in lineage]
    for bad in ("prune", "quantize", "export"):
        if bad in passes:
            raise ConfigError(f"{run_dir} went through `{bad}`, whose network is no longer a "
                              "UNet2DModel; export the run it was made from")
    if cfg.diffusion.schedule not in BETA_SCHEDULES.values():
        raise ConfigError(f"diffusion.schedule={cfg.diffusion.schedule} has no diffusers "
                          f"beta_schedule (linear and cosine map)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another --out")
    run = load_run(run_dir, device="cpu", precision="fp32")
    net: DiffusersUNet = run.model
    out.mkdir(parents=True, exist_ok=True)
    net.unet.save_pretrained(str(out), safe_serialization=True)
    T = cfg.diffusion.timesteps
    beta = {v: k for k, v in BETA_SCHEDULES.items()}[cfg.diffusion.schedule]
    pred = {v: k for k, v in PREDICTIONS.items()}[cfg.diffusion.prediction]
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=T, beta_schedule=beta, beta_start=1e-4 * 1000 / T,
        beta_end=min(0.02 * 1000 / T, 0.999), prediction_type=pred,
        clip_sample=cfg.sample.clip_x0, timestep_spacing=cfg.sample.spacing,
        set_alpha_to_one=True, steps_offset=0)
    scheduler.save_pretrained(str(out))
    info = {"num_classes": cfg.model.num_classes, "null_class": net.has_null_class,
            "data": cfg.data.source, "run": str(run_dir.resolve()), "step": run.step,
            "lineage": lineage, "effusion_sampler": {"sampler": cfg.sample.sampler,
                                                     "steps": cfg.sample.steps,
                                                     "guidance": cfg.sample.guidance}}
    (out / SIDECAR).write_text(json.dumps(info, indent=2) + "\n")
    return {"out": str(out), "step": run.step, "files": sorted(p.name for p in out.iterdir()),
            "hint": f"UNet2DModel.from_pretrained({str(out)!r}); "
                    f"DDIMScheduler.from_pretrained({str(out)!r})"}


__all__ = ["DIFFUSERS_HINT", "diffusion_from_scheduler", "export_diffusers", "find_unet",
           "import_diffusers"]
