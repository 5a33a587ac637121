"""`effusion optimize report RUN...`: one table over a run and its optimized variants.

For each run directory (trained, distilled, pruned, exported: anything `effusion.runs`
loads as a diffusion run), at its own default sampler, steps and guidance:
- parameters and MACs per network call (an exported run: those of the network it was
  exported from), network calls per sample (a guided step is two), DeepCache interval;
- latency of one sampler step (the Denoiser call) at batch 1, 8 and 64, and samples/s
  over the `n` evaluation samples;
- size on disk of the weights (safetensors, or the ONNX graph);
- FID, class accuracy and recall from `effusion evaluate`'s metrics on `n` samples;
- the cold start: a fresh Python process from its start to its first image (loading
  included), apart from the warm figures above.

Writes `report.json` (rows + machine) and a PNG of samples/s against FID.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch.nn as nn

from effusion.evaluate import evaluate_run
from effusion.models import count_params
from effusion.optimize.export import example_inputs
from effusion.optimize.timing import latency_ms, macs
from effusion.plots import figure
from effusion.precision import hardware
from effusion.runs import CheckpointError, LoadedRun, latest_checkpoint, load_run, write_json
from effusion.runs.files import BF16_WEIGHTS, ONNX_MODEL, QUANTIZED_WEIGHTS

COLD_START = ("import sys; from effusion.runs import load_run; from effusion.sampling import "
              "generate; generate(load_run(sys.argv[1]), 1, seed=0)")


def calls_per_sample(run: LoadedRun, steps: int, sampler: str) -> int:
    """Network evaluations per sample: one per step (DDPM: one per timestep), two for a
    guided step of a run without a guidance input (both halves in one batch)."""
    n = run.schedule.T if sampler == "ddpm" else steps
    cfg = run.config
    guided = (run.num_classes and not cfg.model.guidance_input and cfg.train.cond_drop > 0
              and cfg.sample.guidance != 1.0)
    return n * (2 if guided else 1)


def _eager_network(run: LoadedRun) -> nn.Module | None:
    """The run's network as a torch module: itself, or the one an export was made from."""
    if isinstance(run.model, nn.Module):
        return run.model
    for entry in reversed(run.lineage):
        if entry.get("pass") == "export":
            try:
                return load_run(entry["base"], device="cpu", precision="fp32").model
            except CheckpointError:
                return None
    return None


def weights_bytes(run: LoadedRun) -> int:
    for name in (ONNX_MODEL, QUANTIZED_WEIGHTS, BF16_WEIGHTS):  # a run with no checkpoints
        if (run.run_dir / name).is_file():
            return (run.run_dir / name).stat().st_size
    return (latest_checkpoint(run.run_dir) / "ema.safetensors").stat().st_size


def cold_start_seconds(run_dir: Path) -> float:
    """Wall time of a fresh process that loads the run and samples one image."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", COLD_START, str(run_dir)], capture_output=True,
                          text=True)
    if proc.returncode:
        raise CheckpointError(f"cold start of {run_dir} failed: {proc.stderr.strip()[-300:]}")
    return time.perf_counter() - t0


def step_latency_ms(run: LoadedRun, batch: int, repeats: int = 5) -> float:
    """Median time of one sampler step (the run's Denoiser, guidance included) at `batch`."""
    den = run.denoiser()
    x, t, *rest = example_inputs(run, batch)
    dev = run.precision.device
    cond = rest[0].clamp(max=run.num_classes - 1).to(dev) if rest and run.num_classes else None
    return latency_ms(den, x.to(dev), t.to(dev), cond, repeats=repeats)


def describe_variant(run: LoadedRun) -> str:
    passes = [p.get("pass", "?") for p in run.lineage]
    return " + ".join(passes) if passes else "untouched"


def report_runs(run_dirs: list[str | Path], n: int = 1000, *, out: str | Path | None = None,
                cold_start: bool = True, seed: int = 123, features=None) -> dict[str, Any]:
    """Measure every run in `run_dirs` (see the module doc); write `out` (JSON) and the
    PNG beside it if given. Returns {"machine", "n", "rows"}."""
    rows = []
    for rd in run_dirs:
        run = load_run(rd)
        sc = run.config.sample
        net = _eager_network(run)
        one = example_inputs(run, 1)
        ev = evaluate_run(rd, n, bpd_n=0, seed=seed, features=features)
        rows.append({
            "run": str(rd), "variant": describe_variant(run), "lineage": run.lineage,
            "sampler": sc.sampler, "steps": sc.steps, "guidance": ev.get("guidance"),
            "cache_interval": sc.cache_interval,
            "params": count_params(net) if net is not None else None,
            "macs_per_call": macs(copy.deepcopy(net).float().cpu(), *one) if net is not None else None,
            "network_calls_per_sample": calls_per_sample(run, sc.steps, sc.sampler),
            "latency_ms": {str(b): step_latency_ms(run, b) for b in (1, 8, 64)},
            "samples_per_s": n / ev["sample_seconds"], "sample_seconds": ev["sample_seconds"],
            "bytes": weights_bytes(run), "fid": ev["fid"],
            "class_accuracy": ev.get("class_accuracy"), "recall": ev["recall"],
            "precision": ev["precision"],
            "cold_start_s": cold_start_seconds(Path(rd)) if cold_start else None})
    result = {"machine": hardware(), "n": n, "rows": rows}
    if out is not None:
        out = Path(out)
        write_json(out, result)
        plot_report(rows, out.with_suffix(".png"))
    return result


def plot_report(rows: list[dict[str, Any]], path: Path) -> Path:
    """Samples/s against FID, one labelled point per variant."""
    with figure(path, figsize=(7, 4.5)) as (_, ax):
        for r in rows:
            ax.scatter(r["samples_per_s"], r["fid"])
            ax.annotate(f"{Path(r['run']).name} ({r['steps']} st)", (r["samples_per_s"], r["fid"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="samples / s (log)", ylabel="FID (lower is better)",
               title="speed against quality")
        ax.grid(alpha=0.3)
    return path


def table(result: dict[str, Any]) -> str:
    """The rows as a markdown table."""
    head = ("| run | passes | params | MACs/call | calls/sample | ms/step b1 | b8 | b64 | "
            "samples/s | MB | FID | class acc | recall | cold start s |\n" + "|---" * 14 + "|")
    lines = [head]
    for r in result["rows"]:
        lat = r["latency_ms"]

        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        lines.append(
            f"| {Path(r['run']).name} | {r['variant']} | {f(r['params'], ',')} | "
            f"{f(r['macs_per_call'] and r['macs_per_call'] / 1e6, '.1f')} M | "
            f"{r['network_calls_per_sample']} | {lat['1']:.1f} | {lat['8']:.1f} | {lat['64']:.1f} | "
            f"{r['samples_per_s']:.1f} | {r['bytes'] / 1e6:.2f} | {r['fid']:.1f} | "
            f"{f(r['class_accuracy'], '.3f')} | {r['recall']:.3f} | {f(r['cold_start_s'], '.1f')} |")
    return "\n".join(lines)
