"""The scale-out checks that need a GPU (issue 12), in one short script for a lent machine.

    python benchmarks/scale_gpu.py [--json benchmarks/results/scale_gpu.json] [--quick]

1. sync-free step: the training step of a diffusion run on CUDA under
   `torch.cuda.set_sync_debug_mode("error")` (any host sync raises), and its speed against
   the same step with the host-side finiteness check (two syncs per micro-batch).
2. gradient checkpointing where activations dominate: a 64x64 RGB U-Net at width 128,
   peak GPU memory and step time for none / blocks / all (bf16 autocast, AdamW).
3. torchrun's process group on NCCL (a one-GPU world: NCCL refuses two ranks on one GPU),
   with DDP and with FSDP2, with mixed aspect-ratio buckets and progressive resolution,
   then sampling at 24x48; the same run without the process group for comparison.

Prints a table and writes JSON. Needs CUDA; on a CPU-only machine it says so and stops.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _state(overrides: list[str]):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bucketing import state_and_task
    from effusion.config import load_config
    from effusion.precision import Precision
    from effusion.recipes.generative import DiffusionRecipe
    from effusion.train.loop import resolve_runtime

    cfg, prec, _ = resolve_runtime(load_config(None, overrides))
    state, task, data = state_and_task(cfg, DiffusionRecipe(), prec)
    return data.cfg, state, task


SYNC_CONFIGS = {
    "shapes 32x32 RGB, width 64, batch 128": [
        "data.source=shapes:4000", "data.image_size=32", "model.channels=64",
        "model.attention_resolutions=[8]", "train.batch_size=128"],
    "shapes 64x64 RGB, width 128, batch 64": [
        "data.source=shapes:2000", "data.image_size=64", "model.channels=128",
        "model.channel_mult=[1,2,2,2]", "model.attention_resolutions=[16]",
        "model.head_channels=64", "train.batch_size=64"],
}


def sync_free(steps: int, name: str) -> dict:
    import effusion.train.loop as loop

    cfg, state, task = _state(SYNC_CONFIGS[name] + ["data.channels=3", "train.max_minutes=0",
                                                    "train.precision=bf16"])
    tc = cfg.train

    def run(n: int, on_device: bool) -> float:
        loop.decides_on_device = (lambda s: True) if on_device else (lambda s: False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            out, _ = loop.train_step(state, task, tc)
            gate = out.finite if isinstance(out.finite, torch.Tensor) else None
            state.ema.update(state.model, gate)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    original = loop.decides_on_device
    assert original(state), "expected the device path on CUDA with fused AdamW"
    run(5, True), run(5, False)  # warm-up: kernels, allocator, cuDNN
    rows = {}
    for rep in range(2):  # interleaved, best of two
        for how, flag in (("device", True), ("host_check", False)):
            s = run(steps, flag)
            rows[how] = min(rows.get(how, s), s)
    loop.decides_on_device = lambda s: True
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            loop.train_step(state, task, tc)
        syncs = "none"
    except RuntimeError as e:
        syncs = str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        loop.decides_on_device = original
    return {"config": name + ", bf16, fused AdamW",
            "ms_per_step_device": 1000 * rows["device"],
            "ms_per_step_host_check": 1000 * rows["host_check"],
            "speedup": rows["host_check"] / rows["device"],
            "syncs_under_sync_debug_mode_error": syncs}


def grad_checkpointing(batch: int) -> list[dict]:
    from effusion.config import load_config
    from effusion.models import build_model

    cfg = load_config(None, ["data.image_size=64", "data.channels=3", "model.channels=128",
                             "model.channel_mult=[1,2,2,2]", "model.attention_resolutions=[16]",
                             "model.num_classes=0", "model.head_channels=64"])
    dev = torch.device("cuda")
    rows = []
    for mode in ("none", "blocks", "all"):
        torch.manual_seed(0)
        model = build_model(cfg).to(dev).train()
        model.grad_checkpointing = mode
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randn(batch, 3, 64, 64, device=dev)
        t = torch.randint(0, 1000, (batch,), device=dev)
        times = []
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for i in range(8):
            t0 = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16):
                loss = model(x, t).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in model.parameters())
        rows.append({"mode": mode, "params_M": params / 1e6, "batch": batch,
                     "peak_GiB": torch.cuda.max_memory_allocated() / 2 ** 30,
                     "ms_per_step": 1000 * sorted(times)[len(times) // 2]})
        del model, opt, x, t, loss
        torch.cuda.empty_cache()
    base = rows[0]
    for r in rows:
        r["memory_saved"] = 1 - r["peak_GiB"] / base["peak_GiB"]
        r["slowdown"] = r["ms_per_step"] / base["ms_per_step"] - 1
    return rows


def bucket_memory(steps: int) -> dict:
    """benchmarks/bucketing.py's three arms on the GPU: exact peak memory of a training
    step (torch.cuda.max_memory_allocated above the memory before the steps) and
    images/s, at a GPU-sized width (64) and batch (128), bf16."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bucketing

    from effusion.config import load_config
    from effusion.precision import Precision
    from effusion.train.loop import train_step

    out = {}
    for arm in ("bucket", "pad", "crop"):
        cfg = load_config(None, bucketing.BASE + bucketing.ARMS[arm] + [
            "model.channels=64", "model.head_channels=64", "train.batch_size=128",
            "train.device=cuda", "train.precision=bf16", "train.threads=0"])
        state, task, data = bucketing.state_and_task(cfg, bucketing.recipe_for(arm),
                                                     Precision(torch.device("cuda"), "bf16"))
        for _ in range(5):
            train_step(state, task, data.cfg.train)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        images, t0 = 0, time.perf_counter()
        for _ in range(steps):
            images += train_step(state, task, data.cfg.train)[0].images
        torch.cuda.synchronize()
        out[arm] = {"step_peak_MiB": (torch.cuda.max_memory_allocated() - base) / 2 ** 20,
                    "images_per_s": images / (time.perf_counter() - t0)}
        del state, task
        torch.cuda.empty_cache()
    b, p = out["bucket"], out["pad"]
    out["bucket_vs_pad"] = {"speed": b["images_per_s"] / p["images_per_s"] - 1,
                            "step_memory_saved": 1 - b["step_peak_MiB"] / p["step_peak_MiB"]}
    return out


