"""The deployment chain against the default run, in one process: the untouched run at 25
(default), 15 and 10 sampler steps, each pass alone, and the chains; 1,000 (or --n)
samples each, scored with `effusion evaluate`'s metrics. Writes the JSON keys issue 14
asks for (`baseline`, `chain`, `speedup`, `fid_ratio`, `frontier`, `frontier_speedup`).

Passes made from RUN (in --work, named RUN-<suffix>):
  -gd        guidance distillation (--minutes)
  -gd-s4     + progressive step distillation 16 -> 8 -> 4 DDIM steps (--step-minutes)
  -gd-cd     + consistency distillation, 4 consistency steps (--step-minutes, --skip)
  -gd-p      guidance-distilled student pruned by Taylor importance (--prune-ratio,
             --prune-minutes of distillation fine-tune)
  -onnx, -gd-onnx, -gd-s4-onnx, -gd-cd-onnx, -gd-p-onnx   ONNX Runtime exports

The chain row is the step student named by --step-method (progressive or consistency);
both are in the table.

    python benchmarks/optimize_chain.py --run runs/demo [--n 500] [--reuse]
        [--json benchmarks/results/optimize_chain.json]

With --reuse, pass outputs already in --work are used as they are (their lineage says how
they were made) instead of being made again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from effusion.evaluate import evaluate_run
from effusion.optimize.export import export_run
from effusion.precision import hardware as machine
from effusion.recipes import distill_guidance, distill_steps, feature_classifier
from effusion.runs import load_run, read_lineage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--step-minutes", type=float, default=8.0)
    ap.add_argument("--skip", type=int, default=25)
    ap.add_argument("--step-method", choices=("progressive", "consistency"),
                    default="progressive")
    ap.add_argument("--prune-ratio", type=float, default=0.3)
    ap.add_argument("--prune-minutes", type=float, default=4.0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/optimize_chain.json"))
    args = ap.parse_args()
    work = args.work or args.run.parent

    def path(suffix: str) -> Path:
        return work / f"{args.run.name}{suffix}"

    def prune(src: Path, dst: Path):
        from effusion.optimize.prune import prune_run
        return prune_run(src, dst, ratio=args.prune_ratio, finetune_minutes=args.prune_minutes,
                         fresh=True, progress=False)

    passes = [("-gd", lambda d: distill_guidance(args.run, d, minutes=args.minutes, fresh=True,
                                                 progress=False)),
              ("-gd-s4", lambda d: distill_steps(path("-gd"), d, steps=4, from_steps=16,
                                                 minutes=args.step_minutes, fresh=True,
                                                 progress=False)),
              ("-gd-cd", lambda d: distill_steps(path("-gd"), d, steps=4, method="consistency",
                                                 skip=args.skip, minutes=args.step_minutes,
                                                 fresh=True, progress=False)),
              ("-gd-p", lambda d: prune(path("-gd"), d)),
              ("-onnx", lambda d: export_run(args.run, d)),
              ("-gd-onnx", lambda d: export_run(path("-gd"), d)),
              ("-gd-s4-onnx", lambda d: export_run(path("-gd-s4"), d)),
              ("-gd-cd-onnx", lambda d: export_run(path("-gd-cd"), d)),
              ("-gd-p-onnx", lambda d: export_run(path("-gd-p"), d))]
    pass_seconds = {}
    for suffix, make in passes:
        if not (args.reuse and path(suffix).is_dir()):
            t0 = time.perf_counter()
            make(path(suffix))
            pass_seconds[path(suffix).name] = time.perf_counter() - t0

    features = feature_classifier(load_run(args.run).config.data, progress=True)

    def score(label: str, run: Path, steps: int, guided_halves: int) -> dict:
        print(f"-- {label}", flush=True)
        r = evaluate_run(run, args.n, steps=steps, bpd_n=0, features=features)  # its sampler
        return {"variant": label, "run": str(run), "steps": steps, "sampler": r["sampler"],
                "passes": read_lineage(run), "seconds_per_1000": r["sample_seconds"] * 1000 / args.n,
                "fid": r["fid"], "class_accuracy": r.get("class_accuracy"), "recall": r["recall"],
                "precision": r["precision"],
                # guided: both halves in one batch, i.e. 2 network evaluations per sample per step
                "network_calls_per_sample": steps * guided_halves}

    rows = [score(f"untouched, {s} steps", args.run, s, 2) for s in (25, 15, 10)]
    rows += [score("ONNX Runtime alone, 25 steps", path("-onnx"), 25, 2),
             score("guidance distillation alone, 25 steps", path("-gd"), 25, 1),
             score("guidance distillation + ONNX Runtime + 10 steps", path("-gd-onnx"), 10, 1),
             score(f"guidance distillation + pruning {args.prune_ratio:.0%} + ONNX Runtime + 10 steps",
                   path("-gd-p-onnx"), 10, 1),
             score("guidance distillation + progressive distillation (4 DDIM steps), eager",
                   path("-gd-s4"), 4, 1),
             score("guidance distillation + consistency distillation (4 steps), eager",
                   path("-gd-cd"), 4, 1)]
    student = {"progressive": "-gd-s4", "consistency": "-gd-cd"}[args.step_method]
    rows += [score(f"chain: guidance distillation + {args.step_method} distillation + ONNX "
                   "Runtime, 4 steps", path(f"{student}-onnx"), 4, 1)]
    base, chain = rows[0], rows[-1]
    for r in rows:
        r["speedup"] = base["seconds_per_1000"] / r["seconds_per_1000"]
        r["fid_ratio"] = r["fid"] / base["fid"]
    within = [r for r in rows[:3] if r["fid"] <= 1.1 * base["fid"]]
    frontier = min(within, key=lambda r: r["seconds_per_1000"])

    def brief(r: dict) -> dict:
        return {k: r[k] for k in ("seconds_per_1000", "fid", "class_accuracy",
                                  "network_calls_per_sample")}

    result = {"machine": machine(), "n": args.n, "run": str(args.run),
              "baseline": brief(base), "chain": {**brief(chain), "passes": chain["passes"]},
              "speedup": chain["speedup"], "fid_ratio": chain["fid_ratio"],
              "frontier": {"steps": frontier["steps"], "seconds_per_1000": frontier["seconds_per_1000"],
                           "fid": frontier["fid"]},
              "frontier_speedup": frontier["seconds_per_1000"] / chain["seconds_per_1000"],
              "pass_seconds": pass_seconds, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print("| variant | s / 1000 | speedup | FID | FID ratio | class accuracy | recall | calls / sample |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds_per_1000']:.1f} | {r['speedup']:.2f}x | {r['fid']:.1f} | "
              f"{r['fid_ratio']:.2f} | {r['class_accuracy']:.3f} | {r['recall']:.3f} | "
              f"{r['network_calls_per_sample']} |")
    print(f"speedup {result['speedup']:.2f}x, fid_ratio {result['fid_ratio']:.2f}, frontier "
          f"{frontier['steps']} steps, frontier_speedup {result['frontier_speedup']:.2f}x; wrote {args.json}")


if __name__ == "__main__":
    main()
