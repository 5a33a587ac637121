"""The deployment chain against the default run, in one process: the untouched run at 25
(default), 15 and 10 sampler steps, then the chain guidance distillation -> ONNX Runtime
export -> 10 steps, each pass alone too; 1,000 (or --n) samples each, scored with
`effusion evaluate`'s metrics. Writes the JSON keys issue 14 asks for.

    python benchmarks/optimize_chain.py --run runs/demo [--n 500] [--minutes 5] [--work runs]
        [--reuse] [--json benchmarks/results/optimize_chain.json]

With --reuse, pass outputs already in --work (RUN-gd, RUN-onnx, RUN-gd-onnx) are used as they
are (their lineage says how they were made) instead of being made again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_speedups import machine  # noqa: E402

from effusion.evaluate import evaluate_run  # noqa: E402
from effusion.optimize.export import export_run  # noqa: E402
from effusion.recipes import distill_guidance, feature_classifier  # noqa: E402
from effusion.runs import load_run, read_lineage  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/optimize_chain.json"))
    args = ap.parse_args()
    work = args.work or args.run.parent
    gd, onnx, gd_onnx = (work / f"{args.run.name}{s}" for s in ("-gd", "-onnx", "-gd-onnx"))

    pass_seconds = {}
    for path, make in [(gd, lambda: distill_guidance(args.run, gd, minutes=args.minutes,
                                                     fresh=True, progress=False)),
                       (onnx, lambda: export_run(args.run, onnx)),
                       (gd_onnx, lambda: export_run(gd, gd_onnx))]:
        if not (args.reuse and path.is_dir()):
            t0 = time.perf_counter()
            make()
            pass_seconds[path.name] = time.perf_counter() - t0

    features = feature_classifier(load_run(args.run).config.data, progress=True)
    calls = {"untouched": 2, "guidance-distilled": 1}  # images per network-call batch row

    def score(label: str, path: Path, steps: int, kind: str) -> dict:
        print(f"-- {label}", flush=True)
        r = evaluate_run(path, args.n, steps=steps, bpd_n=0, features=features)
        return {"variant": label, "run": str(path), "steps": steps,
                "passes": read_lineage(path), "seconds_per_1000": r["sample_seconds"] * 1000 / args.n,
                "fid": r["fid"], "class_accuracy": r.get("class_accuracy"), "recall": r["recall"],
                "precision": r["precision"],
                # guided: both halves in one batch, i.e. 2 network evaluations per sample per step
                "network_calls_per_sample": steps * calls[kind]}

    rows = [score(f"untouched, {s} steps", args.run, s, "untouched") for s in (25, 15, 10)]
    rows += [score("ONNX Runtime alone, 25 steps", onnx, 25, "untouched"),
             score("guidance distillation alone, 25 steps", gd, 25, "guidance-distilled"),
             score("chain: guidance distillation + ONNX Runtime + 10 steps", gd_onnx, 10,
                   "guidance-distilled")]
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
