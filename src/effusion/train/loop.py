"""The training loop, read top to bottom, and the few small functions around it.

Progress is counted in optimizer steps and images seen; training ends at
`train.max_steps`, after `train.epochs`, or when `train.max_minutes` of wall time are
spent, whichever is first. Running the same command with `--resume` continues from the
latest checkpoint exactly as if the run had never stopped (same RNG streams, same data
order): everything that changes from step to step lives in one `TrainState`.

The loop knows only the loop. What is trained, on what, and what is made along the way
comes from a `Recipe` (data, model) and its `Task` (loss, periodic work, final
artifact): the diffusion, VAE and classifier recipes live in `effusion.recipes`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from effusion.config import Config, ConfigError
from effusion.data import ImageSet, load_source, rescale, resolve_data, split, stage_size
from effusion.models import build_model, count_params, is_classifier
from effusion.precision import (Precision, apply_tf32, precision_reason, resolve_device,
                                resolve_precision)
from effusion.runs.files import (NARROWED, RUNTIME, CheckpointError, checkpoint_name,
                                 latest_checkpoint, list_checkpoints, update_runtime, write_config,
                                 write_json)
from effusion.train import distributed
from effusion.train.distributed import SINGLE, Dist
from effusion.train.logging import MetricsLogger, NullLogger
from effusion.train.optim import lr_factor, set_lr
from effusion.train.state import TrainState

MAX_NONFINITE_IN_A_ROW = 10


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays NaN/Inf); the last checkpoint is kept."""


@dataclass
class TrainData:
    cfg: Config  # with model.num_classes resolved against the data
    train_set: ImageSet  # what the batch stream iterates (images, or latents)
    val_set: ImageSet | None  # held-out images (never encoded)


@dataclass
class TaskContext:
    """What the loop has settled by the time a task starts."""

    cfg: Config
    run_dir: Path | None  # None: a benchmark that writes nothing
    prec: Precision
    mem_format: torch.memory_format
    logger: MetricsLogger | None
    train_set: ImageSet
    val_set: ImageSet | None
    dist: Dist = SINGLE  # data-parallel: this process's rank and the world size


class Task(Protocol):
    """What one kind of model learns and makes; the loop does everything else."""

    def loss(self, net: Any, x0: torch.Tensor, labels: torch.Tensor | None,
             gen: torch.Generator) -> torch.Tensor: ...  # a scalar, reduced in fp32

    def periodic(self, ema_model: nn.Module, step: int, epoch_done: bool) -> dict[str, float]: ...

    def finish(self, ema_model: nn.Module, step: int) -> Path | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Recipe(Protocol):
    """A kind of model: its training data, its network, its task. It may also define
    `fit_to_budget(cfg, data, prec) -> (cfg, log line or None)`, called for a run from
    scratch, to size its network to the time budget (the diffusion recipe does)."""

    def prepare_data(self, cfg: Config, device: torch.device) -> TrainData: ...

    def build_model(self, cfg: Config) -> nn.Module: ...

    def make_task(self, ctx: TaskContext) -> Task: ...


class PlainRecipe:
    """A recipe that trains the configured network (`models.build_model`) on the
    configured images as they are; subclasses add `make_task`."""

    def prepare_data(self, cfg: Config, device: torch.device) -> TrainData:
        if cfg.data.buckets:
            raise ConfigError(f"data.buckets (mixed sizes) trains diffusion U-Nets only, not "
                              f"model.arch={cfg.model.arch}")
        return load_training_data(cfg)

    def build_model(self, cfg: Config) -> nn.Module:
        return build_model(cfg)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    images_seen: int
    loss: float
    minutes: float
    grid: Path | None  # the last sample grid (diffusion) or the loss/accuracy curves (classifier)


# ------------------------------------------------------------------------ setup helpers

