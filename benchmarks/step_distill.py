"""Progressive against consistency distillation, equal wall time, from the same teacher.

Both students start from TEACHER (a guidance-distilled run, so one teacher call per DDIM
step) and train for --minutes on this machine:

  progressive  TEACHER-s4  16 -> 8 -> 4 DDIM steps (2 rounds of --minutes / 2)
  consistency  TEACHER-cd  one run, teacher DDIM steps of --skip timesteps

Scored with `effusion evaluate`'s metrics on --n samples each (same seeds and classes):
the undistilled teacher at 4 DDIM steps (what distillation must beat) and at 4 consistency
steps (the consistency student before training), the progressive
student at its 4 DDIM steps, and the consistency student at 4, 2 and 1 consistency steps
(one network evaluation per step each). Writes benchmarks/results/step_distill.json.

    python benchmarks/step_distill.py --teacher runs/chain/avx2-auto-gd [--minutes 10]
        [--n 1000] [--reuse]

With --reuse, students already in the teacher's folder are used as they are (their
lineage says how they were made); the chain benchmark makes TEACHER-s4 the same way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from effusion.evaluate import evaluate_run
from effusion.precision import hardware as machine
from effusion.recipes import distill_steps, feature_classifier
from effusion.runs import load_run, read_lineage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--skip", type=int, default=25)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/step_distill.json"))
    args = ap.parse_args()
    pd = args.teacher.parent / f"{args.teacher.name}-s4"
    cd = args.teacher.parent / f"{args.teacher.name}-cd"
    made = {}
    for out, kw in ((pd, {"method": "progressive", "from_steps": 16}),
                    (cd, {"method": "consistency", "skip": args.skip})):
        if args.reuse and out.is_dir():
            continue
        t0 = time.perf_counter()
        r = distill_steps(args.teacher, out, steps=4, minutes=args.minutes, fresh=True,
                          progress=False, **kw)
        made[out.name] = {"seconds": time.perf_counter() - t0, "train_steps": r.step}

    features = feature_classifier(load_run(args.teacher).config.data, progress=True)

    def score(label: str, run: Path, sampler: str, steps: int) -> dict:
        print(f"-- {label}", flush=True)
        r = evaluate_run(run, args.n, sampler=sampler, steps=steps, bpd_n=0, features=features)
        return {"variant": label, "run": str(run), "sampler": sampler, "steps": steps,
                "passes": read_lineage(run), "train_steps": load_run(run).step,
                "seconds_per_1000": r["sample_seconds"] * 1000 / args.n, "fid": r["fid"],
                "class_accuracy": r.get("class_accuracy"), "precision": r["precision"],
                "recall": r["recall"], "network_calls_per_sample": steps}

    rows = [score("teacher, undistilled, 4 DDIM steps", args.teacher, "ddim", 4),
            # the consistency student before training: its sampler on the teacher itself
            score("teacher, undistilled, 4 consistency steps", args.teacher, "consistency", 4),
            score("progressive, 4 DDIM steps", pd, "ddim", 4),
            score("consistency, 4 steps", cd, "consistency", 4),
            score("consistency, 2 steps", cd, "consistency", 2),
            score("consistency, 1 step", cd, "consistency", 1)]
    result = {"machine": machine(), "n": args.n, "teacher": str(args.teacher),
              "minutes": args.minutes, "skip": args.skip, "made": made, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print("| variant | train steps | s / 1000 | FID | class accuracy | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['train_steps']} | {r['seconds_per_1000']:.1f} | "
              f"{r['fid']:.1f} | {r['class_accuracy']:.3f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} |")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
