"""A diffusers user's model made fast by effusion (issue 28), in one process.

1. Train a small class-conditional `UNet2DModel` on the digits with diffusers' own recipe
   (examples/unconditional_image_generation/train_unconditional.py: DDPMScheduler, linear
   betas, epsilon prediction, MSE on the noise, AdamW lr 1e-4 betas (0.95, 0.999) weight
   decay 1e-6, 500 warm-up steps then cosine, EMA 0.9999 with power-3/4 warm-up, batch 16,
   fp32), for --minutes. The one addition for class conditioning: 10% of labels dropped to a
   null class (index 10), so classifier-free guidance works. Saved with save_pretrained.
2. Sample it with diffusers' own schedulers, guidance 1.5 (both halves in one batch, as
   diffusers' pipelines do): DDIM at 50 steps (DDIMPipeline's default) and 10, and
   DPM-Solver++ (DPMSolverMultistepScheduler) at 20 and 10 steps.
3. `effusion import diffusers DIR --out RUN --null-class`, then the chain: guidance
   distillation (--gd-minutes), progressive distillation to 4 steps (--step-minutes), ONNX
   Runtime export; 1,000 samples of each, in-process.
4. The effusion default trained for the same time (--effusion-run, already trained; optional).

Every row: seconds per 1,000 samples (in-process, this machine), FID / class accuracy /
recall in the digits classifier's features (`effusion evaluate`'s), network calls per sample.

    python benchmarks/diffusers_interop.py --minutes 11 --effusion-run runs/demo-rule1200 \
        [--work runs/hf] [--reuse] [--n 1000]
    python benchmarks/diffusers_interop.py --markdown   # the docs table, from the JSON

The diffusers model trains on all 5,000 digits (its recipe has no held-out split; effusion
holds 500 out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from effusion.config import DataConfig
from effusion.data import load_source
from effusion.evaluate import evaluate_run
from effusion.evaluate.evaluate import evaluate_images
from effusion.interop.diffusers import import_diffusers
from effusion.optimize.export import export_run
from effusion.precision import hardware as machine
from effusion.recipes import distill_guidance, distill_steps, feature_classifier
from effusion.sampling import class_labels

NULL = 10


def make_unet():
    from diffusers import UNet2DModel

    # diffusers' block types at effusion's default widths: 28 -> 14 -> 7 px, attention at 7
    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64, 64),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=32, num_class_embeds=NULL + 1)


def train_diffusers(out: Path, minutes: float, batch: int = 16, seed: int = 0) -> dict:
    """diffusers' training recipe (module doc), for a wall-clock budget."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    data = load_source(DataConfig(source="mnist5k", image_size=28, channels=1))
    x_all = data.images.float() / 127.5 - 1
    y_all = data.labels.long()
    unet = make_unet()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6,
                            eps=1e-8)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                   power=3 / 4, model_cls=type(unet), model_config=unet.config)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []

    def one_step() -> None:
        idx = torch.randint(len(x_all), (batch,), generator=g)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(batch, generator=g) < 0.1] = NULL
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        pred = unet(sched.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        losses.append(loss.item())

    # the cosine schedule needs a length: the steps that the first 20 say will fit
    t0, probe = time.perf_counter(), 20
    for group in opt.param_groups:
        group["lr"] = 0.0
    for _ in range(probe):
        one_step()
    planned = int(probe * minutes * 60 / (time.perf_counter() - t0))
    for group in opt.param_groups:
        group["lr"] = 1e-4
    lr_sched = get_cosine_schedule_with_warmup(opt, 500, planned)
    step = probe
    while step < planned and time.perf_counter() - t0 < 1.1 * minutes * 60:
        one_step()
        lr_sched.step()
        step += 1
    seconds = time.perf_counter() - t0
    ema.copy_to(unet.parameters())
    unet.save_pretrained(out)
    sched.save_pretrained(out)
    return {"steps": step, "planned_steps": planned, "seconds": seconds, "batch": batch,
            "images": step * batch, "last_loss": sum(losses[-100:]) / max(1, len(losses[-100:]))}


def train_effusion(run: Path, folder: Path, minutes: float) -> dict:
    """effusion's default recipe (cosine, v-prediction, min-SNR, lr 2e-3, batch 128, bf16
    where native) on diffusers' network at the widths of `make_unet`, exported to `folder`."""
    from effusion.interop.diffusers import export_diffusers
    from effusion.recipes import train
    from effusion.config import load_config

    cfg = load_config(None, ["model.arch=diffusers_unet2d", f"train.max_minutes={minutes}",
                             "model.channel_mult=[1,2,2]", "model.attention_resolutions=[7]"])
    res = train(cfg, run, fresh=True, progress=False)
    export_diffusers(run, folder, overwrite=True)
    return {"recipe": "effusion", "run": str(run), "steps": res.step,
            "seconds": res.minutes * 60, "images": res.images_seen}


@torch.inference_mode()
def diffusers_samples(folder: Path, scheduler_name: str, steps: int, n: int, guidance: float = 1.5,
                      batch: int = 250, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor, float]:
    """n guided samples with a diffusers scheduler and the same loop as its pipelines
    (conditional and null halves in one batch)."""
    import diffusers

    unet = diffusers.UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    base = diffusers.DDPMScheduler.from_pretrained(folder)
    sched = getattr(diffusers, scheduler_name).from_config(base.config)
    labels = class_labels(None, n, 10)
    g = torch.Generator().manual_seed(seed)
    out = []
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        c = labels[lo:lo + batch]
        x = torch.randn((len(c), 1, 28, 28), generator=g)
        sched.set_timesteps(steps)
        x = x * sched.init_noise_sigma
        cc = torch.cat([c, torch.full_like(c, NULL)])
        for t in sched.timesteps:
            xin = sched.scale_model_input(torch.cat([x, x]), t)
            e_c, e_u = unet(xin, t, class_labels=cc).sample.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out), labels, time.perf_counter() - t0


