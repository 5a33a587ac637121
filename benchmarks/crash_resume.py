"""Crash-proven resume: SIGKILL a training run at random moments, resume it each time with
the very same command, and compare the end with an uninterrupted run.

    python benchmarks/crash_resume.py [--kills 10] [--steps 120] [--seed 0]
                                      [--json benchmarks/results/crash_resume.json]

The run is a small class-conditional U-Net in fp32 that exercises everything a resume must
restore: the shuffled data order and its loader thread (`train.workers=1`), the RNG streams
(timesteps, noise, label dropout), the optimizer (8-bit AdamW when bitsandbytes is
installed, its uint8 state and quantisation maps included; AdamW otherwise), the EMA, the
cosine LR schedule with warm-up, gradient accumulation (2 micro-batches, so kills land
mid-cycle) and a time budget (`train.max_minutes` with its step plan pinned by
`train.budget_steps`, so both runs have the same plan). A checkpoint every 3 steps makes
kills land during checkpoint writes; half of the kills wait for a checkpoint being written
(`checkpoints/step-*.tmp`) and strike then.

Reported: resumes that succeeded (the restarted command went on from a checkpoint, or
started over when none was written yet), the maximum absolute difference of the final
weights (model, EMA) and of the logged losses against the uninterrupted run. Target: every
resume succeeds and the weights are identical (0.0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def settings(steps: int, optimizer: str) -> list[str]:
    return ["data.source=mnist5k", "data.image_size=16", "data.limit=512",
            "model.channels=8", "model.channel_mult=[1,2]", "model.attention_resolutions=[]",
            "model.norm_groups=4", "model.head_channels=8", "diffusion.timesteps=100",
            "train.batch_size=16", "train.grad_accum=2", f"train.optimizer={optimizer}",
            "train.precision=fp32", "train.device=cpu", "train.threads=1", "train.workers=1",
            "train.warmup_steps=10", "train.max_steps=100000", "train.max_minutes=30",
            f"train.budget_steps={steps}", "train.checkpoint_every=3", "train.keep_checkpoints=2",
            "train.log_every=1", "train.sample_every=0", "train.sample_n=4", "train.ema_decay=0.99",
            "sample.steps=4"]


def command(run: Path, sets: list[str]) -> list[str]:
    args = [sys.executable, "-m", "effusion", "train", "--run", str(run), "--quiet"]
    for s in sets:
        args += ["--set", s]
    return args


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def weights(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


def final_checkpoint(run: Path) -> Path:
    ckpts = sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir() and "." not in p.name)
    return ckpts[-1]


def losses(run: Path) -> dict[int, float]:
    from effusion.runs import read_metrics

    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


def last_logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return -1
    step = -1
    for ln in path.read_text().splitlines():
        try:
            step = max(step, int(json.loads(ln).get("step", -1)))
        except ValueError:
            pass  # a line being written
    return step


def kill_once(cmd: list[str], run: Path, target: int, at_write: bool, rng: random.Random) -> dict:
    """Start `cmd` and SIGKILL it once it has logged step `target`: after a random extra
    0-0.3 s, or (`at_write`) the moment a checkpoint is being written after that."""
    out = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env())
    saw_tmp, strike_at = False, None
    while p.poll() is None:
        if strike_at is None:
            if last_logged_step(run) >= target:
                strike_at = time.perf_counter() + (0.0 if at_write else rng.uniform(0.0, 0.3))
            time.sleep(0.005)
            continue
        if at_write:
            if list((run / "checkpoints").glob("step-*.tmp")):
                saw_tmp = True
                break
            time.sleep(0.0002)
        elif time.perf_counter() >= strike_at:
            break
        else:
            time.sleep(0.005)
    finished = p.poll() is not None
    if not finished:
        p.send_signal(signal.SIGKILL)
    p.wait()
    out.seek(0)
    log = out.read().decode(errors="replace")
    reached = ("resuming" in log) or ("no checkpoint in" in log)
    return {"target_step": target, "at_s": round(time.perf_counter() - t0, 2), "killed": not finished,
            "during_checkpoint_write": saw_tmp, "returncode": p.returncode,
            "reached_training": reached,
            "resumed_from": next((ln.split(" from ")[1].split()[0] for ln in log.splitlines()
                                  if "resuming" in ln), None),
            "error": next((ln for ln in log.splitlines() if ln.startswith("error") or "Traceback" in ln), None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder for the two runs (default: a temp dir)")
    ap.add_argument("--json", default="benchmarks/results/crash_resume.json")
    a = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    import importlib.util

    from effusion.precision import hardware

    optimizer = "adamw8bit" if importlib.util.find_spec("bitsandbytes") else "adamw"
    work = Path(a.work or tempfile.mkdtemp(prefix="crash_resume_"))
    shutil.rmtree(work / "ref", ignore_errors=True)
    shutil.rmtree(work / "crash", ignore_errors=True)
    sets = settings(a.steps, optimizer)

    t0 = time.perf_counter()
    ref = subprocess.run(command(work / "ref", sets), capture_output=True, text=True, env=env())
    ref_s = time.perf_counter() - t0
    if ref.returncode:
        sys.exit(f"the uninterrupted run failed:\n{ref.stdout}\n{ref.stderr}")

    rng = random.Random(a.seed)
    kills = []
    targets = sorted(rng.sample(range(1, a.steps - 3), a.kills))
    for k, target in enumerate(targets):
        at_write = k % 2 == 1
        kills.append(kill_once(command(work / "crash", sets), work / "crash", target, at_write, rng))
        print(f"kill {k + 1}/{a.kills}: {kills[-1]}", flush=True)
    final = subprocess.run(command(work / "crash", sets), capture_output=True, text=True, env=env())
    if final.returncode:
        sys.exit(f"the final resume failed:\n{final.stdout}\n{final.stderr}")

    ra, rb = final_checkpoint(work / "ref"), final_checkpoint(work / "crash")
    diffs = {}
    for name in ("model", "ema", "optimizer"):
        wa, wb = weights(ra / f"{name}.safetensors"), weights(rb / f"{name}.safetensors")
        assert wa.keys() == wb.keys(), name
        diffs[name] = max(float((wa[k].double() - wb[k].double()).abs().max()) if wa[k].numel() else 0.0
                          for k in wa)
    la, lb = losses(work / "ref"), losses(work / "crash")
    loss_diff = max(abs(la[s] - lb[s]) for s in la) if la.keys() == lb.keys() else float("inf")
    # Process 0 starts the run; each later one (kills[1:], then the final command) is a
    # restart after a kill, by the same command.
    ok_resumes = sum(1 for k in kills[1:] if k["error"] is None)
    result = {
        "machine": hardware(), "optimizer": optimizer, "steps": a.steps, "kills": len(kills),
        "killed_mid_run": sum(k["killed"] for k in kills),
        "killed_during_checkpoint_write": sum(k["during_checkpoint_write"] for k in kills),
        "resumes_succeeded": ok_resumes + 1,  # + the final command, which ran to the end
        "resumes_attempted": len(kills),
        "resumes_that_reached_training": sum(k["reached_training"] for k in kills[1:]) + 1,
        "final_steps": {"reference": ra.name, "crashed": rb.name},
        "max_abs_diff": diffs, "max_abs_loss_diff": loss_diff,
        "logged_steps_equal": la.keys() == lb.keys(), "reference_seconds": round(ref_s, 1),
        "settings": sets, "kill_log": kills}
    print("\n| kills | during checkpoint write | resumes ok | max |Δ| model | EMA | optimizer | losses |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {len(kills)} | {result['killed_during_checkpoint_write']} | "
          f"{result['resumes_succeeded']}/{result['resumes_attempted']} | {diffs['model']:.3g} | "
          f"{diffs['ema']:.3g} | {diffs['optimizer']:.3g} | {loss_diff:.3g} |")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
