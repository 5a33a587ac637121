"""Do the metrics' features rank images the way a person would? (issue 26, part 3)

For a data set, half of its real images (at most --n) are scored against the other half:
as they are (the floor), degraded (blur 0.5 and 1 px, additive noise 0.05 and 0.1, colour
jitter, a patch shuffle (8x8 px, 7x7 for 28 px digits): `effusion.evaluate.degrade`), and replaced by samples from an
early and the last checkpoint of a run on the same data. Each candidate feature space
scores all of them (FID, KID, precision, recall); the ranking checks are pairs a person
agrees on (`effusion.evaluate.degrade.PERSON_PAIRS`): stronger worse than weaker, every
degradation worse than the real images, a shuffle worse than the mild degradations, an
early checkpoint worse than the late one and than mildly degraded real images; with
--late-is-blobs (a run whose last samples a person sees as unrecognisable), those samples
worse than every degradation that leaves the objects recognisable.

    python benchmarks/feature_ranking.py --data icons --run runs/icons-default --early-step 200 --late-is-blobs
    python benchmarks/feature_ranking.py --data mnist5k --run runs/demo --early-step 200

Results are merged into benchmarks/results/feature_ranking.json under the data source's name;
`--markdown` prints the README's table for --data from that file, without measuring.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from effusion.config import DataConfig
from effusion.data import load_source, resolve_data
from effusion.evaluate import degrade
from effusion.evaluate.features import FEATURE_SPACES, feature_space
from effusion.evaluate.metrics import fid, kid, precision_recall
from effusion.precision import hardware as machine
from effusion.recipes import feature_classifier
from effusion.runs import load_run
from effusion.runs.files import load_weights
from effusion.sampling import generate


def checkpoint_samples(run_dir: Path, step: int | None, n: int, seed: int = 0) -> tuple[int, torch.Tensor]:
    """n samples of the run's EMA weights at checkpoint `step` (None: the latest)."""
    run = load_run(run_dir)
    if step is not None:
        path = run_dir / "checkpoints" / f"step-{step:07d}" / "ema.safetensors"
        if not path.is_file():
            have = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
            raise SystemExit(f"no checkpoint {path}; the run has {have}")
        load_weights(path, run.model)
    return step if step is not None else run.step, generate(run, n, seed=seed)


def scores(embed, ref: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    f = embed(images)
    prec, rec = precision_recall(ref, f)
    return {"fid": fid(ref, f), "kid": kid(ref, f, subset_size=min(1000, len(f)))[0],
            "precision": prec, "recall": rec}


def markdown(entry: dict) -> str:
    """The README table of one data source's entry: FID per set and feature space, then
    the share of a person's pairs each space agrees with (FID, KID)."""
    spaces = list(entry["spaces"])
    sets = list(entry["spaces"][spaces[0]]["scores"])
    lines = ["| set | " + " | ".join(f"`{s}` FID" for s in spaces) + " |",
             "|---|" + "---|" * len(spaces)]
    for name in sets:
        label = name
        if name in entry["checkpoint_steps"]:
            label += f" (step {entry['checkpoint_steps'][name]})"
        lines.append(f"| {label} | " + " | ".join(
            f"{entry['spaces'][s]['scores'][name]['fid']:.2f}" for s in spaces) + " |")
    lines.append("| **pairs a person agrees with** (FID / KID) | " + " | ".join(
        f"**{entry['spaces'][s]['agreement_fid']:.0%}** / {entry['spaces'][s]['agreement_kid']:.0%}"
        for s in spaces) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="icons")
    ap.add_argument("--run", type=Path, default=None, help="a run on the same data (samples)")
    ap.add_argument("--early-step", type=int, default=None)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--late-is-blobs", action="store_true",
                    help="the run's last samples are unrecognisable (look at its grid first): "
                         "also check that they score worse than the recognisable degradations")
    ap.add_argument("--spaces", default=",".join(FEATURE_SPACES))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/feature_ranking.json"))
    ap.add_argument("--markdown", action="store_true",
                    help="print the table for --data from --json and exit (no measuring)")
    args = ap.parse_args()
    if args.markdown:
        results = json.loads(args.json.read_text()) if args.json.is_file() else {}
        if args.data not in results:
            raise SystemExit(f"{args.json} has no entry for --data {args.data} "
                             f"(it has: {', '.join(results) or 'none'}); measure it first")
        print(markdown(results[args.data]))
        return

    data = resolve_data(DataConfig(source=args.data))
    real = load_source(data)
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(1))
    n = min(args.n, len(real) // 2)
    pick, rest = real.images[perm[:n]], real.images[perm[n:]]
    sets = {"real": pick, **degrade.ladder(pick)}
    steps = {}
    if args.run is not None:
        for name, step in (("early checkpoint", args.early_step), ("late checkpoint", None)):
            if name == "early checkpoint" and step is None:
                continue
            steps[name], sets[name] = checkpoint_samples(args.run, step, n)

    if "classifier" in args.spaces.split(","):
        feature_classifier(data)  # trained once and cached, as `effusion evaluate` does
    rows: dict[str, dict] = {}
    for space in args.spaces.split(","):
        t0 = time.perf_counter()
        embed = feature_space(space, data, real.images[perm[n:]])
        ref = embed(rest)
        table = {name: scores(embed, ref, x) for name, x in sets.items()}
        checks = degrade.ranking_checks(table, args.late_is_blobs)
        rows[space] = {"scores": table, "checks": checks,
                       "agreement_fid": sum(c["fid_ok"] for c in checks) / len(checks),
                       "agreement_kid": sum(c["kid_ok"] for c in checks) / len(checks),
                       "seconds": time.perf_counter() - t0}
        print(f"\n== {space}  ({rows[space]['seconds']:.0f} s; pairs a person agrees with: "
              f"FID {rows[space]['agreement_fid']:.0%}, KID {rows[space]['agreement_kid']:.0%})")
        print(f"{'set':<20}{'FID':>10}{'KID':>10}{'prec':>7}{'recall':>7}")
        for name, s in table.items():
            print(f"{name:<20}{s['fid']:>10.3f}{s['kid']:>10.4f}{s['precision']:>7.2f}{s['recall']:>7.2f}")
        for c in checks:
            if not c["fid_ok"]:
                print(f"  FID disagrees: {c['worse']} should score worse than {c['better']}")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    entry = {"data": data.source, "image_size": data.image_size, "channels": data.channels,
             "images": len(real), "n": n, "run": str(args.run) if args.run else None,
             "checkpoint_steps": steps, "spaces": rows, "machine": machine(),
             "command": "python benchmarks/feature_ranking.py " + " ".join(
                 f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                 if v not in (None, False) and k not in ("json", "markdown")).replace(" True", ""),
             "commit": commit, "date": time.strftime("%Y-%m-%d")}
    out = json.loads(args.json.read_text()) if args.json.is_file() else {}
    out[data.source] = entry
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
