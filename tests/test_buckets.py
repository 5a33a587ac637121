"""Mixed sizes and aspect ratios: buckets, the distributed bucket sampler, non-square
training and sampling, and progressive resolution."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from effusion.config import ConfigError, load_config
from effusion.data import DataError, stage_size
from effusion.data.buckets import (BucketStream, DistributedBucketSampler, auto_buckets,
                                   bucket_shape, bucketize, load_bucketed, nearest)
from effusion.data.sources import shapes_pictures
from effusion.models.layers import Attention
from effusion.models.unet import UNet
from effusion.recipes import train
from effusion.runs import read_metrics
from effusion.runs.files import read_config

from conftest import TINY_OVERRIDES


def _buckets(sizes: list[int], seed: int = 0) -> torch.Tensor:
    """Bucket ids: `sizes[b]` images of bucket b, in a shuffled order."""
    ids = torch.cat([torch.full((n,), b) for b, n in enumerate(sizes)])
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("sizes, batch, world", [
    ([50, 37, 16], 12, 3),  # uneven buckets, 103 images: the world divides neither
    ([7, 1, 30], 4, 1),  # a one-image bucket, one process
    ([9, 9, 2], 8, 2),  # a bucket with exactly as many images as processes
    ([33, 5], 16, 4),  # a bucket whose last batch would leave ranks empty (33 = 2*16 + 1)
])
def test_bucket_sampler_properties(sizes, batch, world):
    bucket = _buckets(sizes)
    samplers = [DistributedBucketSampler(bucket, batch, world, rank, seed=3) for rank in range(world)]
    for epoch in (0, 1):
        per_rank = [s.rank_batches(epoch) for s in samplers]
        # every rank has the same number of batches, none empty
        assert len({len(b) for b in per_rank}) == 1
        assert all(len(x) > 0 for b in per_rank for x in b)
        # each global batch (the ranks' parts together) holds one bucket only
        for parts in zip(*per_rank):
            assert len({int(bucket[i]) for p in parts for i in p}) == 1
        # every image exactly once per epoch across all ranks
        seen = torch.cat([x for b in per_rank for x in b])
        assert sorted(seen.tolist()) == list(range(len(bucket)))
        # parts differ by at most one image; full batches are the global batch size
        for parts in zip(*per_rank):
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # deterministic per (seed, epoch), different across epochs and seeds
    again = DistributedBucketSampler(bucket, batch, world, 0, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again.batches(1), samplers[0].batches(1)))
    e0, e1 = samplers[0].batches(0), samplers[0].batches(1)
    assert any(not torch.equal(a, b) for a, b in zip(e0, e1)) or len(e0) != len(e1)


def test_bucket_sampler_shuffles_across_buckets():
    bucket = _buckets([64, 64, 64])
    order = [int(bucket[b[0]]) for b in DistributedBucketSampler(bucket, 8, seed=0).batches(0)]
    assert Counter(order) == {0: 8, 1: 8, 2: 8}
    runs = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert runs > 8  # interleaved, not three blocks of one bucket each (2 changes)


def test_bucket_sampler_refuses_a_bucket_smaller_than_the_world():
    with pytest.raises(DataError, match="bucket 1 holds 1 image.*fewer than the 2 processes"):
        DistributedBucketSampler(_buckets([10, 1]), 4, world=2)


def test_bucket_stream_resumes_mid_epoch_and_cuts_batches_to_their_bucket():
    pictures = ([torch.full((1, 16, 32), 200, dtype=torch.uint8)] * 20
                + [torch.full((1, 16, 16), 100, dtype=torch.uint8)] * 13)
    data = bucketize(pictures, None, [], [(16, 16), (16, 32)], None)
    a = BucketStream(data, 6, seed=1)
    shapes = []
    for _ in range(5):
        x, _ = a.gather(a.next_indices())
        shapes.append(tuple(x.shape[-2:]))
        assert x.float().std() == 0  # one bucket's images only, no padding
    assert set(shapes) <= {(16, 16), (16, 32)}
    b = BucketStream(data, 6, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(4):  # 5 batches an epoch (6, 6, 8 and 6, 7): across its end
        assert torch.equal(a.next_indices(), b.next_indices())
    assert a.epoch == 1


def test_images_go_whole_to_the_nearest_aspect_ratio():
    buckets = [(32, 32), (24, 40), (40, 24)]
    sizes = torch.tensor([[100, 100], [60, 110], [110, 60], [50, 60], [10, 40]])
    assert nearest(sizes, buckets).tolist() == [0, 1, 2, 0, 1]
    # resized whole: a marker in each corner of a wide image survives in its bucket
    img = torch.zeros(1, 60, 110, dtype=torch.uint8)
    for y, x in [(0, 0), (0, 100), (50, 0), (50, 100)]:
        img[:, y:y + 10, x:x + 10] = 255
    data = bucketize([img], None, [], buckets, None)
    h, w = buckets[int(data.bucket[0])]
    cut = data.images[0, 0, :h, :w].float()
    for corner in (cut[:3, :3], cut[:3, -3:], cut[-3:, :3], cut[-3:, -3:]):
        assert corner.mean() > 150
    assert data.images[0, 0, h:, :].sum() == 0 and data.images[0, 0, :, w:].sum() == 0


def test_auto_buckets_follow_the_data_and_the_pixel_budget():
    sizes = torch.tensor([[64, 64], [64, 128], [128, 64], [64, 130]])
    got = auto_buckets(sizes, 32 * 32)
    assert got[0] == (32, 32) and set(got) == {(32, 32), (24, 48), (48, 24)}
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in got)
    assert bucket_shape(2.0, 1024) == (24, 48)


def test_folder_images_keep_their_aspect_ratio(tmp_path):
    for cls, (w, h) in [("wide", (60, 30)), ("tall", (30, 60)), ("square", (40, 40))]:
        (tmp_path / cls).mkdir()
        for i in range(4):
            arr = np.full((h, w, 3), 40 * i, dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    cfg = load_config(None, [f"data.source=folder:{tmp_path}", "data.image_size=16",
                             "data.channels=3", "data.buckets=[[16,16],[16,32],[32,16]]"]).data
    data = load_bucketed(cfg)
    names = data.class_names
    want = {"square": (16, 16), "wide": (16, 32), "tall": (32, 16)}
    for i in range(len(data)):
        assert data.buckets[int(data.bucket[i])] == want[names[int(data.labels[i])]]


def test_shapes_draw_at_the_configured_aspect_ratios():
    cfg = load_config(None, ["data.source=shapes:9:1", "data.image_size=16", "data.channels=3",
                             "data.aspect_ratios=[0.5,1,2]"]).data
    pictures, labels, _ = shapes_pictures(cfg)
    assert [tuple(p.shape[-2:]) for p in pictures[:3]] == [(23, 11), (16, 16), (11, 23)]
    assert len(labels) == 9
    again, _, _ = shapes_pictures(cfg)
    assert all(torch.equal(a, b) for a, b in zip(pictures, again))


def test_bad_bucket_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="data.buckets 'wide' is not valid"):
        load_config(None, ["data.buckets=wide"])
    with pytest.raises(ConfigError, match="sides >= 8"):
        load_config(None, ["data.buckets=[[4,16]]"])
    with pytest.raises(ConfigError, match="aspect_ratios are width / height ratios > 0"):
        load_config(None, ["data.aspect_ratios=[0]"])
    with pytest.raises(ConfigError, match="must increase and the last must be 1.0"):
        load_config(None, ["train.progressive=[[8,0.5],[16,0.9]]"])
    with pytest.raises(ConfigError, match="pixel-space diffusion"):
        load_config(None, ["train.progressive=[[8,1.0]]", "model.arch=mlp"])


def test_unet_attends_by_level_at_any_size():
    cfg = load_config(None, TINY_OVERRIDES + ["model.attention_resolutions=[8]"]).model
    net = UNet(cfg, in_channels=1, image_size=16).eval()
    calls = []
    for m in net.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape[-2:])))
    with torch.no_grad():
        for hw in [(16, 16), (24, 40), (8, 32)]:
            calls.clear()
            out = net(torch.randn(2, 1, *hw), torch.tensor([3, 7]))
            assert out.shape == (2, 1, *hw)
            # the same layers attend (level 1 and the middle), at that level's own size
            assert len(calls) == 4
            assert calls[0] == ((hw[0] + 1) // 2, (hw[1] + 1) // 2)


BUCKETED = [o for o in TINY_OVERRIDES if not o.startswith(("data.", "model.num_classes"))] + [
    "data.source=shapes:60:2", "data.image_size=16", "data.channels=3",
    "data.aspect_ratios=[0.5,1,2]", "data.buckets=[[16,16],[16,24],[24,16]]",
    "model.num_classes=-1", "train.max_steps=6", "train.checkpoint_every=3",
    "train.keep_checkpoints=3"]


def test_non_square_training_and_sampling_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from effusion.cli import app

    run = tmp_path / "run"
    res = train(load_config(None, BUCKETED), run, progress=False)
    assert res.step == 6
    r = CliRunner().invoke(app, ["sample", "--run", str(run), "--n", "4", "--size", "16x24",
                                 "--steps", "3", "--npy", str(tmp_path / "s.npy"),
                                 "--out", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "s.npy").shape == (4, 16, 24, 3)
    r = CliRunner().invoke(app, ["sample", "--run", str(run), "--n", "2", "--size", "4x4"])
    assert r.exit_code != 0 and "sides must be >= 8" in r.output


def test_progressive_switches_size_on_schedule_and_resumes_at_the_right_size(tmp_path):
    assert [stage_size(((8, 0.25), (12, 0.5), (16, 1.0)), p) for p in (0, 0.24, 0.25, 0.7, 1.0)] \
        == [8, 8, 12, 16, 16]
    assert stage_size((), 0.3) is None
    cfg = load_config(None, TINY_OVERRIDES + ["train.max_steps=8", "train.checkpoint_every=3",
                                              "train.keep_checkpoints=4",
                                              "train.progressive=[[8,0.5],[16,1.0]]"])
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg, a, progress=False)
    assert [(m["step"], m["train_size"]) for m in read_metrics(a) if "train_size" in m] == \
        [(0, 8), (4, 16)]
    shutil.copytree(a, b)  # b "crashed" after its step-3 checkpoint, still at size 8
    for s in (6, 8):
        shutil.rmtree(b / "checkpoints" / f"step-{s:07d}")
    train(read_config(b), b, resume=True, progress=False)
    sizes = [(m["step"], m["train_size"]) for m in read_metrics(b) if "train_size" in m]
    assert sizes == [(0, 8), (3, 8), (4, 16)]  # the resumed run announces where it is
    for f in ("model", "ema"):
        wa = load_file(str(a / "checkpoints" / "step-0000008" / f"{f}.safetensors"))
        wb = load_file(str(b / "checkpoints" / "step-0000008" / f"{f}.safetensors"))
        assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)
