"""Sample quality of MNIST runs, offline: the numbers behind the default recipe's choice.

No Inception weights can be downloaded here, so quality is measured in the feature space
of a small CNN classifier trained (once, cached next to the results) on the same 5,000
digits:
  - FID in the classifier's 128-d penultimate features, 1,000 samples vs all 5,000 real
  - confidence: mean max-softmax probability (recognisable digits score near 1)
  - coverage: entropy of the predicted-class histogram / log(10) (1 = all classes evenly)
The "real" row scores 1,000 real images the same way: the floor a perfect model reaches.
This script reproduces the recipe tables of docs/recipe.md, measured before `effusion evaluate`
existed; new measurements should use `effusion evaluate` (a different feature network,
so its figures are not comparable with these).

    python benchmarks/recipe_quality.py RUN_DIR [RUN_DIR ...] [--n 1000] [--sampler S --steps N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from effusion.config import DataConfig
from effusion.data import load_source, to_model_range
from effusion.evaluate.metrics import fid

CACHE = Path("benchmarks/results/mnist_feature_cnn.safetensors")  # not committed


class FeatureCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def feature_net(x: torch.Tensor, y: torch.Tensor) -> FeatureCNN:
    """Train (8 epochs, Adam, +-2 px shifts) or load the cached classifier."""
    net = FeatureCNN()
    if CACHE.is_file():
        net.load_state_dict(load_file(str(CACHE)))
        return net.eval()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train_idx, val_idx = perm[:4500], perm[4500:]
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for epoch in range(8):
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            loss = F.cross_entropy(net(torch.roll(x[b], (dx, dy), (2, 3))), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (net(x[val_idx]).argmax(1) == y[val_idx]).float().mean().item()
    print(f"feature classifier: validation accuracy {acc:.3f}")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(CACHE))
    return net.eval()


@torch.no_grad()
def score(net: FeatureCNN, real_feats: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    feats = net.features(images)
    probs = F.softmax(net.head(feats), 1)
    hist = torch.bincount(probs.argmax(1), minlength=10).double()
    hist /= hist.sum()
    coverage = float(-(hist * torch.log(hist + 1e-12)).sum() / np.log(10))
    return {"fid_cnn": round(fid(real_feats, feats.double()), 2),
            "confidence": round(probs.max(1).values.mean().item(), 3),
            "coverage": round(coverage, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/recipe_quality.json"))
    args = ap.parse_args()

    from effusion.runs import load_run, read_metrics
    from effusion.sampling import generate

    data = load_source(DataConfig())
    x, y = to_model_range(data.images), data.labels
    net = feature_net(x, y)
    with torch.no_grad():
        real_feats = net.features(x).double()
    subset = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:args.n]
    rows = [{"run": "real (1,000 held images)", **score(net, real_feats, x[subset])}]
    for run_dir in args.runs:
        run = load_run(run_dir)
        images = generate(run, args.n, sampler=args.sampler, steps=args.steps, seed=args.seed)
        m = read_metrics(run_dir)
        rows.append({"run": str(run_dir), "step": run.step,
                     "images_seen": m[-1]["images_seen"] if m else None,
                     "minutes": round(m[-1]["elapsed_s"] / 60, 1) if m else None,
                     **score(net, real_feats, to_model_range(images))})
    print("| run | steps | images seen | minutes | FID (CNN features) | confidence | coverage |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r.get('step', '-')} | {r.get('images_seen', '-')} | "
              f"{r.get('minutes', '-')} | {r['fid_cnn']} | {r['confidence']} | {r['coverage']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
