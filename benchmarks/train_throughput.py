"""Training throughput and peak memory of the default training step.

Measures, each in a fresh subprocess (so one variant's memory does not leak into the
next), images/s (median over timed steps after warm-up) and peak memory:
  - effusion default recipe in fp32 eager
  - effusion default recipe in its default precision (bf16 autocast where supported)
  - with the `compare` extra installed (`pip install effusion[compare]`): a HF diffusers
    UNet2DModel of similar parameter count on the same data, fp32 and bf16.
Peak memory is peak RSS on CPU (includes the interpreter and libraries, ~0.4-0.6 GB; the
"train MB" column subtracts the RSS measured just before the first step) and
torch.cuda.max_memory_allocated on CUDA.

    python benchmarks/train_throughput.py [--steps 20] [--warmup 5] [--batch B] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _diffusers_unet(channels: int, image_size: int, in_ch: int):
    from diffusers import UNet2DModel

    # Same widths, depth and attention placement as effusion's default (32, 64, 64 with
    # attention at the 7x7 level, one block per level).
    c = channels
    return UNet2DModel(sample_size=image_size, in_channels=in_ch, out_channels=in_ch,
                       block_out_channels=(c, 2 * c, 2 * c), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=32)


def run_variant(variant: str, precision: str, steps: int, warmup: int, batch: int | None) -> dict:
    """Runs inside the child process: time `steps` training steps of one variant."""
    import torch

    from effusion.config import load_config
    from effusion.data import BatchStream, load_source, to_model_range
    from effusion.diffusion import schedule_for
    from effusion.models import build_model
    from effusion.precision import Precision, resolve_device, resolve_precision
    from effusion.train.objective import diffusion_loss
    from effusion.train.optim import build_optimizer

    # Unconditional, so the diffusers model (no class input) runs the same task; the class
    # embedding of the default recipe adds one table lookup per sample.
    cfg = load_config(None, ["model.num_classes=0"] + ([f"train.batch_size={batch}"] if batch else []))
    device = resolve_device(cfg.train.device)
    prec = Precision(device, resolve_precision(precision, device))
    torch.manual_seed(0)
    if variant == "effusion":
        model = build_model(cfg).to(device)
        forward = model
    else:
        model = _diffusers_unet(cfg.model.channels, cfg.data.image_size, cfg.data.channels).to(device)
        forward = lambda x, t, cond: model(x, t).sample  # noqa: E731
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.train)
    schedule = schedule_for(cfg)
    stream = BatchStream(load_source(cfg.data), cfg.train.batch_size, seed=0)
    gen = torch.Generator().manual_seed(1)
    base_rss = _current_rss_mb()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x0 = to_model_range(stream.next()[0])
        loss = diffusion_loss(forward, x0, None, cfg.diffusion, schedule, gen, prec)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb())
    return {"variant": variant, "precision": prec.mode, "device": str(device),
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            "batch": cfg.train.batch_size, "images_per_s": round(cfg.train.batch_size / median, 1),
            "step_ms": round(1000 * median, 1), "peak_mem_MB": round(peak, 1),
            "train_mem_MB": round(peak - (0 if device.type == "cuda" else base_rss), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_variant(*args.child, args.steps, args.warmup, args.batch)))
        return
    variants = [("effusion", "fp32"), ("effusion", "auto")]
    try:
        import diffusers  # noqa: F401

        variants += [("diffusers", "fp32"), ("diffusers", "auto")]
    except ImportError:
        print("(diffusers not installed: `pip install effusion[compare]` adds the comparison)")
    rows = []
    for variant, precision in variants:
        cmd = [sys.executable, __file__, "--child", variant, precision, "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--batch", str(args.batch)] if args.batch else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{variant} {precision} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r["images_per_s"] for r in rows if r["variant"] == "effusion"
                 and r["precision"] == "fp32"), None)
    header = "| variant | precision | params (M) | batch | images/s | vs effusion fp32 | step ms | peak MB | train MB |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['precision']} | {r['params_M']} | {r['batch']} | "
              f"{r['images_per_s']} | {ratio} | {r['step_ms']} | {r['peak_mem_MB']} | "
              f"{r['train_mem_MB']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "steps": args.steps, "warmup": args.warmup},
                                    indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
