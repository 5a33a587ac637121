"""Mixed sizes and aspect ratios: aspect-ratio buckets and the distributed bucket sampler.

An image goes, resized whole (nothing cropped away), to the bucket whose aspect ratio is
nearest its own (in log ratio, so 1:2 and 2:1 are equally far from 1:1). Every batch holds
one bucket's images, so nothing is padded: a batch of 24x40 images costs 24x40 pixels per
image, not the largest bucket's. The data stays one tensor: each image sits at the top
left of a canvas as large as the largest bucket, and a batch is cut back to its bucket's
size when it is gathered.

`DistributedBucketSampler` plans an epoch from (seed, epoch) alone: each bucket shuffled
and cut into global batches, the batches shuffled across buckets, each global batch split
into one contiguous part per rank. Every image is seen once per epoch across all ranks,
and every rank gets the same number of batches, so none waits at an all-reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from effusion.data.sources import DataError, ImageSet

MULTIPLE = 8  # bucket sides are multiples of 8: the default U-Net halves the size twice
# "auto": the candidate ratios (width / height) between 1:2 and 2:1, in steps of 2^(1/4)
AUTO_RATIOS = tuple(2 ** (k / 4) for k in range(-4, 5))


def bucket_shape(ratio: float, pixels: int, multiple: int = MULTIPLE) -> tuple[int, int]:
    """(H, W) of about `pixels` pixels at aspect ratio `ratio` = W / H, sides multiples of
    `multiple` (at least one multiple)."""
    h = max(multiple, round(math.sqrt(pixels / ratio) / multiple) * multiple)
    w = max(multiple, round(math.sqrt(pixels * ratio) / multiple) * multiple)
    return h, w


def nearest(sizes: torch.Tensor, buckets: list[tuple[int, int]]) -> torch.Tensor:
    """The bucket nearest each (H, W) in `sizes` (N, 2) by log aspect ratio (ties: the
    bucket listed first)."""
    r = (sizes[:, 1].double() / sizes[:, 0].double()).log()
    br = torch.tensor([math.log(w / h) for h, w in buckets], dtype=torch.float64)
    return (r[:, None] - br[None]).abs().argmin(1)


def auto_buckets(sizes: torch.Tensor, pixels: int) -> list[tuple[int, int]]:
    """`data.buckets: auto`: one bucket of about `pixels` pixels per candidate ratio
    (`AUTO_RATIOS`) that is the nearest for at least one image, square first."""
    cands = sorted({bucket_shape(r, pixels) for r in AUTO_RATIOS},
                   key=lambda hw: (abs(math.log(hw[1] / hw[0])), hw))
    used = set(nearest(sizes, cands).tolist())
    return [hw for i, hw in enumerate(cands) if i in used]


def bucketize(pictures: list[torch.Tensor], labels: torch.Tensor | None,
              class_names: list[str], buckets: list[tuple[int, int]] | None,
              pixels: int | None) -> ImageSet:
    """uint8 images of any sizes (each (C, h, w)) -> a bucketed ImageSet: each resized
    whole (antialiased bilinear) to its nearest bucket, on a canvas of the largest bucket."""
    sizes = torch.tensor([p.shape[-2:] for p in pictures])
    if buckets is None:
        buckets = auto_buckets(sizes, pixels)
    which = nearest(sizes, buckets)
    hmax, wmax = max(h for h, _ in buckets), max(w for _, w in buckets)
    canvas = torch.zeros(len(pictures), pictures[0].shape[0], hmax, wmax, dtype=torch.uint8)
    for i, (p, b) in enumerate(zip(pictures, which.tolist())):
        h, w = buckets[b]
        if tuple(p.shape[-2:]) != (h, w):
            p = F.interpolate(p[None].float(), size=(h, w), mode="bilinear", antialias=True,
                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        canvas[i, :, :h, :w] = p
    return ImageSet(canvas, labels, class_names, buckets=tuple(buckets), bucket=which)


def split_part(n: int, world: int, rank: int) -> slice:
    """Rank `rank`'s contiguous part of a global batch of `n` items (sizes differ by at
    most one; the same rule as `Dist.shard`)."""
    return slice(rank * n // world, (rank + 1) * n // world)


@dataclass
class DistributedBucketSampler:
    """Global batches of one bucket each, planned per (seed, epoch); see the module doc.

    `batch_size` is the global batch. A bucket's last, short batch is kept (every image
    once per epoch) unless it holds fewer than max(batch_size // 2, world) images: then it
    joins the bucket's previous batch, so batches hold 0.5x to 1.5x the batch size and no
    rank is left empty. With world <= batch_size // 2 the plan does not depend on the world
    size, so N processes train on exactly the batches one process would. A bucket with
    fewer images than ranks is an error.
    """

    bucket: torch.Tensor  # (N,) bucket index of each image
    batch_size: int
    world: int = 1
    rank: int = 0
    seed: int = 0
    _cache: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        counts = torch.bincount(self.bucket)
        small = [(b, int(c)) for b, c in enumerate(counts.tolist()) if 0 < c < self.world]
        if small:
            raise DataError(f"bucket {small[0][0]} holds {small[0][1]} image(s), fewer than the "
                            f"{self.world} processes: drop it from data.buckets")
        if self.batch_size < self.world:
            raise DataError(f"the global batch ({self.batch_size}) is smaller than the "
                            f"{self.world} processes")

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """The epoch's global batches (indices into the data), in training order."""
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 29)
            out: list[torch.Tensor] = []
            for b in range(int(self.bucket.max()) + 1 if len(self.bucket) else 0):
                idx = (self.bucket == b).nonzero().flatten()
                if len(idx) == 0:
                    continue
                idx = idx[torch.randperm(len(idx), generator=g)]
                chunks = list(idx.split(self.batch_size))
                if len(chunks) > 1 and len(chunks[-1]) < max(self.batch_size // 2, self.world):
                    chunks[-2:] = [torch.cat(chunks[-2:])]
                out.extend(chunks)
            order = torch.randperm(len(out), generator=g).tolist()
            self._cache = {epoch: [out[i] for i in order]}  # one epoch held at a time
        return self._cache[epoch]

    def part(self, batch: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """A rank's part of a global batch."""
        return batch[split_part(len(batch), self.world, self.rank if rank is None else rank)]

    def rank_batches(self, epoch: int, rank: int | None = None) -> list[torch.Tensor]:
        """This (or `rank`'s) process's batches of the epoch, in order."""
        return [self.part(b, rank) for b in self.batches(epoch)]


@dataclass
class BucketStream:
    """The training stream over a bucketed ImageSet: global batches from
    `DistributedBucketSampler`, each cut to its bucket's size. Like `BatchStream`, its
    position (epoch, batch) alone resumes it; `index` counts the epoch's images so far."""

    data: ImageSet
    batch_size: int
    seed: int
    world: int = 1
    epoch: int = 0
    index: int = 0
    batch: int = 0

    def __post_init__(self) -> None:
        if self.data.bucket is None:
            raise DataError("BucketStream needs bucketed data (data.buckets)")
        self.sampler = DistributedBucketSampler(self.data.bucket, self.batch_size, self.world,
                                                seed=self.seed)

    def next_indices(self) -> torch.Tensor:
        plan = self.sampler.batches(self.epoch)
        sel = plan[self.batch]
        self.batch, self.index = self.batch + 1, self.index + len(sel)
        if self.batch == len(plan):
            self.epoch, self.index, self.batch = self.epoch + 1, 0, 0
        return sel

    def gather(self, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, w = self.data.buckets[int(self.data.bucket[sel[0]])]
        labels = None if self.data.labels is None else self.data.labels[sel]
        return self.data.images[sel, :, :h, :w], labels

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.batch = int(state.get("batch", 0))


def load_bucketed(cfg) -> ImageSet:
    """The configured source with `data.buckets`: every image at its own aspect ratio
    (folder images as stored, shapes at data.aspect_ratios, the rest square), assigned to
    its nearest bucket and resized whole to it (`bucketize`); then data.limit and
    data.imbalance as for square data."""
    from pathlib import Path

    from effusion.config import bucket_budget
    from effusion.data.sources import (_load_folder, _to_channels, load_source, restrict,
                                       shapes_pictures)

    src = cfg.source
    if src.startswith("folder:"):
        pictures, labels, names = _load_folder(Path(src[len("folder:"):]).expanduser(), None,
                                               cfg.channels, cfg.skip_bad_images)
    elif src == "shapes" or src.startswith("shapes:"):
        pictures, labels, names = shapes_pictures(cfg)
    else:  # square sources: every image goes to the bucket nearest 1:1
        from dataclasses import replace

        square = load_source(replace(cfg, limit=0, imbalance=0.0))
        pictures, labels, names = list(square.images), square.labels, square.class_names
    pictures = [_to_channels(p[None], cfg.channels)[0] for p in pictures]
    explicit = None if isinstance(cfg.buckets, str) else [tuple(hw) for hw in cfg.buckets]
    data = bucketize(pictures, labels, names, explicit, bucket_budget(cfg))
    return restrict(data, cfg)


def describe(data: ImageSet) -> str:
    """One line for the log: the buckets and how many images each holds."""
    counts = torch.bincount(data.bucket, minlength=len(data.buckets)).tolist()
    return "buckets " + ", ".join(f"{h}x{w}: {c}" for (h, w), c in zip(data.buckets, counts))
