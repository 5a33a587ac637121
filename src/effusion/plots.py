"""One way to draw a figure to PNG: the Agg backend (no display needed), saved and closed.

Used by the classifier curves, the guidance sweep and the training benchmark's chart.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def figure(path: str | Path, ncols: int = 1, figsize: tuple[float, float] = (6, 4),
           **subplot_kw: Any) -> Iterator[tuple[Any, Any]]:
    """`with figure(path, ncols=2) as (fig, axes): ...` draws, then writes `path` (100 dpi),
    creating its folder, and closes the figure even if drawing fails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, **subplot_kw)
    try:
        yield fig, axes
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
