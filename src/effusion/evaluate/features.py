"""The feature space metrics are computed in: a classifier effusion trains itself.

No Inception weights can be downloaded here, so FID & co. use the penultimate layer of a
classifier trained on the same data domain (the `cnn` recipe of `effusion classifier
train`). Without `--features`, the default one for a data config lives under
`$EFFUSION_CACHE` (default `$XDG_CACHE_HOME/effusion`, else `~/.cache/effusion`), in
`features/<source>-<size>px-<channels>ch-v1/`. This module only loads it: training it is
an explicit step (`effusion.recipes.feature_classifier`), which `effusion evaluate` takes
once, and says so, when the cache is empty.

Figures are comparable only between scores that used the same feature classifier; every
result records which one it used.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from effusion.config import DataConfig
from effusion.data import load_source
from effusion.evaluate.metrics import fid
from effusion.runs import CheckpointError, LoadedClassifier, latest_checkpoint, load_classifier

RECIPE_VERSION = "v1"  # bump when the classifier recipe changes, so old caches are not reused


def cache_dir() -> Path:
    if os.environ.get("EFFUSION_CACHE"):
        return Path(os.environ["EFFUSION_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "effusion"


def feature_run_dir(data: DataConfig) -> Path:
    """Where the default feature classifier for this data config lives in the cache."""
    src = data.source
    if src.startswith(("folder:", "npz:")):  # readable stem + hash of the full path
        kind, path = src.split(":", 1)
        resolved = str(Path(path).expanduser().resolve())
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(resolved).stem)[:40]
        src = f"{kind}-{stem}-{hashlib.sha1(resolved.encode()).hexdigest()[:10]}"
    src = src.replace(":", "-")  # shapes:N:SEED
    arch = feature_arch(data)
    tag = "" if arch == "cnn" else f"-{arch}"  # the digits' cnn keeps its original cache name
    return cache_dir() / "features" / f"{src}-{data.image_size}px-{data.channels}ch{tag}-{RECIPE_VERSION}"


def feature_arch(data: DataConfig) -> str:
    """The classifier the metrics use: the digits recipe's `cnn` for grayscale images, the
    translation-invariant `convnet` for RGB ones (shapes, photos), where the cnn's
    position-bound features underfit (81% on shapes at 32 px, against 100%)."""
    return "cnn" if data.channels == 1 else "convnet"


class NoFeatureClassifier(CheckpointError):
    """The cached default feature classifier for a data config has not been trained."""


def default_feature_classifier(data: DataConfig) -> LoadedClassifier:
    """The cached feature classifier for `data`; NoFeatureClassifier if not trained yet."""
    run = feature_run_dir(data)
    if latest_checkpoint(run) is None:
        raise NoFeatureClassifier(
            f"no feature classifier for {data.source} at {data.image_size}px yet (looked in "
            f"{run}); `effusion evaluate` trains it once, or call "
            "effusion.recipes.feature_classifier(data) first, or pass features=RUN_DIR")
    return load_classifier(run)


@dataclass
class FeatureScorer:
    """A feature classifier plus the features of the reference (real) images."""

    classifier: LoadedClassifier
    real_images: torch.Tensor  # uint8 (N, C, H, W)
    real_labels: torch.Tensor | None
    real_features: torch.Tensor  # float64 (N, D)

    @classmethod
    def for_data(cls, data: DataConfig, classifier: LoadedClassifier | None = None
                 ) -> "FeatureScorer":
        """Reference = every image of the source (augmentations off, no limit, balanced); the
        classifier defaults to the cached one for the data."""
        clean = replace(data, limit=0, imbalance=0.0, hflip=False, rotate=0.0, translate=0)
        clf = classifier or default_feature_classifier(clean)
        real = load_source(clean)
        feats, _ = clf.predict(real.images)
        return cls(clf, real.images, real.labels, feats)

    def fid(self, images: torch.Tensor) -> float:
        return fid(self.real_features, self.classifier.predict(images)[0])
