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
import torch.nn.functional as F

from effusion.config import DataConfig
from effusion.data import load_source, resolve_data, to_model_range
from effusion.evaluate.metrics import fid
from effusion.models.embeddings import RANDOM_FEATURES_VERSION, RandomFeatures
from effusion.runs import CheckpointError, LoadedClassifier, latest_checkpoint, load_classifier

RECIPE_VERSION = "v1"  # bump when the classifier recipe changes, so old caches are not reused


def cache_dir() -> Path:
    if os.environ.get("EFFUSION_CACHE"):
        return Path(os.environ["EFFUSION_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "effusion"


def feature_run_dir(data: DataConfig) -> Path:
    """Where the default feature classifier for this data config lives in the cache."""
    data = resolve_data(data)
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
    return "cnn" if resolve_data(data).channels == 1 else "convnet"


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


class EmbeddingFeatures:
    """A fixed embedding for FID and the other set metrics, next to the data's classifier
    for what needs classes (class accuracy, coverage, confidence). `predict` has the
    classifier's contract: uint8 images -> (float64 features, class probabilities)."""

    def __init__(self, classifier: LoadedClassifier, embed, name: str):
        self.classifier, self.embed, self.name = classifier, embed, name
        self.config, self.run_dir = classifier.config, classifier.run_dir

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def predict(self, images: torch.Tensor, batch_size: int = 500
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(images), self.classifier.predict(images, batch_size)[1]


def default_space(data: DataConfig) -> str:
    """The feature space the set metrics use by default: the classifier's features for
    grayscale data (the digits, where its 10 labels are learnt to ~99% and its features
    rank the degradation ladder as a person does), the random conv ensemble for colour
    (a classifier of a folder's few weak labels ranks coloured blobs above mildly blurred
    real images; the ensemble does not: benchmarks/results/feature_ranking.json)."""
    return "classifier" if resolve_data(data).channels == 1 else "random-std"


@dataclass
class FeatureScorer:
    """A feature network plus the features of the reference (real) images."""

    classifier: LoadedClassifier | EmbeddingFeatures
    real_images: torch.Tensor  # uint8 (N, C, H, W)
    real_labels: torch.Tensor | None
    real_features: torch.Tensor  # float64 (N, D)

    @classmethod
    def for_data(cls, data: DataConfig, classifier: LoadedClassifier | None = None,
                 space: str | None = None) -> "FeatureScorer":
        """Reference = every image of the source (augmentations off, no limit, balanced); the
        classifier defaults to the cached one for the data, the feature space to
        `default_space(data)` (FEATURE_SPACES names the others)."""
        clean = resolve_data(replace(data, limit=0, imbalance=0.0, hflip=False, rotate=0.0,
                                     translate=0))
        clf = classifier or default_feature_classifier(clean)
        real = load_source(clean)
        space = space or default_space(clean)
        net: LoadedClassifier | EmbeddingFeatures = clf
        if space != "classifier":
            name = f"{space} ({RANDOM_FEATURES_VERSION}, over {clean.source}) + classes: {clf.run_dir}"
            net = EmbeddingFeatures(clf, feature_space(space, clean, real.images, clf), name)
        feats, _ = net.predict(real.images)
        return cls(net, real.images, real.labels, feats)

    @property
    def name(self) -> str:
        """What the metrics were computed in, for the results (a run directory, or the
        embedding with the classifier behind the class scores)."""
        net = self.classifier
        return net.name if isinstance(net, EmbeddingFeatures) else str(net.run_dir)

    def fid(self, images: torch.Tensor) -> float:
        return fid(self.real_features, self.classifier.predict(images)[0])


# ---------------------------------------------------------------- candidate feature spaces

FEATURE_SPACES = ("classifier", "random", "random-std", "pixels")


def _batched(fn, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(to_model_range(images[i:i + batch])).double()
                          for i in range(0, len(images), batch)])


def feature_space(name: str, data: DataConfig, real: torch.Tensor,
                  classifier: LoadedClassifier | None = None):
    """A feature map `uint8 (N, C, H, W) -> float64 (N, D)` by name (FEATURE_SPACES):
    the data's feature classifier (penultimate layer; `classifier` or the cached default),
    the random conv ensemble (`RandomFeatures`) as it is or softly standardised over the
    `real` images, or the pixels averaged down to 8x8."""
    data = resolve_data(data)
    if name == "classifier":
        clf = classifier or default_feature_classifier(data)
        return lambda x: clf.predict(x)[0]
    if name in ("random", "random-std"):
        net = RandomFeatures(data.channels).eval()
        if name == "random":
            return lambda x: _batched(net, x)
        # Soft standardisation: each dimension divided by its spread plus the median spread,
        # so that large-scale statistics do not dominate the distances, while dimensions
        # that hardly vary over real images (fine texture that a blur removes) are not
        # blown up. Per-dimension division ranked blobs above 1-px blur on the icons,
        # none at all ranked a shuffle below colour jitter (feature_ranking.json).
        spread = _batched(net, real).std(0)
        scale = (spread + spread.median()).clamp_min(1e-6)
        return lambda x: _batched(net, x) / scale
    if name == "pixels":
        return lambda x: _batched(lambda y: F.adaptive_avg_pool2d(y, 8).flatten(1), x)
    raise ValueError(f"unknown feature space {name!r}; choose {', '.join(FEATURE_SPACES)}")
