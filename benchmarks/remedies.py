"""The remedies table (issue 13), one row family at a time. So far: guidance on a limited
interval of noise levels (Kynkaanniemi et al. 2024) against guidance at every step, at
the high weights where guidance collapses diversity.

    python benchmarks/remedies.py guidance-interval --run RUN [--weights 3,5]
        [--interval 0.28,5.42] [--seeds 123,7] [--n 1000]
        [--json benchmarks/results/remedies_guidance_interval.json]
    python benchmarks/remedies.py guidance-interval --collect A.json B.json ...

The first form samples and scores each (weight, interval, seed) with `effusion evaluate`'s
own code (same seeds and classes for both arms); the second tabulates JSON documents that
`effusion evaluate --run RUN --guidance W --guidance-interval I --seed S --bpd-n 0 --json`
printed. Reported per weight: FID, precision, recall, coverage, class accuracy and sampling
seconds, each arm's mean over seeds with the seed-to-seed spread (max - min), and the
verdict: the interval helps a metric when its change exceeds both arms' spread (for rates,
at least two binomial standard errors at n).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

METRICS = ("fid", "precision", "recall", "coverage", "class_accuracy", "sample_seconds")
LOWER_IS_BETTER = {"fid", "sample_seconds"}
RATES = {"precision", "recall", "coverage", "class_accuracy"}  # fractions of n samples


def run_cells(run: str, weights: list[float], interval: tuple[float, float], seeds: list[int],
              n: int) -> list[dict]:
    from effusion.evaluate import evaluate_run

    rows = []
    for w in weights:
        for gi in ((), interval):
            for seed in seeds:
                r = evaluate_run(run, n, guidance=w, guidance_interval=gi, seed=seed, bpd_n=0)
                rows.append(r)
                print(f"w={w:g} interval={list(gi) or 'all'} seed={seed}: FID {r['fid']:.1f} "
                      f"recall {r['recall']:.3f}", flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["guidance"], tuple(r.get("guidance_interval") or ()))
        cells.setdefault(key, []).append(r)
    out = []
    for w in sorted({k[0] for k in cells}):
        arms = {k[1]: v for k, v in cells.items() if k[0] == w}
        if len(arms) != 2 or () not in arms:
            continue
        interval = next(k for k in arms if k)
        row = {"guidance": w, "interval": list(interval), "seeds": sorted(r["seed"] for r in arms[()])}
        for m in METRICS:
            a = [r[m] for r in arms[()]]
            b = [r[m] for r in arms[interval]]
            spread = max(max(a) - min(a), max(b) - min(b))
            if m in RATES:  # two seeds can agree by chance: also allow 2 binomial errors
                p = (statistics.mean(a) + statistics.mean(b)) / 2
                spread = max(spread, 2 * (p * (1 - p) / arms[()][0]["n"]) ** 0.5)
            delta = statistics.mean(b) - statistics.mean(a)
            better = -delta if m in LOWER_IS_BETTER else delta
            row[m] = {"everywhere": round(statistics.mean(a), 4), "interval": round(statistics.mean(b), 4),
                      "spread": round(spread, 4),
                      "verdict": ("helps" if better > spread else "hurts" if -better > spread
                                  else "within spread") if len(a) > 1 else "one seed"}
        out.append(row)
    floor = rows[0].get("real_floor", {}) if rows else {}
    return {"rows": out, "real_floor": {m: floor.get(m) for m in METRICS if m in floor},
            "run": rows[0]["run"] if rows else None, "n": rows[0]["n"] if rows else None}


def markdown(s: dict) -> str:
    lines = ["| guidance | metric | everywhere | interval " + "| spread | verdict |",
             "|---|---|---|---|---|---|"]
    for r in s["rows"]:
        for m in METRICS:
            c = r[m]
            lines.append(f"| {r['guidance']:g} | {m} | {c['everywhere']:.3f} | {c['interval']:.3f} "
                         f"{r['interval']} | {c['spread']:.3f} | {c['verdict']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    gi = sub.add_parser("guidance-interval")
    gi.add_argument("--run")
    gi.add_argument("--weights", default="3,5")
    gi.add_argument("--interval", default="0.28,5.42")
    gi.add_argument("--seeds", default="123,7")
    gi.add_argument("--n", type=int, default=1000)
    gi.add_argument("--collect", nargs="+", help="JSON documents from `effusion evaluate --json`")
    gi.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "remedies_guidance_interval.json"))
    a = ap.parse_args()
    if a.collect:
        rows = [json.loads(Path(p).read_text()) for p in a.collect]
    elif a.run:
        lo, hi = (float(v) for v in a.interval.split(","))
        rows = run_cells(a.run, [float(w) for w in a.weights.split(",")], (lo, hi),
                         [int(s) for s in a.seeds.split(",")], a.n)
    else:
        ap.error("give --run or --collect")
    s = summarize(rows)
    s["command"] = " ".join(sys.argv)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({**s, "cells": [{k: r.get(k) for k in (
        "run", "guidance", "guidance_interval", "seed", "n", *METRICS)} for r in rows]}, indent=1))
    print(markdown(s))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
