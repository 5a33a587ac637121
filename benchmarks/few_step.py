"""One, two and four network calls per image against the default run, in one process
(issue 27): students of the default digits run, each distilled within its training time.

The default run is trained here for --train-minutes if --run does not exist yet, as
`effusion train` would; then, each pass for its own minutes (cumulative per chain):

  -gd        guidance distillation (Meng et al. 2023, stage 1): one call per step (--gd-minutes)
  -gd-s4     + progressive distillation 16 -> 8 -> 4 DDIM steps (Salimans & Ho 2022; --s4-minutes)
  -gd-s2     + one more round, 4 -> 2 (--s2-minutes)
  -gd-s1     + one more round, 2 -> 1 (--s1-minutes)
  -gd-cd     consistency distillation from -gd (Song et al. 2023, iCT's pair weights
             1/(sigma_{n+1} - sigma_n), Song & Dhariwal 2023; --cd-minutes), at 1 and 2 steps
  -gd-cdu    the same with uniform pair weights (the original CD), at 1 step

Every row: seconds for 1,000 class-conditional samples in-process (after one warm-up batch;
the median of --repeats timings), FID / class accuracy / recall in `effusion evaluate`'s
features, network calls per image and the distillation minutes spent to make it (wall
time measured here, loading and checkpoints included, cumulative from the default run; the
budgets default so that a whole chain costs no more than the training's wall time). `--format auto` then picks the engine of the 1- and
2-call students by measuring (its choice and timings go in the JSON), and with --avx2 the
students and the default are timed again in a subprocess under AVX2 emulation
(ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2: no AVX-512, no native bf16). Whole-process
figures: `effusion sample --n 1000` wall time and a cold start (load + one image).
Guidance sweep: every row is scored again at --guidance-sweep weights (default 1, 1.25,
1.5), since a guidance-distilled student guides harder than its teacher; the second table
compares each at its best weight (class accuracy >= 0.95) with the default's best.

    python benchmarks/few_step.py [--run runs/fs] [--work runs/fs-work] [--reuse] [--avx2]
    python benchmarks/few_step.py --sweep-only # the guidance sweep again, on the JSON's runs
    python benchmarks/few_step.py --markdown   # the docs table, from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from effusion.evaluate import evaluate_run
from effusion.precision import hardware as machine
from effusion.recipes import distill_guidance, distill_steps, feature_classifier

EMULATE = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
TIMER = """
import json, statistics, sys, time
from effusion.runs import load_run
from effusion.sampling import generate
out = {}
for spec in sys.argv[2:]:
    run_dir, steps, repeats = spec.rsplit(":", 2)
    run = load_run(run_dir)
    kw = {"steps": int(steps)}
    generate(run, 64, seed=1, **kw)  # warm-up
    ts = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter(); generate(run, int(sys.argv[1]), seed=0, **kw)
        ts.append(time.perf_counter() - t0)
    out[spec] = {"seconds": statistics.median(ts), "precision": run.precision.mode}
