"""The training loop: one function, read top to bottom.

Progress is counted in optimizer steps and images seen; training ends at
`train.max_steps` or when `train.max_minutes` of wall time are spent, whichever is first.
Running the same command with `--resume` continues from the latest checkpoint exactly as
if the run had never stopped (same RNG streams, same data order).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from effusion.config import Config, ConfigError
from effusion.data import BatchLoader, BatchStream, ImageSet, load_source, split
from effusion.latent import latent_training_set
from effusion.models import build_model, count_params, is_classifier
from effusion.train.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                                       load_checkpoint_state, load_weights, save_checkpoint,
                                       write_config)
from effusion.train.ema import EMA
from effusion.train.logging import MetricsLogger
from effusion.train.optim import build_optimizer, lr_factor, set_lr
from effusion.train.precision import Precision, apply_tf32, resolve_device, resolve_precision
from effusion.train.switches import apply_switches
from effusion.train.tasks import TASKS

MAX_NONFINITE_IN_A_ROW = 10


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays NaN/Inf); the last checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    images_seen: int
    loss: float
    minutes: float
    grid: Path | None  # the last sample grid (diffusion) or the loss/accuracy curves (classifier)


def prepare_run_dir(run_dir: Path, resume: bool, fresh: bool) -> Path | None:
    """Check the run directory against the flags; return the checkpoint to resume from."""
    if resume and fresh:
        raise ConfigError("--resume and --fresh cannot be used together")
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint found in {run_dir}")
        return ckpt
    if fresh:
        for name in ("checkpoints", "samples", "tb", "metrics.jsonl"):
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    elif list_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already holds a trained run; pass --resume to continue "
                              "it, --fresh to start it over, or choose another --run directory")
    return None


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


def training_data(cfg: Config, device: torch.device
                  ) -> tuple[Config, ImageSet, ImageSet, ImageSet | None, BatchLoader]:
    """(config with num_classes resolved, all data, training split (latents for a latent
    run without augmentation), held-out split or None, the batch loader)."""
    tc = cfg.train
    data = load_source(cfg.data)
    cfg = resolve_for_data(cfg, data)
    train_set, val_set = split(data, cfg.data.val_fraction)
    train_set = latent_training_set(cfg, train_set, device)
    loader = BatchLoader(BatchStream(train_set, tc.batch_size, tc.seed), cfg.data, tc.seed,
                         tc.workers, tc.prefetch, pin=tc.pin_memory and device.type == "cuda")
    return cfg, data, train_set, val_set, loader


@dataclass
class StepOutcome:
    loss: float  # mean over the step's micro-batches (nan if skipped)
    images: int
    finite: bool  # False: a micro-batch's loss was NaN/Inf and the update was skipped


def train_step(net, model: torch.nn.Module, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, loader: BatchLoader, task, gen: torch.Generator,
               tc) -> tuple[StepOutcome, torch.Tensor]:
    """One optimizer step: forward and backward over `grad_accum` micro-batches, clip,
    update. A non-finite loss skips the update (gradients dropped, weights untouched).
    Returns the outcome and the pre-clip gradient norm (nan when clipping is off)."""
    step_loss, images = 0.0, 0
    for _ in range(tc.grad_accum):
        x0, labels = loader.next()
        loss = task.loss(net, x0, labels, gen)  # the task reduces its loss in fp32
        if not torch.isfinite(loss):
            opt.zero_grad(set_to_none=True)
            return StepOutcome(math.nan, 0, False), torch.tensor(math.nan)
        # Equal micro-batches: the mean of their means is the big batch's mean.
        scaler.scale(loss / tc.grad_accum).backward()
        step_loss += loss.item() / tc.grad_accum
        images += x0.shape[0]
    scaler.unscale_(opt)
    grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                 if tc.grad_clip > 0 else torch.tensor(math.nan))
    scaler.step(opt)  # fp16: skipped by the scaler itself if the gradients overflowed
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return StepOutcome(step_loss, images, True), grad_norm


def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, fresh: bool = False,
          progress: bool = True) -> TrainResult:
    """Train the configured model (the U-Net, or a classifier for model.arch mlp / cnn),
    writing everything into `run_dir`."""
    run_dir = Path(run_dir)
    tc = cfg.train
    ckpt = prepare_run_dir(run_dir, resume, fresh)

    # --- device and precision, resolved once and recorded in the run's config
    device = resolve_device(tc.device)
    prec = Precision(device, resolve_precision(tc.precision, device))
    cfg = replace(cfg, train=replace(tc, device=str(device), precision=prec.mode))
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    tf32_note = apply_tf32(tc.tf32, device)

    # --- data: a fixed held-out split, then a resumable stream over the training split
    cfg, _, train_set, val_set, loader = training_data(cfg, device)

    # --- model (with the efficiency switches), optimizer, EMA
    torch.manual_seed(tc.seed)  # parameter init and dropout
    model = build_model(cfg).to(device)
    net, mem_format, switch_notes = apply_switches(model, tc)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    opt = build_optimizer(model, tc)
    scaler = prec.make_scaler()
    gen = torch.Generator().manual_seed(tc.seed + 1)  # timesteps, noise, label dropout
    step, images_seen, elapsed, skipped = 0, 0, 0.0, 0

    # --- resume: weights, optimizer, RNG streams and data position from the checkpoint
    task_state: dict = {}
    if ckpt is not None:
        load_weights(ckpt / "model.safetensors", model)
        state, opt_state, rng = load_checkpoint_state(ckpt)
        load_weights(ckpt / "ema.safetensors", ema.model)
        ema.updates = state["ema_updates"]
        opt.load_state_dict(opt_state)
        gen.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        loader.load_state_dict(state["data"])
        step, images_seen = state["step"], state["images_seen"]
        elapsed, skipped = state["elapsed_s"], state["skipped_steps"]
        task_state = state.get("task", {})
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
    write_config(run_dir, cfg)
    logger = MetricsLogger(run_dir, resume_step=step if ckpt is not None else None)

    def epochs_done() -> float:
        return loader.epoch + loader.index / len(train_set)

    def progress_of(step: int, elapsed: float) -> float:
        by_time = elapsed / (tc.max_minutes * 60) if tc.max_minutes else 0.0
        by_epochs = epochs_done() / tc.epochs if tc.epochs else 0.0
        return max(step / tc.max_steps, by_time, by_epochs)

    def checkpoint() -> None:
        rng = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {"images_seen": images_seen, "elapsed_s": elapsed, "skipped_steps": skipped,
                 "ema_updates": ema.updates, "data": loader.state_dict(),
                 "task": task.state_dict()}
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        save_checkpoint(run_dir, step, model=model, ema=ema.state_dict(), optimizer=opt,
                        rng=rng, state=state, keep=tc.keep_checkpoints)

    try:
        task = TASKS[cfg.model.arch](cfg, run_dir, train_set, val_set, prec, logger, mem_format)
        if task_state:
            task.load_state_dict(task_state)
        held = f", {len(val_set)} held out" if val_set is not None else ""
        kind = cfg.model.arch + (f", {cfg.model.num_classes} classes" if cfg.model.num_classes else "")
        print(f"effusion: training {count_params(model) / 1e6:.2f}M params ({kind}) on "
              f"{len(train_set)} images{held} ({cfg.data.source}), {device.type} {prec.mode}, "
              f"run dir {run_dir}")
        print(f"effusion: {tf32_note}")
        for note in switch_notes:
            print(f"effusion: {note}")
        bar = tqdm(total=100, unit="%", disable=not progress, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
        bar.update(min(100.0, 100 * progress_of(step, elapsed)))
        t0, last_log_t, last_log_images = time.perf_counter() - elapsed, time.perf_counter(), images_seen
        loss_sum, loss_n, last_loss, in_a_row = 0.0, 0, math.nan, 0
        compile_s = None
        model.train()
        try:
            while progress_of(step, elapsed) < 1.0:
                # --- one optimizer step over `grad_accum` micro-batches
                epoch_before = loader.epoch
                lr = tc.lr * lr_factor(step, progress_of(step, elapsed), tc.warmup_steps,
                                       tc.lr_schedule, loader.epoch, tc.lr_step_every, tc.lr_gamma)
                set_lr(opt, lr)
                outcome, grad_norm = train_step(net, model, opt, scaler, loader, task, gen, tc)
                if not outcome.finite:
                    # The update was skipped, the weights kept; give up if it persists.
                    skipped, in_a_row = skipped + 1, in_a_row + 1
                    if in_a_row >= MAX_NONFINITE_IN_A_ROW:
                        raise TrainingError(
                            f"loss was NaN/Inf for {in_a_row} steps in a row at step {step}; "
                            f"the last checkpoint is kept. Try a lower train.lr (now {tc.lr:g}) "
                            "or train.precision=fp32")
                    continue
                in_a_row = 0
                ema.update(model)
                step += 1
                images_seen += outcome.images
                last_loss = outcome.loss
                loss_sum, loss_n = loss_sum + last_loss, loss_n + 1
                if compile_s is None and getattr(net, "compile_s", None) is not None:
                    # Compilation happened inside this first step: log it apart and keep it
                    # out of the training time.
                    compile_s = net.compile_s
                    t0 += compile_s
                    logger.log(step, {"compile_s": compile_s})
                    bar.write(f"effusion: torch.compile took {compile_s:.1f} s (not counted as training time)")
                elapsed = time.perf_counter() - t0

                # --- log, evaluate / sample, checkpoint
                if step % tc.log_every == 0:
                    now = time.perf_counter()
                    ips = (images_seen - last_log_images) / max(now - last_log_t, 1e-9)
                    logger.log(step, {"loss": loss_sum / loss_n, "lr": lr, "grad_norm": grad_norm.item(),
                                      "images_per_s": ips, "images_seen": images_seen,
                                      "elapsed_s": elapsed, "skipped_steps": skipped,
                                      "epoch": round(epochs_done(), 3)})
                    bar.set_postfix_str(f"step {step} loss {loss_sum / loss_n:.4f} {ips:.0f} img/s")
                    last_log_t, last_log_images, loss_sum, loss_n = now, images_seen, 0.0, 0
                evals = task.periodic(ema.model, step, loader.epoch > epoch_before)
                if evals:
                    logger.log(step, {**evals, "epoch": round(epochs_done(), 3)})
                    bar.write(f"step {step} epoch {epochs_done():.2f}: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in evals.items()))
                if step % tc.checkpoint_every == 0:
                    checkpoint()
                bar.update(min(100.0, 100 * progress_of(step, elapsed)) - bar.n)
        except KeyboardInterrupt:
            checkpoint()
            bar.close()
            print(f"\ninterrupted: checkpoint saved at step {step}; continue with --resume")
            raise
        bar.close()

        # --- finish: final checkpoint and the task's artifact (sample grid / curves)
        if not list_checkpoints(run_dir) or latest_checkpoint(run_dir).name != f"step-{step:07d}":
            checkpoint()
        artifact = task.finish(ema.model, step)
        return TrainResult(run_dir, step, images_seen, last_loss, elapsed / 60, artifact)
    finally:
        loader.close()
        logger.close()  # also when training fails, so nothing is lost from metrics.jsonl
