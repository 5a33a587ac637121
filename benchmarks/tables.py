"""The measured tables of the docs, rendered from their JSON in benchmarks/results/.

A page holds a generated table between two markers:

    <!-- table: colour_recipe -->
    ...generated: the table, then one line naming the JSON, command, machine, commit, date...
    <!-- /table -->

    python benchmarks/tables.py            # rewrite every marked table in docs/ and README.md
    python benchmarks/tables.py --check    # exit 1 naming each table that differs from its JSON

`tests/test_docs.py` runs the check, so a page cannot drift from its measurement. Each
renderer below reads one JSON file; the JSON carries the command, the git commit, the
machine (CPU flags, torch) and the date, and the line under each table says them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"(<!-- table: (?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _bench(name: str):
    """A benchmark script as a module (for its `markdown`), without running it."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def machine_line(m: dict) -> str:
    """CPU, cores and the flags the figures depend on, e.g. 'AMD EPYC, 2 cores, AVX-512 BF16'."""
    if m.get("gpus"):
        return f"{m['gpus'][0] if isinstance(m['gpus'][0], str) else m['gpus'][0].get('name')}"
    isa = "AVX-512 BF16" if m.get("avx512_bf16") else ("AVX-512" if m.get("avx512f") else "AVX2")
    if m.get("amx_bf16"):
        isa += " + AMX"
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {isa}, torch {m.get('torch', '?')}"


def provenance(path: Path, obj: dict, command: str | None = None) -> str:
    parts = [f"`{path.relative_to(ROOT)}`"]
    cmd = command or obj.get("command")
    if cmd:
        parts.append(f"`{cmd}`")
    if obj.get("machine"):
        parts.append(machine_line(obj["machine"]))
    for k in ("commit", "date"):
        if obj.get(k):
            parts.append(f"{k} {obj[k]}")
    return "*From " + "; ".join(parts) + ".*"


def colour_recipe() -> str:
    path = RESULTS / "colour_recipe.json"
    d = json.loads(path.read_text())
    rows = d["rows"]
    floor = next(iter(rows.values()))["real_floor"]
    out = ["| variant (11 min each) | flags | width | steps | images/s | FID ↓ | KID ↓ | "
           "precision | recall | class acc. | near copies (features / pixels) | measured at |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|",
           f"| real floor | | | | | {floor['fid']:.1f} | {floor['kid']:.3f} | {floor['precision']:.3f} | "
           f"{floor['recall']:.3f} | {floor['class_accuracy']:.3f} | | |"]
    for name, r in rows.items():
        mem = r["memorisation"]
        flags = " ".join(f"`{f}`" for f in r["flags"]) or "none"
        out.append(f"| {'**' + name + '**' if name == 'default' else name} | {flags} | "
                   f"{r['model_channels']} | {r['steps']:,} | {r['images_per_s']:.0f} | "
                   f"{r['fid']:.1f} | {r['kid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                   f"{r['class_accuracy']:.3f} | {mem['features']['copies']:.1%} / "
                   f"{mem['pixels']['copies']:.1%} | {r['commit']}, {r['cpu_flags']} |")
    cmd = f"python benchmarks/colour_recipe.py --data {d['data']} --minutes {d['minutes']:g} --variants ..."
    return "\n".join(out) + "\n\n" + provenance(path, d, cmd)


def _batches(sizes: dict[str, int]) -> str:
    """{'<=1.0': 4, '<=64.0': 2} -> '2x≤1, 4x≤64' (ascending bucket)."""
    items = sorted(((float(k.lstrip("<=")), v) for k, v in sizes.items()))
    return ", ".join(f"{v}x≤{b:g}" for b, v in items)