# Keys a run may change between the command that started it and the one that resumes it:
# budgets (to extend a run), logging and checkpoint cadence, loader threads, the device,
# and sampling defaults. Anything else changes what is trained: resuming is refused.
RESUMABLE_CHANGES = ("train.max_steps", "train.max_minutes", "train.epochs", "train.budget_steps",
                     "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.sample_every", "train.sample_n", "train.eval_every", "train.eval_n",
                     "train.eval_features", "train.workers", "train.prefetch", "train.pin_memory",
                     "train.threads", "train.device", "train.parallel", "sample.")


def config_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every config value that differs."""
    a, b = old.to_dict(), new.to_dict()
    return [(f"{sec}.{k}", a[sec][k], b[sec][k]) for sec in a for k in a[sec]
            if a[sec][k] != b[sec][k]]


def _describe(changes: list[tuple[str, Any, Any]]) -> str:
    shown = ", ".join(f"{k}: {o!r} in the run, {n!r} now" for k, o, n in changes[:4])
    return shown + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")


def _clear_outputs(run_dir: Path) -> None:
    for name in ("checkpoints", "samples", "tb", "metrics.jsonl", NARROWED, "posthoc"):
        p = run_dir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def prepare_run_dir(run_dir: Path, cfg: Config, resume: bool, fresh: bool
                    ) -> tuple[Path | None, Config, str]:
    """Decide between starting and resuming, the same way for every command: a run
    directory holding a checkpoint of this config is resumed (the same command resumes a
    killed or requeued job), one without a checkpoint is started; `fresh` discards what is
    there (`resume` with `fresh` is refused by `train`). `resume` (the run's own
    config.yaml plus --set) may also change training hyper-parameters. Returns (checkpoint or None, the config to train, one line for the log)."""
    from effusion.runs.files import ONNX_MODEL, QUANTIZED_WEIGHTS, read_config

    for artifact in (ONNX_MODEL, QUANTIZED_WEIGHTS):
        if (run_dir / artifact).is_file():
            raise CheckpointError(f"{run_dir} holds an exported or quantized model ({artifact}), "
                                  "not a training run; choose another --run directory")
    if fresh:
        _clear_outputs(run_dir)
        return None, cfg, f"starting {run_dir} afresh (--fresh: its old checkpoints were deleted)"
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        if list_checkpoints(run_dir):
            raise CheckpointError(f"every checkpoint in {run_dir / 'checkpoints'} is corrupt "
                                  "(see the warnings above); --fresh starts the run over")
        if (run_dir / "config.yaml").is_file():  # an effusion run that never reached a
            _clear_outputs(run_dir)  # checkpoint: its logs go; nobody else's folders
        return None, cfg, f"no checkpoint in {run_dir} yet: starting a new run"
    stored = read_config(run_dir)
    narrowed = run_dir / NARROWED
    if narrowed.is_file() and cfg.train.budget_min_steps:  # the run sized itself to its budget
        asked = json.loads(narrowed.read_text())["asked"]
        cm = cfg.model
        if (cm.channels, cm.head_channels) == (asked["channels"], asked["head_channels"]):
            cfg = replace(cfg, model=replace(cm, channels=stored.model.channels,
                                             head_channels=stored.model.head_channels))
    changes = config_changes(stored, cfg)
    fixed = [c for c in changes if not c[0].startswith(RESUMABLE_CHANGES)]
    if resume:  # the run's own config + --set: training hyper-parameters may change
        fixed = [c for c in fixed if not c[0].startswith("train.")]
    if fixed:
        raise CheckpointError(
            f"{run_dir} holds a run trained with another config ({_describe(fixed)}). "
            "Run the command that started it to resume it, pass --resume to continue it with its "
            "own config.yaml, --fresh to discard it, or choose another --run directory")
    tc, old = cfg.train, stored.train
    budget = tc.budget_steps or (old.budget_steps if tc.max_minutes == old.max_minutes else 0)
    cfg = replace(cfg, train=replace(tc, budget_steps=budget))
    note = f"resuming {run_dir} from {ckpt.name}"
    if changes:
        shown = [f"{k} {o!r} -> {n!r}" for k, o, n in changes if k != "train.budget_steps"]
        note += (" with " + ", ".join(shown)) if shown else ""
    return ckpt, cfg, note + " (--fresh starts it over)"


def resolve_runtime(cfg: Config) -> tuple[Config, Precision, list[str]]:
    """Device and precision, resolved once and recorded in the config; threads and TF32
    set for the process. Returns (config, precision, notes for the log)."""
    tc = cfg.train
    device = resolve_device(tc.device)
    prec = Precision(device, resolve_precision(tc.precision, device))
    cfg = replace(cfg, train=replace(tc, device=str(device), precision=prec.mode))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    return cfg, prec, [apply_tf32(tc.tf32, device)]


def resolve_for_data(cfg: Config, data: ImageSet) -> Config:
    """Settle `model.num_classes` against the data: -1 (auto) becomes the data's class
    count when it has labels (a class-conditional model, or a classifier) and 0 (an
    unconditional model) when it has none. Errors if labels are needed but missing."""
    mc = cfg.model
    if (mc.num_classes > 0 or is_classifier(cfg)) and data.labels is None:
        raise ConfigError(f"model.arch={mc.arch} with model.num_classes={mc.num_classes} "
                          f"needs labels, but data source {cfg.data.source!r} has none")
    k = mc.num_classes
    if k < 0 or (k == 0 and is_classifier(cfg)):
        k = data.num_classes if data.labels is not None else 0
    if k and data.num_classes > k:
        raise ConfigError(f"data has {data.num_classes} classes but model.num_classes={k}")
    return replace(cfg, model=replace(mc, num_classes=k))


def load_training_data(cfg: Config) -> TrainData:
    """The configured source with num_classes resolved, split into a fixed held-out part
    (`data.val_fraction`) and the training part; with `data.buckets`, at mixed sizes
    (`effusion.data.buckets`). Sizes of 0 are settled from the data first and recorded."""
    cfg = replace(cfg, data=resolve_data(cfg.data))
    if cfg.data.buckets:
        from effusion.data.buckets import load_bucketed

        data = load_bucketed(cfg.data)
    else:
        data = load_source(cfg.data)
    cfg = resolve_for_data(cfg, data)
    train_set, val_set = split(data, cfg.data.val_fraction)
    return TrainData(cfg, train_set, val_set)


# ------------------------------------------------------------------------ one step

@dataclass
class StepOutcome:
    loss: float | torch.Tensor  # mean over the step's micro-batches (nan if skipped)
    images: int
    # False: a micro-batch's loss was NaN/Inf and the update was skipped. On a GPU with a
    # fused optimizer, a bool tensor: the skip is decided on the device, read back later
    finite: bool | torch.Tensor


def decides_on_device(state: TrainState) -> bool:
    """Does this run skip non-finite steps on the GPU, without a host sync? (CUDA with an
    optimizer that takes `found_inf`: fused AdamW/Adam, the default there.)"""
    return state.device.type == "cuda" and getattr(state.optimizer, "_step_supports_amp_scaling", False)


def train_step(state: TrainState, task: Task, tc, scale: float = 1.0
               ) -> tuple[StepOutcome, torch.Tensor]:
    """One optimizer step: forward and backward over `grad_accum` micro-batches, clip,
    update. A non-finite loss skips the update (gradients dropped, weights untouched).
    `scale` resizes the batches (progressive resolution). Returns the outcome and the
    pre-clip gradient norm (nan when clipping is off).

    On a GPU (`decides_on_device`) the step never waits for the device: finiteness is a
    device tensor, all-reduced over the ranks on the stream, and the fused optimizer skips
    the update itself (its `found_inf`), so the host reads nothing back until it logs."""
    opt, scaler, d = state.optimizer, state.scaler, state.dist
    on_device = decides_on_device(state)
    step_loss: float | torch.Tensor = 0.0
    images, finite = 0, None
    for i in range(tc.grad_accum):
        x0, labels = state.loader.next()
        x0 = rescale(x0, scale)
        # Data-parallel: gradients are all-reduced on the last micro-batch only (no_sync).
        quiet = state.ddp is not None and i < tc.grad_accum - 1
        if state.fsdp:  # FSDP's no_sync: reduce-scatter on the last micro-batch only
            state.model.set_requires_gradient_sync(i == tc.grad_accum - 1)
        with state.ddp.no_sync() if quiet else contextlib.nullcontext():
            loss = task.loss(state.net, x0, labels, state.generator)
            if on_device:
                ok = distributed.all_true_on_device(d, torch.isfinite(loss.detach()))
                finite = ok if finite is None else finite & ok
            elif not distributed.all_true(d, torch.isfinite(loss)):  # every rank skips
                opt.zero_grad(set_to_none=True)
                return StepOutcome(math.nan, 0, False), torch.tensor(math.nan)
            # Equal micro-batches: the mean of their means is the big batch's mean.
            scaler.scale(loss / tc.grad_accum).backward()
        step_loss = step_loss + (loss.detach() if on_device else loss.item()) / tc.grad_accum
        images += x0.shape[0]  # the global micro-batch: every rank counts all of it
    scaler.unscale_(opt)
    grad_norm = (torch.nn.utils.clip_grad_norm_(state.model.parameters(), tc.grad_clip)
                 if tc.grad_clip > 0 else torch.tensor(math.nan))
    if state.fsdp and hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()  # the norm over every rank's shards
    if on_device:  # read by the fused optimizer (an fp16 scaler sets its own)
        opt.found_inf = (~finite).float()
    scaler.step(opt)  # fp16: skipped by the scaler itself if the gradients overflowed
    if on_device and hasattr(opt, "found_inf"):
        del opt.found_inf
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return StepOutcome(step_loss, images, finite if on_device else True), grad_norm


class _DeviceHealth:
    """Skipped steps decided on the GPU, counted there and read back when the loop logs,
    checkpoints or ends (one transfer, not one per step)."""

    def __init__(self) -> None:
        self.skipped: torch.Tensor | None = None  # since the last read
        self.in_a_row: torch.Tensor | None = None  # consecutive non-finite steps

    def add(self, finite: torch.Tensor) -> None:
        bad = (~finite).to(torch.int64)
        self.skipped = bad if self.skipped is None else self.skipped + bad
        self.in_a_row = bad if self.in_a_row is None else (self.in_a_row + 1) * bad

    def settle(self, state: TrainState, tc) -> None:
        if self.skipped is None:
            return
        skipped, in_a_row = (int(v) for v in torch.stack([self.skipped, self.in_a_row]).tolist())
        state.skipped_steps += skipped
        self.skipped = None
        self.in_a_row = None if in_a_row == 0 else self.in_a_row
        if in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise TrainingError(
                f"loss was NaN/Inf for {in_a_row} steps in a row at step {state.step}; the "
                f"last checkpoint is kept. Try a lower train.lr (now {tc.lr:g}) or "
                "train.precision=fp32")


# A time budget (train.max_minutes) becomes a step count once, PLAN_AT steps into the run,
# from the time per step measured since step PROBE_FROM; from then on the LR schedule and
# the end of the run follow steps only, and the plan is recorded in config.yaml
# (train.budget_steps) so that a resumed run keeps it. A run that falls far behind its plan
# (the machine got busier) still stops at TIME_GUARD x the budget: the wall-time promise
# holds within 10%, and only such a run depends on load.
PLAN_AT, PROBE_FROM, TIME_GUARD = 40, 10, 1.1


def horizon(step: int, tc) -> int:
    """The step count the schedule runs to at `step`: max_steps, or the time budget's plan
    once it applies (from PLAN_AT on, so the steps before it never depend on the plan)."""
    if tc.budget_steps and step >= PLAN_AT:
        return min(tc.max_steps, tc.budget_steps)
    return tc.max_steps


def progress_of(state: TrainState, tc) -> float:
    """How far the run is, 0 -> 1, by its step and epoch budgets (never by wall time)."""
    by_epochs = state.loader.epochs_done() / tc.epochs if tc.epochs else 0.0
    return max(state.step / horizon(state.step, tc), by_epochs)


def out_of_time(state: TrainState, tc) -> bool:
    """A time budget without a plan yet (a run shorter than PLAN_AT steps) ends on time;
    with a plan, only TIME_GUARD x over it does."""
    if not tc.max_minutes:
        return False
    limit = tc.max_minutes * 60 * (TIME_GUARD if tc.budget_steps else 1.0)
    return state.elapsed_s >= limit


def _stop_for_time(state: TrainState, tc) -> bool:
    """`out_of_time`, by rank 0's clock for every rank (one broadcast per step, only with
    a time budget), so that all ranks stop at the same step."""
    if not tc.max_minutes:
        return False
    return bool(distributed.broadcast_flag(state.dist, out_of_time(state, tc)))


def plan_budget(state: TrainState, tc, probe: tuple[int, float], probe_size: int | None = None
                ) -> int:
    """Steps that fit in the time budget, from the time per step since `probe` (step,
    elapsed). With progressive resolution, measured at `probe_size`, a step's cost is taken
    to grow with its pixels: the plan divides by the run's mean cost relative to the probe."""
    p_step, p_elapsed = probe
    per_step = (state.elapsed_s - p_elapsed) / max(state.step - p_step, 1)
    left = tc.max_minutes * 60 - state.elapsed_s
    if tc.progressive and probe_size:
        starts = [0.0] + [until for _, until in tc.progressive[:-1]]
        per_step *= sum((until - a) * (size / probe_size) ** 2
                        for a, (size, until) in zip(starts, tc.progressive))
    return max(state.step, state.step + int(left / max(per_step, 1e-9)))


