"""The `effusion` command: parse arguments, call the Python API, report user errors in one line."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from effusion.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train diffusion models fast on the hardware you have.")


def _version(value: bool) -> None:
    if value:
        from effusion import __version__

        typer.echo(f"effusion {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Train diffusion models fast on the hardware you have."""


_JSON_STDOUT = sys.stdout


def emit_json(obj: object, indent: int | None = None) -> None:
    """Print the one JSON document of a --json command to the real stdout."""
    _JSON_STDOUT.write(json.dumps(obj, indent=indent) + "\n")
    _JSON_STDOUT.flush()


def user_errors(fn: Callable) -> Callable:
    """Turn user errors (bad config, missing files, corrupt checkpoints) into exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import contextlib

        from effusion.train.loop import TrainingError

        global _JSON_STDOUT
        # --json: stdout carries exactly one JSON document (emit_json); every log line,
        # progress bar or first-use training message goes to stderr meanwhile.
        quiet = contextlib.redirect_stdout(sys.stderr) if kwargs.get("as_json") else contextlib.nullcontext()
        _JSON_STDOUT = sys.stdout
        try:
            with quiet:
                return fn(*args, **kwargs)
        except ConfigError as e:  # DataError and CheckpointError are ConfigErrors too
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except TrainingError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except OSError as e:  # the machine, not the input: a full disk, a vanished folder
            where = f" {e.filename}" if e.filename else ""
            typer.echo(f"error: cannot read or write{where}: {e.strerror or e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


def _resumed_config(run: Path, set_: list[str], given: dict[str, object]):
    """`--resume` continues a run with its own config.yaml; only --set may change it, and
    options that would build another config are an error (the same rule in every command).
    `given` maps each such option to its value (None when not given)."""
    from effusion.config import config_from_dict, parse_overrides
    from effusion.runs import read_config

    named = [opt for opt, v in given.items() if v is not None]
    if named:
        raise ConfigError(f"--resume uses the run's own config.yaml; drop {', '.join(named)} "
                          "(--set may still change e.g. train.max_steps), or leave out --resume: "
                          "the same command that started a run resumes it")
    return config_from_dict(parse_overrides(set_), read_config(run))


@app.command()
@user_errors
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. train.lr=3e-4."),
    run: Path = typer.Option(Path("runs/default"), "--run", help="Run directory to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue with the run's own config.yaml (--set may change training values). Without it, the same command resumes a run of the same config."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete this run's old checkpoints first."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Latent diffusion: the run directory "
                                       "of a trained VAE (sets model.space=latent)."),
    nproc: int = typer.Option(1, "--nproc", help="Data-parallel processes on this machine (torchrun: gloo on CPU, nccl on CUDA)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines in the job (run the same command on each)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous, the same on every machine (needed with --nnodes > 1)."),
) -> None:
    """Train a diffusion model (default: the MNIST recipe in configs/mnist.yaml)."""
    import os

    from effusion.config import load_config
    from effusion.recipes import train as train_fn

    if (nproc > 1 or nnodes > 1) and "WORLD_SIZE" not in os.environ:
        from effusion.train.distributed import launch

        args = ["train", "--run", str(run)] + [x for kv in set_ for x in ("--set", kv)]
        args += (["--config", str(config)] if config else []) + (["--vae", str(vae)] if vae else [])
        args += [flag for flag, on in (("--resume", resume), ("--fresh", fresh), ("--quiet", quiet)) if on]
        launch(nproc, args, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint)
        return

    if resume:
        cfg = _resumed_config(run, set_, {"--config": config, "--vae": vae})
    if vae is not None:
        from effusion.runs import load_vae

        load_vae(vae)  # fail now, with a clear message, if it is not a finished VAE run
        set_ = ["model.space=latent", f"model.vae={vae.resolve()}"] + list(set_)
    if not resume:
        cfg = load_config(config, set_)
    result = train_fn(cfg, run, resume=resume, fresh=fresh, progress=not quiet)
    if os.environ.get("RANK", "0") != "0":
        return  # data-parallel: rank 0 reports
    typer.echo(f"trained {result.step} steps ({result.images_seen} images) in "
               f"{result.minutes:.1f} min; last loss {result.loss:.4f}")
    if result.grid is not None:
        typer.echo(f"samples: {result.grid}")


@app.command()
@user_errors
def sample(
    run: Path = typer.Option(..., "--run", help="Run directory written by `effusion train`."),
    n: int = typer.Option(64, "--n", help="Number of samples."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddim | ddpm | dpmpp_2m | consistency (default: the run's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default: the sampler's)."),
    seed: int = typer.Option(0, "--seed"),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM noise (0 = deterministic)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights."),
    out: Optional[Path] = typer.Option(None, "--out", help="Grid PNG (default RUN/samples.png)."),
    npy: Optional[Path] = typer.Option(None, "--npy", help="Also save uint8 N x H x W [x C] .npy."),
    device: str = typer.Option("auto", "--device"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 | fp16 | auto (default: the run's)."),
    classes: Optional[str] = typer.Option(None, "--class", help="Class-conditional runs: a class, a comma list, or all (default all, evenly)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance weight (0 = unconditional, 1 = conditional; default: the run's)."),
    cache_interval: Optional[int] = typer.Option(None, "--cache-interval", help="DeepCache: a full U-Net pass every N network calls, the shallow branch in between (1 = off; default: the run's sample.cache_interval)."),
    guidance_interval: Optional[str] = typer.Option(None, "--guidance-interval", help="Guidance only at noise levels sigma in lo,hi (Kynkaanniemi et al. 2024; 'all' = every step; default: the run's sample.guidance_interval)."),
    size: Optional[str] = typer.Option(None, "--size", help="Sample at HxW, e.g. 24x40 (pixel-space runs; default: the run's data.image_size square)."),
) -> None:
    """Draw samples from a trained run and save them as a PNG grid (and .npy)."""
    import time

    from effusion.data.images import save_grid, save_npy
    from effusion.fileio import check_writable
    from effusion.runs import load_run
    from effusion.sampling import class_labels, generate, parse_size

    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    hw = parse_size(size) if size is not None else None
    loaded = load_run(run, ema=ema, device=device, precision=precision)
    out = check_writable(out or run / "samples.png")  # fail before sampling, not after
    if npy is not None:
        check_writable(npy)
    if classes is not None and not loaded.num_classes:
        raise ConfigError("--class needs a class-conditional run (model.num_classes > 0)")
    cond = class_labels(classes, n, loaded.num_classes) if loaded.num_classes else None
    t0 = time.perf_counter()
    images = generate(loaded, n, sampler=sampler, steps=steps, seed=seed, eta=eta, cond=cond,
                      guidance=guidance, cache_interval=cache_interval,
                      guidance_interval=_interval(guidance_interval), size=hw)
    dt = time.perf_counter() - t0
    nrow = 10 if n % 10 == 0 and n >= 50 else None
    save_grid(images, out, nrow=nrow)
    typer.echo(f"{n} samples from step {loaded.step} in {dt:.1f}s -> {out}")
    if npy is not None:
        save_npy(images, npy)
        typer.echo(f"array: {npy}")


@app.command()
@user_errors
def info(
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory."),
    hardware: bool = typer.Option(False, "--hardware", help="Show this machine instead: CPU flags, "
                                  "the ISA PyTorch uses, GPUs, and which precision `auto` picks and why."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show a run's config, checkpoints, parameter count and last metrics (or, with
    --hardware, what this machine offers)."""
    from effusion.runs import describe

    if hardware:
        from effusion.precision import hardware as machine

        hw = machine()
        if as_json:
            emit_json(hw, indent=1)
            return
        for k, v in hw.items():
            typer.echo(f"{k:16s} {v}")
        return
    if run is None:
        raise ConfigError("effusion info needs --run RUN_DIR (or --hardware)")

    ri = describe(run)
    summary = ri.as_dict()
    if as_json:
        emit_json(summary, indent=1)
        return
    typer.echo(f"run:         {run}  ({ri.kind})")
    typer.echo(f"params:      {ri.params:,}")
    typer.echo(f"step:        {ri.step}  (checkpoints: {', '.join(ri.checkpoints) or 'none'})")
    for p in ri.lineage:
        typer.echo(f"derived:     {p.get('pass', '?')} of {p.get('base', '?')} "
                   + " ".join(f"{k}={v}" for k, v in p.items() if k not in ("pass", "base")))
    if ri.last_metrics:
        typer.echo("last metrics: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ri.last_metrics.items()))
    typer.echo("config:\n" + "\n".join("  " + ln for ln in ri.config.to_yaml().splitlines()))


classifier_app = typer.Typer(no_args_is_help=True, help="Train and quantize the small image "
                             "classifiers (the feature networks of `effusion evaluate`).")
app.add_typer(classifier_app, name="classifier")

AUGMENTATIONS = {"flip": "data.hflip=true", "rotate": "data.rotate=10", "crop": "data.translate=2"}


@classifier_app.command("train")
@user_errors
def classifier_train(
    data: str = typer.Option("mnist5k", "--data", help="mnist5k | digits | folder:PATH | npz:PATH"),
    arch: Optional[str] = typer.Option(None, "--arch", help="mlp (784-128-64-10) | cnn (default) | convnet (3 stages, global pooling; for RGB / shapes)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam | adamw | rmsprop | sgd (default adam)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Default 0.002."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="step | cosine | none (default step)."),
    step_every: Optional[int] = typer.Option(None, "--step-every", help="Step schedule: decay every N epochs (default 5)."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="Step schedule: LR multiplier per decay (default 0.3)."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Default 0.2."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Default 0."),
    augment: Optional[str] = typer.Option(None, "--augment",
                                          help="Comma list of flip, rotate, crop, or none (default rotate,crop)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Default 15."),
    set_: list[str] = typer.Option([], "--set", help="Any other config value, e.g. train.batch_size=128."),
    run: Path = typer.Option(Path("runs/classifier"), "--run", help="Run directory to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue with the run's own config.yaml (--set may change training values). Without it, the same command resumes a run of the same config."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete this run's old checkpoints first."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a classifier through the same loop (and switches) as the diffusion model."""
    from effusion.recipes import classifier_config
    from effusion.recipes import train as train_fn

    flags = {"model.arch": arch, "train.optimizer": optimizer, "train.lr": lr,
             "train.lr_schedule": lr_schedule, "train.lr_step_every": step_every,
             "train.lr_gamma": gamma, "model.dropout": dropout,
             "train.weight_decay": weight_decay, "train.epochs": epochs}
    overrides = [f"data.source={data}"] + [f"{k}={v}" for k, v in flags.items() if v is not None]
    if augment is not None:
        augs = [a.strip() for a in augment.split(",") if a.strip() and a.strip() != "none"]
        bad = [a for a in augs if a not in AUGMENTATIONS]
        if bad:
            raise ConfigError(f"--augment: unknown {', '.join(bad)}; choose from "
                              f"{', '.join(AUGMENTATIONS)} (or none)")
        overrides += ["data.hflip=false", "data.rotate=0", "data.translate=0"]
        overrides += [AUGMENTATIONS[a] for a in augs]
    overrides += list(set_)
    given = {"--arch": arch, "--optimizer": optimizer, "--lr": lr, "--lr-schedule": lr_schedule,
             "--step-every": step_every, "--gamma": gamma, "--dropout": dropout,
             "--weight-decay": weight_decay, "--epochs": epochs, "--augment": augment,
             "--data": None if data == "mnist5k" else data}
    cfg = _resumed_config(run, set_, given) if resume else classifier_config(overrides)
    result = train_fn(cfg, run, resume=resume, fresh=fresh, progress=not quiet)
    from effusion.runs import read_metrics

    last = [m for m in read_metrics(run) if "val_acc" in m][-1]
    typer.echo(f"trained {result.step} steps in {result.minutes:.1f} min; held-out accuracy "
               f"{last['val_acc']:.4f}, loss {last['val_loss']:.4f}")
    typer.echo(f"curves: {result.grid}")


@classifier_app.command("distill")
@user_errors
def classifier_distill(
    teacher: Path = typer.Option(..., "--teacher", help="Classifier run to learn from (fp32 or int8)."),
    arch: str = typer.Option("mlp", "--arch", help="The student: mlp | cnn | convnet."),
    temperature: float = typer.Option(4.0, "--temperature", help="Softens both distributions (Hinton et al. 2015)."),
    alpha: float = typer.Option(0.9, "--alpha", help="Share of the soft-target loss; the rest is cross-entropy on labels."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Default: the teacher's."),
    set_: list[str] = typer.Option([], "--set", help="Any other config value, e.g. train.lr=1e-3."),
    run: Path = typer.Option(..., "--run", help="Run directory for the student."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint, also with changed training values (without it, the same command resumes anyway)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the student's old checkpoints first."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Knowledge distillation of a classifier into another architecture, with the
    temperature-softened KL loss against the teacher's probabilities."""
    from effusion.recipes.classifier import distill_classifier
    from effusion.runs import read_metrics

    overrides = ([f"train.epochs={epochs}"] if epochs is not None else []) + list(set_)
    result = distill_classifier(teacher, run, arch=arch, temperature=temperature, alpha=alpha,
                                overrides=overrides, resume=resume, fresh=fresh,
                                progress=not quiet)
    last = [m for m in read_metrics(run) if "val_acc" in m][-1]
    typer.echo(f"distilled {result.step} steps in {result.minutes:.1f} min; held-out accuracy "
               f"{last['val_acc']:.4f}, loss {last['val_loss']:.4f}; student: {run}")


@classifier_app.command("quantize")
@user_errors
def classifier_quantize(
    run: Path = typer.Option(..., "--run", help="Classifier run directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="New run directory (default RUN-int8)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Dynamic int8 quantization of the Linear layers; reports size, latency, accuracy."""
    from effusion.optimize.quantize import quantize_classifier

    r = quantize_classifier(run, out)
    if as_json:
        emit_json(r)
        return
    typer.echo("| | fp32 | int8 |\n|---|---|---|")
    typer.echo(f"| model bytes | {r['bytes_fp32']:,} | {r['bytes_int8']:,} |")
    typer.echo(f"| latency / 256 images (ms) | {r['latency_ms_per_256_fp32']:.2f} | "
               f"{r['latency_ms_per_256_int8']:.2f} |")
    typer.echo(f"| held-out accuracy | {r['val_acc_fp32']:.4f} | {r['val_acc_int8']:.4f} |")
    typer.echo(f"quantized run: {out or run.with_name(run.name + '-int8')}")


@app.command()
@user_errors
def evaluate(
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory to sample and score."),
    images: Optional[Path] = typer.Option(None, "--images", help="Score a uint8 .npy array instead."),
    data: str = typer.Option("mnist5k", "--data", help="With --images: the real data to compare to."),
    n: int = typer.Option(1000, "--n", help="Samples to draw."),
    sampler: Optional[str] = typer.Option(None, "--sampler"),
    steps: Optional[int] = typer.Option(None, "--steps"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Class-conditional runs: guidance weight (default: the run's)."),
    cache_interval: Optional[int] = typer.Option(None, "--cache-interval", help="DeepCache interval for the samples (1 = off; default: the run's)."),
    guidance_sweep: Optional[str] = typer.Option(None, "--guidance-sweep", help="Class-conditional runs: score each weight of a comma list, e.g. 0,1,2,3,5."),
    guidance_interval: Optional[str] = typer.Option(None, "--guidance-interval", help="Guidance only at noise levels sigma in lo,hi ('all' = every step; default: the run's)."),
    per_class: bool = typer.Option(False, "--per-class", help="Class-conditional runs: FID/KID, recall and class accuracy per class, and head vs tail by training class counts."),
    ema_sweep: Optional[str] = typer.Option(None, "--ema-sweep", help="Runs with post-hoc EMA snapshots: score the EMA rebuilt at each sigma_rel of a comma list, e.g. 0.03,0.05,0.1,0.2."),
    ema_decays: Optional[str] = typer.Option(None, "--ema-decays", help="With --ema-sweep: also fixed decays (bias-corrected), e.g. 0.999,0.9999."),
    seed: int = typer.Option(123, "--seed"),
    features: Optional[str] = typer.Option(None, "--features", help="Feature space: classifier, random, random-std or pixels, or a classifier run dir (default: classifier for grayscale data, random-std for colour; the data's classifier is trained once and cached)."),
    bpd_n: int = typer.Option(256, "--bpd-n", help="Held-out images for bits/dim (0 = skip)."),
    bpd_strata: int = typer.Option(50, "--bpd-strata", help="Timesteps per image for bits/dim (T-1 = exact)."),
    ema: bool = typer.Option(True, "--ema/--no-ema"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON object."),
) -> None:
    """FID, KID, precision/recall, coverage (and class accuracy, bits/dim) of a run or images."""
    from effusion.config import DataConfig
    from effusion.evaluate import evaluate_images, evaluate_run, load_image_array
    from effusion.runs import read_config

    if (run is None) == (images is None):
        raise ConfigError("give exactly one of --run DIR or --images FILE.npy")
    if run is not None:
        clf = _features(features, read_config(run).data, as_json)
    else:
        arr = load_image_array(images)
        clf = _features(features, DataConfig(source=data, image_size=arr.shape[-1],
                                             channels=arr.shape[1]), as_json)
    if guidance_sweep is not None:
        return _guidance_sweep(run, guidance_sweep, n, sampler, steps, seed, clf, ema,
                               device, as_json, _interval(guidance_interval))
    if ema_sweep is not None or ema_decays is not None:
        return _ema_sweep(run, ema_sweep or "", ema_decays or "", n, sampler, steps, guidance,
                          seed, clf, device, as_json)
    if run is not None:
        r = evaluate_run(run, n, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                         cache_interval=cache_interval, features=clf, bpd_n=bpd_n, bpd_strata=bpd_strata, ema=ema,
                         device=device, guidance_interval=_interval(guidance_interval),
                         per_class=per_class)
    elif per_class:
        raise ConfigError("--per-class needs --run DIR (a class-conditional run)")
    else:
        r = evaluate_images(arr, data, features=clf)
    if as_json:
        emit_json(r)
        return
    floor = r["real_floor"]
    typer.echo(f"| metric | {'samples' if run else images.name} (n={r['n']}) | "
               f"real floor (n={floor['n']}) |\n|---|---|---|")
    def cell(d: dict, k: str) -> str:
        if k not in d:
            return "-"
        return f"{d[k]:.4f}" + (f" ± {d['kid_std']:.4f}" if k == "kid" else "")

    for k in ("fid", "kid", "precision", "recall", "coverage", "confidence", "class_accuracy"):
        if k in r:
            typer.echo(f"| {k} | {cell(r, k)} | {cell(floor, k)} |")
    if "bpd" in r:
        typer.echo(f"| bits/dim ({r['bpd_split']} images, n={r['bpd_images']}) | "
                   f"{r['bpd']:.3f} ± {r['bpd_stderr']:.3f} | - |")
    if "per_class" in r:
        _per_class_table(r["per_class"])
    mem = r.get("memorisation", {})
    if "features" in mem:
        typer.echo(f"memorisation (against {mem['train_images']} training images, "
                   f"{mem['held_out_images']} held out): " + "; ".join(
                       f"{space}: near copies {m['copies']:.1%}, closer than 95% of held-out "
                       f"{m['closer_than_p5']:.1%} (0.05 = as novel as unseen images), "
                       f"distance ratio {m['distance_ratio']:.2f}"
                       for space, m in ((k, mem[k]) for k in ("features", "pixels"))))
    typer.echo(f"features: {r['features']}")
    if run is not None:
        typer.echo(f"wrote {run / 'metrics.json'}")


def _num(v, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _per_class_table(pc: dict) -> None:
    typer.echo("\n| class | train images | n | FID | KID | precision | recall | class accuracy |")
    typer.echo("|---|---|---|---|---|---|---|---|")
    rows = [(c, r) for c, r in pc["classes"].items()]
    rows += [(g, pc[g]) for g in ("head", "tail") if g in pc]
    for c, r in rows:
        label = f"{c} ({','.join(pc['groups'][c])})" if c in ("head", "tail") else c
        typer.echo(f"| {label} | {r.get('train_images', '-')} | {r.get('n', '-')} | "
                   f"{_num(r['fid'])} | {_num(r['kid'], '.1f')} | {_num(r['precision'], '.3f')} | "
                   f"{_num(r['recall'], '.3f')} | {_num(r['class_accuracy'], '.3f')} |")
    typer.echo(f"(FID where both sides have more than {pc['feature_dim']} images, else '-': "
               "read the KID there)")


def _floats(spec: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes a comma list of numbers, got {spec!r}") from None


def _ema_sweep(run: Optional[Path], spec: str, decays: str, n: int, sampler, steps, guidance,
               seed: int, features, device: str, as_json: bool) -> None:
    from effusion.evaluate import ema_sweep

    if run is None:
        raise ConfigError("--ema-sweep needs --run DIR")
    r = ema_sweep(run, _floats(spec, "--ema-sweep"), _floats(decays, "--ema-decays"), n,
                  sampler=sampler, steps=steps, guidance=guidance, seed=seed, features=features,
                  device=device, progress=not as_json)
    if as_json:
        emit_json(r)
        return
    typer.echo("| EMA | FID | precision | recall | coverage | class accuracy | fit residual |")
    typer.echo("|---|---|---|---|---|---|---|")
    for x in r["sweep"]:
        mark = " (best)" if x["ema"] == r["best"] else ""
        typer.echo(f"| {x['ema']}{mark} | {x['fid']:.2f} | {x['precision']:.3f} | "
                   f"{x['recall']:.3f} | {x['coverage']:.4f} | {_num(x.get('class_accuracy'), '.3f')} | "
                   f"{_num(x.get('residual'), '.3g')} |")
    typer.echo(f"wrote {run / 'ema_sweep.json'}")


@app.command()
@user_errors
def ema(
    run: Path = typer.Option(..., "--run", help="A run trained with train.posthoc_ema (its posthoc/ snapshots)."),
    out: Path = typer.Option(..., "--out", help="New run directory with the rebuilt EMA."),
    sigma_rel: Optional[float] = typer.Option(None, "--sigma-rel", help="Power EMA of this relative width (EDM2), e.g. 0.1."),
    decay: Optional[float] = typer.Option(None, "--decay", help="Or: a fixed decay (bias-corrected), e.g. 0.999."),
    step: Optional[int] = typer.Option(None, "--step", help="Average up to this step (default: the last snapshot)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Post-hoc EMA (Karras et al. 2024): rebuild the EMA of any length after training."""
    from effusion.train.posthoc import Target, write_posthoc_run

    r = write_posthoc_run(run, out, Target(sigma_rel=sigma_rel, decay=decay), step)
    if as_json:
        emit_json(r)
        return
    typer.echo(f"{r['target']} at step {r['step']} from {r['snapshots']} snapshots "
               f"(profile fit residual {r['residual']:.3g}); wrote {r['out']}")


def _features(features: Optional[str], data, as_json: bool):
    """--features as evaluate takes it: None -> the data's cached classifier, trained once
    here (evaluate uses the data's default space with it), a feature space's name (after
    that same step: its class scores use the classifier), else a classifier run dir."""
    from effusion.evaluate.features import FEATURE_SPACES

    if features is None:
        return _feature_classifier(data, as_json)
    if features in FEATURE_SPACES:
        _feature_classifier(data, as_json)
        return features
    return Path(features)


def _feature_classifier(data, as_json: bool):
    """The explicit step before scoring: the cached feature classifier for the data,
    trained once if missing (its log goes to stderr, so --json output stays pure)."""
    import contextlib

    from effusion.recipes import feature_classifier

    with contextlib.redirect_stdout(sys.stderr):
        return feature_classifier(data, progress=not as_json)


def _guidance_sweep(run: Optional[Path], spec: str, n: int, sampler: Optional[str],
                    steps: Optional[int], seed: int, features, ema: bool,
                    device: str, as_json: bool, interval=None) -> None:
    from effusion.evaluate import guidance_sweep

    if run is None:
        raise ConfigError("--guidance-sweep needs --run DIR")
    try:
        weights = [float(w) for w in spec.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--guidance-sweep takes a comma list of numbers, got {spec!r}") from None
    r = guidance_sweep(run, weights, n, sampler=sampler, steps=steps, seed=seed,
                       features=features, ema=ema, device=device, progress=not as_json,
                       guidance_interval=interval)
    if as_json:
        emit_json(r)
        return
    typer.echo("| guidance | class accuracy | FID | KID | precision | recall | coverage |")
    typer.echo("|---|---|---|---|---|---|---|")
    for x in r["sweep"] + [{**r["real_floor"], "guidance": "real floor"}]:
        typer.echo(f"| {x['guidance']} | {x['class_accuracy']:.4f} | {x['fid']:.2f} | "
                   f"{x['kid']:.1f} | {x['precision']:.3f} | {x['recall']:.3f} | {x['coverage']:.4f} |")
    typer.echo(f"wrote {run / 'guidance_sweep.json'} and {run / 'guidance_sweep.png'}")


optimize_app = typer.Typer(no_args_is_help=True, help="Make a trained diffusion run cheaper to "
                           "sample; each pass writes a new run directory.")
app.add_typer(optimize_app, name="optimize")


@optimize_app.command("export")
@user_errors
def optimize_export(
    run: Path = typer.Option(..., "--run", help="Diffusion run directory."),
    out: Path = typer.Option(..., "--out", help="New run directory for the exported model."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (the graph run by ONNX Runtime) | openvino (the same graph run by OpenVINO) | auto (time eager bf16/fp32, ONNX Runtime and OpenVINO fp32/int8 here; keep the fastest within --tolerance)."),
    tolerance: float = typer.Option(0.02, "--tolerance", help="auto: the largest relative RMS error of the network output against eager fp32 a candidate may have."),
    int8: bool = typer.Option(False, "--int8", help="Static int8 quantization, calibrated on noisy real inputs across timesteps (onnx: ONNX Runtime's QDQ tooling; openvino: NNCF post-training quantization)."),
    calib_batches: int = typer.Option(16, "--calib-batches", help="Calibration batches of 16 (with --int8)."),
    fp16: bool = typer.Option(False, "--fp16", help="onnx: an fp16 graph (fp32 inputs and output) for ONNX Runtime on CUDA, with TensorRT's execution provider where installed; CPUs run it, slowly."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Export the U-Net (EMA weights, fp32) and check it against the eager model; `sample`
    and `evaluate` take the new run directory like any other."""
    from effusion.optimize.export import AUTO, export_run

    r = export_run(run, out, fmt, int8=int8, calib_batches=calib_batches, fp16=fp16,
                   tolerance=tolerance)
    if as_json:
        emit_json(r)
        return
    if fmt == AUTO:
        b = str(r["chosen_at_batch"])
        typer.echo(f"| engine | relative error | batch 1 ms | batch {b} ms | |\n|---|---|---|---|---|")
        for c in r["candidates"]:
            if c.get("error") is None:
                typer.echo(f"| {c['name']} | | | | skipped: {c.get('skipped', '')} |")
                continue
            mark = "chosen" if c["name"] == r["chosen"] else (
                "" if c["within_tolerance"] else f"over --tolerance {r['tolerance']}")
            typer.echo(f"| {c['name']} | {c['error']:.2e} | {c['latency_ms']['1']:.1f} | "
                       f"{c['latency_ms'][b]:.1f} | {mark} |")
        typer.echo(f"wrote {out} with {r['chosen']} (the fastest at batch {b} within tolerance)")
        return
    typer.echo(f"exported {run} -> {out / 'model.onnx'} ({r['bytes']:,} bytes); max abs "
               f"difference to eager fp32: {r['max_abs_diff_fp32']:.2e}")
    name = r["engine"]
    reduced = int8 or fp16
    engine = f"{name} {'int8' if int8 else 'fp16'}" if reduced else name
    extra = f" {name} fp32 ms |" if reduced else ""
    typer.echo(f"| batch | eager fp32 ms |{extra} {engine} ms | speedup |\n|---|---|" + "---|" * (2 + reduced))
    for b, v in r["latency_ms"].items():
        mid = f" {v['engine_fp32']:.1f} |" if reduced else ""
        typer.echo(f"| {b} | {v['eager_fp32']:.1f} |{mid} {v['engine']:.1f} | {v['speedup']:.2f}x |")


@optimize_app.command("quantize")
@user_errors
def optimize_quantize(
    run: Path = typer.Option(..., "--run", help="Diffusion run directory."),
    out: Path = typer.Option(..., "--out", help="New run directory for the quantized model."),
    method: str = typer.Option("dynamic-int8", "--method", help="dynamic-int8 (Linear layers, torch.ao) | bf16-weights (half the bytes, upcast on load) | static-int8 (every layer, calibrated; an engine graph, as `export --int8`)."),
    fmt: str = typer.Option("onnx", "--format", help="static-int8: onnx (ONNX Runtime) | openvino."),
    calib_batches: int = typer.Option(16, "--calib-batches", help="Batches of 16 noisy training images across timesteps: calibration (static-int8) and the error measurement."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Quantize a diffusion run into a new run directory that `sample`, `evaluate` and
    `serve` load like any other; report bytes, latency and the network's output error."""
    from effusion.optimize.quantize import quantize_run

    r = quantize_run(run, out, method, fmt=fmt, calib_batches=calib_batches)
    if as_json:
        emit_json(r)
        return
    if method == "static-int8":
        typer.echo(f"quantized {run} -> {out} (static int8 {r['engine']} graph, {r['bytes']:,} bytes)")
        return
    typer.echo(f"quantized {run} -> {out} ({method}): {r['bytes']:,} bytes (base "
               f"{r['bytes_base']:,}), {100 * r['params_quantized_share']:.1f}% of the parameters, "
               f"output error {100 * r['prediction_rel_error']:.2f}% of its magnitude")
    typer.echo("| batch | base ms | quantized ms | speedup |\n|---|---|---|---|")
    for b, v in r["latency_ms"].items():
        typer.echo(f"| {b} | {v['base']:.1f} | {v['quantized']:.1f} | {v['speedup']:.2f}x |")


@optimize_app.command("distill-guidance")
@user_errors
def optimize_distill_guidance(
    run: Path = typer.Option(..., "--run", help="Class-conditional run trained with label dropout."),
    out: Path = typer.Option(..., "--out", help="Run directory for the student."),
    guidance_range: str = typer.Option("1,3", "--guidance-range", help="Weights the student learns, lo,hi."),
    minutes: float = typer.Option(5.0, "--minutes", help="Training budget (wall time)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. train.lr=1e-4."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint, also with changed training values (without it, the same command resumes anyway)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the student's old checkpoints first."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Guidance distillation: a student that takes the guidance weight as an input and
    gives the guided prediction in one network call instead of two halves."""
    from effusion.recipes import distill_guidance

    result = distill_guidance(run, out, guidance_range=_pair(guidance_range, "--guidance-range"),
                              minutes=minutes, overrides=set_, resume=resume, fresh=fresh,
                              progress=not quiet)
    _distilled(result, out)


def _interval(text: Optional[str]) -> Optional[tuple[float, ...]]:
    """--guidance-interval: None = the run's, 'all' = every step, 'lo,hi' = that sigma range."""
    if text is None:
        return None
    if text.strip().lower() in ("all", "none", ""):
        return ()
    return _pair(text, "--guidance-interval")


def _pair(text: str, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes two numbers lo,hi, got {text!r}") from None
    return lo, hi


def _distilled(result, out: Path) -> None:
    typer.echo(f"distilled {result.step} steps ({result.images_seen} images) in "
               f"{result.minutes:.1f} min; last loss {result.loss:.5f}; student: {out}")


@optimize_app.command("distill-steps")
@user_errors
def optimize_distill_steps(
    run: Path = typer.Option(..., "--run", help="Diffusion run (or a guidance-distilled student)."),
    out: Path = typer.Option(..., "--out", help="Run directory for the student."),
    steps: int = typer.Option(4, "--steps", help="Sampler steps the student takes."),
    from_steps: int = typer.Option(32, "--from-steps", help="DDIM steps of the first teacher; "
                                   "halved each round down to --steps."),
    minutes: float = typer.Option(10.0, "--minutes", help="Training budget for all rounds (wall time)."),
    guidance_range: str = typer.Option("1,3", "--guidance-range", help="Weights a guided student learns, lo,hi."),
    method: str = typer.Option("progressive", "--method", help="progressive (halving rounds) | consistency (one consistency-distillation run; any step count after)."),
    skip: int = typer.Option(25, "--skip", help="consistency: timesteps per teacher DDIM step on the distillation grid."),
    weighting: str = typer.Option("uniform", "--weighting", help="consistency: pair weights, uniform | ict (1/(sigma_{n+1}-sigma_n), Song & Dhariwal 2023)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. train.lr=1e-4."),
    resume: bool = typer.Option(False, "--resume", help="Skip finished rounds, resume the current one."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the student's old checkpoints first."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Step distillation. progressive (Salimans & Ho 2022): each round a student learns to
    take one DDIM step where its teacher takes two; the result samples in --steps DDIM
    steps. consistency (Song et al. 2023): the student maps any point of the teacher's
    ODE path to its end; it samples with the consistency sampler in --steps steps."""
    from effusion.recipes import distill_steps

    result = distill_steps(run, out, steps=steps, from_steps=from_steps, minutes=minutes,
                           guidance_range=_pair(guidance_range, "--guidance-range"),
                           method=method, skip=skip, weighting=weighting, overrides=set_,
                           resume=resume,
                           fresh=fresh, progress=not quiet)
    _distilled(result, out)
    sampler = "the consistency sampler" if method == "consistency" else "DDIM"
    typer.echo(f"the student samples with {sampler} in {steps} steps by default")


@optimize_app.command("distill-student")
@user_errors
def optimize_distill_student(
    run: Path = typer.Option(..., "--run", help="Diffusion run (the teacher)."),
    out: Path = typer.Option(..., "--out", help="Run directory for the student."),
    channels: int = typer.Option(..., "--channels", help="Base width of the student U-Net."),
    channel_mult: Optional[str] = typer.Option(None, "--channel-mult", help="Width multipliers per level, e.g. 1,2 (default: the teacher's)."),
    minutes: float = typer.Option(5.0, "--minutes", help="Training budget (wall time)."),
    data_weight: float = typer.Option(0.0, "--data-weight", help="Weight of the plain denoising loss added to the teacher's."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. train.lr=1e-3."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint, also with changed training values (without it, the same command resumes anyway)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the student's old checkpoints first."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Soft-target distillation into a narrower U-Net: the student learns the teacher's
    prediction at every noise level (and label), so guidance still works on it."""
    from effusion.recipes import distill_student

    try:
        mult = tuple(int(v) for v in channel_mult.split(",")) if channel_mult else None
    except ValueError:
        raise ConfigError(f"--channel-mult takes integers like 1,2,2, got {channel_mult!r}") from None
    result = distill_student(run, out, channels=channels, channel_mult=mult, minutes=minutes,
                             data_weight=data_weight, overrides=set_, resume=resume, fresh=fresh,
                             progress=not quiet)
    _distilled(result, out)


@optimize_app.command("prune")
@user_errors
def optimize_prune(
    run: Path = typer.Option(..., "--run", help="Diffusion run."),
    out: Path = typer.Option(..., "--out", help="Run directory for the pruned model."),
    ratio: float = typer.Option(0.5, "--ratio", help="Share of the prunable channels removed."),
    importance: str = typer.Option("taylor", "--importance", help="taylor | magnitude | random."),
    finetune_minutes: float = typer.Option(5.0, "--finetune-minutes", help="Fine-tune budget (wall time)."),
    batches: int = typer.Option(8, "--batches", help="Batches whose gradients rank the channels (taylor)."),
    data_weight: float = typer.Option(0.0, "--data-weight", help="Weight of the denoising loss in the fine-tune."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value of the fine-tune."),
    resume: bool = typer.Option(False, "--resume", help="Continue the fine-tune from its latest checkpoint."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the old checkpoints in --out first."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Structured channel pruning by gradient importance (Diff-Pruning), then a fine-tune
    that distils the unpruned network into the pruned one."""
    from effusion.optimize.prune import prune_run

    _, r = prune_run(run, out, ratio=ratio, importance=importance,
                     finetune_minutes=finetune_minutes, batches=batches, data_weight=data_weight,
                     overrides=set_, resume=resume, fresh=fresh, progress=not quiet and not as_json)
    if as_json:
        emit_json(r)
        return
    b, a = r["before"], r["after"]
    typer.echo(f"pruned {run} -> {out} ({importance}, ratio {ratio}); fine-tuned "
               f"{r['finetune']['steps']} steps in {r['finetune']['minutes']:.1f} min")
    typer.echo("| | params | MACs per call | ms per call at batch 64 |\n|---|---|---|---|")
    for name, v in (("before", b), ("after", a)):
        typer.echo(f"| {name} | {v['params']:,} | {v['macs_per_call'] / 1e6:.1f} M | "
                   f"{v['latency_ms_batch_64']:.1f} |")


@optimize_app.command("report")
@user_errors
def optimize_report(
    runs: list[Path] = typer.Argument(..., help="Run directories: a run and its variants."),
    n: int = typer.Option(1000, "--n", help="Samples per run for speed and quality."),
    out: Path = typer.Option(Path("optimize_report.json"), "--out", help="JSON to write (the PNG goes beside it)."),
    cold_start: bool = typer.Option(True, "--cold-start/--no-cold-start", help="Also time a fresh process to its first image."),
    features: Optional[str] = typer.Option(None, "--features", help="Feature space or classifier run dir, as for evaluate."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """One table over variants: params, MACs, calls per sample, latency at batch 1/8/64,
    samples/s, size, FID, class accuracy, recall and cold start, each at its defaults."""
    from effusion.optimize.report import report_runs, table
    from effusion.runs import load_run

    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    features = _features(features, load_run(runs[0]).config.data, as_json)
    r = report_runs(runs, n, out=out, cold_start=cold_start, features=features)
    if as_json:
        emit_json(r)
        return
    typer.echo(table(r))
    typer.echo(f"wrote {out} and {out.with_suffix('.png')}")


vae_app = typer.Typer(no_args_is_help=True, help="The autoencoder of latent diffusion.")
app.add_typer(vae_app, name="vae")


@vae_app.command("train")
@user_errors
def vae_train(
    data: str = typer.Option("mnist5k", "--data", help="mnist5k | digits | shapes[:N[:SEED]] | folder:PATH | npz:PATH"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Default: the data's config default (28)."),
    channels: Optional[int] = typer.Option(None, "--channels", help="1 (grayscale) or 3 (RGB)."),
    latent_channels: Optional[int] = typer.Option(None, "--latent-channels", help="Default 4."),
    downsample: Optional[int] = typer.Option(None, "--downsample", help="Spatial factor, a power of 2 (default 4)."),
    recon: Optional[str] = typer.Option(None, "--recon", help="l1 | l2 (default l1)."),
    kl_weight: Optional[float] = typer.Option(None, "--kl-weight", help="Default 1e-4."),
    feature_weight: Optional[float] = typer.Option(None, "--feature-weight",
                                                   help="Feature loss through the data's classifier (default 0: off)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help="Any other config value, e.g. train.max_minutes=10."),
    run: Path = typer.Option(Path("runs/vae"), "--run", help="Run directory to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue with the run's own config.yaml (--set may change training values). Without it, the same command resumes a run of the same config."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete this run's old checkpoints first."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train the VAE; reports held-out reconstruction PSNR and the latent scale factor."""
    from effusion.recipes import train as train_fn
    from effusion.recipes import vae_config
    from effusion.runs.files import VAE_INFO

    flags = {"data.image_size": image_size, "data.channels": channels,
             "vae.latent_channels": latent_channels, "vae.downsample": downsample,
             "vae.recon": recon, "vae.kl_weight": kl_weight, "vae.feature_weight": feature_weight}
    overrides = [f"data.source={data}"] + [f"{k}={v}" for k, v in flags.items() if v is not None]
    overrides += list(set_)
    given = {f"--{k.split('.')[1].replace('_', '-')}": v for k, v in flags.items()}
    given.update({"--config": config, "--data": None if data == "mnist5k" else data})
    cfg = _resumed_config(run, set_, given) if resume else vae_config(overrides, config)
    if cfg.model.arch != "vae":
        raise ConfigError(f"effusion vae train needs model.arch=vae, got {cfg.model.arch}")
    result = train_fn(cfg, run, resume=resume, fresh=fresh, progress=not quiet)
    info = json.loads((run / VAE_INFO).read_text())
    typer.echo(f"trained {result.step} steps in {result.minutes:.1f} min; reconstruction PSNR "
               f"{info['psnr_db']:.2f} dB ({info['psnr_on']}), latents {tuple(info['latent_shape'])}, "
               f"scale factor {info['scale_factor']:.4f}")
    typer.echo(f"reconstructions: {result.grid}")
    typer.echo(f"train latent diffusion on it with: effusion train --vae {run} --set data.source={cfg.data.source} ...")


bench_app = typer.Typer(no_args_is_help=True, help="Measure the efficiency switches on this machine.")
app.add_typer(bench_app, name="bench")


@bench_app.command("train")
@user_errors
def bench_train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (default: the MNIST recipe)."),
    steps: int = typer.Option(50, "--steps", help="Training steps per variant (quality is compared after these)."),
    warmup: int = typer.Option(5, "--warmup", help="Steps left out of the timing."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma list of variants (the fp32 baseline always runs): "
                                       "bf16, fp16, tf32, channels_last, compile, ckpt_blocks, ckpt_all, "
                                       "adamw8bit, grad_accum, workers, fastest."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value for every variant."),
    out: Path = typer.Option(Path("bench"), "--out", help="Folder for bench_train.{md,json,png}."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON instead of the table."),
) -> None:
    """Baseline, each technique alone and the fastest combination, each in a fresh process:
    images/s, peak memory (weights + optimizer vs activations) and quality kept."""
    from effusion.bench import bench_train as run_bench
    from effusion.bench import markdown, write

    if config is not None and not config.is_file():
        raise ConfigError(f"config file not found: {config}")
    keys = [k.strip() for k in only.split(",") if k.strip()] if only else None
    result = run_bench(str(config) if config else None, steps=steps, warmup=warmup, only=keys,
                       overrides=set_, progress=not as_json)
    paths = write(result, out)
    if as_json:
        emit_json(json.loads(paths["json"].read_text()), indent=1)
        return
    typer.echo(markdown(result))
    typer.echo(f"wrote {paths['markdown']}, {paths['json']} and {paths['png']}")


@app.command()
@user_errors
def serve(
    run: Path = typer.Option(..., "--run", help="Run directory (trained, or written by `effusion optimize`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; beyond this machine needs --token or --insecure-no-token."),
    port: int = typer.Option(8000, "--port"),
    max_batch: int = typer.Option(64, "--max-batch", help="Most images in one sampler call."),
    batch_window_ms: float = typer.Option(10.0, "--batch-window-ms", help="How long a request waits for others to share its batch."),
    max_queue: int = typer.Option(256, "--max-queue", help="Most images waiting; more is answered 503 with Retry-After."),
    max_n: int = typer.Option(64, "--max-n", help="Most images per request."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Most sampler steps per request (default: the run's schedule length)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="EFFUSION_SERVE_TOKEN", help="Bearer token for every endpoint but /healthz and the page (or EFFUSION_SERVE_TOKEN)."),
    insecure_no_token: bool = typer.Option(False, "--insecure-no-token", help="Allow a non-loopback --host without a token."),
    device: str = typer.Option("auto", "--device"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the network; kernels are cached on disk for the next start."),
    threads: Optional[int] = typer.Option(None, "--threads", help="PyTorch intra-op threads (default: all cores)."),
) -> None:
    """Serve a run over HTTP: POST /v1/generate, GET /v1/info, /healthz, /metrics and a page at /."""
    from effusion.serve import ServeSettings
    from effusion.serve import serve as run_server

    settings = ServeSettings(max_batch=max_batch, batch_window_ms=batch_window_ms,
                             max_queue=max_queue, max_n=max_n, max_steps=max_steps, token=token,
                             threads=threads)
    run_server(run, settings, host=host, port=port, device=device, compile=compile_,
               insecure_no_token=insecure_no_token)


import_app = typer.Typer(no_args_is_help=True, help="Turn another library's model folder into "
                         "an effusion run directory.")
app.add_typer(import_app, name="import")


@import_app.command("diffusers")
@user_errors
def import_diffusers_cmd(
    src: Path = typer.Argument(..., help="A diffusers UNet2DModel folder (save_pretrained), or a pipeline folder with unet/ and scheduler/."),
    out: Path = typer.Option(..., "--out", help="New run directory."),
    data: Optional[str] = typer.Option(None, "--data", help="The data source the model was trained on (default: the built-in source of its size and channels)."),
    null_class: Optional[bool] = typer.Option(None, "--null-class/--no-null-class", help="Whether the last class embedding is the null class of classifier-free guidance (default: what effusion.json says, else no: guidance off)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
) -> None:
    """Import a diffusers UNet2DModel (and its DDPM/DDIM scheduler config) as a run that
    `sample`, `evaluate`, `optimize ...` and `serve` take like any other."""
    from effusion.interop.diffusers import import_diffusers
    from effusion.runs.files import read_config

    run = import_diffusers(src, out, data=data, null_class=null_class, overwrite=overwrite)
    cfg = read_config(run)
    kind = f"{cfg.model.num_classes} classes" if cfg.model.num_classes else "unconditional"
    typer.echo(f"imported {src} -> {run} (diffusers UNet2DModel, {kind}, "
               f"{cfg.diffusion.schedule} schedule, {cfg.diffusion.prediction}-prediction, "
               f"data {cfg.data.source}); next: effusion sample --run {run}")


@app.command("export")
@user_errors
def export_cmd(
    run: Path = typer.Option(..., "--run", help="Diffusion run directory."),
    out: Path = typer.Option(..., "--out", help="New folder (diffusers) or run directory (onnx, openvino)."),
    fmt: str = typer.Option(..., "--format", help="diffusers (UNet2DModel + DDIMScheduler folder) | onnx | openvino | auto (as `effusion optimize export`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Export a run: as a diffusers folder, or as an ONNX / OpenVINO run (see `effusion
    optimize export` for int8 and fp16)."""
    if fmt != "diffusers":
        return optimize_export(run=run, out=out, fmt=fmt, tolerance=0.02, int8=False,
                               calib_batches=16, fp16=False, as_json=as_json)
    from effusion.interop.diffusers import export_diffusers

    r = export_diffusers(run, out)
    if as_json:
        emit_json(r)
        return
    typer.echo(f"exported {run} (step {r['step']}) -> {out}: {', '.join(r['files'])}\n"
               f"load it with {r['hint']}")


def main() -> None:
    app(prog_name="effusion")


if __name__ == "__main__":
    sys.exit(main())
