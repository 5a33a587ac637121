"""Dynamic batching: requests that arrive within a window share one sampler call.

Each request becomes one item per image. The batcher takes the oldest waiting item, waits
until the batch window after its arrival has passed (or a full batch of items with the same
settings is waiting), and runs up to `max_batch` items with those settings in one call on a
single model thread. A request larger than a batch is split across calls; one smaller than a
batch shares it with others. The asyncio event loop never runs the model, so it keeps
accepting, validating and refusing requests while a batch samples.

Backpressure: at most `max_queue` images wait; a request that would exceed it is refused at
once (`QueueFull`), so memory stays bounded under any load. A cancelled request (its client
disconnected) leaves the queue, and a running batch whose requests are all cancelled stops
at its next sampler step.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np

# run_batch(key, seeds, labels, should_stop) -> uint8 images (len(seeds), C, H, W), numpy
RunBatch = Callable[[Hashable, list[int], "list[int] | None", Callable[[], bool]], np.ndarray]


def model_thread(thread_init: Callable[[], None] | None = None) -> ThreadPoolExecutor:
    """The one thread that runs PyTorch in a server process."""
    return ThreadPoolExecutor(1, thread_name_prefix="effusion-model", initializer=thread_init)


class QueueFull(Exception):
    """More images are waiting than the server accepts; retry after `retry_after` seconds."""

    def __init__(self, waiting: int, limit: int, retry_after: int):
        super().__init__(f"{waiting} images are waiting (limit {limit}); retry in {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The request was cancelled (its client went away) before its images were done."""


@dataclass
class Job:
    """One request: `n` images with the same settings (`key`)."""

    key: Hashable
    seeds: list[int]
    labels: list[int] | None
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    images: list[np.ndarray | None] = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    started: float | None = None  # when its first image went into a batch
    batch_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.images = [None] * len(self.seeds)
        self.remaining = len(self.seeds)


@dataclass
class _Item:
    job: Job
    index: int


@dataclass
class BatchStats:
    """What one sampler call did (for metrics)."""

    size: int
    seconds: float
    stopped: bool


class Batcher:
    """Merges concurrent requests into batched sampler calls on one model thread."""

    def __init__(self, run_batch: RunBatch, max_batch: int = 64, window_ms: float = 10.0,
                 max_queue: int = 256, on_batch: Callable[[BatchStats], None] | None = None,
                 thread_init: Callable[[], None] | None = None,
                 executor: ThreadPoolExecutor | None = None):
        if max_batch < 1 or max_queue < 1 or window_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and window_ms >= 0")
        self.run_batch, self.max_batch, self.window = run_batch, max_batch, window_ms / 1000
        self.max_queue, self.on_batch = max_queue, on_batch
        self._waiting: deque[_Item] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # Every model call runs on this one thread (pass `executor` to share it with the code
        # that loads the run). PyTorch work on a second thread starts a second OpenMP team
        # that contends with this one: set in the main thread, torch.set_num_threads (use
        # `thread_init`) or loading the run made sampling at batch 1 2.5-2.7x slower on 2
        # cores. So the event loop touches numpy only: run_batch returns numpy arrays.
        self._executor = executor or model_thread(thread_init)
        self._seconds_per_image = 0.05  # running estimate, for Retry-After
        self.running = 0  # images in the batch being sampled now

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._waiting:
            item = self._waiting.popleft()
            if not item.job.future.done():
                item.job.future.set_exception(Cancelled("the server is shutting down"))
        self._executor.shutdown(wait=True)

    def call_on_model_thread(self, fn: Callable[[], object]):
        """Run `fn` on the model thread (warm-up at start), as an awaitable."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ------------------------------------------------------------------ requests
    @property
    def waiting(self) -> int:
        """Images queued and not yet in a batch."""
        return len(self._waiting)

    def submit(self, key: Hashable, seeds: list[int], labels: list[int] | None) -> Job:
        """Queue a request; raises QueueFull when it would exceed `max_queue` waiting images."""
        if self._task is None or self._wake is None:
            raise RuntimeError("Batcher.start() was not called")
        if len(self._waiting) + len(seeds) > self.max_queue:
            backlog = len(self._waiting) + self.running
            retry = max(1, round(backlog * self._seconds_per_image))
            raise QueueFull(len(self._waiting), self.max_queue, retry)
        job = Job(key, list(seeds), None if labels is None else list(labels),
                  asyncio.get_running_loop().create_future())
        self._waiting.extend(_Item(job, i) for i in range(len(seeds)))
        self._wake.set()
        return job

    def cancel(self, job: Job) -> int:
        """Drop a request's waiting images (a running batch stops if no one else needs it).
        Returns how many waiting images were dropped."""
        job.cancelled = True
        before = len(self._waiting)
        self._waiting = deque(it for it in self._waiting if it.job is not job)
        if not job.future.done():
            job.future.cancel()  # its awaiter has gone; nobody will read a result
        return before - len(self._waiting)

    # ------------------------------------------------------------------ the loop
    def _take(self) -> list[_Item]:
        """Up to max_batch waiting items with the oldest item's settings, in arrival order."""
        key = self._waiting[0].job.key
        batch, rest = [], deque()
        while self._waiting:
            it = self._waiting.popleft()
            if len(batch) < self.max_batch and it.job.key == key:
                batch.append(it)
            else:
                rest.append(it)
        self._waiting = rest
        return batch

    def _ready(self) -> bool:
        key = self._waiting[0].job.key
        same = sum(1 for it in self._waiting if it.job.key == key)
        return same >= self.max_batch

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = self._waiting[0].job.arrived + self.window
            while self._waiting and not self._ready():
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            if not self._waiting:
                continue
            batch = self._take()
            jobs = list({id(it.job): it.job for it in batch}.values())
            now = time.perf_counter()
            for job in jobs:
                job.started = job.started or now
                job.batch_sizes.append(len(batch))
            key = batch[0].job.key
            seeds = [it.job.seeds[it.index] for it in batch]
            labels = (None if batch[0].job.labels is None
                      else [it.job.labels[it.index] for it in batch])  # type: ignore[index]

            def stop() -> bool:
                return all(j.cancelled for j in jobs)

            self.running = len(batch)
            t0 = time.perf_counter()
            try:
                images = await loop.run_in_executor(self._executor, self.run_batch, key, seeds,
                                                    labels, stop)
                error = None
            except Exception as e:  # noqa: BLE001 - handed to each request, never raised here
                images, error = None, e
            finally:
                self.running = 0
            dt = time.perf_counter() - t0
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * dt / len(batch)
            if self.on_batch is not None:
                self.on_batch(BatchStats(len(batch), dt, error is not None and stop()))
            for i, it in enumerate(batch):
                job = it.job
                if job.future.done():
                    continue
                if error is not None:
                    job.future.set_exception(error)
                    continue
                job.images[it.index] = images[i]  # type: ignore[index]
                job.remaining -= 1
                if job.remaining == 0:
                    job.future.set_result(np.stack(job.images))  # type: ignore[arg-type]