def serve_load(files: list[tuple[str, list[str]]], bullets: tuple[str, ...]) -> Callable[[], str]:
    """The load tables of docs/serving.md: `files` = (JSON name, a label per run in it);
    rows by run, then server mode, then clients; the in-process rates of the JSONs named in
    `bullets` go above the table."""
    def render() -> str:
        head, rows, notes = [], [], []
        for name, labels in files:
            path = RESULTS / f"{name}.json"
            d = json.loads(path.read_text())
            for label, run in zip(labels, d["runs"]):
                ip = run["in_process_images_per_s"]
                if name in bullets:
                    head.append(f"- In-process sampler, {label}, images/s at batch 1 / 8 / 32: "
                                f"**{ip['1']:.2f} / {ip['8']:.2f} / {ip['32']:.2f}**.")
                for mode, server in (("dynamic", "dynamic"), ("max_batch_1", "`--max-batch 1`")):
                    for lv in run[mode]:
                        errors = sum(n for code, n in lv["status"].items() if code != "200")
                        rows.append(f"| {label} | {server} | {lv['clients']} | "
                                    f"{lv['images_per_s']:.2f} | {lv['p50_ms']:.0f} | "
                                    f"{lv['p95_ms']:.0f} | {lv['p99_ms']:.0f} | "
                                    f"{_batches(lv['batch_sizes'])} | {errors} |")
            notes.append(provenance(path, d, "python " + d["command"].split(" --json")[0]))
        table = ["| run | server | clients | images/s | p50 ms | p95 ms | p99 ms | "
                 "batches (count x size bucket) | errors |", "|---|---|---|---|---|---|---|---|---|"]
        return "\n".join((head + [""] if head else []) + table + rows) + "\n\n" + "\n\n".join(notes)
    return render


BUCKET_ARMS = {"bucket": ("buckets (`data.buckets=auto`: 24x24, 16x32, 32x16)", "one bucket, whole images"),
               "pad": ("pad to the largest bucket (32x32, letterboxed)", "mixed, whole images + black bars"),
               "crop": ("centre-crop to 24x24 (the square pipeline)",
                        "mixed, {cut} of the pixels cut away")}


def bucketing() -> str:
    path = RESULTS / "bucketing.json"
    d = json.loads(path.read_text())
    cut = d["crop_cuts_share_of_pixels"]
    out = ["| arm | what a batch holds | images/s | step memory | steps | FID vs its own view |",
           "|---|---|---|---|---|---|"]
    for name, (arm, holds) in BUCKET_ARMS.items():
        r = d["arms"][name]
        holds = holds.format(cut="a third" if abs(cut - 1 / 3) < 0.01 else f"{cut:.0%}")
        out.append(f"| {arm} | {holds} | {r['images_per_s']:.0f} | {r['step_peak_MiB']:.0f} MiB | "
                   f"{r['steps']} | {r['fid']:.1f} |")
    v = d["bucket_vs_pad"]
    out += ["", f"Buckets against padding: **{v['speed']:+.0%} images/s and "
            f"{v['step_memory_saved']:.0%} less step memory** (quoted: {v['quoted']})."]
    return "\n".join(out) + "\n\n" + provenance(path, d)


def projection() -> str:
    path = RESULTS / "distributed.json"
    d = json.loads(path.read_text())
    p = d["projection"]
    out = ["| GPUs | all-reduce | speed-up | per-rank RNG of the global batch (measured on this CPU) "
           "| speed-up with it |", "|---|---|---|---|---|"]
    for r in p["rows"]:
        out.append(f"| {r['gpus']} | {r['allreduce_ms']:.2f} ms | {r['speedup_comm_exposed']:.1f}x | "
                   f"{r['extra_rng_ms_per_step']:.0f} ms | {r['speedup_with_exact_rng']:.1f}x |")
    note = (f"*{p['label']}: step {p['step_s'] * 1000:.0f} ms, {p['model_params'] / 1e6:.2f}M "
            f"parameters; from `{path.relative_to(ROOT)}`; `python {d['command']}`; the RNG "
            f"column measured on {d['machine']}.*")
    return "\n".join(out) + "\n\n" + note


