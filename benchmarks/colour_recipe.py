"""Recipe variants on a real colour set (issue 26, part 2): each variant trains as a user
would run it (`effusion train --set data.source=DATA` plus the variant's flags, in its own
process, the default 11-minute budget), then `effusion evaluate` scores 1,000 samples in
the metrics' features (FID, KID, precision, recall, class accuracy, memorisation).

    python benchmarks/colour_recipe.py --data icons --work runs/colour [--minutes 11]
        [--variants default,width32,attn16] [--reuse]

Variants (name -> extra --set flags) are in VARIANTS; `default` has none. With --reuse a
finished run in --work is scored again instead of trained again. Rows are merged into
benchmarks/results/colour_recipe.json by variant name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from effusion.config import DataConfig
from effusion.evaluate import evaluate_run
from effusion.precision import hardware as machine
from effusion.recipes import feature_classifier
from effusion.runs import read_config, read_metrics

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "width32": ["train.budget_min_steps=0"],  # keep the asked width 32 (fewer steps)
    "attn16": ["model.attention_resolutions=[16,8]"],
    "attn8": ["model.attention_resolutions=[8]"],
    "hflip": ["data.hflip=true"],
    "batch64": ["train.batch_size=64"],
    "lr1e-3": ["train.lr=1e-3"],
    "ema0.9995": ["train.ema_decay=0.9995"],
    "eps": ["diffusion.prediction=eps"],
    "width24": ["model.channels=24", "train.budget_min_steps=0"],
    "w16batch64": ["model.channels=16", "train.batch_size=64"],  # twice the steps again
    "ema0.995": ["train.ema_decay=0.995"],  # a shorter average for a short run
}


def train(run: Path, data: str, minutes: float, flags: list[str]) -> float:
    cmd = [sys.executable, "-m", "effusion", "train", "--run", str(run), "--fresh",
           "--set", f"data.source={data}", "--set", f"train.max_minutes={minutes}"]
    for f in flags:
        cmd += ["--set", f]
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="icons")
    ap.add_argument("--work", type=Path, default=Path("runs/colour"))
    ap.add_argument("--minutes", type=float, default=11.0)
    ap.add_argument("--variants", default="default")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/colour_recipe.json"))
    args = ap.parse_args()
    feature_classifier(DataConfig(source=args.data))  # once, cached, outside any timing

    out = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": {}}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for name in args.variants.split(","):
        flags = VARIANTS[name]
        run = args.work / f"{args.data.replace(':', '-')}-{name}"
        seconds = None
        if not (args.reuse and (run / "checkpoints").is_dir()):
            seconds = train(run, args.data, args.minutes, flags)
        cfg = read_config(run)
        log = [m for m in read_metrics(run) if "images_per_s" in m]
        r = evaluate_run(run, n=args.n)
        row = {"variant": name, "flags": flags, "run": str(run), "steps": r["step"],
               "model_channels": cfg.model.channels,
               "images_per_s": sum(m["images_per_s"] for m in log) / max(len(log), 1),
               "train_seconds": log[-1]["elapsed_s"] if log else None,
               "wall_seconds": seconds, "features": r["features"],
               **{k: r.get(k) for k in ("fid", "kid", "precision", "recall", "class_accuracy",
                                         "coverage", "memorisation", "real_floor")},
               "command": f"python benchmarks/colour_recipe.py --data {args.data} "
                          f"--minutes {args.minutes:g} --variants {name}",
               # rows merge across sessions: each keeps where it was measured
               "commit": commit, "date": time.strftime("%Y-%m-%d"),
               "cpu_flags": "AVX-512 BF16" if machine()["avx512_bf16"] else "AVX2"}
        out["rows"][name] = row
        out.update({"data": args.data, "minutes": args.minutes, "n": args.n, "machine": machine(),
                    "commit": commit, "date": time.strftime("%Y-%m-%d")})
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"{name:<12} steps {row['steps']:>5}  width {row['model_channels']:>3}  "
              f"FID {row['fid']:.3f}  KID {row['kid']:.4f}  prec {row['precision']:.2f}  "
              f"rec {row['recall']:.2f}  acc {row.get('class_accuracy') or 0:.2f}", flush=True)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
