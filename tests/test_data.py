"""Data sources, augmentation and the resumable batch stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from effusion.config import DataConfig
from effusion.data import BatchStream, DataError, ImageSet, augment, load_source, to_model_range, to_uint8


# --------------------------------------------------------------------------- built-in sources

def test_mnist5k_source():
    d = load_source(DataConfig(source="mnist5k"))
    assert d.images.shape == (5000, 1, 28, 28) and d.images.dtype == torch.uint8
    assert d.labels.dtype == torch.int64 and d.labels.shape == (5000,)
    assert torch.equal(torch.bincount(d.labels), torch.full((10,), 500))
    assert d.class_names == [str(i) for i in range(10)] and d.num_classes == 10
    assert d.images.min() == 0 and d.images.max() == 255
    # digits are white strokes on black: mostly background
    assert (d.images == 0).float().mean() > 0.7


def test_digits_source_is_resized():
    d = load_source(DataConfig(source="digits", image_size=16))
    assert d.images.shape == (1797, 1, 16, 16) and d.images.dtype == torch.uint8
    assert len(d) == 1797 and d.num_classes == 10
    assert d.images.max() == 255  # 16 on the 0..16 scale maps to 255
    rgb = load_source(DataConfig(source="digits", image_size=16, channels=3))
    assert rgb.images.shape == (1797, 3, 16, 16)
    assert torch.equal(rgb.images[:, 0], d.images[:, 0])
    assert torch.equal(rgb.images[:, 1], rgb.images[:, 2])


def test_limit_picks_a_fixed_random_subset():
    full = load_source(DataConfig(source="mnist5k"))
    a = load_source(DataConfig(source="mnist5k", limit=64))
    b = load_source(DataConfig(source="mnist5k", limit=64))
    assert len(a) == 64
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert len(a.labels.unique()) >= 8  # not the first 64 of a class-sorted set
    # every kept image is an image of the full set, with its own label
    flat = full.images.view(5000, -1)
    for img, lab in zip(a.images[:10], a.labels[:10]):
        idx = (flat == img.view(1, -1)).all(1).nonzero().view(-1)
        assert len(idx) >= 1 and lab in full.labels[idx]
    assert len(load_source(DataConfig(source="digits", limit=100_000))) == 1797


# --------------------------------------------------------------------------- npz

def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_grayscale_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 12, 12), dtype=np.uint8)
    src = _npz(tmp_path / "g.npz", images=gray, labels=np.array([0, 1, 2, 1, 0]))
    d = load_source(DataConfig(source=src, image_size=12))
    assert d.images.shape == (5, 1, 12, 12)
    assert np.array_equal(d.images[:, 0].numpy(), gray)
    assert d.labels.tolist() == [0, 1, 2, 1, 0] and d.class_names == ["0", "1", "2"]
    d3 = load_source(DataConfig(source=src, image_size=12, channels=3))
    assert d3.images.shape == (5, 3, 12, 12)
    assert all(np.array_equal(d3.images[:, c].numpy(), gray) for c in range(3))

    rgb = rng.integers(0, 256, (4, 10, 10, 3), dtype=np.uint8)
    src = _npz(tmp_path / "c.npz", images=rgb)
    d = load_source(DataConfig(source=src, image_size=10, channels=3))
    assert d.images.shape == (4, 3, 10, 10) and d.labels is None and d.class_names == []
    assert np.array_equal(d.images.permute(0, 2, 3, 1).numpy(), rgb)
    d1 = load_source(DataConfig(source=src, image_size=10, channels=1))
    assert d1.images.shape == (4, 1, 10, 10)
    luma = np.round(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    assert np.abs(d1.images[:, 0].numpy().astype(int) - luma.astype(int)).max() <= 1
    # resizing on the way
    d16 = load_source(DataConfig(source=src, image_size=16, channels=3))
    assert d16.images.shape == (4, 3, 16, 16) and d16.images.dtype == torch.uint8


@pytest.mark.parametrize("arrays,fragment", [
    ({"images": np.zeros((4, 8), np.uint8)}, "must be N x H x W or N x H x W x C"),
    ({"images": np.zeros((4, 8, 8, 2), np.uint8)}, "must be N x H x W or N x H x W x C"),
    ({"images": np.zeros((4, 8, 8), np.float32)}, "must be uint8"),
    ({"pixels": np.zeros((4, 8, 8), np.uint8)}, "no array named 'images'"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3)}, "'labels' must be a 1-D"),
    ({"images": np.zeros((0, 8, 8), np.uint8)}, "is empty"),
])
def test_npz_errors(tmp_path, arrays, fragment):
    src = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=fragment):
        load_source(DataConfig(source=src, image_size=8))


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="npz file not found"):
        load_source(DataConfig(source=f"npz:{tmp_path / 'nope.npz'}", image_size=8))


def test_npz_garbage_file(tmp_path):
    p = tmp_path / "garbage.npz"
    p.write_bytes(b"\x00this is not a zip file" * 10)
    with pytest.raises(DataError, match="cannot read npz file"):
        load_source(DataConfig(source=f"npz:{p}", image_size=8))


def test_npz_source_pointing_at_an_npy_file(tmp_path):
    """A plain .npy file is a user error and must be a DataError, not a raw TypeError."""
    p = tmp_path / "images.npy"
    np.save(p, np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataError):
        load_source(DataConfig(source=f"npz:{p}", image_size=8))


# --------------------------------------------------------------------------- folders

def _png(path: Path, color, size=(20, 14), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_folder_class_subfolders_become_labels(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "cats" / "a.png", (255, 0, 0))
    _png(root / "cats" / "b.jpg", (250, 0, 0))
    _png(root / "dogs" / "c.png", (0, 0, 255))
    _png(root / "dogs" / "deeper" / "d.png", (0, 0, 250))  # nested files belong to the class
    (root / "dogs" / "notes.txt").write_text("not an image")
    d = load_source(DataConfig(source=f"folder:{root}", image_size=8, channels=3))
    assert d.class_names == ["cats", "dogs"]
    assert d.images.shape == (4, 3, 8, 8) and d.images.dtype == torch.uint8
    assert d.labels.tolist() == [0, 0, 1, 1]
    # RGB is kept: cats are red, dogs are blue
    assert (d.images[:2, 0] > 200).all() and (d.images[:2, 2] < 30).all()
    assert (d.images[2:, 2] > 200).all() and (d.images[2:, 0] < 30).all()
    gray = load_source(DataConfig(source=f"folder:{root}", image_size=8, channels=1))
    assert gray.images.shape == (4, 1, 8, 8)
    assert abs(int(gray.images[0, 0, 0, 0]) - round(0.299 * 255)) <= 1  # luma of pure red


def test_folder_without_subfolders_has_no_labels(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", i * 100, mode="L", size=(9, 9))
    d = load_source(DataConfig(source=f"folder:{tmp_path}", image_size=9))
    assert d.labels is None and d.class_names == []
    assert d.images.shape == (3, 1, 9, 9)
    assert d.images[:, 0, 4, 4].tolist() == [0, 100, 200]


def test_folder_corrupt_file_is_an_error_unless_skipping_is_asked(tmp_path):
    _png(tmp_path / "good.png", (10, 20, 30))
    (tmp_path / "x.png").write_bytes(b"\x89PNG garbage garbage garbage")
    with pytest.raises(DataError, match=r"1 unreadable image file.*x\.png \(not an image\).*skip_bad_images"):
        load_source(DataConfig(source=f"folder:{tmp_path}", image_size=8, channels=3))
    with pytest.warns(UserWarning, match="skipped 1 unreadable image file.*x.png"):
        d = load_source(DataConfig(source=f"folder:{tmp_path}", image_size=8, channels=3,
                                   skip_bad_images=True))
    assert len(d) == 1


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        load_source(DataConfig(source=f"folder:{tmp_path / 'missing'}"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no readable images found"):
        load_source(DataConfig(source=f"folder:{empty}"))
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no readable images found"):
        load_source(DataConfig(source=f"folder:{empty}"))


# --------------------------------------------------------------------------- batch stream

def _indexed_set(n: int) -> ImageSet:
    """Image i is filled with the value i, label i % 3: batches reveal their indices."""
    imgs = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageSet(imgs, torch.arange(n) % 3, ["a", "b", "c"])


def _ids(batch) -> list[int]:
    return batch[0][:, 0, 0, 0].tolist()


def test_batch_stream_covers_every_index_once_per_epoch():
    n = 10
    stream = BatchStream(_indexed_set(n), batch_size=3, seed=5)
    seq = []
    for _ in range(10):  # 30 images = exactly 3 epochs, with batches spanning epochs
        x, y = stream.next()
        assert x.shape == (3, 1, 2, 2) and y.shape == (3,)
        assert torch.equal(y, x[:, 0, 0, 0].long() % 3)  # labels travel with images
        seq += _ids((x, y))
    epochs = [seq[i:i + n] for i in range(0, 30, n)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert stream.state_dict() == {"epoch": 3, "index": 0}


def test_batch_stream_larger_batch_than_data():
    stream = BatchStream(_indexed_set(4), batch_size=10, seed=0)
    ids = _ids(stream.next())
    assert len(ids) == 10
    assert sorted(ids[:4]) == [0, 1, 2, 3] and sorted(ids[4:8]) == [0, 1, 2, 3]


def test_batch_stream_same_seed_same_order_other_seed_differs():
    a = BatchStream(_indexed_set(50), 8, seed=1)
    b = BatchStream(_indexed_set(50), 8, seed=1)
    c = BatchStream(_indexed_set(50), 8, seed=2)
    sa, sb, sc = ([_ids(s.next()) for _ in range(5)] for s in (a, b, c))
    assert sa == sb and sa != sc


def test_batch_stream_resumes_from_state_dict():
    data = _indexed_set(10)
    a = BatchStream(data, batch_size=4, seed=7)
    for _ in range(4):  # 16 images: into the second epoch
        a.next()
    state = a.state_dict()
    assert state == {"epoch": 1, "index": 6}
    expected = [_ids(a.next()) for _ in range(6)]
    b = BatchStream(data, batch_size=4, seed=7)
    b.next()
    b.load_state_dict(state)
    assert [_ids(b.next()) for _ in range(6)] == expected


# --------------------------------------------------------------------------- augmentation

def _batch(seed=0, b=16, c=1, size=12):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, size, size, generator=g) * 2 - 1


def test_range_conversions_round_trip():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model_range(u8)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), u8)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_augment_off_is_identity():
    x = _batch()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(augment(x, DataConfig(), g), x)
    assert torch.equal(g.get_state(), state)  # and consumes no randomness


def test_hflip_flips_about_half():
    x = _batch(b=200)
    out = augment(x, DataConfig(hflip=True), torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all()
    assert 60 < int(flipped.sum()) < 140


def test_translate_is_a_shifted_reflect_padded_crop():
    p = 2
    x = _batch(b=24)
    out = augment(x, DataConfig(translate=p), torch.Generator().manual_seed(3))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    shifts = set()
    for i in range(len(x)):
        match = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + 12, dx:dx + 12])]
        assert match, f"sample {i} is not a crop of the padded input"
        shifts.add(match[0])
    assert len(shifts) > 5  # shifts really vary


def test_rotate_pads_with_black_and_keeps_range():
    black = -torch.ones(4, 1, 12, 12)
    out = augment(black, DataConfig(rotate=30), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, black)  # background stays black, not mid-grey
    x = _batch()
    out = augment(x, DataConfig(rotate=30), torch.Generator().manual_seed(0))
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("channels", [1, 3])
def test_all_augmentations_keep_shape_range_and_are_deterministic(channels):
    cfg = DataConfig(hflip=True, rotate=15, translate=2)
    x = _batch(c=channels)
    a = augment(x, cfg, torch.Generator().manual_seed(42))
    b = augment(x, cfg, torch.Generator().manual_seed(42))
    c = augment(x, cfg, torch.Generator().manual_seed(43))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