def markdown(result: dict) -> str:
    lines = ["| variant | network calls / sample | s / 1,000 | speed-up vs DDIM 50 | FID | class acc. | recall |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = "" if r["class_accuracy"] is None else f"{r['class_accuracy']:.3f}"
        lines.append(f"| {r['variant']} | {r['calls_per_sample']} | {r['seconds_per_1000']:.1f} | "
                     f"{r['speedup_vs_ddim50']:.1f}x | {r['fid']:.1f} | {acc} | {r['recall']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=11.0)
    ap.add_argument("--recipe", choices=("diffusers", "effusion"), default="diffusers",
                    help="train the UNet2DModel with diffusers' example recipe, or with effusion's "
                         "default recipe on that network (model.arch=diffusers_unet2d), exported "
                         "to a diffusers folder")
    ap.add_argument("--effusion-run", type=Path, default=None,
                    help="an effusion default run trained for the same time, for one more row")
    ap.add_argument("--work", type=Path, default=Path("runs/hf"))
    ap.add_argument("--gd-minutes", type=float, default=5.0)
    ap.add_argument("--step-minutes", type=float, default=8.0)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--reuse", action="store_true", help="keep what --work already holds")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/diffusers_interop.json"))
    ap.add_argument("--markdown", action="store_true", help="print the table from --json and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.json.read_text())))
        return
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    folder, run, gd, s4, onnx = (w / "unet2d", w / "imported", w / "imported-gd",
                                 w / "imported-gd-s4", w / "imported-gd-s4-onnx")
    info = json.loads((w / "train.json").read_text()) if (w / "train.json").is_file() else None
    if not (args.reuse and info):
        if args.recipe == "diffusers":
            print(f"-- training a UNet2DModel with diffusers' recipe for {args.minutes} min", flush=True)
            info = train_diffusers(folder, args.minutes)
        else:
            print(f"-- training a UNet2DModel with effusion's recipe for {args.minutes} min", flush=True)
            info = train_effusion(w / "trained", folder, args.minutes)
        (w / "train.json").write_text(json.dumps(info))
    seconds = {}
    for d, make in ((run, lambda: import_diffusers(folder, run, null_class=True, overwrite=True)),  # noqa: E501
                    (gd, lambda: distill_guidance(run, gd, minutes=args.gd_minutes, fresh=True,
                                                  progress=False)),
                    (s4, lambda: distill_steps(gd, s4, steps=4, from_steps=16,
                                               minutes=args.step_minutes, fresh=True, progress=False)),
                    (onnx, lambda: export_run(s4, onnx))):
        if not (args.reuse and d.is_dir()):
            t = time.perf_counter()
            make()
            seconds[d.name] = time.perf_counter() - t
    features = feature_classifier(DataConfig(source="mnist5k"), progress=False)
    rows = []

    def row(label, calls, secs, r, extra=None):
        rows.append({"variant": label, "calls_per_sample": calls,
                     "seconds_per_1000": secs * 1000 / args.n, "fid": r["fid"],
                     "class_accuracy": r.get("class_accuracy"), "recall": r["recall"],
                     "precision": r["precision"], **(extra or {})})
        print(f"   {label}: {rows[-1]['seconds_per_1000']:.1f} s/1000, FID {r['fid']:.1f}, "
              f"class acc {r.get('class_accuracy')}", flush=True)

    for name, steps in (("DDIMScheduler", 50), ("DDIMScheduler", 10),
                        ("DPMSolverMultistepScheduler", 20), ("DPMSolverMultistepScheduler", 10)):
        print(f"-- diffusers {name} {steps} steps", flush=True)
        x, y, secs = diffusers_samples(folder, name, steps, args.n)
        row(f"diffusers {name}, {steps} steps, guidance 1.5", 2 * steps, secs,
            evaluate_images(x, "mnist5k", features=features, labels=y))
    for label, d, steps, calls in (
            ("imported, effusion DPM-Solver++ 25 steps, guidance 1.5", run, 25, 50),
            ("imported + guidance distillation + 4-step progressive distillation, eager", s4, 4, 4),
            ("imported + the chain, ONNX Runtime, 4 steps", onnx, 4, 4),
            ("effusion default, same training time, DPM-Solver++ 25 steps", args.effusion_run, 25, 50)):
        if d is None:
            continue
        print(f"-- {label}", flush=True)
        r = evaluate_run(d, args.n, steps=steps, bpd_n=0, features=features)
        row(label, calls, r["sample_seconds"], r)
    base = rows[0]
    fastest_diffusers = min((r for r in rows[:4] if r["fid"] <= 1.1 * base["fid"]),
                            key=lambda r: r["seconds_per_1000"])
    chain = rows[6]
    for r in rows:
        r["speedup_vs_ddim50"] = base["seconds_per_1000"] / r["seconds_per_1000"]
        r["fid_ratio_vs_ddim50"] = r["fid"] / base["fid"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"command": "python benchmarks/diffusers_interop.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                  if v not in (None, False) and k not in ("json", "markdown")).replace(" True", ""),
              "commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "n": args.n, "diffusers_training": info, "pass_seconds": seconds,
              "speedup_chain_vs_ddim50": chain["speedup_vs_ddim50"],
              "speedup_chain_vs_fastest_diffusers_within_10pct_fid":
                  fastest_diffusers["seconds_per_1000"] / chain["seconds_per_1000"],
              "fastest_diffusers_within_10pct_fid": fastest_diffusers["variant"],
              "chain_fid_ratio_vs_ddim50": chain["fid_ratio_vs_ddim50"], "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + markdown(result))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
