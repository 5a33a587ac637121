"""`effusion optimize prune`: structured channel pruning of a diffusion run's U-Net by
gradient importance (Diff-Pruning, Fang et al. 2023), then a short fine-tune.

- The dependency graph comes from torch-pruning: a channel removed from a convolution is
  removed from everything coupled to it (GroupNorms, the skip concatenations into the
  decoder, residual additions, the time-embedding projection's scale/shift halves).
  GroupNorms lose the same number of channels in every group, so their group count stays.
- Attention blocks are pruned as one unit (`_AttentionPruner`): the residual width
  narrows (norm, qkv input, proj output) and every head keeps its width.
- The embedding MLPs and the output convolution are never pruned: the output keeps the
  image's channels, and the embedding width is shared by every block.
- Taylor importance (|w * dL/dw|, summed over a group) is accumulated over `batches`
  batches of real images at random timesteps, with the run's own training loss: the
  gradient sum over timesteps of Diff-Pruning, without its cut-off of the late steps.
  `magnitude` (L2 norm of the weights) and `random` are the baselines.
- The fine-tune is knowledge distillation from the unpruned network (the distillation
  task of `effusion.recipes.distill`, optionally plus the data loss), for
  `finetune_minutes`; `report.json` holds parameters and MACs per call before and after.

torch-pruning is an optional dependency (`pip install 'effusion[prune]'`).
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from effusion.config import ConfigError, config_from_dict, parse_overrides
from effusion.data import to_model_range
from effusion.models import build_model, count_params
from effusion.models.layers import Attention
from effusion.models.pruned import group_count, shape_like
from effusion.optimize.export import example_inputs
from effusion.optimize.timing import latency_ms, macs
from effusion.recipes.distill import (SCRATCH_DEFAULTS, DistillTask, StudentRecipe, Teacher,
                                      _inherited_range)
from effusion.recipes.generative import DiffusionRecipe
from effusion.runs import (CheckpointError, LoadedRun, latest_checkpoint, load_run, read_lineage,
                           read_tensors, write_json)
from effusion.runs.files import REPORT
from effusion.train.loop import TrainResult
from effusion.train.loop import train as run_loop
from effusion.train.objective import diffusion_loss

IMPORTANCES = ("taylor", "magnitude", "random")
# A pruned network has lost much of what it knew, so it fine-tunes at half the default
# recipe's peak LR, not at the distillation passes' 2e-4 (measured: at 2e-4, a 30%-pruned
# guidance-distilled default run's loss was still falling steeply after 4 minutes, and its
# samples were far worse than the unpruned ones').
FINETUNE_DEFAULTS = SCRATCH_DEFAULTS + ["train.lr=1e-3", "train.warmup_steps=20"]
PRUNE_HINT = "channel pruning needs torch-pruning: pip install 'effusion[prune]'"


def import_torch_pruning():
    try:
        return importlib.import_module("torch_pruning")
    except ImportError:
        raise ConfigError(PRUNE_HINT) from None


def _attention_pruner(tp):
    class _AttentionPruner(tp.pruner.function.BasePruningFunc):
        """Prunes an Attention block's residual channels; its heads stay whole. Input and
        output are the same channels (prune_in_channels = prune_out_channels couples them)."""

        def prune_out_channels(self, layer: Attention, idxs: list[int]) -> Attention:
            tp.prune_groupnorm_out_channels(layer.norm, idxs)
            tp.prune_conv_in_channels(layer.qkv, idxs)
            tp.prune_conv_out_channels(layer.proj, idxs)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: Attention) -> int:
            return layer.norm.num_channels

        get_in_channels = get_out_channels

        def get_out_channel_groups(self, layer: Attention) -> int:
            return layer.norm.num_groups

        get_in_channel_groups = get_out_channel_groups

    return _AttentionPruner()


def never_pruned(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs keep their width: the output conv (image channels) and the
    embedding MLPs (one width shared by every block)."""
    keep = [model.conv_out, *model.time_mlp]
    if model.guidance_mlp is not None:
        keep += list(model.guidance_mlp)
    return [m for m in keep if isinstance(m, (nn.Linear, nn.Conv2d))]


def prune_unet(model: nn.Module, example: tuple[torch.Tensor, ...], ratio: float,
               importance: str = "taylor", loss_batches=None) -> nn.Module:
    """Remove `ratio` of the prunable channels of `model` (in place) and return it.

    `loss_batches` (an iterable of scalar losses, each with its graph) supplies the
    gradients Taylor importance needs; the other importances ignore it.
    """
    tp = import_torch_pruning()
    if not 0 < ratio < 1:
        raise ConfigError(f"--ratio must be between 0 and 1 (the share of channels removed), "
                          f"got {ratio}")
    if importance not in IMPORTANCES:
        raise ConfigError(f"--importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}")
    imp = {"taylor": lambda: tp.importance.TaylorImportance(),
           "magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
           "random": lambda: tp.importance.RandomImportance()}[importance]()
    model.eval()
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio,
                                  ignored_layers=never_pruned(model),
                                  customized_pruners={Attention: _attention_pruner(tp)})
    if importance == "taylor":
        if loss_batches is None:
            raise ConfigError("Taylor importance needs loss batches (gradients)")
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for loss in loss_batches:
                loss.backward()  # gradients add up over batches and timesteps
    pruner.step()
    model.zero_grad(set_to_none=True)
    for m in model.modules():  # where a norm reads a concatenation, the per-group pruning
        if isinstance(m, nn.GroupNorm):  # can leave a width its group count does not divide
            m.num_groups = group_count(m.num_groups, m.num_channels)
    return model


