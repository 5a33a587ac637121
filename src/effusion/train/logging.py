"""Metrics for machines (`metrics.jsonl`) and for people (TensorBoard scalars and images).

`effusion.runs.read_metrics` reads the JSON Lines back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from effusion.runs.files import METRICS, parse_lines


class MetricsLogger:
    """Append-only JSON Lines log plus TensorBoard scalars and images."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / METRICS
        self._tb = None
        if resume_step is not None and self.path.is_file():
            # Drop lines written after the checkpoint we resume from: they will be redone.
            kept = [json.dumps(m) for m in parse_lines(self.path.read_text())
                    if m.get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
        except ImportError:  # tensorboard is a dependency; tolerate a broken install
            self._tb = None

    def log(self, step: int, values: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in values.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """uint8 (C, H, W) image to TensorBoard."""
        if self._tb is not None:
            self._tb.add_image(tag, image, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    """What ranks other than 0 log to in data-parallel training: nothing."""

    def log(self, step: int, values: dict[str, Any]) -> None:
        pass

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        pass

    def close(self) -> None:
        pass