def nccl_run(work: Path, steps: int) -> dict:
    sets = ["data.source=shapes:3000", "data.image_size=32", "data.channels=3",
            "data.aspect_ratios=[0.5,1,2]", "data.buckets=auto", "model.channels=64",
            "model.attention_resolutions=[8]", f"train.max_steps={steps}", "train.max_minutes=0",
            "train.progressive=[[16,0.3],[32,1.0]]", "train.sample_every=0"]
    args = [x for kv in sets for x in ("--set", kv)]
    out: dict = {}
    world1 = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": "29533"}
    for name, extra_env, extra in (("torchrun_nccl_world1", world1, []),
                                   ("torchrun_nccl_world1_fsdp", world1, ["--set", "train.parallel=fsdp"]),
                                   ("one_process", {}, [])):
        run = work / name
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **extra_env}
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "effusion", "train", "--quiet", "--fresh",
                            "--run", str(run), *args, *extra], env=env, capture_output=True, text=True,
                           timeout=400)
        row = {"rc": p.returncode, "seconds": time.perf_counter() - t0,
               "log": [l for l in (p.stdout + p.stderr).splitlines()
                       if l.startswith(("effusion:", "trained", "Traceback", "RuntimeError"))
                       or "Error" in l][-12:]}
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            lines = [json.loads(l) for l in metrics.read_text().splitlines()]
            ips = [m["images_per_s"] for m in lines if "images_per_s" in m]
            row["images_per_s_last"] = ips[-1] if ips else None
            row["train_size"] = [(m["step"], m["train_size"]) for m in lines if "train_size" in m]
        out[name] = row
    s = subprocess.run([sys.executable, "-m", "effusion", "sample", "--run",
                        str(work / "torchrun_nccl_world1"), "--n", "16", "--size", "24x48",
                        "--npy", str(work / "wide.npy"), "--out", str(work / "wide.png")],
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True,
                       text=True, timeout=200)
    out["sample_24x48"] = {"rc": s.returncode, "tail": (s.stdout + s.stderr).strip().splitlines()[-3:]}
    if s.returncode == 0:
        import numpy as np

        out["sample_24x48"]["shape"] = list(np.load(work / "wide.npy").shape)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/scale_gpu.json"))
    ap.add_argument("--work", default="/tmp/scale_gpu")
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--only", default="", help="run the checks whose name contains this")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/scale_gpu.py needs a CUDA GPU; this machine has none")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                             "cuda": torch.version.cuda}}
    for name, fn in (*[(f"sync_free_step {k}", lambda k=k: sync_free(10 if a.quick else 40, k))
                       for k in SYNC_CONFIGS],
                     ("grad_checkpointing_64px_w128", lambda: grad_checkpointing(32 if a.quick else 64)),
                     ("bucket_memory", lambda: bucket_memory(10 if a.quick else int(os.environ.get("BUCKET_STEPS", "60")))),
                     ("nccl_buckets_progressive", lambda: nccl_run(work, 60 if a.quick else 400))):
        if a.only not in name:
            continue
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # record and go on: one failing check must not hide the rest
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"\n== {name} ({time.perf_counter() - t0:.0f} s)\n{json.dumps(res[name], indent=1)}",
              flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