# ------------------------------------------------------------------------ the run


def train(cfg: Config, run_dir: str | Path, recipe: Recipe, *, resume: bool = False,
          fresh: bool = False, progress: bool = True,
          lineage: list[dict[str, Any]] | None = None) -> TrainResult:
    """Train what `recipe` describes, writing everything into `run_dir` (a run derived
    from another, like a distilled student, records its `lineage` in config.yaml)."""
    run_dir = Path(run_dir)
    if resume and fresh:
        raise ConfigError("--resume and --fresh cannot be used together")
    d = distributed.from_env()  # torchrun's environment, or one process
    if d.enabled and not getattr(recipe, "data_parallel", False):
        raise ConfigError(f"{type(recipe).__name__} trains in one process; data-parallel "
                          "training (--nproc, torchrun) is built for diffusion runs")
    requested = cfg.train.precision
    cfg, prec, notes = resolve_runtime(cfg)
    try:
        device = distributed.setup(d, prec.device)
        if device != prec.device:
            prec = Precision(device, prec.mode)
        distributed.check_batch(d, cfg.train.batch_size)
        return _train(cfg, run_dir, recipe, resume, fresh, progress, lineage, d, prec,
                      requested, notes)
    finally:
        distributed.teardown(d)


def _train(cfg: Config, run_dir: Path, recipe: Recipe, resume: bool, fresh: bool,
           progress: bool, lineage: list[dict[str, Any]] | None, d: Dist, prec: Precision,
           requested: str, notes: list[str]) -> TrainResult:
    data = recipe.prepare_data(cfg, prec.device)
    ckpt, fitted = None, None
    if d.main:  # rank 0 alone reads, clears and sizes the run directory; the rest follow it
        ckpt, cfg, how = prepare_run_dir(run_dir, data.cfg, resume, fresh)
        fit = getattr(recipe, "fit_to_budget", None)
        if ckpt is None and fit is not None:  # a run from scratch may size itself to its budget
            asked = cfg.model
            cfg, fitted = fit(cfg, data, prec)
            if cfg.model != asked:  # recorded, so that the same command resumes this run
                write_json(run_dir / NARROWED, {"asked": {"channels": asked.channels,
                                                          "head_channels": asked.head_channels},
                                                "trained": {"channels": cfg.model.channels,
                                                            "head_channels": cfg.model.head_channels},
                                                "why": fitted})
    ckpt, cfg, how, fitted = distributed.broadcast(d, (ckpt, cfg, how if d.main else None, fitted))
    notes = notes + ([fitted] if fitted else [])
    state = TrainState.create(cfg, lambda: recipe.build_model(cfg), data.train_set, prec, d)
    task_state = state.restore(ckpt) if ckpt is not None else {}
    reason = precision_reason(requested, prec.device)
    notes = [f"precision {reason}"] + notes
    if d.enabled:
        notes.append(f"data-parallel: {d.world} processes ({'nccl' if prec.device.type == 'cuda' else 'gloo'}), "
                     f"global batch train.batch_size={cfg.train.batch_size} = {d.world} x "
                     f"{cfg.train.batch_size // d.world} per rank, lr {cfg.train.lr:g}")
    if d.main:
        write_config(run_dir, cfg, lineage)
        update_runtime(run_dir, {"device": str(prec.device), "precision": prec.mode,
                                 "precision_reason": reason, "world_size": d.world,
                                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "compile": cfg.train.compile}, reset=True)
        logger: MetricsLogger | NullLogger = MetricsLogger(
            run_dir, resume_step=state.step if ckpt is not None else None)
    else:
        logger = NullLogger()
    try:
        ctx = TaskContext(cfg, run_dir, prec, state.mem_format, logger if d.main else None,
                          data.train_set, data.val_set, d)
        # Rank 0 first: a task may train and cache what it needs (the feature classifier)
        task = recipe.make_task(ctx) if d.main else None
        distributed.barrier(d)
        if task is None:
            task = recipe.make_task(ctx)
        if ckpt is not None:
            task.load_state_dict(task_state)
        held = f", {len(data.val_set)} held out" if data.val_set is not None else ""
        kind = cfg.model.arch + (f", {cfg.model.num_classes} classes" if cfg.model.num_classes else "")
        if data.train_set.bucket is not None:
            from effusion.data.buckets import describe

            notes = notes + [describe(data.train_set) + " (one bucket per batch)"]
        for line in [f"training {count_params(state.model) / 1e6:.2f}M params ({kind}) on "
                     f"{len(data.train_set)} images{held} ({cfg.data.source}), "
                     f"{prec.device.type} {prec.mode}, run dir {run_dir}", how] + notes + state.switch_notes:
            if d.main:
                print(f"effusion: {line}")
        distributed.barrier(d)  # config.yaml and the logs are in place before anyone trains
        return _fit(cfg, run_dir, state, task, logger, progress and d.main, lineage)
    finally:
        state.loader.close()
        logger.close()  # also when training fails, so nothing is lost from metrics.jsonl


