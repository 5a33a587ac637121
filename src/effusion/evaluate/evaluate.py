"""`effusion evaluate`: sample a run (or read an image array), score it, write metrics.json.

Every score comes with the floor: `n` real images scored the same way, against the same
reference (the rest of the real set), which is what a perfect generator would get at this
sample size.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from effusion.config import ConfigError, DataConfig
from effusion.data import DataError, load_source, resolve_data, split, to_model_range
from effusion.evaluate.features import FEATURE_SPACES, FeatureScorer, feature_run_dir
from effusion.evaluate.likelihood import bits_per_dim
from effusion.evaluate.metrics import (class_accuracy, coverage, fid, kid, memorisation,
                                       precision_recall)
from effusion.plots import figure
from effusion.runs import LoadedClassifier, LoadedRun, load_classifier, load_run, write_json
from effusion.sampling import class_labels, generate

# A feature classifier (a run directory or one already loaded), a feature space's name
# (FEATURE_SPACES), or None for the data's default space (`default_space`).
Features = str | Path | LoadedClassifier | None


def score(scorer: FeatureScorer, images: torch.Tensor, requested: torch.Tensor | None = None,
          reference: torch.Tensor | None = None) -> dict[str, float]:
    """All feature-space metrics of uint8 images (N, C, H, W) against the reference
    features (default: every real image). `requested` holds the class each sample was
    asked for, if any."""
    ref = scorer.real_features if reference is None else reference
    feats, probs = scorer.classifier.predict(images)
    pred = probs.argmax(1)
    kid_mean, kid_std = kid(ref, feats, subset_size=min(1000, len(feats)))
    prec, rec = precision_recall(ref, feats)
    out = {"fid": fid(ref, feats), "kid": kid_mean, "kid_std": kid_std, "precision": prec,
           "recall": rec, "coverage": coverage(pred, scorer.classifier.num_classes),
           "confidence": float(probs.max(1).values.mean())}
    if requested is not None:
        out["class_accuracy"] = class_accuracy(pred, requested)
    return out


def per_class_scores(scorer: FeatureScorer, images: torch.Tensor, requested: torch.Tensor,
                     reference: torch.Tensor, reference_labels: torch.Tensor,
                     train_counts: torch.Tensor | None = None) -> dict[str, Any]:
    """Per requested class: FID, KID, precision, recall and class accuracy of its samples
    against the reference images of that class. FID needs a full-rank covariance: it is
    given where both sides have more images than feature dimensions, else null (use the
    KID there, unbiased at any size). With `train_counts` (images per class in training)
    that differ by 2x or more, the classes are split by it into head (largest third),
    tail (smallest third) and the rest, and each metric is averaged over head and tail."""
    feats, probs = scorer.classifier.predict(images)
    pred = probs.argmax(1)
    dim = feats.shape[1]
    rows: dict[str, dict[str, Any]] = {}
    for c in sorted(set(requested.tolist())):
        f, r = feats[requested == c], reference[reference_labels == c]
        if min(len(f), len(r)) < 4:
            raise ValueError(f"class {c}: {len(f)} samples and {len(r)} reference images; "
                             "per-class scores need at least 4 of each (raise --n)")
        kid_mean, kid_std = kid(r, f, subset_size=min(1000, len(f)))
        prec, rec = precision_recall(r, f)
        rows[str(c)] = {"n": len(f), "n_reference": len(r),
                        "fid": fid(r, f) if min(len(f), len(r)) > dim else None,
                        "kid": kid_mean, "kid_std": kid_std, "precision": prec, "recall": rec,
                        "class_accuracy": class_accuracy(pred[requested == c],
                                                         requested[requested == c])}
        if train_counts is not None:
            rows[str(c)]["train_images"] = int(train_counts[c]) if c < len(train_counts) else 0
    out: dict[str, Any] = {"classes": rows, "feature_dim": dim}
    if train_counts is not None and len(rows) >= 3:
        counts = {c: rows[c]["train_images"] for c in rows}
        if min(counts.values()) * 2 <= max(counts.values()):
            order = sorted(rows, key=lambda c: -counts[c])
            third = max(1, len(order) // 3)
            groups = {"head": order[:third], "tail": order[-third:]}
            out["groups"] = groups
            for g, members in groups.items():
                out[g] = {m: _mean([rows[c][m] for c in members]) for m in
                          ("fid", "kid", "precision", "recall", "class_accuracy")}
    return out


def _mean(values: list[Any]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


FLOOR_SEED = 1


def floor_split(scorer: FeatureScorer, n: int, seed: int = FLOOR_SEED
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the real set: `n` images (at most half) that play the perfect generator
    for the floor, and the rest, the reference that samples AND the floor are scored
    against (one reference for both, so the floor is not biased by a larger one)."""
    total = len(scorer.real_images)
    n = min(n, total // 2)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return perm[:n], perm[n:]


def reference_for(scorer: FeatureScorer, n: int) -> torch.Tensor:
    """The reference features for scoring `n` samples: the real set minus the floor's."""
    return scorer.real_features[floor_split(scorer, n)[1]]


def real_floor(scorer: FeatureScorer, n: int) -> dict[str, float]:
    """The floor's real images scored against `reference_for(scorer, n)`."""
    pick, rest = floor_split(scorer, n)
    labels = None if scorer.real_labels is None else scorer.real_labels[pick]
    return {"n": len(pick), **score(scorer, scorer.real_images[pick], labels,
                                    reference=scorer.real_features[rest])}


def _scorer(data: DataConfig, features: Features) -> FeatureScorer:
    """The scorer `features` asks for: None = the data's default space (`default_space`),
    a FEATURE_SPACES name, or a classifier (a run directory or one loaded), whose own
    features are then used (the data's cached default classifier: the default space)."""
    data = resolve_data(data)
    if isinstance(features, str) and features in FEATURE_SPACES:
        return FeatureScorer.for_data(data, space=features)
    clf = load_classifier(features) if isinstance(features, (str, Path)) else features
    if clf is not None:
        want = (data.channels, data.image_size)
        have = (clf.config.data.channels, clf.config.data.image_size)
        if want != have:
            raise ConfigError(f"feature classifier {clf.run_dir} takes {have[0]}-channel "
                              f"{have[1]}px images; these are {want[0]}-channel {want[1]}px")
        # the data's own cached classifier is the default: its default space; any other
        # classifier was asked for by name, so its features are used
        is_default = Path(clf.run_dir).resolve() == feature_run_dir(data).resolve()
        return FeatureScorer.for_data(data, clf, space=None if is_default else "classifier")
    return FeatureScorer.for_data(data)


def evaluate_run(run_dir: str | Path, n: int = 1000, *, sampler: str | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int = 123,
                 cache_interval: int | None = None, features: Features = None,
                 bpd_n: int = 256, bpd_strata: int = 50,
                 ema: bool = True, device: str = "auto",
                 guidance_interval: tuple[float, ...] | None = None,
                 per_class: bool = False) -> dict[str, Any]:
    """Sample `n` images from a run, score them, and write `RUN/metrics.json`.

    Class-conditional runs are asked for an even spread of classes and also get
    `class_accuracy`. Bits/dim is estimated on up to `bpd_n` images of the run's held-out
    split (its training images if it has none: `bpd_split` says which); 0 skips it.
    `features`: see `Features`; the cached default must exist (`effusion evaluate` trains
    it once; from Python, `effusion.recipes.feature_classifier(data)`). `per_class` adds
    `per_class_scores` (class-conditional runs), with head and tail by the run's training
    class counts.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir, ema=ema, device=device)
    cfg = run.config
    scorer = _scorer(cfg.data, features)
    result: dict[str, Any] = {
        "run": str(run_dir), "step": run.step, "n": n, "seed": seed, "ema": ema,
        "sampler": sampler or cfg.sample.sampler, "steps": steps,
        "cache_interval": cfg.sample.cache_interval if cache_interval is None else cache_interval,
        "features": scorer.name,
        **_sample_and_score(run, scorer, n, sampler, steps, guidance, seed, cache_interval,
                            guidance_interval, per_class)}
    if bpd_n and run.vae is not None:
        result["bpd_note"] = ("not computed: bits/dim is a pixel-space likelihood, and this "
                              "run models VAE latents")
    elif bpd_n:
        result.update(_bpd(run, bpd_n, bpd_strata, seed))
    result["real_floor"] = real_floor(scorer, n)
    write_json(run_dir / "metrics.json", result)
    return result


def _sample_and_score(run: LoadedRun, scorer: FeatureScorer, n: int, sampler: str | None,
                      steps: int | None, guidance: float | None, seed: int,
                      cache_interval: int | None = None,
                      guidance_interval: tuple[float, ...] | None = None,
                      per_class: bool = False) -> dict[str, Any]:
    requested = class_labels(None, n, run.num_classes) if run.num_classes else None
    if per_class and requested is None:
        raise ConfigError(f"per-class scores need a class-conditional run; {run.run_dir} has "
                          "model.num_classes = 0")
    t0 = time.perf_counter()
    images = generate(run, n, sampler=sampler, steps=steps, seed=seed, cond=requested,
                      guidance=guidance, cache_interval=cache_interval,
                      guidance_interval=guidance_interval)
    w = (run.config.sample.guidance if guidance is None else guidance) if run.num_classes else None
    gi = run.config.sample.guidance_interval if guidance_interval is None else guidance_interval
    out = {"guidance": w, "guidance_interval": list(gi) if w is not None else None,
           "sample_seconds": round(time.perf_counter() - t0, 2),
           **score(scorer, images, requested, reference=reference_for(scorer, n))}
    out["memorisation"] = memorisation_scores(scorer, run.config.data, images)
    if per_class:
        rest = floor_split(scorer, n)[1]
        out["per_class"] = per_class_scores(scorer, images, requested, scorer.real_features[rest],
                                            scorer.real_labels[rest], training_counts(run.config))
    return out


def memorisation_scores(scorer: FeatureScorer, data: DataConfig, images: torch.Tensor
                        ) -> dict[str, Any]:
    """`metrics.memorisation` of samples against the run's own training split, with its
    held-out split as the unseen real images, in the metrics' features and in pixels."""
    clean = replace(data, hflip=False, rotate=0.0, translate=0)
    train_set, held_out = split(load_source(clean), clean.val_fraction)
    if held_out is None or len(held_out) < 2:
        return {"note": "not computed: the run holds out no images (data.val_fraction=0)"}

    def pixels(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double() / 255.0

    def feats(x: torch.Tensor) -> torch.Tensor:
        return scorer.classifier.predict(x)[0]

    return {"train_images": len(train_set), "held_out_images": len(held_out),
            "features": memorisation(feats(train_set.images), feats(held_out.images), feats(images)),
            "pixels": memorisation(pixels(train_set.images), pixels(held_out.images), pixels(images))}


def training_counts(cfg) -> torch.Tensor | None:
    """Images per class in a run's training split (None for unlabelled data)."""
    train_set, _ = split(load_source(replace(cfg.data, hflip=False, rotate=0.0, translate=0)),
                         cfg.data.val_fraction)
    if train_set.labels is None:
        return None
    return torch.bincount(train_set.labels, minlength=train_set.num_classes)


def guidance_sweep(run_dir: str | Path, weights: list[float], n: int = 1000, *,
                   sampler: str | None = None, steps: int | None = None, seed: int = 123,
                   features: Features = None, ema: bool = True, device: str = "auto",
                   progress: bool = False,
                   guidance_interval: tuple[float, ...] | None = None) -> dict[str, Any]:
    """Score a class-conditional run at each guidance weight (same seeds, same classes);
    writes `RUN/guidance_sweep.json` and a PNG of class accuracy, FID and coverage vs w."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, ema=ema, device=device)
    if not run.num_classes:
        raise ConfigError(f"--guidance-sweep needs a class-conditional run; {run_dir} has "
                          "model.num_classes = 0")
    if not weights or any(w < 0 for w in weights):
        raise ConfigError(f"guidance weights must be >= 0, got {weights}")
    scorer = _scorer(run.config.data, features)
    rows = []
    for w in weights:
        rows.append(_sample_and_score(run, scorer, n, sampler, steps, w, seed,
                                      guidance_interval=guidance_interval))
        if progress:
            r = rows[-1]
            print(f"guidance {w:g}: class accuracy {r['class_accuracy']:.4f}, FID {r['fid']:.2f}, "
                  f"coverage {r['coverage']:.4f}", flush=True)
    result = {"run": str(run_dir), "step": run.step, "n": n, "seed": seed,
              "sampler": sampler or run.config.sample.sampler, "steps": steps,
              "features": scorer.name, "sweep": rows,
              "real_floor": real_floor(scorer, n)}
    write_json(run_dir / "guidance_sweep.json", result)
    _plot_sweep(result, run_dir / "guidance_sweep.png")
    return result


def _plot_sweep(result: dict[str, Any], path: Path) -> None:
    w = [r["guidance"] for r in result["sweep"]]
    floor = result["real_floor"]
    with figure(path, ncols=3, figsize=(11, 3.2)) as (fig, axes):
        for ax, key, label in zip(axes, ["class_accuracy", "fid", "coverage"],
                                  ["class accuracy", "FID", "coverage"]):
            ax.plot(w, [r[key] for r in result["sweep"]], marker="o", label="samples")
            ax.axhline(floor[key], color="gray", linestyle="--", label="real floor")
            ax.set(xlabel="guidance weight w", title=label)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"{result['run']} (step {result['step']}, {result['n']} samples)", fontsize=9)


def _bpd(run: LoadedRun, bpd_n: int, strata: int, seed: int) -> dict[str, Any]:
    cfg = run.config
    train_set, val_set = split(load_source(replace(cfg.data, hflip=False, rotate=0.0,
                                                   translate=0)), cfg.data.val_fraction)
    data, which = (val_set, "held-out") if val_set is not None else (train_set, "training")
    x = to_model_range(data.images[:bpd_n])
    labels = data.labels[:bpd_n] if (cfg.model.num_classes and data.labels is not None) else None
    gen = torch.Generator().manual_seed(seed)
    # The conditional likelihood (guidance 1): a guided mixture is not a proper density.
    den = run.denoiser(guidance=1.0 if run.num_classes else None)
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(x), 128):
        c = None if labels is None else labels[i:i + 128]
        out = bits_per_dim(den, run.schedule, x[i:i + 128], c, strata=strata, generator=gen,
                           device=run.precision.device)
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    bpd = torch.cat(parts["bpd"])
    return {"bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std() / len(bpd) ** 0.5),
            "bpd_parts": {k: float(torch.cat(v).mean()) for k, v in parts.items() if k != "bpd"},
            "bpd_split": which, "bpd_images": len(bpd), "bpd_strata": strata}


def load_image_array(path: str | Path) -> torch.Tensor:
    """A uint8 .npy array N x H x W [x C] (as `effusion sample --npy` writes) -> (N, C, H, W)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image array not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as a .npy array: {e}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8:
        raise DataError(f"{path} must hold a uint8 array, got {getattr(arr, 'dtype', type(arr))}")
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
        raise DataError(f"{path} must be N x H x W or N x H x W x C (C = 1 or 3), got "
                        f"shape {arr.shape}")
    if arr.shape[1] != arr.shape[2]:
        raise DataError(f"{path} holds {arr.shape[1]}x{arr.shape[2]} images; only square "
                        "images are supported")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return (t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)).contiguous()


def evaluate_images(images: torch.Tensor | str | Path, data: str | DataConfig = "mnist5k", *,
                    features: Features = None, labels: torch.Tensor | None = None,
                    out: str | Path | None = None) -> dict[str, Any]:
    """Score any uint8 images (N, C, H, W), or a .npy path, against a data source, so other
    tools' samples are measured on the same footing. `labels`: requested classes, if any."""
    if not isinstance(images, torch.Tensor):
        images = load_image_array(images)
    if len(images) < 10:
        raise DataError(f"need at least 10 images to score, got {len(images)}")
    if isinstance(data, str):
        data = DataConfig(source=data)
    data = replace(data, image_size=images.shape[-1], channels=images.shape[1])
    scorer = _scorer(data, features)
    result = {"n": len(images), "data": data.source,
              "features": scorer.name,
              **score(scorer, images, labels, reference=reference_for(scorer, len(images))),
              "real_floor": real_floor(scorer, len(images))}
    if out is not None:
        write_json(Path(out), result)
    return result


def ema_sweep(run_dir: str | Path, sigma_rels: list[float], decays: list[float] = (),
              n: int = 1000, *, sampler: str | None = None, steps: int | None = None,
              guidance: float | None = None, seed: int = 123, features: Features = None,
              device: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Score a run's EMA at several lengths rebuilt after training from its post-hoc EMA
    snapshots (`effusion.train.posthoc`): power EMAs of each sigma_rel and bias-corrected
    fixed decays, next to the EMA the run tracked itself. Same seeds and classes for every
    row; writes `RUN/ema_sweep.json`. The best row by FID is marked."""
    from effusion.train.posthoc import Target, list_snapshots, reconstruct

    run_dir = Path(run_dir)
    list_snapshots(run_dir)  # a clear error before anything is sampled
    targets = [Target(sigma_rel=s) for s in sigma_rels] + [Target(decay=d) for d in decays]
    if not targets:
        raise ConfigError("--ema-sweep needs at least one sigma_rel (or --ema-decays)")
    run = load_run(run_dir, ema=True, device=device)
    scorer = _scorer(run.config.data, features)
    tracked = {k: v.clone() for k, v in run.model.state_dict().items()}
    tc = run.config.train
    rows = [{"ema": f"tracked (decay {tc.ema_decay:g}" + (", warm-up)" if tc.ema_warmup else ")"),
             **_sample_and_score(run, scorer, n, sampler, steps, guidance, seed)}]
    for target in targets:
        state, info = reconstruct(run_dir, target, run.step)
        run.model.load_state_dict(state)
        rows.append({"ema": target.label, "sigma_rel": target.sigma_rel, "decay": target.decay,
                     "residual": info["residual"],
                     **_sample_and_score(run, scorer, n, sampler, steps, guidance, seed)})
        if progress:
            r = rows[-1]
            print(f"{target.label}: FID {r['fid']:.2f}, precision {r['precision']:.3f}, "
                  f"recall {r['recall']:.3f} (profile fit residual {info['residual']:.3g})",
                  flush=True)
    run.model.load_state_dict(tracked)
    best = min(range(len(rows)), key=lambda i: rows[i]["fid"])
    result = {"run": str(run_dir), "step": run.step, "n": n, "seed": seed,
              "features": scorer.name, "sweep": rows, "best": rows[best]["ema"],
              "real_floor": real_floor(scorer, n)}
    write_json(run_dir / "ema_sweep.json", result)
    return result
