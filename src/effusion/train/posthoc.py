"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2, section 3): choose the length of the weight average after training.

During training, a few power-function EMAs are kept: after update t the average is
    avg_t = beta_t avg_{t-1} + (1 - beta_t) theta_t,  beta_t = (1 - 1/t)^(gamma + 1),
which weights past weights as tau^gamma: an average over a fixed *fraction* of the run,
whatever its length. Its relative width sigma_rel (the profile's standard deviation over
its length) maps one-to-one to gamma. Snapshots of these averages are saved every
`train.posthoc_every` steps (`posthoc/step-NNNNNNN.safetensors`).

Every snapshot is a known linear combination of the training iterates theta_1..theta_T
(its *profile*, a weight per step). The average of any other profile, a power EMA of
another width or a bias-corrected exponential EMA with a fixed decay, is approximated by
the combination of snapshots whose profile is closest in least squares; the residual of
that fit is reported. Profiles are computed for the discrete recursions actually run
(not EDM2's continuous approximation), so a target equal to a snapshot is reproduced exactly.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from effusion.config import ConfigError
from effusion.runs.files import CheckpointError, read_tensors

SNAPSHOT_DIR = "posthoc"
_NAME = re.compile(r"^step-(\d{7,})\.safetensors$")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power profile tau^gamma with relative width sigma_rel:
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), solved as EDM2's cubic
    gamma^3 + 7 gamma^2 + (16 - 1/s^2) gamma + (12 - 1/s^2) = 0 (largest real root)."""
    if not 0 < sigma_rel < 0.3:  # sigma_rel -> 0.289 as gamma -> -1 (a uniform average)
        raise ConfigError(f"sigma_rel must be in (0, 0.3), got {sigma_rel}")
    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(step: int, gamma: float) -> float:
    """The decay of a power EMA at update `step` (1-based): (1 - 1/step)^(gamma + 1)."""
    return (1.0 - 1.0 / step) ** (gamma + 1)


class PowerEMAs:
    """The power-function EMAs that training keeps for post-hoc EMA (one per sigma_rel)."""

    def __init__(self, model: nn.Module, sigma_rels: tuple[float, ...]):
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.avgs = [{k: v.detach().clone().float() for k, v in model.state_dict().items()}
                     for _ in self.gammas]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based)."""
        sd = model.state_dict()
        for gamma, avg in zip(self.gammas, self.avgs):
            w = 1.0 - power_beta(step, gamma)
            for k, v in sd.items():
                if v.is_floating_point():
                    avg[k].lerp_(v.float(), w)
                else:
                    avg[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}/{k}": v.detach().cpu().contiguous() for i, avg in enumerate(self.avgs)
                for k, v in avg.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, avg in enumerate(self.avgs):
            for k in avg:
                avg[k].copy_(tensors[f"{i}/{k}"])

    def save_snapshot(self, run_dir: Path, step: int) -> Path:
        path = Path(run_dir) / SNAPSHOT_DIR / f"step-{step:07d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"step": str(step), "gammas": json.dumps(self.gammas),
                "sigma_rels": json.dumps(self.sigma_rels)}
        tmp = path.with_suffix(".tmp")
        save_file(self.state_dict(), str(tmp), metadata=meta)
        tmp.replace(path)
        return path


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    index: int  # which average in the file
    gamma: float


def list_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """Every (snapshot file, average) of a run, oldest first; none: a CheckpointError."""
    root = Path(run_dir) / SNAPSHOT_DIR
    files = sorted(p for p in root.glob("step-*.safetensors") if _NAME.match(p.name)) \
        if root.is_dir() else []
    if not files:
        raise CheckpointError(
            f"{run_dir} has no post-hoc EMA snapshots ({root}/step-*.safetensors); train it "
            "with --set train.posthoc_ema=[0.05,0.1] to keep them")
    out = []
    for p in files:
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
            gammas = json.loads(meta["gammas"])
            step = int(meta["step"])
        except Exception as e:  # noqa: BLE001 - any unreadable or corrupt file
            raise CheckpointError(f"post-hoc EMA snapshot {p} is corrupt: {e}") from None
        out += [Snapshot(p, step, i, float(g)) for i, g in enumerate(gammas)]
    return out


# ------------------------------------------------------------------------ profiles

def ema_profile(betas: np.ndarray, init_weight: bool) -> np.ndarray:
    """Weights over (theta_0, theta_1, ..., theta_T) of an EMA run with decay betas[t - 1]
    at update t = 1..T: weight(tau) = (1 - beta_tau) prod_{s > tau} beta_s; theta_0 (the
    initial copy) keeps prod_s beta_s if `init_weight`, else that share is dropped and the
    rest renormalised (a bias-corrected average of the iterates)."""
    betas = np.asarray(betas, dtype=np.float64)
    after = np.concatenate([np.cumprod(betas[::-1])[::-1][1:], [1.0]])  # prod_{s > tau} beta_s
    w = np.concatenate([[np.prod(betas) if init_weight else 0.0], (1.0 - betas) * after])
    return w if init_weight else w / w.sum()


