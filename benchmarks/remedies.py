"""The remedies table (issue 13): each typical training problem reproduced on our data, and
what its switch changes, with the seed-to-seed spread beside it.

    python benchmarks/remedies.py reproduce [--dir runs/rem] [--steps 500] [--only base,div,...]
    python benchmarks/remedies.py collect [--dir runs/rem] [--json benchmarks/results/remedies.json]
    python benchmarks/remedies.py overhead [--steps 6] [--rounds 3]

`reproduce` trains the arms (the default recipe at width 16, what the 11-minute budget
gives a 2-core AVX2 CPU; 500 steps; seeds 0 and 1 where it matters), each with the CLI
exactly as a user would, and scores them with `effusion evaluate` (JSON under DIR/logs):
  base-s{0,1}        the default recipe, with post-hoc EMA snapshots (train.posthoc_ema)
  div-s{0,1}         + train.diversity_weight=0.1
  ms-s0              + train.multiscale_weights=[1,0.5,0.25]
  feat-s0            + train.feature_loss_weight=0.1
  lt-none-s{0,1}     data.imbalance=50 (mnist5k, long-tailed)
  lt-inv-s{0,1}      data.imbalance=50 + train.reweight=inverse
base and div are scored at guidance 1.5, 3 and 5 (--guidance-sweep, 500 samples), the
long-tail arms per class (--per-class, 1,500 samples: 150 per class, above the 128
feature dimensions, so per-class FID is defined), and base's EMA length by --ema-sweep.
`collect` tabulates them with a verdict per metric: helps / hurts when the change exceeds
the spread between seeds of either arm (for rates, also two binomial standard errors),
else "within spread". `overhead` times a training step of each variant, interleaved in
one process (ratios, robust to a busy machine), for the equal-wall-time reading.

Guidance on a limited interval of noise levels (Kynkaanniemi et al. 2024), against
guidance at every step, at the high weights where guidance collapses diversity:

    python benchmarks/remedies.py guidance-interval --run RUN [--weights 3,5]
        [--interval 0.28,5.42] [--seeds 123,7] [--n 1000]
        [--json benchmarks/results/remedies_guidance_interval.json]
    python benchmarks/remedies.py guidance-interval --collect A.json B.json ...

The first form samples and scores each (weight, interval, seed) with `effusion evaluate`'s
own code (same seeds and classes for both arms); the second tabulates JSON documents that
`effusion evaluate --run RUN --guidance W --guidance-interval I --seed S --bpd-n 0 --json`
printed. Reported per weight: FID, precision, recall, coverage, class accuracy and sampling
seconds, each arm's mean over seeds with the seed-to-seed spread (max - min), and the
verdict: the interval helps a metric when its change exceeds both arms' spread (for rates,
at least two binomial standard errors at n).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

METRICS = ("fid", "precision", "recall", "coverage", "class_accuracy", "sample_seconds")
LOWER_IS_BETTER = {"fid", "sample_seconds"}
RATES = {"precision", "recall", "coverage", "class_accuracy"}  # fractions of n samples


def _machine() -> str:
    import platform

    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        have = set(next(line for line in text.splitlines() if line.startswith("flags")).split())
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have)
    except (OSError, StopIteration):
        pass
    import os
    return f"{platform.machine()} {os.cpu_count()} cores, flags: {flags or 'unknown'}"


def run_cells(run: str, weights: list[float], interval: tuple[float, float], seeds: list[int],
              n: int) -> list[dict]:
    from effusion.evaluate import evaluate_run

    rows = []
    for w in weights:
        for gi in ((), interval):
            for seed in seeds:
                r = evaluate_run(run, n, guidance=w, guidance_interval=gi, seed=seed, bpd_n=0)
                rows.append(r)
                print(f"w={w:g} interval={list(gi) or 'all'} seed={seed}: FID {r['fid']:.1f} "
                      f"recall {r['recall']:.3f}", flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["guidance"], tuple(r.get("guidance_interval") or ()))
        cells.setdefault(key, []).append(r)
    out = []
    for w in sorted({k[0] for k in cells}):
        arms = {k[1]: v for k, v in cells.items() if k[0] == w}
        if len(arms) != 2 or () not in arms:
            continue
        interval = next(k for k in arms if k)
        row = {"guidance": w, "interval": list(interval), "seeds": sorted(r["seed"] for r in arms[()])}
        for m in METRICS:
            a = [r[m] for r in arms[()]]
            b = [r[m] for r in arms[interval]]
            spread = max(max(a) - min(a), max(b) - min(b))
            if m in RATES:  # two seeds can agree by chance: also allow 2 binomial errors
                p = (statistics.mean(a) + statistics.mean(b)) / 2
                spread = max(spread, 2 * (p * (1 - p) / arms[()][0]["n"]) ** 0.5)
            delta = statistics.mean(b) - statistics.mean(a)
            better = -delta if m in LOWER_IS_BETTER else delta
            row[m] = {"everywhere": round(statistics.mean(a), 4), "interval": round(statistics.mean(b), 4),
                      "spread": round(spread, 4),
                      "verdict": ("helps" if better > spread else "hurts" if -better > spread
                                  else "within spread") if len(a) > 1 else "one seed"}
        out.append(row)
    floor = rows[0].get("real_floor", {}) if rows else {}
    return {"rows": out, "real_floor": {m: floor.get(m) for m in METRICS if m in floor},
            "run": rows[0]["run"] if rows else None, "n": rows[0]["n"] if rows else None}


def markdown(s: dict) -> str:
    lines = ["| guidance | metric | everywhere | interval " + "| spread | verdict |",
             "|---|---|---|---|---|---|"]
    for r in s["rows"]:
        for m in METRICS:
            c = r[m]
            lines.append(f"| {r['guidance']:g} | {m} | {c['everywhere']:.3f} | {c['interval']:.3f} "
                         f"{r['interval']} | {c['spread']:.3f} | {c['verdict']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ reproduce

BASE_SETTINGS = ["model.channels=16", "model.head_channels=16", "train.max_minutes=0",
                 "train.budget_min_steps=0", "train.sample_every=0",
                 "train.posthoc_ema=[0.05,0.1]", "train.posthoc_every=25"]
ARMS = {  # name: (seeds, extra settings, how it is scored)
    "base": ((0, 1), [], "guidance"),
    "div": ((0, 1), ["train.diversity_weight=0.1"], "guidance"),
    "ms": ((0,), ["train.multiscale_weights=[1,0.5,0.25]"], "plain"),
    "feat": ((0,), ["train.feature_loss_weight=0.1"], "plain"),
    "lt-none": ((0, 1), ["data.imbalance=50"], "per-class"),
    "lt-inv": ((0, 1), ["data.imbalance=50", "train.reweight=inverse"], "per-class"),
}
EMA_SIGMAS, EMA_DECAYS = "0.03,0.06,0.1,0.15,0.22", "0.999,0.9999,0.99999"


def reproduce(root: Path, steps: int, only: list[str]) -> None:
    import subprocess

    cli = [sys.executable, "-m", "effusion"]
    logs = root.parent / (root.name + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    for arm in only:
        seeds, extra, how = ARMS[arm]
        for seed in seeds:
            name = f"{arm}-s{seed}"
            sets = [x for kv in BASE_SETTINGS + [f"train.max_steps={steps}", f"train.seed={seed}"]
                    + extra for x in ("--set", kv)]
            subprocess.run(cli + ["train", "--quiet", "--run", str(root / name)] + sets, check=True)
            ev = cli + ["evaluate", "--run", str(root / name), "--json"]
            if how == "guidance":
                jobs = [("gs", ["--guidance-sweep", "1.5,3,5", "--n", "500"])]
                if arm == "base":
                    jobs.append(("ema", ["--ema-sweep", EMA_SIGMAS, "--ema-decays", EMA_DECAYS,
                                         "--n", "500"]))
            elif how == "per-class":
                jobs = [("pc", ["--per-class", "--n", "1500", "--bpd-n", "0"])]
            else:
                jobs = [("ev", ["--n", "500", "--bpd-n", "0"])]
            for tag, args in jobs:
                with open(logs / f"{tag}-{name}.json", "w") as f:
                    subprocess.run(ev + args, check=True, stdout=f)


# ------------------------------------------------------------------------ collect

def _verdict(a: list[float], b: list[float], metric: str, n: int) -> tuple[float, str]:
    """(spread, verdict) of arm b against arm a (each a list over seeds)."""
    spread = max(max(a) - min(a), max(b) - min(b))
    if metric in RATES or metric.endswith(tuple(RATES)):
        p = (statistics.mean(a) + statistics.mean(b)) / 2
        spread = max(spread, 2 * (p * (1 - p) / n) ** 0.5)
    if len(a) < 2 and len(b) < 2:
        return spread, "one seed"
    delta = statistics.mean(b) - statistics.mean(a)
    better = -delta if _lower_better(metric) else delta
    return spread, ("helps" if better > spread else "hurts" if -better > spread else "within spread")


def _lower_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER or metric.endswith(("fid", "kid"))


def _compare(a: list[dict], b: list[dict], metrics: tuple[str, ...], n: int,
             spread_from: list[dict] | None = None) -> dict:
    """Per metric: arm means, spread, verdict. `spread_from`: a two-seed arm whose spread
    stands in when both arms here have one seed (the single-seed rows)."""
    out = {}
    for m in metrics:
        va, vb = [r[m] for r in a if r.get(m) is not None], [r[m] for r in b if r.get(m) is not None]
        if not va or not vb:
            continue
        spread, verdict = _verdict(va, vb, m, n)
        if spread_from is not None and len(vb) < 2:  # the base seeds' spread stands in
            vs = [r[m] for r in spread_from]
            spread = _verdict(vs, vs, m, n)[0]
            delta = statistics.mean(vb) - statistics.mean(va)
            better = -delta if _lower_better(m) else delta
            verdict = ("helps" if better > spread else "hurts" if -better > spread
                       else "within spread") + " (one seed; spread of the two base seeds)"
        out[m] = {"before": round(statistics.mean(va), 4), "after": round(statistics.mean(vb), 4),
                  "spread": round(spread, 4), "verdict": verdict}
    return out


def _load(logs: Path, pattern: str) -> list[dict]:
    """The finished JSON documents matching `pattern` (one still being written is skipped)."""
    out = []
    for p in sorted(logs.glob(pattern)):
        try:
            out.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            print(f"skipped {p}: empty or incomplete (still running?)", file=sys.stderr)
    return out


def collect(root: Path) -> dict:
    logs = root.parent / (root.name + "-logs")
    rows: dict = {}
    # EMA length: post-hoc sweep on both base seeds
    ema = _load(logs, "ema-base-s*.json")
    if ema:
        names = [r["ema"] for r in ema[0]["sweep"]]
        table = {}
        for name in names:
            cells = [next(r for r in e["sweep"] if r["ema"] == name) for e in ema]
            table[name] = {m: round(statistics.mean(c[m] for c in cells), 4)
                           for m in ("fid", "precision", "recall", "class_accuracy")}
            table[name]["fid_per_seed"] = [round(c["fid"], 2) for c in cells]
            if cells[0].get("residual") is not None:
                table[name]["fit_residual"] = round(max(c["residual"] for c in cells), 4)
        posthoc = [k for k in table if k.startswith("sigma_rel")]
        best = min(posthoc, key=lambda k: table[k]["fid"]) if posthoc else None
        tracked = names[0]
        cmp = {}
        if best:
            a = [next(r for r in e["sweep"] if r["ema"] == tracked) for e in ema]
            b = [next(r for r in e["sweep"] if r["ema"] == best) for e in ema]
            seeds = [next(r for r in g["sweep"] if r["guidance"] == a[0]["guidance"])
                     for g in _load(logs, "gs-base-s*.json")]  # the two seeds' spread
            cmp = _compare(a, b, ("fid", "precision", "recall", "class_accuracy"), ema[0]["n"],
                           spread_from=seeds if len(ema) < 2 and len(seeds) > 1 else None)
        rows["ema"] = {"table": table, "best_posthoc": best, "tracked": tracked,
                       "best_vs_tracked": cmp, "steps": ema[0]["step"], "n": ema[0]["n"]}
    # diversity: base vs div at each guidance weight
    base, div = _load(logs, "gs-base-s*.json"), _load(logs, "gs-div-s*.json")
    if base and div:
        rows["diversity"] = {}
        for w in [r["guidance"] for r in base[0]["sweep"]]:
            a = [next(r for r in g["sweep"] if r["guidance"] == w) for g in base]
            b = [next(r for r in g["sweep"] if r["guidance"] == w) for g in div]
            rows["diversity"][str(w)] = _compare(
                a, b, ("fid", "precision", "recall", "coverage", "class_accuracy"), base[0]["n"])
    # blur: multi-scale and feature losses at guidance 1.5 (one seed each; base's spread)
    if base:
        a = [next(r for r in g["sweep"] if r["guidance"] == 1.5) for g in base]
        for arm in ("ms", "feat"):
            b = _load(logs, f"ev-{arm}-s*.json")
            if b:
                rows[arm] = _compare(a[:1], b, ("fid", "precision", "recall", "class_accuracy"),
                                     base[0]["n"], spread_from=a)
    # long tail: per-class, none vs inverse reweighting
    none, inv = _load(logs, "pc-lt-none-s*.json"), _load(logs, "pc-lt-inv-s*.json")
    if none and inv:
        def flat(doc: dict) -> dict:
            pc = doc["per_class"]
            out = {"fid": doc["fid"], "class_accuracy": doc["class_accuracy"], "recall": doc["recall"]}
            for g in ("head", "tail"):
                for m in ("fid", "kid", "class_accuracy", "recall", "precision"):
                    out[f"{g}_{m}"] = pc[g][m]
            return out
        a, b = [flat(d) for d in none], [flat(d) for d in inv]
        metrics = tuple(a[0])
        n_tail = sum(none[0]["per_class"]["classes"][c]["n"] for c in none[0]["per_class"]["groups"]["tail"])
        lt = _compare(a, b, metrics, n_tail)
        head_loss = lt["head_class_accuracy"]["before"] - lt["head_class_accuracy"]["after"]
        tail_gain = lt["tail_class_accuracy"]["after"] - lt["tail_class_accuracy"]["before"]
        rows["long_tail"] = {"metrics": lt, "groups": none[0]["per_class"]["groups"],
                             "head_accuracy_lost": round(head_loss, 4),
                             "tail_accuracy_gained": round(tail_gain, 4),
                             "per_class": {"none": [d["per_class"]["classes"] for d in none],
                                           "inverse": [d["per_class"]["classes"] for d in inv]}}
    return rows


def collect_markdown(rows: dict) -> str:
    out = []
    if "ema" in rows:
        e = rows["ema"]
        out += [f"EMA length at step {e['steps']} (mean of seeds; n={e['n']}):", "",
                "| EMA | FID | per seed | precision | recall | fit residual |", "|---|---|---|---|---|---|"]
        for k, v in e["table"].items():
            out.append(f"| {k}{' (best post-hoc)' if k == e['best_posthoc'] else ''} | "
                       f"{v['fid']:.2f} | {v['fid_per_seed']} | {v['precision']:.3f} | "
                       f"{v['recall']:.3f} | {v.get('fit_residual', '-')} |")
        out.append("")
    def block(title: str, cmp: dict) -> None:
        out.extend([title, "", "| metric | before | after | spread | verdict |", "|---|---|---|---|---|"])
        out.extend(f"| {m} | {c['before']:.4f} | {c['after']:.4f} | {c['spread']:.4f} | {c['verdict']} |"
                   for m, c in cmp.items())
        out.append("")
    if "ema" in rows and rows["ema"]["best_vs_tracked"]:
        block("Best post-hoc EMA against the run's own EMA:", rows["ema"]["best_vs_tracked"])
    for w, cmp in rows.get("diversity", {}).items():
        block(f"Diversity regularizer at guidance {w}:", cmp)
    for arm, title in (("ms", "Multi-scale loss [1, 0.5, 0.25]"), ("feat", "Feature loss 0.1")):
        if arm in rows:
            block(f"{title} at guidance 1.5:", rows[arm])
    if "long_tail" in rows:
        lt = rows["long_tail"]
        block(f"Long tail R=50, inverse reweighting (head {lt['groups']['head']}, tail "
              f"{lt['groups']['tail']}):", lt["metrics"])
        out.append(f"head accuracy lost {lt['head_accuracy_lost']:.4f}, tail accuracy gained "
                   f"{lt['tail_accuracy_gained']:.4f}")
    return "\n".join(out)


# ------------------------------------------------------------------------ overhead

def overhead(steps: int, rounds: int) -> dict:
    """Seconds per training step of each variant at the remedies' settings (width 16,
    batch 128, 28 px), timed in interleaved rounds in this one process; median per variant."""
    import time

    import torch

    from effusion.config import load_config
    from effusion.data import load_source, to_model_range
    from effusion.diffusion import schedule_for
    from effusion.models import build_model
    from effusion.precision import Precision
    from effusion.recipes.generative import x0_terms
    from effusion.train.objective import diffusion_loss

    cfg = load_config(None, BASE_SETTINGS + ["model.num_classes=10", "train.precision=fp32"])
    data = load_source(cfg.data)
    prec = Precision(torch.device("cpu"), "fp32")
    schedule = schedule_for(cfg)
    variants = {"base": [], "diversity 0.1": ["train.diversity_weight=0.1"],
                "multiscale [1,0.5,0.25]": ["train.multiscale_weights=[1,0.5,0.25]"],
                "feature 0.1": ["train.feature_loss_weight=0.1"]}
    setups = {}
    for name, extra in variants.items():
        c = load_config(None, BASE_SETTINGS + ["model.num_classes=10", "train.precision=fp32"] + extra)
        torch.manual_seed(0)
        model = build_model(c)
        setups[name] = (model, torch.optim.AdamW(model.parameters(), 1e-3), x0_terms(c, prec.device))
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (model, opt, terms) in setups.items():
            t0 = time.perf_counter()
            for i in range(steps):
                idx = torch.randint(0, len(data), (128,), generator=gen)
                x0, y = to_model_range(data.images[idx]), data.labels[idx]
                loss = diffusion_loss(model, x0, y, cfg.diffusion, schedule, gen, prec,
                                      cond_drop=0.1, null_class=10, terms=terms)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if r:
                times[name].append((time.perf_counter() - t0) / steps)
    base = statistics.median(times["base"])
    return {name: {"s_per_step": round(statistics.median(t), 4),
                   "ratio": round(statistics.median(t) / base, 3)} for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("reproduce")
    rp.add_argument("--dir", default="runs/rem")
    rp.add_argument("--steps", type=int, default=500)
    rp.add_argument("--only", default=",".join(ARMS))
    co = sub.add_parser("collect")
    co.add_argument("--dir", default="runs/rem")
    co.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "remedies.json"))
    ov = sub.add_parser("overhead")
    ov.add_argument("--steps", type=int, default=6)
    ov.add_argument("--rounds", type=int, default=3)
    ov.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "remedies_overhead.json"))
    gi = sub.add_parser("guidance-interval")
    gi.add_argument("--run")
    gi.add_argument("--weights", default="3,5")
    gi.add_argument("--interval", default="0.28,5.42")
    gi.add_argument("--seeds", default="123,7")
    gi.add_argument("--n", type=int, default=1000)
    gi.add_argument("--collect", nargs="+", help="JSON documents from `effusion evaluate --json`")
    gi.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "remedies_guidance_interval.json"))
    a = ap.parse_args()
    if a.cmd == "reproduce":
        return reproduce(Path(a.dir), a.steps, [x for x in a.only.split(",") if x])
    if a.cmd in ("collect", "overhead"):
        rows = collect(Path(a.dir)) if a.cmd == "collect" else overhead(a.steps, a.rounds)
        doc = {"command": " ".join(sys.argv), "machine": _machine(), **rows}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(doc, indent=1))
        if a.cmd == "collect":
            print(collect_markdown(rows))
        else:
            print("| variant | s/step | x base |\n|---|---|---|")
            for k, v in rows.items():
                print(f"| {k} | {v['s_per_step']:.3f} | {v['ratio']:.2f} |")
        print(f"wrote {a.json}")
        return
    if a.collect:
        rows = [json.loads(Path(p).read_text()) for p in a.collect]
    elif a.run:
        lo, hi = (float(v) for v in a.interval.split(","))
        rows = run_cells(a.run, [float(w) for w in a.weights.split(",")], (lo, hi),
                         [int(s) for s in a.seeds.split(",")], a.n)
    else:
        ap.error("give --run or --collect")
    s = summarize(rows)
    s["command"] = " ".join(sys.argv)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({**s, "cells": [{k: r.get(k) for k in (
        "run", "guidance", "guidance_interval", "seed", "n", *METRICS)} for r in rows]}, indent=1))
    print(markdown(s))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