print(json.dumps(out))
"""


def time_runs(specs: list[tuple[Path, int, int]], n: int, env: dict[str, str] | None = None
              ) -> dict[str, dict]:
    """Seconds for `n` samples of each (run, steps, repeats), in a fresh process (with `env`
    added: the AVX2 emulation) so that every row sees the same machine state."""
    proc = subprocess.run([sys.executable, "-c", TIMER, str(n),
                           *(f"{r}:{s}:{k}" for r, s, k in specs)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def whole_process(run: Path, n: int) -> dict[str, float]:
    """`effusion sample --n N` wall time, and a cold start (imports, load, one image)."""
    from effusion.optimize.report import cold_start_seconds

    exe = Path(sys.executable).with_name("effusion")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([str(exe), "sample", "--run", str(run), "--n", str(n), "--out",
                        f"{tmp}/g.png"], check=True, capture_output=True)
        wall = time.perf_counter() - t0
    imports = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); "
                              "import effusion.runs, effusion.sampling; "
                              "print(time.perf_counter() - t)"], capture_output=True, text=True)
    return {"sample_cli_seconds": wall, "cold_start_seconds": cold_start_seconds(run),
            "import_seconds": float(imports.stdout.strip())}


def guidance_sweep(rows: list[dict], weights: list[float], n: int, features) -> None:
    """Score every row's run again at each guidance weight (its own 1.5 row is kept), into
    `row["guidance_sweep"]`: a guidance-distilled student guides harder than its teacher,
    so the weight the default uses is not the student's best one."""
    for r in rows:
        sweep = [{"guidance": 1.5, "fid": r["fid"], "class_accuracy": r["class_accuracy"],
                  "recall": r["recall"]}]
        for w in weights:
            if w == 1.5:
                continue
            e = evaluate_run(r["run"], n, steps=r["steps"], guidance=w, bpd_n=0,
                             features=features)
            sweep.append({"guidance": w, "fid": e["fid"], "class_accuracy": e["class_accuracy"],
                          "recall": e["recall"]})
            print(f"   {r['variant']} at guidance {w:g}: FID {e['fid']:.2f}, "
                  f"acc {e['class_accuracy']:.3f}", flush=True)
        r["guidance_sweep"] = sorted(sweep, key=lambda x: x["guidance"])


def best_guidance(r: dict) -> dict:
    """The sweep's best FID among the weights that keep class accuracy >= 0.95."""
    ok = [x for x in r["guidance_sweep"] if x["class_accuracy"] >= 0.95] or r["guidance_sweep"]
    return min(ok, key=lambda x: x["fid"])