def _fit(cfg: Config, run_dir: Path, state: TrainState, task: Task, logger: MetricsLogger,
         progress: bool, lineage: list[dict[str, Any]] | None = None) -> TrainResult:
    tc = cfg.train
    bar = tqdm(total=100, unit="%", disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
    bar.update(min(100.0, 100 * progress_of(state, tc)))
    window = _LogWindow(state.images_seen)
    t0 = time.perf_counter() - state.elapsed_s
    last_loss, in_a_row, compile_logged = math.nan, 0, False
    d = state.dist
    size = shown_size = None  # progressive resolution: the size now, and last announced
    health = _DeviceHealth()

    def checkpoint() -> None:  # rank 0 writes; the others wait until it is whole
        health.settle(state, tc)
        if d.main or state.fsdp:  # FSDP: every rank takes part in the gather
            state.save(run_dir, tc.keep_checkpoints, task.state_dict() if d.main else None,
                       write=d.main)
        distributed.barrier(d)

    # Where the time per step is measured from, if the time budget still needs its plan.
    plan_step = PLAN_AT if state.step < PLAN_AT else state.step + PLAN_AT - PROBE_FROM
    probe: tuple[int, float] | None = None
    state.model.train()
    try:
        while progress_of(state, tc) < 1.0 and not _stop_for_time(state, tc):
            if tc.max_minutes and not tc.budget_steps:
                if probe is None and state.step >= min(PROBE_FROM, plan_step - 1):
                    probe = (state.step, state.elapsed_s)
                elif probe is not None and state.step >= plan_step:
                    # rank 0's clock decides, for every rank
                    planned = distributed.broadcast(d, plan_budget(state, tc, probe, size))
                    cfg = replace(cfg, train=replace(tc, budget_steps=planned))
                    tc = cfg.train
                    if d.main:
                        write_config(run_dir, cfg, lineage)
                    logger.log(state.step, {"budget_steps": tc.budget_steps})
                    bar.write(f"effusion: train.max_minutes={tc.max_minutes:g} planned as "
                              f"train.budget_steps={tc.budget_steps} (measured "
                              f"{(state.elapsed_s - probe[1]) / (state.step - probe[0]):.3g} s/step); "
                              "the LR schedule and the end follow steps from here")
            # --- one optimizer step over `grad_accum` micro-batches
            epoch_before = state.loader.epoch
            lr = tc.lr * lr_factor(state.step, progress_of(state, tc), tc.warmup_steps,
                                   tc.lr_schedule, state.loader.epoch, tc.lr_step_every,
                                   tc.lr_gamma)
            set_lr(state.optimizer, lr)
            size = stage_size(tc.progressive, progress_of(state, tc))
            if size != shown_size:
                shown_size = size
                logger.log(state.step, {"train_size": size})
                bar.write(f"effusion: progressive resolution: training at {size}/"
                          f"{cfg.data.image_size} of the size from step {state.step}")
            scale = size / cfg.data.image_size if size else 1.0
            outcome, grad_norm = train_step(state, task, tc, scale)
            gate = None
            if isinstance(outcome.finite, torch.Tensor):  # decided on the GPU
                gate = outcome.finite
                health.add(gate)
            elif not outcome.finite:
                # The update was skipped, the weights kept; give up if it persists.
                state.skipped_steps, in_a_row = state.skipped_steps + 1, in_a_row + 1
                if in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    raise TrainingError(
                        f"loss was NaN/Inf for {in_a_row} steps in a row at step {state.step}; "
                        f"the last checkpoint is kept. Try a lower train.lr (now {tc.lr:g}) "
                        "or train.precision=fp32")
                continue
            in_a_row = 0
            state.ema.update(state.model, gate)
            state.step += 1
            if state.posthoc is not None:
                state.posthoc.update(state.model, state.step)
                if state.step % tc.posthoc_every == 0 and d.main:
                    state.posthoc.save_snapshot(run_dir, state.step)
            state.images_seen += outcome.images
            last_loss = outcome.loss
            window.add(last_loss, gate)
            compile_s = getattr(state.net, "compile_s", None)
            compile_error = getattr(state.net, "error", None)
            if compile_s is not None and not compile_logged:
                # Compilation happened inside this first step: log it apart and keep it
                # out of the training time.
                compile_logged, t0 = True, t0 + compile_s
                logger.log(state.step, {"compile_s": compile_s, "compiled": True})
                update_runtime(run_dir, {"compiled": True})
                bar.write(f"effusion: torch.compile took {compile_s:.1f} s (not counted as training time)")
            elif compile_error is not None and not compile_logged:
                # The config still says compile: true; what really ran is recorded here.
                compile_logged = True
                logger.log(state.step, {"compiled": False, "compile_error": compile_error})
                update_runtime(run_dir, {"compiled": False, "compile_error": compile_error})
                bar.write(f"effusion: torch.compile failed ({compile_error}); this run trains "
                          f"in eager mode (recorded in {RUNTIME} and metrics.jsonl)")
            state.elapsed_s = time.perf_counter() - t0

            # --- log, evaluate / sample, checkpoint
            if state.step % tc.log_every == 0:
                health.settle(state, tc)
                line = window.flush(state, lr, grad_norm.item())
                logger.log(state.step, line)
                bar.set_postfix_str(f"step {state.step} loss {line['loss']:.4f} "
                                    f"{line['images_per_s']:.0f} img/s")
            epoch_done = state.loader.epoch > epoch_before
            evals = {}
            if not state.fsdp:
                evals = task.periodic(state.ema.model, state.step, epoch_done) if d.main else {}
            elif getattr(task, "uses_model", lambda *a: True)(state.step, epoch_done):
                averaged = state.averaged_model()  # gathered on every rank, kept on rank 0
                evals = task.periodic(averaged, state.step, epoch_done) if d.main else {}
            if evals:
                epochs = round(state.loader.epochs_done(), 3)
                logger.log(state.step, {**evals, "epoch": epochs})
                bar.write(f"step {state.step} epoch {epochs:.2f}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in evals.items()))
            if state.step % tc.checkpoint_every == 0:
                checkpoint()
            bar.update(min(100.0, 100 * progress_of(state, tc)) - bar.n)
    except KeyboardInterrupt:
        if d.main and not state.fsdp:  # no barrier: the other ranks may be stopping anywhere
            state.save(run_dir, tc.keep_checkpoints, task.state_dict())
        bar.close()
        if state.fsdp:  # a gather needs every rank, and they may be stopping anywhere
            print(f"\ninterrupted at step {state.step}: with train.parallel=fsdp no checkpoint is "
                  "written on interrupt; the same command resumes from the last periodic one")
        else:
            print(f"\ninterrupted: checkpoint saved at step {state.step}; continue with --resume")
        raise
    bar.close()

    # --- finish: final checkpoint and the task's artifact (sample grid / curves)
    last = latest_checkpoint(run_dir, verify=False)  # only its name matters here
    if distributed.broadcast(d, last is None or last.name != checkpoint_name(state.step)):
        checkpoint()
    health.settle(state, tc)
    last_loss = distributed.mean(d, float(last_loss))  # the global batch's loss
    averaged = state.averaged_model()  # FSDP: gathered (every rank), kept on rank 0
    if not d.main:
        return TrainResult(run_dir, state.step, state.images_seen, last_loss,
                           state.elapsed_s / 60, None)
    if state.posthoc is not None and state.step % tc.posthoc_every:
        state.posthoc.save_snapshot(run_dir, state.step)  # the average at the last step
    artifact = task.finish(averaged, state.step)
    return TrainResult(run_dir, state.step, state.images_seen, last_loss,
                       state.elapsed_s / 60, artifact)


class _LogWindow:
    """Loss and throughput averaged over the steps since the last log line. Losses may be
    device tensors (summed there; read back once, when the line is written), with a
    `finite` gate that leaves skipped steps out of the mean."""

    def __init__(self, images_seen: int):
        self.t, self.images, self.loss_sum, self.n = time.perf_counter(), images_seen, 0.0, 0

    def add(self, loss: float | torch.Tensor, finite: torch.Tensor | None = None) -> None:
        if finite is not None:
            loss = torch.where(finite, loss, torch.zeros_like(loss))
            finite = finite.to(torch.int64)
        self.loss_sum = self.loss_sum + loss
        self.n = self.n + (1 if finite is None else finite)

    def flush(self, state: TrainState, lr: float, grad_norm: float) -> dict[str, Any]:
        now = time.perf_counter()
        mean = float(self.loss_sum / self.n) if float(self.n) else math.nan
        line = {"loss": distributed.mean(state.dist, mean), "lr": lr, "grad_norm": grad_norm,
                "images_per_s": (state.images_seen - self.images) / max(now - self.t, 1e-9),
                "images_seen": state.images_seen, "elapsed_s": state.elapsed_s,
                "skipped_steps": state.skipped_steps,
                "epoch": round(state.loader.epochs_done(), 3)}
        self.t, self.images, self.loss_sum, self.n = now, state.images_seen, 0.0, 0
        return line
