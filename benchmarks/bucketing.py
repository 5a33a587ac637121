"""Mixed aspect ratios three ways, at equal wall time: buckets, padding, centre-cropping.

    python benchmarks/bucketing.py [--minutes 4] [--n 500] [--json benchmarks/results/bucketing.json]

Data: `shapes:3000` drawn at aspect ratios 1:2, 1:1 and 2:1 (data.aspect_ratios) with about
24x24 pixels each. Three ways to train the same class-conditional U-Net on it, each for
the same wall time (train.max_minutes; width fixed at 16, budget narrowing off):

- bucket: `data.buckets=auto` -> buckets 24x24, 16x32 and 32x16, one bucket per batch;
- pad: every image whole, letterboxed (black bars) into the largest bucket's 32x32 canvas,
  batches mixed (what a loader without buckets must do to keep content);
- crop: the centred square, resized to 24x24 (the square pipeline; half of a 1:2 image is
  cut away).

Per arm: images/s over the whole run, the memory a training step takes (peak resident
memory during 12 steps above the resident memory before them, sampled every 2 ms, fp32),
and FID of 500 samples against what the arm trained on (its own view of the data: bucket
sizes, letterboxed canvases or crops), all resized to 24x24 for the feature network (the
cached shapes classifier). The FIDs therefore say how far each arm got towards its own
target in the same time, not which target is better; the crop arm's target has lost
content, which no FID here shows (the table gives the share of pixels cropped).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SIZE = 24
BASE = ["data.source=shapes:3000:5", f"data.image_size={SIZE}", "data.channels=3",
        "data.aspect_ratios=[0.5,1,2]", "model.channels=16", "model.attention_resolutions=[6]",
        "train.budget_min_steps=0", "train.sample_every=0", "train.batch_size=64",
        "train.checkpoint_every=100000", "train.threads=2"]
ARMS = {"bucket": ["data.buckets=auto"], "pad": [f"data.image_size=32"], "crop": []}


def _letterbox(p: torch.Tensor, canvas: int) -> torch.Tensor:
    """uint8 (C, h, w) -> whole, scaled to fit, centred on a black canvas x canvas."""
    h, w = p.shape[-2:]
    s = canvas / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    small = F.interpolate(p[None].float(), size=(nh, nw), mode="bilinear", antialias=True,
                          align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    out = torch.zeros(p.shape[0], canvas, canvas, dtype=torch.uint8)
    top, left = (canvas - nh) // 2, (canvas - nw) // 2
    out[:, top:top + nh, left:left + nw] = small
    return out


def _cfg(arm: str):
    from effusion.config import load_config

    return load_config(None, BASE + ARMS[arm])


def _padded_set(cfg):
    from effusion.data import ImageSet
    from effusion.data.sources import restrict, shapes_pictures

    pictures, labels, names = shapes_pictures(_cfg("crop").data)  # drawn at ~24x24 pixels
    return restrict(ImageSet(torch.stack([_letterbox(p, 32) for p in pictures]), labels, names),
                    cfg.data)


def recipe_for(arm: str):
    """The diffusion recipe, or for the pad arm one that trains on letterboxed canvases."""
    from effusion.recipes.generative import DiffusionRecipe
    from effusion.train.loop import TrainData, resolve_for_data

    class Padded(DiffusionRecipe):  # letterboxed 32x32 canvases instead of the source
        def prepare_data(self, cfg, device):
            from effusion.data import split

            data = _padded_set(cfg)
            cfg = resolve_for_data(cfg, data)
            tr, va = split(data, cfg.data.val_fraction)
            return TrainData(cfg, tr, va)

    return Padded() if arm == "pad" else DiffusionRecipe()


def train_arm(arm: str, run: Path, minutes: float) -> None:
    """In its own process: train one arm, then print its peak RSS as JSON."""
    from dataclasses import replace

    from effusion.train.loop import train

    cfg = _cfg(arm)
    cfg = replace(cfg, train=replace(cfg.train, max_minutes=minutes))
    recipe = recipe_for(arm)
    res = train(cfg, run, recipe, fresh=True, progress=False)
    print(json.dumps({"step_peak_MiB": step_memory(cfg, recipe), "steps": res.step,
                      "images": res.images_seen, "minutes": res.minutes,
                      "images_per_s": res.images_seen / (res.minutes * 60)}))


def state_and_task(cfg, recipe, prec):
    """A fresh training state and task for `recipe` on `cfg` (no run directory): what the
    step-level measurements here and in scale_gpu.py drive with `train_step`."""
    from effusion.train.loop import TaskContext
    from effusion.train.state import TrainState

    data = recipe.prepare_data(cfg, prec.device)
    state = TrainState.create(data.cfg, lambda: recipe.build_model(data.cfg), data.train_set, prec)
    task = recipe.make_task(TaskContext(data.cfg, None, prec, state.mem_format, None,
                                        data.train_set, data.val_set))
    return state, task, data


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def step_memory(cfg, recipe, steps: int = 12) -> float:
    """Peak resident memory during training steps above the resident memory before them
    (MiB): what a step's activations and gradients take, sampled every 2 ms."""
    import threading

    from effusion.precision import Precision
    from effusion.train.loop import train_step

    state, task, data = state_and_task(cfg, recipe, Precision(torch.device("cpu"), "fp32"))
    for _ in range(3):
        train_step(state, task, data.cfg.train)
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample)
    th.start()
    for _ in range(steps):
        train_step(state, task, data.cfg.train)
    done.set()
    th.join()
    return (peak[0] - base) / 2 ** 20


