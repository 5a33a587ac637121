"""The `icons` source (a real colour set from installed icon themes) and sizes and channels
taken from the data (data.image_size=0, data.channels=0, the defaults)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from effusion.config import ConfigError, DataConfig, load_config
from effusion.data import DataError, load_source, resolve_data
from effusion.data.icons import BACKGROUND, ICON_CLASSES, ICON_THEMES, load_icons

from test_features import needs_icons


def _png(path, size, rgba, mode="RGBA"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), rgba).save(path)


@pytest.fixture
def theme_root(tmp_path, monkeypatch):
    """A fake icon theme in both layouts (Faenza's context/size and oxygen's size/context)."""
    root = tmp_path / "share"
    a = root / "icons" / "ThemeA"
    _png(a / "apps" / "32" / "red.png", 32, (255, 0, 0, 255))
    _png(a / "apps" / "48" / "red.png", 48, (250, 0, 0, 255))  # same icon, another size
    _png(a / "places" / "48" / "half.png", 48, (0, 0, 255, 128))  # no 32: downscaled
    _png(a / "places" / "32" / "copy.png", 32, (255, 0, 0, 255))  # identical to red.png
    (a / "devices" / "32").mkdir(parents=True)
    (a / "devices" / "32" / "alias.png").symlink_to(a / "apps" / "32" / "red.png")
    _png(a / "apps@2x" / "32" / "hidpi.png", 64, (0, 255, 0, 255))
    _png(a / "emblems" / "32" / "skip.png", 32, (0, 255, 0, 255))  # not one of the six
    b = root / "icons" / "ThemeB" / "base"
    _png(b / "32x32" / "mimes" / "doc.png", 32, (0, 200, 0, 255))
    _png(b / "16x16" / "status" / "tiny.png", 16, (9, 9, 9, 255))  # only smaller: upscaled
    monkeypatch.setenv("XDG_DATA_DIRS", str(root))
    return root


def test_icons_dedupe_and_classes(theme_root):
    x, y, names, summary = load_icons("icons:ThemeA,ThemeB", 32)
    assert names == ICON_CLASSES and x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
    # red (32 px drawing), half (48 -> 32), doc, tiny; copy.png is red again, the symlink,
    # the @2x folder and the emblem are left out
    assert len(x) == 4 and summary["duplicate_files"] == 1
    assert summary["themes"] == {"ThemeA": 2, "ThemeB": 2}
    assert sorted(names[i] for i in y.tolist()) == ["apps", "mimetypes", "places", "status"]
    half = x[(y == ICON_CLASSES.index("places")).nonzero()[0, 0]]
    # alpha 128 blue over the white background: red and green 255 * 127/255, blue 255
    r, g, b = half[:, 16, 16].tolist()
    assert abs(r - BACKGROUND * 127 / 255) <= 1 and abs(g - r) <= 1 and b == 255
    tiny = x[(y == ICON_CLASSES.index("status")).nonzero()[0, 0]]
    assert tiny[:, 0, 0].tolist() == [9, 9, 9]  # a 16 px drawing grown to fill 32 px
    red = x[(y == ICON_CLASSES.index("apps")).nonzero()[0, 0]]
    assert red[:, 0, 0].tolist() == [255, 0, 0]  # the 32 px drawing, not the 48 px one


def test_icons_source_resolves_to_32px_rgb_and_limits(theme_root):
    d = resolve_data(DataConfig(source="icons:ThemeA"))
    assert (d.image_size, d.channels) == (32, 3)
    s = load_source(DataConfig(source="icons:ThemeA,ThemeB", image_size=16, limit=3))
    assert s.images.shape == (3, 3, 16, 16) and s.class_names == ICON_CLASSES


def test_missing_theme_names_the_apt_line(theme_root):
    with pytest.raises(DataError, match="apt-get install faenza-icon-theme"):
        load_source(DataConfig(source="icons:Faenza"))
    with pytest.raises(DataError, match="not installed"):
        load_source(DataConfig(source="icons:NoSuchTheme"))
    with pytest.raises(ConfigError, match="icons"):
        load_config(None, ["data.source=iconz"])


@needs_icons
def test_the_real_icon_set():
    x, y, names, summary = load_icons("icons", 32)
    assert len(x) >= 2000  # issue 26: at least 2,000 distinct images
    assert torch.bincount(y, minlength=6).min() >= 50  # every class is populated
    flat = x.flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(x)  # no picture twice
    assert set(summary["themes"]) == set(ICON_THEMES)


def _folder(tmp_path, sizes, mode):
    for i, (w, h) in enumerate(sizes):
        colour = (i * 20, 100, 200) if mode == "RGB" else i * 20
        (tmp_path / "cls").mkdir(parents=True, exist_ok=True)
        Image.new(mode, (w, h), colour).save(tmp_path / "cls" / f"{i}.png")
    return tmp_path


def test_folder_sizes_and_channels_come_from_the_data(tmp_path):
    rgb = _folder(tmp_path / "a", [(40, 50), (60, 48), (100, 100)], "RGB")
    d = resolve_data(DataConfig(source=f"folder:{rgb}"))
    assert (d.image_size, d.channels) == (32, 3)  # median short side 50, capped at 32
    gray = _folder(tmp_path / "b", [(20, 22), (21, 30), (26, 26)], "L")
    d = resolve_data(DataConfig(source=f"folder:{gray}"))
    assert (d.image_size, d.channels) == (20, 1)  # median 21 -> a multiple of 4
    d = resolve_data(DataConfig(source=f"folder:{gray}", image_size=24, channels=3))
    assert (d.image_size, d.channels) == (24, 3)  # what the user set is kept
    assert load_source(DataConfig(source=f"folder:{gray}")).images.shape == (3, 1, 20, 20)


def test_builtin_and_npz_sizes(tmp_path):
    assert (resolve_data(DataConfig()).image_size, resolve_data(DataConfig()).channels) == (28, 1)
    assert resolve_data(DataConfig(source="shapes:10")).channels == 3
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 12, 14, 3), np.uint8))
    d = resolve_data(DataConfig(source=f"npz:{tmp_path / 'a.npz'}"))
    assert (d.image_size, d.channels) == (12, 3)
    with pytest.raises(DataError, match="image folder not found"):
        resolve_data(DataConfig(source=f"folder:{tmp_path / 'nope'}"))


def test_a_run_records_the_resolved_size(tmp_path, make_cfg):
    from effusion.recipes import train
    from effusion.runs import read_config

    rgb = _folder(tmp_path / "imgs", [(24, 24)] * 6, "RGB")
    cfg = make_cfg(f"data.source=folder:{rgb}", "data.image_size=0", "data.channels=0",
                   "data.val_fraction=0")
    train(cfg, tmp_path / "run", progress=False)
    d = read_config(tmp_path / "run").data
    assert (d.image_size, d.channels) == (24, 3)
    assert os.path.isfile(tmp_path / "run" / "config.yaml")
