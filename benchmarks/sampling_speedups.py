"""Cheaper sampling of one trained run, measured in one process on this machine: the
untouched model at fewer sampler steps (the frontier to beat), DeepCache feature caching
at several intervals, and the ONNX Runtime export, each scored with `effusion evaluate`'s
metrics on the same seeds and classes.

    python benchmarks/sampling_speedups.py RUN [--n 500] [--steps 25,15,10] [--cache 2,3,4]
        [--onnx-out DIR] [--json benchmarks/results/sampling_speedups.json]

Timing is the wall time of drawing the n samples (batches of 256, the run's sampler and
guidance); quality is FID, class accuracy, precision and recall against the real digits
in the cached feature classifier's space. Ratios are against the run's default setting
measured in the same process. Network latency at batch 1, 8 and 64 is timed per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from effusion.evaluate import evaluate_run
from effusion.precision import hardware as machine
from effusion.recipes import feature_classifier
from effusion.runs import load_run


def net_latency_ms(net, run, batch: int, repeats: int = 10) -> float:
    d = run.config.data
    x = torch.randn(batch, d.channels, d.image_size, d.image_size)
    t = torch.full((batch,), run.schedule.T // 2)
    c = torch.zeros(batch, dtype=torch.long) if run.num_classes else None
    with torch.no_grad(), run.precision.autocast():
        net(x, t, c)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x, t, c)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--steps", default="25,15,10")
    ap.add_argument("--cache", default="2,3,4")
    ap.add_argument("--onnx-out", type=Path, default=None,
                    help="also export to ONNX here and score it (needs effusion[onnx])")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/sampling_speedups.json"))
    args = ap.parse_args()

    run = load_run(args.run)
    features = feature_classifier(run.config.data, progress=True)
    default_steps = run.config.sample.steps
    variants = [(f"untouched, {s} steps", args.run, {"steps": s})
                for s in (int(v) for v in args.steps.split(",") if v)]
    variants += [(f"DeepCache interval {k}, {default_steps} steps", args.run,
                  {"cache_interval": k}) for k in (int(v) for v in args.cache.split(",") if v)]
    if args.onnx_out is not None:
        from effusion.optimize.export import export_run

        export_run(args.run, args.onnx_out)
        variants += [(f"ONNX Runtime, {s} steps", args.onnx_out, {"steps": s})
                     for s in (int(v) for v in args.steps.split(",") if v)]

    rows = []
    for label, path, kw in variants:
        print(f"-- {label}", flush=True)
        r = evaluate_run(path, args.n, bpd_n=0, features=features, **kw)
        rows.append({"variant": label, "run": str(path), **kw,
                     "seconds": r["sample_seconds"], "fid": r["fid"],
                     "class_accuracy": r.get("class_accuracy"), "precision": r["precision"],
                     "recall": r["recall"]})
    base = rows[0]  # the untouched model at the first --steps value (the run's default: 25)
    for r in rows:
        r["speedup"] = base["seconds"] / r["seconds"]
        r["fid_ratio"] = r["fid"] / base["fid"]

    lat = {}
    for name, net in [("eager", run.model), ("DeepCache shallow call", None)]:
        if net is None:  # a cached network right after its full call: the cheap path
            cached = run.network(cache_interval=1_000_000)
            lat[name] = {}
            for b in (1, 8, 64):
                d = run.config.data
                x = torch.randn(b, d.channels, d.image_size, d.image_size)
                c = torch.zeros(b, dtype=torch.long) if run.num_classes else None
                with torch.no_grad():
                    cached(x, torch.full((b,), 900), c)  # full pass, keeps the deep feature
                    times = []
                    for k in range(10):
                        t0 = time.perf_counter()
                        cached(x, torch.full((b,), 899 - k), c)
                        times.append(time.perf_counter() - t0)
                lat[name][str(b)] = 1000 * statistics.median(times)
            continue
        lat[name] = {str(b): net_latency_ms(net, run, b) for b in (1, 8, 64)}
    if args.onnx_out is not None:
        onnx = load_run(args.onnx_out)
        lat["ONNX Runtime"] = {str(b): net_latency_ms(onnx.model, onnx, b) for b in (1, 8, 64)}

    result = {"machine": machine(), "run": str(args.run), "step": run.step, "n": args.n,
              "precision": run.precision.mode, "rows": rows, "network_latency_ms": lat}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\n{result['machine']['cpu']} (avx512_bf16: {result['machine']['avx512_bf16']}), "
          f"{run.precision.mode}, {args.n} samples")
    print("| variant | seconds | speedup | FID | FID ratio | class accuracy | precision | recall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.1f} | {r['speedup']:.2f}x | {r['fid']:.1f} | "
              f"{r['fid_ratio']:.2f} | {r['class_accuracy']:.3f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} |")
    print("\n| network call | batch 1 ms | batch 8 ms | batch 64 ms |\n|---|---|---|---|")
    for name, v in lat.items():
        print(f"| {name} | {v['1']:.1f} | {v['8']:.1f} | {v['64']:.1f} |")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
