"""docs/colour-default.png: 64 real images beside 64 samples of a run on the same source.

    python benchmarks/colour_grid.py runs/colour/icons-default "default, 11 min, 2,746 steps" docs/colour-default.png

The samples are an even spread over the run's classes (seed 0); each real image beside
them is drawn from the class its sample was asked for, so a person compares like with like.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from effusion.data import load_source
from effusion.runs import load_run
from effusion.sampling import class_labels, generate


def tile(x: torch.Tensor, cols: int = 8, scale: int = 2) -> Image.Image:
    n, c, h, w = x.shape
    rows = n // cols
    x = x[: rows * cols].view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    img = Image.fromarray(x.squeeze(-1).numpy() if c == 1 else x.numpy())
    return img.resize((cols * w * scale, rows * h * scale), Image.NEAREST)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("label")
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    run = load_run(args.run)
    real = load_source(run.config.data)
    cond = class_labels(None, args.n, run.num_classes)
    samples = generate(run, args.n, seed=0, cond=cond)
    g = torch.Generator().manual_seed(0)
    if cond is None or real.labels is None:
        reals = real.images[torch.randperm(len(real), generator=g)[: args.n]]
    else:
        picks = [(real.labels == c).nonzero().flatten() for c in cond.tolist()]
        reals = real.images[[p[torch.randint(len(p), (1,), generator=g)].item() for p in picks]]
    left, right = tile(reals), tile(samples)
    out = Image.new("RGB", (left.width * 2 + 24, left.height + 28), "white")
    out.paste(left, (0, 28))
    out.paste(right, (left.width + 24, 28))
    draw = ImageDraw.Draw(out)
    draw.text((4, 6), "real images (the classes asked for)", fill="black")
    draw.text((left.width + 28, 6), f"samples: {args.label}", fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
