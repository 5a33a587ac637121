"""`effusion bench train`: every training-efficiency switch measured on this machine.

Runs the fp32 eager baseline, each technique alone, and then the fastest combination of
the ones that helped, each in a fresh Python process (so one variant's memory, caches or
compiled kernels cannot leak into the next). Each process trains the configured model
from the same seed for `steps` steps with the real training step (`train_step`) and
reports:

- images/s: median over the steps after `warmup` (compile time is reported apart);
- memory at the peak of one extra step, broken down by PyTorch's tensor-level tracker
  into weights, gradients, optimizer state and activations (see `train/memory.py`);
- quality kept: the loss on a fixed held-out batch (fixed images, timesteps and noise,
  evaluated in fp32) after the `steps` steps, relative to the baseline's: 100% = the same,
  above 100% = lower loss than the baseline.

Output: a markdown table with the columns of the source write-up's table of training
optimizations (memory saved, speed, quality kept), the same numbers as JSON, and a PNG
bar chart.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effusion.config import ConfigError, load_config
from effusion.plots import figure
from effusion.runs import atomic_write, write_json

# The baseline switches every variant starts from: fp32, eager, nothing saved or quantised.
BASELINE = ["train.precision=fp32", "train.tf32=false", "train.compile=false",
            "train.channels_last=false", "train.grad_checkpointing=none",
            "train.optimizer=adamw", "train.grad_accum=1", "train.workers=0"]


@dataclass
class Variant:
    key: str
    label: str
    overrides: list[str]
    needs: str = ""  # "bf16" | "cuda" | "8bit": skipped (with the reason) when unavailable
    kind: str = "speed"  # speed | memory: which switches the fastest combination may use


def variants(batch_size: int) -> list[Variant]:
    half = max(1, batch_size // 2)
    return [
        Variant("fp32", "fp32 eager (baseline)", []),
        Variant("bf16", "bf16 autocast", ["train.precision=bf16"], needs="bf16"),
        Variant("fp16", "fp16 autocast + GradScaler", ["train.precision=fp16"], needs="cuda"),
        Variant("tf32", "TF32 matmul/cuDNN", ["train.tf32=true"], needs="cuda"),
        Variant("channels_last", "channels_last", ["train.channels_last=true"]),
        Variant("compile", "torch.compile", ["train.compile=true"]),
        Variant("ckpt_blocks", "grad checkpointing: blocks", ["train.grad_checkpointing=blocks"],
                kind="memory"),
        Variant("ckpt_all", "grad checkpointing: all", ["train.grad_checkpointing=all"],
                kind="memory"),
        Variant("adamw8bit", "8-bit AdamW", ["train.optimizer=adamw8bit"], needs="8bit",
                kind="memory"),
        Variant("grad_accum", f"grad accumulation 2 x {half}",
                [f"train.batch_size={half}", "train.grad_accum=2"], kind="memory"),
        Variant("workers", "1 loader worker, prefetch 2", ["train.workers=1", "train.prefetch=2"]),
    ]


KEYS = [v.key for v in variants(128)] + ["fastest"]


def _unavailable(v: Variant, device: str) -> str:
    """Why a variant cannot run here ('' if it can)."""
    from effusion.precision import bf16_supported, resolve_device

    dev = resolve_device(device)
    if v.needs == "cuda" and dev.type != "cuda":
        return {"fp16": "fp16 autocast is a CUDA path; this CPU has no fast fp16 matmul",
                "tf32": "TF32 is a CUDA (Ampere+) feature; a no-op on CPU"}.get(v.key, "needs CUDA")
    if v.needs == "bf16" and not bf16_supported(dev):
        return f"{dev.type} has no native bf16"
    if v.needs == "8bit":
        import importlib.util

        if not importlib.util.find_spec("bitsandbytes"):
            return "needs bitsandbytes (pip install 'effusion[8bit]')"
    return ""


# --------------------------------------------------------------------------- child side

def fixed_eval_loss(model, data, cfg, prec, n: int = 512, seed: int = 1234, vae=None) -> float:
    """The training objective on a fixed batch: the first `n` images (encoded by `vae` for
    a latent run), with timesteps and noise from a fixed seed, in fp32 and without label
    dropout. Equal weights give equal values, whatever the switches were."""
    import torch

    from effusion.data import to_model_range
    from effusion.diffusion import schedule_for
    from effusion.precision import Precision
    from effusion.train.objective import diffusion_loss

    fp32 = Precision(prec.device, "fp32")
    schedule = schedule_for(cfg)
    gen = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, min(n, len(data)), 128):
            x0 = to_model_range(data.images[i:min(i + 128, n)])
            if vae is not None:
                x0 = vae.encode(x0)
            labels = data.labels[i:i + x0.shape[0]] if cfg.model.num_classes and data.labels is not None else None
            cond = labels.to(prec.device) if labels is not None else None
            loss = diffusion_loss(model, x0, cond, cfg.diffusion, schedule, gen, fp32)
            total, count = total + loss.item() * x0.shape[0], count + x0.shape[0]
    model.train(was)
    return total / count


def setup_child(cfg):
    """The loop's own setup without a run directory: (config, precision, data, state, task)
    for a diffusion config, as `effusion.train.loop.train` would build them."""
    from effusion.recipes import DiffusionRecipe
    from effusion.train.loop import TaskContext, resolve_runtime
    from effusion.train.state import TrainState

    cfg, prec, _ = resolve_runtime(cfg)
    recipe = DiffusionRecipe()
    data = recipe.prepare_data(cfg, prec.device)
    cfg = data.cfg
    state = TrainState.create(cfg, lambda: recipe.build_model(cfg), data.train_set, prec)
    task = recipe.make_task(TaskContext(cfg, None, prec, state.mem_format, None,
                                        data.train_set, data.val_set))
    return cfg, prec, data, state, task


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the fresh process: train `steps` steps of one variant and measure it."""
    import torch

    from effusion.data import load_source
    from effusion.models import count_params
    from effusion.train.loop import train_step
    from effusion.train.memory import measure_step_memory
    from effusion.train.optim import lr_factor, set_lr

    cfg, prec, data, state, task = setup_child(load_config(spec["config"], spec["overrides"]))
    tc, device = cfg.train, prec.device
    steps, times, losses, skipped = spec["steps"], [], [], 0

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        for step in range(steps):
            set_lr(state.optimizer, tc.lr * lr_factor(step, step / steps, tc.warmup_steps,
                                                      tc.lr_schedule))
            sync()
            t0 = time.perf_counter()
            outcome, _ = train_step(state, task, tc)
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(outcome.loss)
            skipped += not outcome.finite
        # pixels, not latents: the held-out split, or all images if there is none
        eval_data = data.val_set if data.val_set is not None else load_source(cfg.data)
        eval_loss = fixed_eval_loss(state.model, eval_data, cfg, prec, vae=task.vae)
        mem = measure_step_memory(lambda: train_step(state, task, tc), state.model,
                                  state.optimizer)
    finally:
        state.loader.close()
    timed = times[spec["warmup"]:] or times
    step_s = statistics.median(timed)
    images_per_step = tc.batch_size * tc.grad_accum
    net, opt = state.net, state.optimizer
    return {"images_per_s": images_per_step / step_s, "step_ms": 1000 * step_s,
            "compile_s": getattr(net, "compile_s", None), "compile_error": getattr(net, "error", None),
            "memory": mem.as_dict(), "eval_loss": eval_loss, "train_loss_last": losses[-1],
            "skipped_steps": skipped, "precision": prec.mode, "device": str(device),
            "params": count_params(state.model), "notes": state.switch_notes,
            "optimizer": type(opt).__module__ + "." + type(opt).__name__}