def _taylor_losses(model: nn.Module, base: LoadedRun, recipe: DiffusionRecipe, batches: int,
                   batch_size: int, seed: int):
    """The run's training loss on `batches` batches of its training images (or latents),
    at random timesteps, each yielded for backward."""
    cfg = base.config
    data = recipe.prepare_data(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    n = len(data.train_set)
    fwd = model
    if cfg.model.guidance_input:  # the conditional prediction (w = 1) of a distilled student
        def fwd(x, t, c):
            return model(x, t, c, w=torch.ones(x.shape[0]))
    for _ in range(batches):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        x0 = data.train_set.images[idx]
        x0 = to_model_range(x0) if x0.dtype == torch.uint8 else x0.float()
        labels = data.train_set.labels[idx] if cfg.model.num_classes else None
        yield diffusion_loss(fwd, x0, labels, cfg.diffusion, base.schedule, gen, base.precision,
                             cond_drop=cfg.train.cond_drop, null_class=cfg.model.num_classes)


def _cost(model: nn.Module, run: LoadedRun) -> dict[str, Any]:
    return {"params": count_params(model), "macs_per_call": macs(model, *example_inputs(run, 1))}


def _latencies(models: list[nn.Module], run: LoadedRun, rounds: int = 3) -> list[float]:
    """ms per call at batch 64 of each model, measured in alternation (the best of
    `rounds` medians), so a change in machine load hits them alike."""
    x = example_inputs(run, 64)
    best = [float("inf")] * len(models)
    for _ in range(rounds):
        for i, m in enumerate(models):
            best[i] = min(best[i], latency_ms(m, *x, repeats=3))
    return best


def prune_run(run_dir: str | Path, out_dir: str | Path, *, ratio: float = 0.5,
              importance: str = "taylor", finetune_minutes: float = 5.0, batches: int = 8,
              data_weight: float = 0.0, overrides: list[str] | None = None,
              resume: bool = False, fresh: bool = False, progress: bool = True
              ) -> tuple[TrainResult, dict[str, Any]]:
    """Prune a diffusion run's U-Net (EMA weights) and fine-tune it by distillation from
    the unpruned one into `out_dir`; returns the fine-tune's result and the report."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError("the pruned run needs its own directory (--out)")
    if finetune_minutes <= 0:
        raise ConfigError(f"--finetune-minutes must be > 0 (a pruned network needs a fine-tune), "
                          f"got {finetune_minutes}")
    base = load_run(run_dir, device="cpu", precision="fp32")
    teacher = Teacher(base)  # also rejects an exported run
    cfg = config_from_dict(parse_overrides(
        FINETUNE_DEFAULTS + [f"train.max_minutes={finetune_minutes}"] + list(overrides or [])),
        base.config)
    lineage = base.lineage + [{"pass": "prune", "base": str(run_dir.resolve()), "step": base.step,
                               "ratio": ratio, "importance": importance,
                               "finetune_minutes": finetune_minutes, "batches": batches}]
    ckpt = None if fresh else latest_checkpoint(out_dir)  # the same command resumes
    if ckpt is not None:
        done = (read_lineage(out_dir) or [{}])[-1]
        if (done.get("pass"), done.get("ratio"), done.get("importance")) != ("prune", ratio, importance):
            raise CheckpointError(
                f"{out_dir} holds another run ({done.get('pass', 'not a pruned run')}"
                + (f", ratio {done.get('ratio')}, {done.get('importance')} importance"
                   if done.get("pass") == "prune" else "")
                + "); --fresh discards it, or choose another --out")
    before = _cost(base.model, base)
    if ckpt is not None:  # resuming the fine-tune: the widths are in the checkpoint
        widths = read_tensors(ckpt / "model.safetensors")
        pruned = shape_like(build_model(cfg, latent_shape=base.vae.latent_shape if base.vae
                                        else None), widths)
    else:
        import_torch_pruning()
        pruned = copy.deepcopy(base.model).float().requires_grad_(True)  # the teacher is frozen
        losses = _taylor_losses(pruned, base, DiffusionRecipe(), batches,
                                cfg.train.batch_size, cfg.train.seed) if importance == "taylor" else None
        prune_unet(pruned, example_inputs(base, 2), ratio, importance, losses)
    after = _cost(pruned, base)
    before["latency_ms_batch_64"], after["latency_ms_batch_64"] = _latencies([base.model, pruned], base)
    w_range = _inherited_range(base, (1.0, 3.0)) if teacher.takes_w else None
    recipe = StudentRecipe(lambda c: copy.deepcopy(pruned),
                           lambda ctx, vae: DistillTask(ctx, teacher, w_range, data_weight, vae=vae))
    result = run_loop(cfg, out_dir, recipe, resume=resume, fresh=fresh, progress=progress,
                      lineage=lineage)
    report = {"source": str(run_dir), "ratio": ratio, "importance": importance,
              "before": before, "after": after,
              "params_ratio": after["params"] / before["params"],
              "macs_ratio": after["macs_per_call"] / before["macs_per_call"],
              "latency_speedup_batch_64": before["latency_ms_batch_64"] / after["latency_ms_batch_64"],
              "finetune": {"steps": result.step, "minutes": result.minutes, "loss": result.loss,
                           "data_weight": data_weight},
              "threads": torch.get_num_threads()}
    write_json(out_dir / REPORT, report)
    return result, report
