"""`icons`: a real colour data set built from the icon themes Debian ships.

Nobody here drew these: they are the PNG icons of freedesktop.org icon themes installed
under `/usr/share/icons` (or `$XDG_DATA_DIRS/*/icons`). Each icon's context folder is its
class (actions, apps, devices, mimetypes, places, status: the six contexts every theme
has; the small ones, emblems and emotes, are left out). One picture per icon: the PNG
drawn at the requested size where the theme has one (icons are hinted per size), else the
smallest larger one, downscaled. Symlinks, identical files, and pictures that come out
identical at the requested size count once. Transparency is composited onto a fixed white
background, as icons are seen on a page.

`icons` is the default set (Faenza, Oxygen and Moka: ~2,500 distinct icons at 32 px);
`icons:THEME[,THEME...]` picks themes by their folder name. A missing theme is an error
that names the `apt-get install` line.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

# The six contexts of the Icon Theme Specification that every theme here fills; "mimes" is
# an older spelling of "mimetypes".
ICON_CLASSES = ["actions", "apps", "devices", "mimetypes", "places", "status"]
_CONTEXT_ALIASES = {"mimes": "mimetypes"}
# Default themes (folder name -> Debian package). PNG themes only: SVG ones (elementary,
# Papirus) would need a renderer.
ICON_THEMES = {"Faenza": "faenza-icon-theme", "oxygen": "oxygen-icon-theme",
               "Moka": "moka-icon-theme"}
BACKGROUND = 255  # white, for every channel
_SIZE_DIR = re.compile(r"^(\d+)(?:x(\d+))?$")  # "32" (Faenza) or "32x32" (oxygen, Moka)


class IconError(ValueError):
    """An icon set that cannot be built (theme not installed, nothing readable)."""


def icon_dirs() -> list[Path]:
    """Where icon themes are installed: $XDG_DATA_DIRS/icons (default /usr/share)."""
    data_dirs = os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share"
    out = []
    for d in data_dirs.split(":"):
        p = Path(d) / "icons"
        if d and p.is_dir() and p not in out:
            out.append(p)
    return out


def parse_spec(src: str) -> tuple[str, ...]:
    """`icons` -> the default themes; `icons:A,B` -> (A, B)."""
    if src == "icons":
        return tuple(ICON_THEMES)
    names = tuple(t.strip() for t in src[len("icons:"):].split(",") if t.strip())
    if not src.startswith("icons:") or not names:
        raise IconError(f"data.source {src!r}: expected icons or icons:THEME[,THEME...]")
    return names


def find_theme(name: str) -> Path:
    for d in icon_dirs():
        if (d / name).is_dir():
            return d / name
    pkg = ICON_THEMES.get(name)
    how = (f"apt-get install {pkg}" if pkg else
           f"install the package that ships /usr/share/icons/{name}")
    where = ", ".join(str(d) for d in icon_dirs()) or "/usr/share/icons (missing)"
    raise IconError(f"icon theme {name!r} is not installed (looked in {where}); {how}, or "
                    f"pick installed themes with data.source=icons:THEME[,THEME...]")


def _icon_files(theme: Path) -> dict[tuple[str, str], dict[int, Path]]:
    """{(class, icon name): {drawn size: file}} for a theme's PNGs (hi-dpi @2x folders,
    symlinks to other icons and unknown contexts left out)."""
    found: dict[tuple[str, str], dict[int, Path]] = defaultdict(dict)
    for f in theme.rglob("*.png"):
        if f.is_symlink():  # an alias of another icon (or of itself at another size)
            continue
        parts = f.relative_to(theme).parts[:-1]
        context = next((_CONTEXT_ALIASES.get(p, p) for p in parts
                        if _CONTEXT_ALIASES.get(p, p) in ICON_CLASSES), None)
        sizes = [int(m.group(1)) for p in parts if (m := _SIZE_DIR.match(p))]
        if context is None or len(sizes) != 1:
            continue
        found[(context, f.stem)][sizes[0]] = f
    return found


def _pick(sizes: dict[int, Path], size: int) -> Path:
    """The file drawn at `size`, else at the smallest larger size, else the largest."""
    larger = [s for s in sizes if s >= size]
    return sizes[min(larger)] if larger else sizes[max(sizes)]


def _render(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the icon resized (aspect kept, centred) onto the background."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
        if max(im.size) != size:  # larger drawings shrink, an only-smaller one grows
            scale = size / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.LANCZOS)
        canvas = Image.new("RGBA", (size, size), (BACKGROUND,) * 3 + (255,))
        canvas.alpha_composite(im, ((size - im.width) // 2, (size - im.height) // 2))
        return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


def load_icons(src: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(uint8 (N, 3, size, size), int64 labels (N,), class names, summary) for an `icons`
    source. Deterministic: files are visited in sorted order. The summary counts icons per
    theme and what deduplication removed. Built once per process (a few seconds)."""
    themes = tuple(find_theme(name) for name in parse_spec(src))
    x, y, summary = _build(themes, size)
    return x.clone(), y.clone(), list(ICON_CLASSES), dict(summary)


@functools.lru_cache(maxsize=4)
def _build(themes: tuple[Path, ...], size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    images, labels, seen_files, seen_pixels = [], [], set(), set()
    summary: dict = {"themes": {}, "duplicate_files": 0, "duplicate_pictures": 0}
    for theme in themes:
        kept = 0
        files = _icon_files(theme)
        for (context, name) in sorted(files):
            path = _pick(files[(context, name)], size)
            digest = hashlib.sha1(path.read_bytes()).digest()
            if digest in seen_files:
                summary["duplicate_files"] += 1
                continue
            seen_files.add(digest)
            try:
                arr = _render(path, size)
            except (OSError, ValueError, SyntaxError):  # a damaged file: leave it out
                continue
            key = hashlib.sha1(arr.tobytes()).digest()
            if key in seen_pixels:
                summary["duplicate_pictures"] += 1
                continue
            seen_pixels.add(key)
            images.append(arr)
            labels.append(ICON_CLASSES.index(context))
            kept += 1
        summary["themes"][theme.name] = kept
    if not images:
        raise IconError(f"no PNG icons found in {', '.join(str(t) for t in themes)}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64), summary
