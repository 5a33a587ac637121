"""Where a training step's time goes: torch.profiler's top operators for one variant.

Builds the model and training step exactly as `effusion bench train` does (same config,
same switches), runs warm-up steps, then profiles a few steps and prints the operators
by self CPU (or CUDA) time, so a missed speed target can be traced to its operators.

    python benchmarks/profile_step.py [--set train.precision=bf16 ...] [--steps 3] [--top 15]
        [--json benchmarks/results/profile_bf16.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from effusion.bench import BASELINE, setup_child
from effusion.config import load_config
from effusion.train.loop import train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    cfg, prec, _, state, task = setup_child(load_config(None, BASELINE + args.overrides))
    tc, device = cfg.train, prec.device
    for _ in range(args.warmup):
        train_step(state, task, tc)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            train_step(state, task, tc)
    state.loader.close()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = [{"op": e.key, "self_ms_per_step": getattr(e, key) / 1000 / args.steps,
             "share": getattr(e, key) / total, "calls_per_step": e.count / args.steps}
            for e in events[:args.top]]
    print(f"precision {prec.mode}, batch {tc.batch_size}, {args.steps} steps profiled, "
          f"{total / 1000 / args.steps:.0f} ms of self time per step")
    print("| operator | ms / step | share | calls / step |\n|---|---|---|---|")
    for r in rows:
        print(f"| `{r['op']}` | {r['self_ms_per_step']:.1f} | {100 * r['share']:.1f}% | "
              f"{r['calls_per_step']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"overrides": args.overrides, "precision": prec.mode,
                                         "ms_per_step": total / 1000 / args.steps, "top": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
