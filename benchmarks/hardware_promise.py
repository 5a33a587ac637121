"""The default recipe's promise on this machine: train with the one command, score it.

    python benchmarks/hardware_promise.py [--run runs/promise] [--emulate-avx2]
                                          [--set key=value ...] [--json out.json]
    python benchmarks/hardware_promise.py --collect RUN [RUN ...] --json out.json
    python benchmarks/hardware_promise.py --matmul [--emulate-avx2]

Runs `effusion train --run R --fresh` (the default recipe; `--set` adds overrides, e.g.
`train.budget_min_steps=0` for the full-width network) and `effusion evaluate --run R
--bpd-n 0` (1,000 samples, seed 123), each in a fresh process, optionally under
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` (a CPU without AVX-512 / bf16, emulated).
Reports steps reached, training minutes, images/s, the network width trained, FID with its
real floor, class accuracy and the time for 1,000 samples, with the machine's
`effusion info --hardware`. `--collect` reads finished, evaluated runs instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMULATE = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    e = {**os.environ, **env, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-m", "effusion", *args], capture_output=True, text=True, env=e)
    if p.returncode:
        sys.exit(f"effusion {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p


def collect(run: Path) -> dict:
    from effusion.runs import latest_checkpoint, read_config, read_metrics

    cfg = read_config(run)
    metrics = read_metrics(run)
    logged = [m for m in metrics if "elapsed_s" in m]
    ev = json.loads((run / "metrics.json").read_text())
    narrowed = run / "narrowed.json"
    return {"run": str(run), "precision": cfg.train.precision, "channels": cfg.model.channels,
            "narrowed": json.loads(narrowed.read_text()) if narrowed.is_file() else None,
            "budget_steps": cfg.train.budget_steps, "steps": ev["step"],
            "train_minutes": round(json.loads((latest_checkpoint(run) / "state.json").read_text())
                                   ["elapsed_s"] / 60, 2),
            "images_per_s": round(sum(m["images_per_s"] for m in logged[1:]) / max(len(logged) - 1, 1), 1)
            if logged else None,
            "fid": ev["fid"], "floor_fid": ev["real_floor"]["fid"],
            "class_accuracy": ev.get("class_accuracy"), "recall": ev["recall"],
            "sample_seconds_1000": ev["sample_seconds"] * 1000 / ev["n"]}


def matmul_ratio(n: int = 1024, repeats: int = 20) -> dict:
    """fp32 and bf16 time of an n x n matmul here: is bf16 really faster on this CPU?"""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dt), b.to(dt)
        for _ in range(3):
            x @ y
        t0 = time.perf_counter()
        for _ in range(repeats):
            x @ y
        out[f"{name}_ms"] = 1000 * (time.perf_counter() - t0) / repeats
    out["bf16_speedup"] = out["fp32_ms"] / out["bf16_ms"]
    out["torch_cpu_isa"] = torch.backends.cpu.get_cpu_capability()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/promise")
    ap.add_argument("--emulate-avx2", action="store_true")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--collect", nargs="+", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--matmul", action="store_true",
                    help="only time a 1024x1024 matmul in fp32 and bf16 (with --emulate-avx2: under the caps)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    env = EMULATE if a.emulate_avx2 else {}
    if a.matmul:
        code = ("import json, sys; sys.path.insert(0, %r); from hardware_promise import matmul_ratio; "
                "print(json.dumps(matmul_ratio()))" % str(Path(__file__).parent))
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, **env})
        print(p.stdout.strip() or p.stderr)
        return
    if a.collect:
        runs = [Path(r) for r in a.collect]
    else:
        sets = [x for s in a.sets for x in ("--set", s)]
        run_cli(["train", "--run", a.run, "--fresh", "--quiet", *sets], env)
        run_cli(["evaluate", "--run", a.run, "--bpd-n", "0", "--json"], env)
        runs = [Path(a.run)]
    hw = json.loads(run_cli(["info", "--hardware", "--json"], env).stdout)
    rows = [collect(r) for r in runs]
    print("| run | precision | width | steps | train min | images/s | FID (floor) | class acc | 1,000 samples |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['precision']} | {r['channels']} | {r['steps']} | {r['train_minutes']} | "
              f"{r['images_per_s']} | {r['fid']:.1f} ({r['floor_fid']:.1f}) | {r['class_accuracy']} | "
              f"{r['sample_seconds_1000']:.0f} s |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"machine": hw, "emulated_avx2": a.emulate_avx2, "rows": rows},
                                           indent=1))


if __name__ == "__main__":
    main()