def markdown(result: dict) -> str:
    avx2 = any("avx2_seconds_per_1000" in r for r in result["rows"])
    head = "| variant | calls / image | s / 1,000 | speed-up | FID | FID ratio | class acc. | recall | distillation min |"
    lines = [head + (" s / 1,000 AVX2 |" if avx2 else ""), "|---" * (9 + avx2) + "|"]
    for r in result["rows"]:
        cells = [r["variant"], str(r["calls_per_image"]), f"{r['seconds_per_1000']:.2f}",
                 f"{r['speedup']:.1f}x", f"{r['fid']:.1f}", f"{r['fid_ratio']:.2f}",
                 f"{r['class_accuracy']:.3f}", f"{r['recall']:.3f}",
                 f"{r['distill_minutes']:.1f}"]
        if avx2:
            v = r.get("avx2_seconds_per_1000")
            cells.append("" if v is None else f"{v:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    rows = [r for r in result["rows"] if "guidance_sweep" in r]
    if rows:
        weights = sorted({x["guidance"] for r in rows for x in r["guidance_sweep"]})
        ref = best_guidance(rows[0])["fid"]
        lines += ["", "Each at its best guidance weight (FID by weight; the best, among the "
                  "weights that keep class accuracy >= 0.95, in bold; ratio against the default's "
                  "best):", "",
                  "| variant | calls / image | " + " | ".join(f"FID at w={w:g}" for w in weights)
                  + " | best w | class acc. at best | FID ratio at best |",
                  "|---" * (5 + len(weights)) + "|"]
        for r in rows:
            b = best_guidance(r)
            by = {x["guidance"]: x for x in r["guidance_sweep"]}
            cells = [r["variant"], str(r["calls_per_image"])] + [
                "" if w not in by else (f"**{by[w]['fid']:.1f}**" if by[w] is b
                                        else f"{by[w]['fid']:.1f}") for w in weights]
            cells += [f"{b['guidance']:g}", f"{b['class_accuracy']:.3f}", f"{b['fid'] / ref:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/fs"))
    ap.add_argument("--train-minutes", type=float, default=11.0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--gd-minutes", type=float, default=2.5)
    ap.add_argument("--s4-minutes", type=float, default=3.5)
    ap.add_argument("--s2-minutes", type=float, default=1.5)
    ap.add_argument("--s1-minutes", type=float, default=1.5)
    ap.add_argument("--cd-minutes", type=float, default=7.0)
    ap.add_argument("--skip", type=int, default=25)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--avx2", action="store_true", help="time again under AVX2 emulation")
    ap.add_argument("--reuse", action="store_true", help="keep pass outputs already in --work")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/few_step.json"))
    ap.add_argument("--markdown", action="store_true", help="print the table from --json and exit")
    ap.add_argument("--guidance-sweep", default="1,1.25,1.5",
                    help="score every row again at these weights ('' = none)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the guidance sweep, on the runs the JSON names; merged into it")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.json.read_text())))
        return
    weights = [float(w) for w in args.guidance_sweep.split(",") if w.strip()]
    if args.sweep_only:
        from effusion.runs import load_run
        result = json.loads(args.json.read_text())
        features = feature_classifier(load_run(result["rows"][0]["run"]).config.data,
                                      progress=False)
        guidance_sweep(result["rows"], weights, result["n"], features)
        result["guidance_sweep_command"] = "python " + " ".join(sys.argv)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print("\n" + markdown(result))
        return
    work = args.work or args.run.parent
    work.mkdir(parents=True, exist_ok=True)

    def path(suffix: str) -> Path:
        return work / f"{args.run.name}{suffix}"

    train_info = None
    if not args.run.is_dir():
        from effusion.config import load_config
        from effusion.recipes import train

        print(f"-- training the default run for {args.train_minutes} min", flush=True)
        t0 = time.perf_counter()
        res = train(load_config(None, [f"train.max_minutes={args.train_minutes}"]), args.run,
                    progress=False)
        train_info = {"steps": res.step, "minutes": res.minutes,
                      "wall_minutes": (time.perf_counter() - t0) / 60}
    passes = [
        ("-gd", args.gd_minutes, lambda d: distill_guidance(args.run, d, minutes=args.gd_minutes,
                                                            fresh=True, progress=False)),
        ("-gd-s4", args.s4_minutes, lambda d: distill_steps(
            path("-gd"), d, steps=4, from_steps=16, minutes=args.s4_minutes, fresh=True,
            progress=False)),
        ("-gd-s2", args.s2_minutes, lambda d: distill_steps(
            path("-gd-s4"), d, steps=2, from_steps=4, minutes=args.s2_minutes, fresh=True,
            progress=False)),
        ("-gd-s1", args.s1_minutes, lambda d: distill_steps(
            path("-gd-s2"), d, steps=1, from_steps=2, minutes=args.s1_minutes, fresh=True,
            progress=False)),
        ("-gd-cd", args.cd_minutes, lambda d: distill_steps(
            path("-gd"), d, steps=1, method="consistency", skip=args.skip, weighting="ict",
            minutes=args.cd_minutes, fresh=True, progress=False)),
        ("-gd-cdu", args.cd_minutes, lambda d: distill_steps(
            path("-gd"), d, steps=1, method="consistency", skip=args.skip, weighting="uniform",
            minutes=args.cd_minutes, fresh=True, progress=False))]
    pass_seconds = {}
    for suffix, _, make in passes:
        if not (args.reuse and path(suffix).is_dir()):
            print(f"-- {path(suffix).name}", flush=True)
            t0 = time.perf_counter()
            make(path(suffix))
            pass_seconds[suffix] = time.perf_counter() - t0
    # distillation minutes: the wall time each pass took here (loading, checkpoints and
    # the final grid included), cumulative along its chain; a pass reused from --work
    # counts its budget instead (marked in the JSON)
    minutes = {s: pass_seconds[s] / 60 if s in pass_seconds else m for s, m, _ in passes}
    spent = {"": 0.0, "-gd": minutes["-gd"]}
    for s, base in (("-gd-s4", "-gd"), ("-gd-s2", "-gd-s4"), ("-gd-s1", "-gd-s2"),
                    ("-gd-cd", "-gd"), ("-gd-cdu", "-gd")):
        spent[s] = spent[base] + minutes[s]
    budgets = {s: m for s, m, _ in passes}

    from effusion.runs import load_run
    features = feature_classifier(load_run(args.run).config.data, progress=False)
    variants = [("default: DPM-Solver++ 25 steps, guidance 1.5", "", 25, 50),
                ("guidance distillation + progressive, 4 DDIM steps", "-gd-s4", 4, 4),
                ("guidance distillation + progressive, 2 DDIM steps", "-gd-s2", 2, 2),
                ("guidance distillation + progressive, 1 DDIM step", "-gd-s1", 1, 1),
                ("guidance distillation + consistency (iCT weights), 2 steps", "-gd-cd", 2, 2),
                ("guidance distillation + consistency (iCT weights), 1 step", "-gd-cd", 1, 1),
                ("guidance distillation + consistency (uniform weights), 1 step", "-gd-cdu", 1, 1)]
    print("-- timing (one fresh process)", flush=True)
    specs = [(path(s) if s else args.run, steps, 1 if calls > 10 else args.repeats)
             for _, s, steps, calls in variants]
    key = [f"{r}:{st}:{k}" for r, st, k in specs]
    timed = time_runs(specs, args.n)
    rows = []
    for (label, s, steps, calls), spec, k in zip(variants, specs, key):
        print(f"-- {label}", flush=True)
        r = evaluate_run(spec[0], args.n, steps=steps, bpd_n=0, features=features)
        rows.append({"variant": label, "run": str(spec[0]), "steps": steps, "sampler": r["sampler"],
                     "calls_per_image": calls,
                     "seconds_per_1000": timed[k]["seconds"] * 1000 / args.n,
                     "precision": timed[k]["precision"],
                     "fid": r["fid"], "class_accuracy": r["class_accuracy"], "recall": r["recall"],
                     "precision_metric": r["precision"], "distill_minutes": spent[s]})
        print(f"   {rows[-1]['seconds_per_1000']:.2f} s/1000, FID {r['fid']:.2f}, "
              f"acc {r['class_accuracy']:.3f}", flush=True)
    base = rows[0]
    for r in rows:
        r["speedup"] = base["seconds_per_1000"] / r["seconds_per_1000"]
        r["fid_ratio"] = r["fid"] / base["fid"]
    if weights:
        print("-- guidance sweep", flush=True)
        guidance_sweep(rows, weights, args.n, features)
    engines = {}
    from effusion.optimize.export import export_auto
    for s in ("-gd-s1", "-gd-s2"):
        out = path(s + "-auto")
        if out.exists():
            import shutil
            shutil.rmtree(out)
        print(f"-- --format auto for {path(s).name}", flush=True)
        rep = export_auto(path(s), out)
        engines[s] = {"chosen": rep["chosen"], "candidates": rep["candidates"]}
    avx2 = None
    if args.avx2:
        print("-- timing under AVX2 emulation", flush=True)
        avx2 = time_runs(specs, args.n, EMULATE)
        for r, k in zip(rows, key):
            r["avx2_seconds_per_1000"] = avx2[k]["seconds"] * 1000 / args.n
            r["avx2_precision"] = avx2[k]["precision"]
    print("-- whole process", flush=True)
    proc = {s or "default": whole_process(path(s) if s else args.run, args.n)
            for s in ("", "-gd-s1")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"command": "python " + " ".join(sys.argv), "commit": commit,
              "date": time.strftime("%Y-%m-%d"), "machine": machine(), "n": args.n,
              "train": train_info, "pass_seconds": pass_seconds,
              "pass_budget_minutes": budgets,
              "reused_passes": sorted(set(budgets) - set(pass_seconds)),
              "engines_auto": engines, "whole_process": proc, "rows": rows,
              "threads": torch.get_num_threads()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + markdown(result))
    print(json.dumps({"engines_auto": {k: v["chosen"] for k, v in engines.items()},
                      "whole_process": proc}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
