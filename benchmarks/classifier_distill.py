"""Knowledge distillation of a classifier (Hinton et al. 2015): the MLP student trained
with soft targets from the CNN teacher against the same MLP trained on labels alone.

Same recipe for every row (`effusion classifier train` defaults with model.arch=mlp:
Adam, step decay, dropout 0.2, rotate + translate, 15 epochs), same seeds; the teacher is
the shipped CNN recipe (the cached feature classifier for mnist5k, trained once if
missing). Held-out accuracy on the fixed 10% split, mean and min/max over seeds.

    python benchmarks/classifier_distill.py [--seeds 3] [--json benchmarks/results/classifier_distill.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROWS = {"labels only (no teacher)": None, "KD T=1, alpha 0.9": (1.0, 0.9),
        "KD T=4, alpha 0.9": (4.0, 0.9), "KD T=8, alpha 0.9": (8.0, 0.9),
        "KD T=4, alpha 0.5": (4.0, 0.5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/classifier_distill.json"))
    args = ap.parse_args()

    from effusion.config import DataConfig
    from effusion.recipes import classifier_config, feature_classifier, train
    from effusion.recipes.classifier import distill_classifier
    from effusion.runs import read_metrics

    teacher = feature_classifier(DataConfig())
    t_acc = [m for m in read_metrics(teacher.run_dir) if "val_acc" in m][-1]["val_acc"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kd in ROWS.items():
            accs, secs = [], []
            for seed in range(args.seeds):
                run = Path(tmp) / f"{len(rows)}-{seed}"
                sets = ["model.arch=mlp", f"train.seed={seed}"]
                t0 = time.perf_counter()
                if kd is None:
                    train(classifier_config(sets), run, progress=False)
                else:
                    distill_classifier(teacher.run_dir, run, arch="mlp", temperature=kd[0],
                                       alpha=kd[1], overrides=[f"train.seed={seed}"],
                                       progress=False)
                secs.append(time.perf_counter() - t0)
                accs.append([m for m in read_metrics(run) if "val_acc" in m][-1]["val_acc"])
            rows.append({"variant": name, "temperature": kd and kd[0], "alpha": kd and kd[1],
                         "val_acc_mean": statistics.mean(accs), "val_acc_min": min(accs),
                         "val_acc_max": max(accs), "val_acc": accs,
                         "seconds_mean": statistics.mean(secs)})
    out = {"teacher": {"arch": "cnn", "val_acc": t_acc, "run": str(teacher.run_dir)},
           "student": "mlp 784-128-64-10", "seeds": args.seeds, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"teacher: cnn, held-out accuracy {t_acc:.4f}\n")
    print("| student (mlp) | held-out acc, mean | min..max | s per run |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['val_acc_mean']:.4f} | {r['val_acc_min']:.3f}..{r['val_acc_max']:.3f} "
              f"| {r['seconds_mean']:.1f} |")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
