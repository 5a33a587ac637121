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


def user_errors(fn: Callable) -> Callable:
    """Turn user errors (bad config, missing files, corrupt checkpoints) into exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from effusion.train.loop import TrainingError

        try:
            return fn(*args, **kwargs)
        except ConfigError as e:  # DataError and CheckpointError are ConfigErrors too
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except TrainingError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@user_errors
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value, e.g. train.lr=3e-4."),
    run: Path = typer.Option(Path("runs/default"), "--run", help="Run directory to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete this run's old checkpoints first."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a diffusion model (default: the MNIST recipe in configs/mnist.yaml)."""
    from effusion.config import config_from_dict, load_config, parse_overrides
    from effusion.train.checkpoint import read_config
    from effusion.train.loop import train as train_fn

    if resume:
        if config is not None:
            raise ConfigError("--resume uses the run's own config.yaml; drop --config "
                              "(--set may still change e.g. train.max_steps)")
        cfg = config_from_dict(parse_overrides(set_), read_config(run))
    else:
        cfg = load_config(config, set_)
    result = train_fn(cfg, run, resume=resume, fresh=fresh, progress=not quiet)
    typer.echo(f"trained {result.step} steps ({result.images_seen} images) in "
               f"{result.minutes:.1f} min; last loss {result.loss:.4f}")
    if result.grid is not None:
        typer.echo(f"samples: {result.grid}")


@app.command()
@user_errors
def sample(
    run: Path = typer.Option(..., "--run", help="Run directory written by `effusion train`."),
    n: int = typer.Option(64, "--n", help="Number of samples."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddim | ddpm | dpmpp_2m (default: the run's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default: the sampler's)."),
    seed: int = typer.Option(0, "--seed"),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM noise (0 = deterministic)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights."),
    out: Optional[Path] = typer.Option(None, "--out", help="Grid PNG (default RUN/samples.png)."),
    npy: Optional[Path] = typer.Option(None, "--npy", help="Also save uint8 N x H x W [x C] .npy."),
    device: str = typer.Option("auto", "--device"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | bf16 | fp16 | auto (default: the run's)."),
) -> None:
    """Draw samples from a trained run and save them as a PNG grid (and .npy)."""
    import time

    from effusion.data.images import save_grid, save_npy
    from effusion.sampling import generate, load_run

    loaded = load_run(run, ema=ema, device=device, precision=precision)
    t0 = time.perf_counter()
    images = generate(loaded, n, sampler=sampler, steps=steps, seed=seed, eta=eta)
    dt = time.perf_counter() - t0
    out = out or run / "samples.png"
    nrow = 10 if n % 10 == 0 and n >= 50 else None
    save_grid(images, out, nrow=nrow)
    typer.echo(f"{n} samples from step {loaded.step} in {dt:.1f}s -> {out}")
    if npy is not None:
        save_npy(images, npy)
        typer.echo(f"array: {npy}")


@app.command()
@user_errors
def info(
    run: Path = typer.Option(..., "--run", help="Run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show a run's config, checkpoints, parameter count and last metrics."""
    from effusion.models import build_model, count_params
    from effusion.train.checkpoint import list_checkpoints, read_config
    from effusion.train.logging import read_metrics

    cfg = read_config(run)
    ckpts = list_checkpoints(run)
    metrics = read_metrics(run)
    summary = {
        "run": str(run),
        "params": count_params(build_model(cfg)),
        "checkpoints": [p.name for p in ckpts],
        "step": int(ckpts[-1].name.split("-")[1]) if ckpts else 0,
        "last_metrics": metrics[-1] if metrics else None,
        "config": cfg.to_dict(),
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    typer.echo(f"run:         {run}")
    typer.echo(f"params:      {summary['params']:,}")
    typer.echo(f"step:        {summary['step']}  (checkpoints: {', '.join(summary['checkpoints']) or 'none'})")
    if metrics:
        typer.echo("last metrics: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics[-1].items()))
    typer.echo("config:\n" + "\n".join("  " + ln for ln in cfg.to_yaml().splitlines()))


def main() -> None:
    app(prog_name="effusion")


if __name__ == "__main__":
    sys.exit(main())
