"""Walk effusion's CUDA paths end to end on a GPU machine and record what happened.

CI has no GPU, so this is the check that the CUDA code paths (bf16 / fp16 autocast with
GradScaler, TF32, fused AdamW, torch.compile, CUDA RNG state in checkpoints, sampling,
evaluation, the optimize passes) really run, and what they cost there. Each step is one
CLI command in a fresh process, as a user would type it:

    python benchmarks/cuda_check.py [--work /tmp/cuda_check] [--json results/cuda_check.json]

Every step's exit code, wall time and the figures it prints (images/s, FID, class accuracy)
go into the JSON; the table goes to stdout. A step that fails does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


SKIP: set[str] = set()


def run(name: str, args: list[str], timeout: float, results: list[dict]) -> dict | None:
    if name in SKIP:
        return None
    cmd = [sys.executable, "-m", "effusion", *args]
    print(f"\n=== {name}: effusion {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:  # its stdout may be bytes even with text=True
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, err = 124, "timeout"
    wall = time.perf_counter() - t0
    tail = (out + "\n" + err).strip().splitlines()[-12:]
    print("\n".join(tail), flush=True)
    row = {"step": name, "command": "effusion " + " ".join(args), "rc": rc, "seconds": round(wall, 1),
           "tail": tail}
    if "--json" in args and rc == 0:
        try:
            row["json"] = json.loads(out)
        except json.JSONDecodeError:
            row["json_error"] = "stdout was not one JSON document"
    results.append(row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/cuda_check")
    ap.add_argument("--json", default="benchmarks/results/cuda_check.json")
    ap.add_argument("--train-steps", type=int, default=1000)
    ap.add_argument("--skip", default="", help="comma list of step names to leave out")
    a = ap.parse_args()
    SKIP.update(filter(None, a.skip.split(",")))

    import torch

    if not torch.cuda.is_available():
        sys.exit("cuda_check: no CUDA device here; run it on a GPU machine")
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
           "bf16": torch.cuda.is_bf16_supported(), "cpu_count": os.cpu_count()}
    print(env, flush=True)
    res: list[dict] = []
    r, w = str(work / "r"), str(work)
    steps = a.train_steps
    # 1. The efficiency switches, each in a fresh process (bf16, fp16 + GradScaler, TF32,
    #    channels_last, compile, fused AdamW is the CUDA default).
    run("bench", ["bench", "train", "--steps", "40", "--warmup", "10", "--only",
                  "bf16,fp16,tf32,channels_last,compile,fastest", "--out", f"{w}/bench", "--json"], 420, res)
    # 2. The default recipe on CUDA (precision auto -> bf16), to a fixed step count.
    run("train default", ["train", "--run", r, "--quiet", "--set", f"train.max_steps={steps}",
                          "--set", "train.max_minutes=0"], 600, res)
    # 3. Resume on CUDA: the CUDA RNG state and fused optimizer state round-trip.
    run("resume", ["train", "--run", r, "--resume", "--quiet", "--set", f"train.max_steps={steps + 100}",
                   "--set", "train.max_minutes=0"], 300, res)
    run("sample 1000", ["sample", "--run", r, "--n", "1000", "--out", f"{w}/grid.png"], 300, res)
    run("evaluate", ["evaluate", "--run", r, "--n", "1000", "--json"], 400, res)
    # 4. fp16 autocast + GradScaler to the end of a short run.
    run("train fp16", ["train", "--run", f"{w}/r16", "--quiet", "--set", "train.precision=fp16",
                       "--set", "train.max_steps=300", "--set", "train.max_minutes=0"], 300, res)
    run("sample fp16", ["sample", "--run", f"{w}/r16", "--n", "256", "--precision", "fp16",
                        "--out", f"{w}/grid16.png"], 300, res)
    # 5. The optimize passes on CUDA.
    run("distill-guidance", ["optimize", "distill-guidance", "--run", r, "--out", f"{w}/gd", "--minutes", "0.5",
                             "--quiet"], 300, res)
    run("distill-steps", ["optimize", "distill-steps", "--run", f"{w}/gd", "--out", f"{w}/s4", "--steps", "4",
                          "--minutes", "1", "--quiet"], 300, res)
    run("evaluate s4", ["evaluate", "--run", f"{w}/s4", "--n", "1000", "--json"], 300, res)
    run("prune", ["optimize", "prune", "--run", r, "--out", f"{w}/p", "--ratio", "0.3",
                  "--finetune-minutes", "0.5", "--quiet", "--json"], 300, res)
    run("report", ["optimize", "report", r, f"{w}/s4", f"{w}/p", "--n", "256", "--no-cold-start",
                   "--out", f"{w}/report.json", "--json"], 400, res)

    print("\n| step | rc | seconds |\n|---|---|---|")
    for row in res:
        print(f"| {row['step']} | {row['rc']} | {row['seconds']} |")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "steps": res}, indent=1))
    if os.environ.get("OUT"):  # the device machine's folder that comes back
        if out.resolve().parent != Path(os.environ["OUT"]).resolve():
            shutil.copy(out, Path(os.environ["OUT"]) / out.name)
        for f in ("grid.png", "grid16.png"):
            if (work / f).exists():
                shutil.copy(work / f, Path(os.environ["OUT"]) / f)


if __name__ == "__main__":
    main()