def guidance_sweep_demo() -> str:
    path = RESULTS / "guidance_sweep_demo.json"
    d = json.loads(path.read_text())
    names = {0.0: "0 (unconditional branch)", 1.0: "1 (conditional)", 1.5: "**1.5 (default)**"}
    best = min(d["sweep"], key=lambda r: r["fid"])
    out = ["| guidance w | class accuracy ↑ | FID ↓ | KID ↓ | precision ↑ | recall ↑ | coverage ↑ |",
           "|---|---|---|---|---|---|---|"]
    for r in d["sweep"] + [dict(d["real_floor"], guidance=None)]:
        w = r["guidance"]
        label = "real floor" if w is None else names.get(w, f"{w:g}")
        acc = f"{r['class_accuracy']:.3f}"
        fid = f"{r['fid']:.1f}"
        out.append(f"| {label} | {'**' + acc + '**' if w == 1.5 else acc} | "
                   f"{'**' + fid + '**' if r is best else fid} | {r['kid']:.0f} | "
                   f"{r['precision']:.3f} | {r['recall']:.3f} | {r['coverage']:.3f} |")
    cmd = (f"effusion evaluate --run {d['run']} --guidance-sweep "
           + ",".join(f"{r['guidance']:g}" for r in d["sweep"]))
    return "\n".join(out) + "\n\n" + provenance(path, d, cmd) + (
        f" *(run at step {d['step']}, {d['n']:,} samples per weight, seed {d['seed']}.)*")


def crash_resume() -> str:
    path = RESULTS / "crash_resume.json"
    d = json.loads(path.read_text())
    diff = d["max_abs_diff"]
    out = ["| kills | of them during a checkpoint write | resumes that succeeded | max abs diff: "
           "model | EMA | optimizer state | logged losses |", "|---|---|---|---|---|---|---|",
           f"| {d['kills']} | {d['killed_during_checkpoint_write']} | {d['resumes_succeeded']}/"
           f"{d['resumes_attempted']} | {diff['model']} | {diff['ema']} | {diff['optimizer']} | "
           f"{d['max_abs_loss_diff']} |", "",
           f"(optimizer `{d['optimizer']}`, {d['steps']} steps; the uninterrupted run took "
           f"{d['reference_seconds']:.1f} s including process start.)"]
    cmd = f"python benchmarks/crash_resume.py --kills {d['kills']} --steps {d['steps']}"
    return "\n".join(out) + "\n\n" + provenance(path, d, cmd)


def feature_ranking(source: str) -> Callable[[], str]:
    def render() -> str:
        path = RESULTS / "feature_ranking.json"
        entry = json.loads(path.read_text())[source]
        return _bench("feature_ranking").markdown(entry) + "\n\n" + provenance(path, entry)
    return render


def diffusers_interop(name: str = "diffusers_interop") -> Callable[[], str]:
    def render() -> str:
        path = RESULTS / f"{name}.json"
        d = json.loads(path.read_text())
        return _bench("diffusers_interop").markdown(d) + "\n\n" + provenance(path, d)
    return render


def few_step() -> str:
    path = RESULTS / "few_step.json"
    d = json.loads(path.read_text())
    return _bench("few_step").markdown(d) + "\n\n" + provenance(path, d)


def recipe_default() -> str:
    path = RESULTS / "recipe_default.json"
    d = json.loads(path.read_text())
    e, w, f = d["evaluate"], d["width32_same_machine"]["evaluate"], d["evaluate"]["real_floor"]
    steps_w = w["step"]
    mins = d["train"]["elapsed_s"] / 60

    def kid(r):
        return f"{r['kid']:.0f} ± {r['kid_std']:.0f}"

    rows = [("FID ↓", f"**{e['fid']:.1f}**", f"{w['fid']:.1f}", f"{f['fid']:.1f}"),
            ("KID ↓", kid(e), kid(w), kid(f)),
            ("precision ↑", f"{e['precision']:.3f}", f"{w['precision']:.3f}", f"{f['precision']:.3f}"),
            ("recall ↑", f"{e['recall']:.3f}", f"{w['recall']:.3f}", f"{f['recall']:.3f}"),
            ("class accuracy ↑", f"**{e['class_accuracy']:.3f}**", f"{w['class_accuracy']:.3f}",
             f"{f['class_accuracy']:.3f}"),
            ("bits/dim ↓ (256 held-out images)", f"{e['bpd']:.2f} ± {e['bpd_stderr']:.2f}",
             f"{w['bpd']:.2f} ± {w['bpd_stderr']:.2f}", ""),
            ("1,000 samples", f"{e['sample_seconds']:.0f} s", f"{w['sample_seconds']:.0f} s", "")]
    head = (f"| metric | default: width {d['narrowed']['trained']['channels']}, {e['step']:,} steps, "
            f"{mins:.1f} min | width 32 kept: {steps_w:,} steps | real floor |")
    out = [head, "|---|---|---|---|"] + [f"| {a} | {b} | {c} | {x} |" for a, b, c, x in rows]
    return "\n".join(out) + "\n\n" + provenance(path, d)


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _cpu(m: dict) -> str:
    return "AVX-512 BF16" if m.get("avx512_bf16") else "AVX2" if m.get("avx2") else "?"