# -------------------------------------------------------------------------- parent side

@dataclass
class BenchResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _run_variant(config: str | None, overrides: list[str], steps: int, warmup: int,
                 timeout: float) -> dict[str, Any]:
    spec = {"config": config, "overrides": overrides, "steps": steps, "warmup": warmup}
    proc = subprocess.run([sys.executable, "-m", "effusion.bench", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _speed_candidates(rows: list[dict[str, Any]], by_key: dict[str, Variant]) -> tuple[list[str], list[list[str]]]:
    """The best precision that beat the baseline, and the other speed switches that did
    (by more than noise, 3%), fastest first. Memory savers are left out: they cost speed
    by design."""
    start, others = [], []
    for r in sorted(rows, key=lambda r: -r.get("speedup", 0)):
        v = by_key.get(r["key"])
        if v is None or v.kind != "speed" or r["key"] == "fp32" or r.get("speedup", 0) < 1.03:
            continue
        if r["key"] in ("bf16", "fp16"):
            start = start or v.overrides
        else:
            others.append(v.overrides)
    return start, others


def _derive(row: dict[str, Any], base: dict[str, Any]) -> None:
    if "error" in row or "skipped" in row or "error" in base:
        return
    m, bm = row["memory"], base["memory"]
    row["speedup"] = row["images_per_s"] / base["images_per_s"]
    row["peak_saved"] = 1 - m["peak_mb"] / bm["peak_mb"]
    row["activations_saved"] = 1 - m["activations_mb"] / bm["activations_mb"]
    row["optimizer_saved"] = 1 - m["optimizer_mb"] / bm["optimizer_mb"] if bm["optimizer_mb"] else 0.0
    row["quality_kept"] = base["eval_loss"] / row["eval_loss"] if row["eval_loss"] > 0 else math.nan
    row["loss_change"] = row["eval_loss"] / base["eval_loss"] - 1


def _targets(rows: dict[str, dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """The issue's targets for the default model on a CPU, checked where measured."""
    out = []

    def ok(r: str) -> bool:
        return r in rows and "speedup" in rows[r]

    if ok("bf16"):
        s = rows["bf16"]["speedup"]
        out.append({"target": "bf16 >= 1.8x fp32 eager images/s", "value": f"{s:.2f}x",
                    "met": s >= 1.8})
    for k in ("ckpt_blocks", "ckpt_all"):
        if ok(k):
            r = rows[k]
            out.append({"target": f"{k}: >= 50% less activation memory at <= 20% slowdown",
                        "value": f"{100 * r['activations_saved']:.0f}% less, "
                                 f"{100 * (1 - r['speedup']):+.0f}% time",
                        "met": r["activations_saved"] >= 0.5 and r["speedup"] >= 1 / 1.2})
    if ok("adamw8bit"):
        r = rows["adamw8bit"]
        asked = "" if steps >= 300 else "; the target is stated for 300"
        out.append({"target": f"8-bit AdamW: >= 70% less optimizer state, loss within 3% "
                              f"(after {steps} steps{asked})",
                    "value": f"{100 * r['optimizer_saved']:.0f}% less, loss {100 * r['loss_change']:+.1f}%",
                    "met": r["optimizer_saved"] >= 0.7 and abs(r["loss_change"]) <= 0.03})
    if ok("fastest"):
        s = rows["fastest"]["speedup"]
        out.append({"target": "fastest combination >= 2x fp32 eager", "value": f"{s:.2f}x",
                    "met": s >= 2.0})
    return out


def bench_train(config: str | None = None, steps: int = 50, warmup: int = 5,
                only: list[str] | None = None, overrides: list[str] | None = None,
                timeout: float = 3600, progress: bool = True) -> BenchResult:
    """Measure each switch in its own process; see the module docstring."""
    overrides = list(overrides or [])
    cfg = load_config(config, overrides)  # validates the config and overrides up front
    if cfg.model.arch != "unet":
        raise ConfigError("effusion bench train measures the diffusion U-Net "
                          f"(model.arch=unet), not model.arch={cfg.model.arch}")
    if steps <= warmup:
        raise ConfigError(f"--steps ({steps}) must be larger than --warmup ({warmup})")
    only_set = set(only or [])
    unknown = only_set - set(KEYS)
    if unknown:
        raise ConfigError(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(KEYS)}")
    all_variants = variants(cfg.train.batch_size)
    by_key = {v.key: v for v in all_variants}
    todo = [v for v in all_variants if v.key == "fp32" or not only_set or v.key in only_set]
    common = BASELINE + overrides + ["train.max_minutes=0"]
    result = BenchResult(meta={"config": config, "overrides": overrides, "steps": steps,
                               "warmup": warmup, "batch_size": cfg.train.batch_size,
                               "device": cfg.train.device})

    def run(key: str, label: str, extra: list[str]) -> dict[str, Any]:
        if progress:
            print(f"bench: {label} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        r = _run_variant(config, common + extra, steps, warmup, timeout)
        r.update(key=key, label=label, overrides=extra, wall_s=time.perf_counter() - t0)
        if progress:
            msg = r.get("error") or f"{r['images_per_s']:.1f} img/s, peak {r['memory']['peak_mb']:.0f} MB"
            print(f"bench: {label}: {msg}", file=sys.stderr, flush=True)
        return r

    for v in todo:
        why = _unavailable(v, cfg.train.device)
        if why:
            result.rows.append({"key": v.key, "label": v.label, "overrides": v.overrides,
                                "skipped": why})
            continue
        result.rows.append(run(v.key, v.label, v.overrides))
    base = result.rows[0]
    for r in result.rows:
        _derive(r, base)
    if not only_set or "fastest" in only_set:
        # Greedy forward selection: switches interact (channels_last can help fp32 and hurt
        # bf16), so each is added to the best combination so far and kept only if the
        # combination measures faster.
        start, others = _speed_candidates(result.rows, by_key)
        best = next((r for r in result.rows if r.get("overrides") == start and "speedup" in r), base)
        for extra in others:
            combo = start + extra if not best.get("overrides") else best["overrides"] + extra
            r = run("combo", "combination: " + " + ".join(o.split(".", 1)[1] for o in combo), combo)
            _derive(r, base)
            result.rows.append(r)
            if r.get("speedup", 0) > best.get("speedup", 1) * 1.03:
                best = r
        if best is base:
            result.rows.append({"key": "fastest", "label": "fastest combination", "overrides": [],
                                "skipped": "no switch beat the baseline by more than 3%"})
        else:
            result.rows.append({**best, "key": "fastest",
                                "label": "fastest: " + " + ".join(o.split(".", 1)[1] for o in best["overrides"])})
    result.targets = _targets({r["key"]: r for r in result.rows}, steps)
    if "error" not in base:
        result.meta.update(device=base["device"], params=base["params"])
    return result


def markdown(result: BenchResult) -> str:
    """The table (memory saved, speed, quality kept), plus the raw figures behind them."""
    lines = ["| technique | memory saved (peak) | speed | quality kept | images/s | peak MB | "
             "activations MB | weights + grads + optimizer MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['label']} | – | – | – | {r.get('skipped') or r['error']} | | | |")
            continue
        m = r["memory"]
        static = m["weights_mb"] + m["grads_mb"] + m["optimizer_mb"]
        label = r["label"]
        if r.get("compile_s"):
            label += f" (compiling took {r['compile_s']:.0f} s, not in images/s)"
        if r.get("compile_error"):
            label += " (compile failed, ran eager)"
        lines.append(
            f"| {label} | {100 * r.get('peak_saved', 0):.0f}% "
            f"(activations {100 * r.get('activations_saved', 0):.0f}%"
            + (f", optimizer {100 * r['optimizer_saved']:.0f}%" if abs(r.get("optimizer_saved", 0)) > 0.005 else "")
            + f") | {100 * (r.get('speedup', 1) - 1):+.0f}% | {100 * r.get('quality_kept', 1):.1f}% | "
            f"{r['images_per_s']:.1f} | {m['peak_mb']:.0f} | {m['activations_mb']:.0f} | {static:.1f} |")
    if result.targets:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |"
                  for t in result.targets]
    return "\n".join(lines)


def plot(result: BenchResult, path: Path) -> Path:
    rows = [r for r in result.rows if "speedup" in r or r.get("key") == "fp32" and "memory" in r]
    labels = [r["label"] for r in rows]
    speed = [r["images_per_s"] for r in rows]
    act = [r["memory"]["activations_mb"] for r in rows]
    static = [r["memory"]["weights_mb"] + r["memory"]["grads_mb"] + r["memory"]["optimizer_mb"]
              for r in rows]
    with figure(path, ncols=2, figsize=(12, 0.45 * len(rows) + 1.5), sharey=True) as (fig, (a, b)):
        y = range(len(rows))
        a.barh(y, speed, color="tab:blue")
        a.set(xlabel="images/s (higher is better)", yticks=list(y), yticklabels=labels)
        a.invert_yaxis()
        b.barh(y, static, color="tab:gray", label="weights + grads + optimizer")
        b.barh(y, act, left=static, color="tab:orange", label="activations")
        b.set(xlabel="peak training memory, MB (lower is better)")
        b.legend(loc="lower right")
        for ax in (a, b):
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle(f"effusion bench train: {result.meta.get('device', '')}, "
                     f"{result.meta['steps']} steps, batch {result.meta['batch_size']}")
    return path


def write(result: BenchResult, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench_train.json", "markdown": out / "bench_train.md",
             "png": out / "bench_train.png"}
    write_json(paths["json"], {"meta": result.meta, "rows": result.rows,
                               "targets": result.targets})
    atomic_write(paths["markdown"], markdown(result) + "\n")
    plot(result, paths["png"])
    return paths


if __name__ == "__main__":  # the child process of one variant
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    print(json.dumps(run_child(json.loads(sys.argv[1]))))
