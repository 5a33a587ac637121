"""Inference engines for one run's network, on this machine: eager PyTorch fp32, ONNX
Runtime fp32 and static int8 (its QDQ tooling), OpenVINO fp32 and static int8 (NNCF
post-training quantization; before 2026-11-26 the ONNX Runtime QDQ graph). Latency per network call at batch 1, 8 and 64, measured in alternation (best of
3 medians, so load changes hit every engine alike), then FID and class accuracy of each
exported variant on --n samples at the run's own sampler settings.

    python benchmarks/engines.py --run runs/demo-gd-s4 [--n 500] [--json benchmarks/results/engines.json]

Exports go to RUN-<engine> beside the run (reused if present).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from effusion.evaluate import evaluate_run
from effusion.optimize.export import example_inputs, export_run
from effusion.optimize.timing import latency_ms
from effusion.precision import hardware as machine
from effusion.recipes import feature_classifier
from effusion.runs import load_run

ENGINES = {"onnxruntime-fp32": ("onnx", False), "onnxruntime-int8": ("onnx", True),
           "openvino-fp32": ("openvino", False), "openvino-int8": ("openvino", True)}


def _loaded_bytes(d: Path) -> int:
    """Bytes of what the engine loads: the OpenVINO int8 IR (.xml + .bin) where NNCF wrote
    one, else the ONNX graph (the eager run: its weights)."""
    from effusion.runs.files import OPENVINO_INT8

    ir = d / OPENVINO_INT8
    if ir.is_file():
        return ir.stat().st_size + ir.with_suffix(".bin").stat().st_size
    return sum(p.stat().st_size for p in d.rglob("*.onnx"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo-gd-s4"))
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/engines.json"))
    args = ap.parse_args()
    dirs = {"eager-fp32": args.run}
    for name, (fmt, int8) in ENGINES.items():
        d = args.run.with_name(f"{args.run.name}-{name}")
        if not d.is_dir():
            export_run(args.run, d, fmt, repeats=1, int8=int8)
        dirs[name] = d
    runs = {k: load_run(v, device="cpu") for k, v in dirs.items()}
    latency = {}
    for b in (1, 8, 64):
        x = example_inputs(runs["eager-fp32"], b)
        best = {k: float("inf") for k in runs}
        for _ in range(3):
            for k, r in runs.items():
                best[k] = min(best[k], latency_ms(r.model, *x, repeats=5))
        latency[str(b)] = best
    features = feature_classifier(runs["eager-fp32"].config.data)
    quality = {}
    for k, d in dirs.items():
        r = evaluate_run(d, args.n, bpd_n=0, features=features)
        quality[k] = {"fid": r["fid"], "class_accuracy": r.get("class_accuracy"),
                      "seconds_per_1000": r["sample_seconds"] * 1000 / args.n,
                      "bytes": _loaded_bytes(Path(d))
                      or sum(p.stat().st_size for p in Path(d).rglob("ema.safetensors"))}
    out = {"machine": machine(), "run": str(args.run), "n": args.n, "latency_ms": latency,
           "quality": quality}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print("| engine | ms/call b1 | b8 | b64 | s / 1000 samples | FID | class acc | MB |")
    print("|---|---|---|---|---|---|---|---|")
    for k in dirs:
        q = quality[k]
        print(f"| {k} | {latency['1'][k]:.1f} | {latency['8'][k]:.1f} | {latency['64'][k]:.1f} | "
              f"{q['seconds_per_1000']:.1f} | {q['fid']:.1f} | {q['class_accuracy']:.3f} | "
              f"{q['bytes'] / 1e6:.2f} |")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