def headline(prefix: str) -> Callable[[], str]:
    """README's (and the site's front page's) table: one figure per part, each read from
    its JSON, with the CPU it was measured on; `prefix` is the path from the page to docs/."""
    def render() -> str:
        rows = []
        d = _load("recipe_default")
        e = d["evaluate"]
        rows.append((f"default recipe on digits: {d['train']['steps']:,} steps, "
                      f"{d['train']['elapsed_s'] / 60:.1f} min wall",
                     f"FID {e['fid']:.1f} (real floor {e['real_floor']['fid']:.1f}), class "
                     f"accuracy {e['class_accuracy']:.3f}", d["machine"], "recipe.md", "the recipe"))
        d = _load("hardware_avx2")
        r = next(r for r in d["rows"] if r["run"].endswith("-auto"))
        rows.append((f"the same on a CPU without bf16 ({r['steps']:,} steps)",
                     f"FID {r['fid']:.1f} (floor {r['floor_fid']:.1f}), class accuracy "
                     f"{r['class_accuracy']:.3f}", d["machine"],
                     "recipe.md#hardware-the-promise-on-cpus-without-bf16", "hardware"))
        d = _load("optimize_chain")
        rows.append(("deployment chain (guidance + 4-step distillation + ONNX Runtime)",
                     f"{d['speedup']:.1f}x faster at FID {d['fid_ratio']:.2f}x, class accuracy "
                     f"{d['chain']['class_accuracy']:.3f}", d["machine"], "deployment.md", "deployment"))
        if (RESULTS / "few_step.json").is_file():
            d = _load("few_step")
            few = [r for r in d["rows"] if r["calls_per_image"] <= 2]
            meets = [r for r in few if r["fid_ratio"] <= 1.1 and r["class_accuracy"] >= 0.95]
            # the fastest that meets issue 27's targets, or else the closest to them
            best = (min(meets, key=lambda r: r["seconds_per_1000"]) if meets
                    else min(few, key=lambda r: r["fid_ratio"]))
            rows.append((f"{best['calls_per_image']} network call{'s' * (best['calls_per_image'] > 1)}"
                         " per image", f"1,000 samples in {best['seconds_per_1000']:.1f} s at FID "
                         f"{best['fid_ratio']:.2f}x, class accuracy {best['class_accuracy']:.3f}"
                         + ("" if meets else " (target: FID <= 1.10x, not met yet)"),
                         d["machine"], "deployment.md#one-or-two-network-calls-per-image", "few calls"))
        d = _load("diffusers_interop_effusion_recipe")
        chain = next(r for r in d["rows"] if r["variant"].startswith("imported + guidance"))
        theirs = [r for r in d["rows"] if r["variant"].startswith("diffusers DPM")]
        fast = min(theirs, key=lambda r: r["seconds_per_1000"])
        rows.append(("a diffusers `UNet2DModel` through the chain",
                     f"{fast['seconds_per_1000'] / chain['seconds_per_1000']:.0f}x faster than its "
                     f"fastest scheduler at FID {chain['fid'] / fast['fid']:.2f}x", d["machine"],
                     "deployment.md#diffusers-users-your-unet2dmodel-10x-faster-on-a-cpu", "diffusers users"))
        d = _load("colour_recipe")
        r = d["rows"]["default"]
        rows.append((f"real colour icons (`data.source={d['data']}`, 32 px), {d['minutes']:g} min",
                     f"FID {r['fid']:.1f} in `random-std` features (floor "
                     f"{r['real_floor']['fid']:.1f}): not yet recognisable", d["machine"],
                     "evaluation.md#colour-images-a-real-colour-set-and-what-the-default-does-on-it", "colour images"))
        d = _load("crash_resume")
        same = max(d["max_abs_diff"].values()) == 0 and d["max_abs_loss_diff"] == 0
        rows.append(("exact resume under SIGKILL",
                     f"{d['resumes_succeeded']}/{d['kills']} kills resumed, "
                     + ("bit-identical weights, EMA, optimizer, losses" if same else
                        f"max weight difference {max(d['max_abs_diff'].values()):.1e}"),
                     d["machine"], "reliability.md", "reliability"))
        out = ["| what | figure | CPU (2 cores) | where |", "|---|---|---|---|"]
        for what, fig, m, link, page in rows:
            out.append(f"| {what} | {fig} | {_cpu(m)} | [{page}]({prefix}{link}) |")
        return "\n".join(out)
    return render