def _square(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x.float(), size=(SIZE, SIZE), mode="bilinear", antialias=True,
                         align_corners=False).round().clamp(0, 255).to(torch.uint8)


def score(arm: str, run: Path, n: int) -> dict:
    """FID of `n` samples against the arm's own training view, at 24x24."""
    from effusion.data import load_source
    from effusion.data.buckets import load_bucketed
    from effusion.evaluate.metrics import fid
    from effusion.recipes.classifier import feature_classifier
    from effusion.runs import load_run
    from effusion.sampling import generate

    cfg = _cfg(arm)
    clf = feature_classifier(_cfg("crop").data)
    loaded = load_run(run)
    if arm == "bucket":
        data = load_bucketed(cfg.data)
        real = torch.cat([_square(data.images[i:i + 1, :, :data.buckets[int(b)][0],
                                             :data.buckets[int(b)][1]])
                          for i, b in enumerate(data.bucket.tolist())])
        counts = torch.bincount(data.bucket, minlength=len(data.buckets))
        parts = []
        for k, (h, w) in enumerate(data.buckets):  # samples in the buckets' proportions
            m = round(n * int(counts[k]) / len(data))
            if m:
                parts.append(_square(generate(loaded, m, seed=100 + k, size=(h, w))))
        fake = torch.cat(parts)
    elif arm == "pad":
        real = _square(_padded_set(cfg).images)
        fake = _square(generate(loaded, n, seed=100))
    else:
        real = load_source(cfg.data).images
        fake = generate(loaded, n, seed=100)
    return {"fid": fid(clf.predict(real)[0], clf.predict(fake)[0]), "samples": len(fake),
            "reference": len(real)}


def cropped_share() -> float:
    """Share of the drawn images' pixels that centre-cropping cuts away."""
    from effusion.data.sources import shapes_pictures

    pictures, _, _ = shapes_pictures(_cfg("crop").data)
    lost = [1 - min(p.shape[-2:]) ** 2 / (p.shape[-2] * p.shape[-1]) for p in pictures]
    return sum(lost) / len(lost)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--work", default="runs/bucketing")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/bucketing.json"))
    ap.add_argument("--train-arm", help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.work)
    if a.train_arm:
        train_arm(a.train_arm, work / a.train_arm, a.minutes)
        return
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                       "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
                       "avx2": "avx2" in flags, "torch": torch.__version__},
           "command": "python benchmarks/bucketing.py " + " ".join(sys.argv[1:]),
           "minutes_per_arm": a.minutes, "config": BASE, "arms": {},
           "crop_cuts_share_of_pixels": cropped_share()}
    for arm in ARMS:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--train-arm", arm, "--minutes", str(a.minutes),
                            "--work", str(work)], capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"arm {arm} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        row = json.loads(p.stdout.strip().splitlines()[-1])
        row.update(score(arm, work / arm, a.n))
        row["wall_s"] = time.perf_counter() - t0
        res["arms"][arm] = row
        print(arm, json.dumps(row), flush=True)
    b, pad = res["arms"]["bucket"], res["arms"]["pad"]
    res["bucket_vs_pad"] = {"speed": b["images_per_s"] / pad["images_per_s"] - 1,
                            "step_memory_saved": 1 - b["step_peak_MiB"] / pad["step_peak_MiB"],
                            "quoted": "28% less memory, +25% speed (MISSION.md)"}
    print(f"\n{'arm':8} {'img/s':>8} {'step peak MiB':>14} {'steps':>6} {'FID (own view)':>15}")
    for arm, r in res["arms"].items():
        print(f"{arm:8} {r['images_per_s']:8.0f} {r['step_peak_MiB']:14.0f} {r['steps']:6d} {r['fid']:15.1f}")
    print(f"bucket vs pad: speed {res['bucket_vs_pad']['speed']:+.0%}, step memory "
          f"{-res['bucket_vs_pad']['step_memory_saved']:+.0%}; crop cuts "
          f"{res['crop_cuts_share_of_pixels']:.0%} of the pixels")
    Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
