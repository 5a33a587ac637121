"""Augmentation and a resumable, deterministic batch stream over an in-memory ImageSet."""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effusion.config import DataConfig
from effusion.data.sources import DataError, ImageSet


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1]."""
    return x.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 0..255 (clamped)."""
    return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def augment(x: torch.Tensor, cfg: DataConfig, generator: torch.Generator) -> torch.Tensor:
    """Random flip / rotation / translation of a float batch (B, C, H, W) in [-1, 1].

    All randomness comes from `generator`, so a resumed run sees the same augmentations.
    """
    b = x.shape[0]
    if cfg.hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    if cfg.rotate > 0:
        ang = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(cfg.rotate)
        cos, sin = ang.cos(), ang.sin()
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1),
                             torch.stack([sin, cos, torch.zeros(b)], 1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Pad with the background value (-1 = black) rather than zeros (= mid grey).
        x = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False) - 1
    if cfg.translate > 0:
        p = cfg.translate
        h, w = x.shape[-2:]
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        rows = (dy.view(b, 1) + torch.arange(h)).view(b, 1, h, 1).expand(-1, x.shape[1], -1, w + 2 * p)
        cols = (dx.view(b, 1) + torch.arange(w)).view(b, 1, 1, w).expand(-1, x.shape[1], h, -1)
        x = padded.gather(2, rows).gather(3, cols)
    return x


def stage_size(stages: tuple[tuple[float, ...], ...], progress: float) -> int | None:
    """The size progressive training (train.progressive, [[size, until], ...]) trains at,
    at `progress` (0 -> 1) of the run; None when it is off."""
    for size, until in stages:
        if progress < until:
            return int(size)
    return int(stages[-1][0]) if stages else None


def rescale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """A float batch resized by `factor` (antialiased bilinear, sides >= 8); 1 = as is."""
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    size = (max(8, round(h * factor)), max(8, round(w * factor)))
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


