"""Progressive resolution at equal wall time on the default recipe.

    python benchmarks/progressive.py [--minutes 5] [--n 500] [--seeds 0]
                                     [--json benchmarks/results/progressive.json]

Two runs of the default recipe (mnist5k, 28x28, class-conditional), width 16 fixed
(train.budget_min_steps=0, so both train the same network), each for the same
train.max_minutes: plain, and with train.progressive=[[16, 0.3], [28, 1.0]] (the first
30% of the steps at 16x16). Each is scored by `effusion evaluate --n N` (FID, class
accuracy, recall against the whole data set). Every command is printed and stored.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model.channels=16", "model.head_channels=16", "train.budget_min_steps=0",
        "train.sample_every=0", "train.threads=2"]
ARMS = {"plain": [], "progressive": ["train.progressive=[[16,0.3],[28,1.0]]"]}


def effusion(*args: str) -> str:
    cmd = [sys.executable, "-m", "effusion", *args]
    print("$ effusion " + " ".join(args), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--work", default="runs/progressive")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/progressive.json"))
    a = ap.parse_args()
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    res = {"machine": {"cpu": platform.processor() or platform.machine(),
                       "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
                       "avx2": "avx2" in flags, "torch": torch.__version__},
           "minutes": a.minutes, "n": a.n, "runs": []}
    for seed in [int(s) for s in a.seeds.split(",")]:
        for arm, extra in ARMS.items():
            run = Path(a.work) / f"{arm}-s{seed}"
            sets = BASE + extra + [f"train.max_minutes={a.minutes}", f"train.seed={seed}"]
            t0 = time.perf_counter()
            effusion("train", "--quiet", "--fresh", "--run", str(run),
                     *[x for kv in sets for x in ("--set", kv)])
            wall = time.perf_counter() - t0
            metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
            steps = max(m["step"] for m in metrics)
            ev = json.loads(effusion("evaluate", "--run", str(run), "--n", str(a.n), "--bpd-n", "0",
                                     "--json"))
            row = {"arm": arm, "seed": seed, "steps": steps, "train_wall_s": wall,
                   "fid": ev.get("fid"), "class_accuracy": ev.get("class_accuracy"),
                   "recall": ev.get("recall"), "precision": ev.get("precision"),
                   "sets": sets}
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'arm':12} {'seed':>4} {'steps':>6} {'FID':>7} {'class acc':>9} {'recall':>7}")
    for r in res["runs"]:
        print(f"{r['arm']:12} {r['seed']:4d} {r['steps']:6d} {r['fid']:7.1f} "
              f"{r['class_accuracy']:9.3f} {r['recall']:7.3f}")
    Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