def benchmark_index() -> str:
    """Every benchmark script: what it measures (its docstring's first line) and its JSON."""
    import ast

    out = ["| script | what it measures | results |", "|---|---|---|"]
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if script.name == "tables.py":
            continue
        doc = ast.get_docstring(ast.parse(script.read_text())) or ""
        first = doc.split("\n\n")[0].replace("\n", " ").strip()
        stem = script.stem
        found = sorted(p.name for p in RESULTS.glob(f"{stem}*.json"))
        out.append(f"| `benchmarks/{script.name}` | {first.replace('|', '/')} | "
                   f"{', '.join(f'`{f}`' for f in found) or '(prints its table)'} |")
    return "\n".join(out)


TABLES: dict[str, Callable[[], str]] = {
    "benchmarks": benchmark_index,
    "colour_recipe": colour_recipe,
    "feature_ranking:icons": feature_ranking("icons"),
    "feature_ranking:mnist5k": feature_ranking("mnist5k"),
    "diffusers_interop": diffusers_interop(),
    "diffusers_interop:effusion_recipe": diffusers_interop("diffusers_interop_effusion_recipe"),
    "recipe_default": recipe_default,
    "few_step": few_step,
    "serve_load": serve_load([("serve_load", ["digits", "4-step"])], bullets=("serve_load",)),
    "serve_load:h200": serve_load([("serve_load_h200", ["digits, eager"]),
                                   ("serve_load_h200_compile", ["digits, `--compile`"])],
                                  bullets=("serve_load_h200",)),
    "crash_resume": crash_resume,
    "guidance_sweep_demo": guidance_sweep_demo,
    "distributed:projection": projection,
    "bucketing": bucketing,
    "headline": headline("docs/"),
    "headline:site": headline(""),
}


def render_page(text: str, page: Path) -> tuple[str, list[str]]:
    """The page with every marked table rendered again; the names of those that changed."""
    changed: list[str] = []

    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise SystemExit(f"{page}: unknown table {name!r} (known: {', '.join(TABLES)})")
        body = TABLES[name]().rstrip() + "\n"
        if body != m.group("body"):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return MARKER.sub(one, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="report drift, write nothing")
    args = ap.parse_args(argv)
    drift = []
    for page in PAGES:
        if not page.is_file():
            continue
        text = page.read_text()
        new, changed = render_page(text, page)
        drift += [f"{page.relative_to(ROOT)}: {name}" for name in changed]
        if changed and not args.check:
            page.write_text(new)
    if args.check and drift:
        print("tables that differ from their JSON (run python benchmarks/tables.py):\n  "
              + "\n  ".join(drift))
        return 1
    print(("rewrote " if drift and not args.check else "up to date: ")
          + (", ".join(drift) if drift else f"{len(TABLES)} tables"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