def power_profile(step: int, gamma: float, length: int) -> np.ndarray:
    """The profile of a power EMA at `step`, zero-padded to `length` + 1 entries."""
    betas = (1.0 - 1.0 / np.arange(1, step + 1, dtype=np.float64)) ** (gamma + 1)
    p = ema_profile(betas, init_weight=True)
    return np.pad(p, (0, length - step))


def exponential_profile(step: int, decay: float, length: int) -> np.ndarray:
    """A fixed-decay EMA of the iterates, bias-corrected (the initial weights dropped)."""
    p = ema_profile(np.full(step, decay), init_weight=False)
    return np.pad(p, (0, length - step))


@dataclass
class Target:
    """The average to rebuild: a power EMA (sigma_rel) or a fixed decay, at a step."""

    sigma_rel: float | None = None
    decay: float | None = None

    def __post_init__(self) -> None:
        if (self.sigma_rel is None) == (self.decay is None):
            raise ConfigError("give one of sigma_rel or decay")
        if self.decay is not None and not 0 < self.decay < 1:
            raise ConfigError(f"decay must be in (0, 1), got {self.decay}")
        if self.sigma_rel is not None:
            sigma_rel_to_gamma(self.sigma_rel)  # range check

    @property
    def label(self) -> str:
        return f"sigma_rel={self.sigma_rel:g}" if self.sigma_rel is not None else f"decay={self.decay:g}"

    def profile(self, step: int, length: int) -> np.ndarray:
        if self.sigma_rel is not None:
            return power_profile(step, sigma_rel_to_gamma(self.sigma_rel), length)
        return exponential_profile(step, self.decay, length)


def solve_coefficients(snapshots: list[Snapshot], target: Target, step: int
                       ) -> tuple[np.ndarray, float]:
    """Least-squares coefficients of the snapshots (taken at or before `step`) whose
    combined profile is closest to the target's at `step`, and the relative residual
    ||P^T x - p|| / ||p|| (0: exact)."""
    snaps = [s for s in snapshots if s.step <= step]
    if not snaps:
        raise CheckpointError(f"no post-hoc EMA snapshot at or before step {step}")
    cache: dict[tuple[int, float], np.ndarray] = {}
    rows = []
    for s in snaps:
        key = (s.step, s.gamma)
        if key not in cache:
            cache[key] = power_profile(s.step, s.gamma, step)
        rows.append(cache[key])
    P = np.stack(rows)  # (K, step + 1)
    p = target.profile(step, step)
    x, *_ = np.linalg.lstsq(P.T, p, rcond=None)
    resid = float(np.linalg.norm(P.T @ x - p) / np.linalg.norm(p))
    return x, resid


def reconstruct(run_dir: str | Path, target: Target, step: int | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state_dict of the target average at `step` (default: the last snapshot's step),
    and a summary {target, step, snapshots used, residual}."""
    snaps = list_snapshots(run_dir)
    last = max(s.step for s in snaps)
    step = last if step is None else step
    if step > last:
        raise ConfigError(f"the last post-hoc EMA snapshot of {run_dir} is at step {last}; "
                          f"cannot rebuild an average at step {step}")
    coef, resid = solve_coefficients(snaps, target, step)
    used = [s for s in snaps if s.step <= step]
    out: dict[str, torch.Tensor] = {}
    files: dict[Path, dict[str, torch.Tensor]] = {}
    for c, s in zip(coef, used):
        if s.path not in files:
            files[s.path] = read_tensors(s.path)
        prefix = f"{s.index}/"
        for k, v in files[s.path].items():
            if not k.startswith(prefix):
                continue
            name = k[len(prefix):]
            if v.is_floating_point():
                v64 = v.double() * float(c)
                out[name] = v64 if name not in out else out[name] + v64
            else:
                out[name] = v  # integer buffers: the latest
    last = files[used[-1].path]
    state = {k: v.to(last[f"{used[-1].index}/{k}"].dtype) for k, v in out.items()}
    return state, {"target": target.label, "step": step, "snapshots": len(used),
                   "residual": resid}


def write_posthoc_run(run_dir: str | Path, out_dir: str | Path, target: Target,
                      step: int | None = None) -> dict[str, Any]:
    """A new run directory whose EMA weights are the target average: the base run's
    latest checkpoint with `ema.safetensors` replaced, and the lineage in config.yaml."""
    from effusion.runs.files import latest_checkpoint, read_config, read_lineage, write_config, write_json

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise ConfigError("--out must be a new directory, not the run itself")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} exists and is not empty; choose a new --out directory")
    cfg = read_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {run_dir}")
    state, info = reconstruct(run_dir, target, step)
    dest = out_dir / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, dest)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "ema.safetensors"))
    lineage = read_lineage(run_dir) + [{"pass": "posthoc-ema", "base": str(run_dir), **info}]
    write_config(out_dir, cfg, lineage)
    write_json(out_dir / "report.json", {"posthoc_ema": info, "base": str(run_dir)})
    return {**info, "out": str(out_dir)}
