"""The classifier recipe, one ingredient at a time (Adam, step LR decay, dropout, augmentation,
then int8 dynamic quantization: the source write-up's worked MNIST example).

Trains the `cnn` and `mlp` classifiers on mnist5k through `effusion classifier train`'s
config with one change per row from the shipped recipe (Adam, step decay x0.3 every 5
epochs, dropout 0.2, rotate + translate augmentation, 15 epochs), then quantizes the
shipped recipe's model to int8. Prints a markdown table and writes JSON.

    python benchmarks/classifier_recipe.py [--arch cnn] [--json benchmarks/results/classifier_recipe.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "recipe (adam, step decay, dropout 0.2, rotate+crop)": [],
    "no LR decay": ["train.lr_schedule=none"],
    "cosine decay": ["train.lr_schedule=cosine"],
    "no dropout": ["model.dropout=0"],
    "no augmentation": ["data.rotate=0", "data.translate=0"],
    "sgd (nesterov 0.9, lr 0.05)": ["train.optimizer=sgd", "train.lr=0.05"],
    "rmsprop (lr 1e-3)": ["train.optimizer=rmsprop", "train.lr=0.001", "train.momentum=0"],
    "adamw (wd 0.05)": ["train.optimizer=adamw", "train.weight_decay=0.05"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cnn", choices=["cnn", "mlp"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out_json = args.json or Path(f"benchmarks/results/classifier_recipe_{args.arch}.json")

    from effusion.optimize.quantize import quantize_classifier
    from effusion.recipes import classifier_config, train
    from effusion.runs import read_metrics

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            run = Path(tmp) / f"v{i}"
            t0 = time.perf_counter()
            train(classifier_config([f"model.arch={args.arch}"] + overrides), run, progress=False)
            evals = [m for m in read_metrics(run) if "val_acc" in m]
            rows.append({"variant": name, "overrides": overrides,
                         "val_acc": evals[-1]["val_acc"], "val_loss": evals[-1]["val_loss"],
                         "best_val_acc": max(m["val_acc"] for m in evals),
                         "train_acc": evals[-1]["train_acc"],
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{name}: {rows[-1]}", flush=True)
        q = quantize_classifier(Path(tmp) / "v0", Path(tmp) / "v0-int8")
    print(f"\n{args.arch}: held-out accuracy after 15 epochs (500 held-out images; 1 image = 0.2 points)\n")
    print("| variant | held-out acc | held-out loss | best epoch acc | train acc (with dropout/aug) | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['val_acc']:.3f} | {r['val_loss']:.4f} | {r['best_val_acc']:.3f} "
              f"| {r['train_acc']:.3f} | {r['seconds']} |")
    print("\n| int8 dynamic quantization (Linear layers) | fp32 | int8 |\n|---|---|---|")
    print(f"| model bytes | {q['bytes_fp32']:,} | {q['bytes_int8']:,} |")
    print(f"| latency / 256 images (ms, {q['threads']} threads) | {q['latency_ms_per_256_fp32']:.2f} | "
          f"{q['latency_ms_per_256_int8']:.2f} |")
    print(f"| held-out accuracy | {q['val_acc_fp32']:.3f} | {q['val_acc_int8']:.3f} |")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"arch": args.arch, "variants": rows, "quantize": q}, indent=1))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