@dataclass
class BatchStream:
    """Endless shuffled batches; position (epoch, index) fully determines what comes next.

    Each epoch's order is a permutation drawn from a generator seeded with (seed, epoch),
    so resuming needs only the position, not a pickled iterator.
    """

    data: ImageSet
    batch_size: int
    seed: int
    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        self._perm = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=g)

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (uint8 images (B, C, H, W), labels (B,) or None); batches span epochs."""
        return self.gather(self.next_indices())

    def gather(self, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        labels = None if self.data.labels is None else self.data.labels[sel]
        return self.data.images[sel], labels

    def next_indices(self) -> torch.Tensor:
        """Advance by one batch and return its indices into the data."""
        parts, need = [], self.batch_size
        while need > 0:
            take = self._perm[self.index: self.index + need]
            parts.append(take)
            need -= len(take)
            self.index += len(take)
            if self.index >= len(self.data):
                self.epoch, self.index = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation(self.epoch)


REWEIGHTS = ("none", "inverse", "sqrt", "effective_number")


def class_weights(counts: torch.Tensor, scheme: str, beta: float = 0.999) -> torch.Tensor:
    """How often each class should be drawn, relative (K,), for class sizes `counts`:
    none ~ n (the data as it is), inverse ~ 1 (class-balanced), sqrt ~ sqrt(n),
    effective_number ~ n (1 - beta) / (1 - beta^n) (Cui et al. 2019: the effective number
    of samples (1 - beta^n) / (1 - beta), inverse-weighted, times n)."""
    n = counts.double()
    if scheme == "none":
        w = n
    elif scheme == "inverse":
        w = (n > 0).double()
    elif scheme == "sqrt":
        w = n.sqrt()
    elif scheme == "effective_number":
        w = torch.where(n > 0, n * (1 - beta) / (1 - beta ** n.clamp_min(1)), torch.zeros_like(n))
    else:
        raise ValueError(f"unknown reweighting {scheme!r}; choose one of {REWEIGHTS}")
    return w / w.sum()


@dataclass
class WeightedBatchStream(BatchStream):
    """Batches drawn with replacement, image i with probability w(c_i) / n(c_i)
    (`class_weights`): a class-balanced sampler for long-tailed data. An "epoch" is
    len(data) draws; each batch's draw comes from a generator seeded by (seed, position),
    so the position alone resumes it, like `BatchStream`."""

    reweight: str = "inverse"
    beta: float = 0.999

    def __post_init__(self) -> None:
        if self.data.labels is None:
            raise DataError(f"train.reweight={self.reweight} needs labelled data")
        counts = torch.bincount(self.data.labels, minlength=self.data.num_classes)
        per_class = class_weights(counts, self.reweight, self.beta)
        self._p = (per_class / counts.double().clamp_min(1))[self.data.labels].float()

    def next_indices(self) -> torch.Tensor:
        drawn = self.epoch * len(self.data) + self.index
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + drawn + 13)
        sel = torch.multinomial(self._p, self.batch_size, replacement=True, generator=g)
        drawn += self.batch_size
        self.epoch, self.index = divmod(drawn, len(self.data))
        return sel

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def make_stream(data: ImageSet, batch_size: int, seed: int, reweight: str = "none",
                beta: float = 0.999, world: int = 1) -> BatchStream:
    """The training batch stream: shuffled epochs, class-reweighted draws, or, for bucketed
    data, one bucket per batch (`effusion.data.buckets.BucketStream`; `world` processes
    share each global batch)."""
    if data.bucket is not None:
        if reweight != "none":
            raise DataError("train.reweight does not combine with data.buckets yet: the "
                            "bucket sampler sees every image once per epoch")
        from effusion.data.buckets import BucketStream

        return BucketStream(data, batch_size, seed, world)  # type: ignore[return-value]
    if reweight == "none":
        return BatchStream(data, batch_size, seed)
    return WeightedBatchStream(data, batch_size, seed, reweight=reweight, beta=beta)


class BatchLoader:
    """Training batches: the stream's images as floats in [-1, 1], augmented.

    A batch's augmentation draws from its own generator, seeded by (seed, batch number), so
    the result does not depend on how many workers prepared it or on when a run resumed.
    With `workers > 0`, background threads gather, convert and augment the next
    `workers * prefetch` batches while the model trains on the current one (torch ops
    release the GIL); `pin` puts each batch in page-locked memory for an asynchronous copy
    to a CUDA device. The resumable position is that of the last batch handed out, not of
    the ones prepared ahead.
    """

    def __init__(self, stream: BatchStream, cfg: DataConfig, seed: int, workers: int = 0,
                 prefetch: int = 2, pin: bool = False):
        self.stream, self.cfg, self.seed, self.pin = stream, cfg, seed, pin
        self.batches = 0  # batches handed out so far (numbers the next one)
        self._position = stream.state_dict()
        self._workers, self._depth = workers, workers * prefetch
        self._pool = self._new_pool()
        self._ahead: deque[tuple[Future, dict[str, int]]] = deque()
        self._issued = 0  # batches taken from the stream (handed out or in flight)

    def _make(self, sel: torch.Tensor, number: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, labels = self.stream.gather(sel)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + number + 7)
        # uint8 images become floats in [-1, 1]; float data (cached latents) is used as is
        x = augment(to_model_range(x) if x.dtype == torch.uint8 else x.float(), self.cfg, g)
        if self.pin:
            x = x.pin_memory()
            labels = None if labels is None else labels.pin_memory()
        return x, labels

    def _issue(self) -> tuple[Future | tuple, dict[str, int]]:
        sel, number = self.stream.next_indices(), self._issued
        self._issued += 1
        job = self._pool.submit(self._make, sel, number) if self._pool else self._make(sel, number)
        return job, self.stream.state_dict()

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._pool is None:
            batch, self._position = self._issue()
        else:
            while len(self._ahead) < self._depth:
                self._ahead.append(self._issue())
            job, self._position = self._ahead.popleft()
            batch = job.result()
        self.batches += 1
        return batch

    @property
    def epoch(self) -> int:
        return self._position["epoch"]

    @property
    def index(self) -> int:
        return self._position["index"]

    def epochs_done(self) -> float:
        """Passes over the data so far, fractional (0.5 = half of the first epoch)."""
        return self.epoch + self.index / len(self.stream.data)

    def state_dict(self) -> dict[str, int]:
        return {**self._position, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self._position = self.stream.state_dict()
        self.batches = self._issued = int(state.get("batches", 0))
        self._pool = self._new_pool()

    def _new_pool(self) -> ThreadPoolExecutor | None:
        return (ThreadPoolExecutor(self._workers, thread_name_prefix="effusion-data")
                if self._workers else None)

    def close(self) -> None:
        for job, _ in self._ahead:
            job.cancel()
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
