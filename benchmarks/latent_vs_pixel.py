"""Latent vs pixel diffusion at 64x64 RGB on `shapes`: memory, speed and FID per wall time.

1. Trains (or reuses) a VAE on the shapes images (`effusion vae train`, downsample 4:
   64x64x3 -> 16x16x4 latents) and reports its held-out PSNR.
2. Measures, each in a fresh process through `effusion bench train`'s machinery, one
   training step of the same U-Net (same width and depth; attention at its lowest
   resolution) on pixels and on the VAE's cached latents: images/s and peak memory
   split into weights + optimizer and activations (tensor-level tracker).
3. Trains both for the same wall time and scores them with `effusion evaluate`'s FID in
   the shapes feature classifier's space (trained once per size and cached), plus class
   accuracy (both are class-conditional, guidance 1.5).

Prints a markdown table and writes JSON.

    python benchmarks/latent_vs_pixel.py [--minutes 8] [--vae-minutes 6] [--work runs/latent_vs_pixel]
        [--json benchmarks/results/latent_vs_pixel.json] [--skip-fid]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from effusion.bench import BASELINE, _run_variant
from effusion.evaluate.evaluate import evaluate_run
from effusion.recipes import feature_classifier, train, vae_config
from effusion.runs import latest_checkpoint
from effusion.runs import read_config as res_cfg
from effusion.runs.files import VAE_INFO


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--source", default="shapes")
    ap.add_argument("--minutes", type=float, default=8.0, help="U-Net training time, each")
    ap.add_argument("--vae-minutes", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=25, help="steps timed per variant")
    ap.add_argument("--n", type=int, default=500, help="samples for FID")
    ap.add_argument("--work", type=Path, default=Path("runs/latent_vs_pixel"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/latent_vs_pixel.json"))
    ap.add_argument("--skip-fid", action="store_true", help="only memory and speed")
    args = ap.parse_args()

    data = [f"data.source={args.source}", f"data.image_size={args.size}", "data.channels=3"]
    lowest = (args.size + 3) // 4  # resolution after two stride-2 levels
    unet = ["model.channels=32", "model.channel_mult=[1,2,2]"]
    pixel = data + unet + [f"model.attention_resolutions=[{lowest}]"]

    # --- 1. the VAE
    vae_dir = args.work / "vae"
    t0 = time.perf_counter()
    if latest_checkpoint(vae_dir) is None or not (vae_dir / VAE_INFO).is_file():
        train(vae_config(data + [f"train.max_minutes={args.vae_minutes}"]), vae_dir, fresh=True)
    vae_info = json.loads((vae_dir / VAE_INFO).read_text())
    vae_s = time.perf_counter() - t0
    lat_size = vae_info["latent_shape"][1]
    latent = data + unet + [f"model.attention_resolutions=[{(lat_size + 3) // 4}]",
                            "model.space=latent", f"model.vae={vae_dir.resolve()}"]

    # --- 2. memory and speed, one fresh process each (default precision of this machine)
    common = [o for o in BASELINE if not o.startswith("train.precision")] + ["train.max_minutes=0"]
    rows = {}
    for name, over in (("pixel", pixel), ("latent", latent)):
        print(f"timing {name} ...", flush=True)
        rows[name] = _run_variant(None, common + over, args.steps, 5, timeout=3600)
        if "error" in rows[name]:
            raise SystemExit(f"{name}: {rows[name]['error']}")
    p, q = rows["pixel"], rows["latent"]
    result = {
        "machine_note": "measured with the default precision of this machine",
        "size": args.size, "source": args.source, "vae": vae_info, "vae_train_s": vae_s,
        "pixel": p, "latent": q,
        "activation_memory_saved": 1 - q["memory"]["activations_mb"] / p["memory"]["activations_mb"],
        "peak_memory_saved": 1 - q["memory"]["peak_mb"] / p["memory"]["peak_mb"],
        "speedup": q["images_per_s"] / p["images_per_s"],
    }

    # --- 3. FID after the same wall time
    if not args.skip_fid:
        for name, over in (("pixel", pixel), ("latent", latent)):
            run = args.work / name
            cfg_over = over + [f"train.max_minutes={args.minutes}", "train.sample_every=0"]
            from effusion.config import load_config

            res = train(load_config(None, cfg_over), run, fresh=True)
            ev = evaluate_run(run, n=args.n, bpd_n=0, features=feature_classifier(res_cfg(run).data,
                                                                                    progress=True))
            result[name].update(train_steps=res.step, train_images=res.images_seen,
                                train_minutes=res.minutes, fid=ev["fid"],
                                class_accuracy=ev.get("class_accuracy"),
                                precision_metric=ev["precision"], recall=ev["recall"],
                                sample_seconds=ev["sample_seconds"])

    pm, qm = p["memory"], q["memory"]
    lines = ["| | pixel 64x64x3 | latent 16x16x4 | latent vs pixel |", "|---|---|---|---|",
             f"| images/s (training) | {p['images_per_s']:.1f} | {q['images_per_s']:.1f} | "
             f"{result['speedup']:.1f}x |",
             f"| activation memory (MB) | {pm['activations_mb']:.0f} | {qm['activations_mb']:.0f} | "
             f"{100 * result['activation_memory_saved']:.0f}% less |",
             f"| peak memory (MB) | {pm['peak_mb']:.0f} | {qm['peak_mb']:.0f} | "
             f"{100 * result['peak_memory_saved']:.0f}% less |",
             f"| weights + grads + optimizer (MB) | {pm['weights_mb'] + pm['grads_mb'] + pm['optimizer_mb']:.1f} | "
             f"{qm['weights_mb'] + qm['grads_mb'] + qm['optimizer_mb']:.1f} | |"]
    if not args.skip_fid:
        lines += [f"| steps in {args.minutes:g} min | {p['train_steps']} | {q['train_steps']} | |",
                  f"| FID ({args.n} samples) | {p['fid']:.1f} | {q['fid']:.1f} | |",
                  f"| class accuracy | {p['class_accuracy']:.3f} | {q['class_accuracy']:.3f} | |"]
    lines.append(f"\nVAE: {vae_info['psnr_db']:.2f} dB PSNR ({vae_info['psnr_on']}), scale factor "
                 f"{vae_info['scale_factor']:.3f}, trained in {vae_s / 60:.1f} min (0 if reused)")
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
