"""Structured channel pruning: the pruned U-Net runs, its parameters and MACs drop as
configured, coupled layers stay consistent (GroupNorm groups, attention heads, the
scale/shift halves of each block's embedding projection, the skip concatenations), and the
pruned run dir loads, samples and resumes like any other."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import tiny_config
from effusion.config import ConfigError
from effusion.models import build_model, count_params
from effusion.models.layers import Attention, ResBlock
from effusion.recipes import train
from effusion.runs import describe, load_run, read_lineage

tp = pytest.importorskip("torch_pruning", reason="needs the prune extra (torch-pruning)")

from effusion.optimize.prune import prune_run, prune_unet  # noqa: E402
from effusion.optimize.timing import macs  # noqa: E402

ATTN = ["model.attention_resolutions=[8]", "model.channels=16", "model.norm_groups=4",
        "model.head_channels=8", "model.num_classes=10", "train.cond_drop=0.2"]


def _inputs(b: int = 2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, 1, 16, 16, generator=g), torch.randint(0, 50, (b,), generator=g),
            torch.randint(0, 11, (b,), generator=g))


def _tag(model: nn.Module) -> None:
    """Distinct values that pruning must keep aligned: conv1's bias j, norm2's weight j and
    the embedding projection's scale row j and shift row C+j all carry the same tag."""
    for k, m in enumerate(m for m in model.modules() if isinstance(m, ResBlock)):
        c = m.conv1.out_channels
        tags = 1000 * k + torch.arange(c, dtype=torch.float32)
        with torch.no_grad():
            m.conv1.bias.copy_(tags)
            m.norm2.weight.copy_(tags)
            m.emb.bias.copy_(torch.cat([tags, tags + 0.5]))


@pytest.mark.parametrize("importance,ratio", [("magnitude", 0.5), ("random", 0.5),
                                              ("magnitude", 0.3)])
def test_pruned_unet_is_consistent_and_smaller(importance, ratio):
    model = build_model(tiny_config(*ATTN)).eval()
    for p in model.parameters():  # a trained-like net: nothing is zero
        nn.init.normal_(p, std=0.1)
    _tag(model)
    x = _inputs()
    p0, m0 = count_params(model), macs(model, *_inputs(1))
    heads = [a.heads for a in model.modules() if isinstance(a, Attention)]
    prune_unet(model, x, ratio, importance)
    p1, m1 = count_params(model), macs(model, *_inputs(1))
    want = (1 - ratio) ** 2  # both sides of most weights narrow
    assert 0.6 * want < p1 / p0 < 1.5 * want and 0.6 * want < m1 / m0 < 1.5 * want, (p1 / p0, m1 / m0)
    with torch.no_grad():
        out = model(*_inputs(3))
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()
    assert model.conv_out.out_channels == 1  # the output keeps the image's channels
    for m in model.modules():  # the configured 4 groups, or fewer where a width needs it
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0 and 4 % m.num_groups == 0
    atts = [a for a in model.modules() if isinstance(a, Attention)]
    assert [a.heads for a in atts] == heads and atts
    for a in atts:  # heads keep their width; the residual stream narrowed
        assert a.qkv.out_channels == 3 * 16 * 2 and a.proj.in_channels == 32
        assert a.qkv.in_channels == a.proj.out_channels == a.norm.num_channels < 32
    # the widths alone rebuild it: a fresh model shaped like the pruned state dict
    from effusion.models.pruned import shape_like
    again = shape_like(build_model(tiny_config(*ATTN)), model.state_dict())
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(*_inputs(3)), out)
    for m in model.modules():
        if isinstance(m, ResBlock):
            c = m.conv1.out_channels
            assert torch.equal(m.norm2.weight, m.conv1.bias)
            assert torch.equal(m.emb.bias[:c], m.conv1.bias)
            assert torch.equal(m.emb.bias[c:], m.conv1.bias + 0.5)


def test_taylor_needs_gradients_and_bad_settings_are_clear():
    model = build_model(tiny_config(*ATTN))
    with pytest.raises(ConfigError, match="gradients"):
        prune_unet(model, _inputs(), 0.5, "taylor")
    with pytest.raises(ConfigError, match="--ratio"):
        prune_unet(model, _inputs(), 1.0, "magnitude")
    with pytest.raises(ConfigError, match="--importance"):
        prune_unet(model, _inputs(), 0.5, "psychic")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run = tmp_path_factory.mktemp("prune") / "base"
    train(tiny_config(*ATTN, "train.max_steps=20", "train.lr=3e-3", "train.ema_decay=0"), run,
          progress=False)
    return run


def test_pruned_run_loads_samples_and_resumes(base, tmp_path):
    from effusion.sampling import generate

    out = tmp_path / "pruned"
    _, report = prune_run(base, out, ratio=0.5, importance="taylor", batches=2, progress=False,
                          overrides=["train.max_steps=6", "train.max_minutes=0",
                                     "train.checkpoint_every=3"])
    assert report["after"]["params"] < 0.5 * report["before"]["params"]
    assert report["macs_ratio"] < 0.5 and report["finetune"]["steps"] == 6
    run = load_run(out, device="cpu")
    assert count_params(run.model) == report["after"]["params"] == describe(out).params
    images = generate(run, 4, seed=0)  # no extra flags: its config's sampler and guidance
    assert images.shape == (4, 1, 16, 16)
    (entry,) = read_lineage(out)
    assert entry["pass"] == "prune" and entry["ratio"] == 0.5 and entry["importance"] == "taylor"
    # the fine-tune resumes with the pruned widths read back from its checkpoint
    _, again = prune_run(base, out, ratio=0.5, batches=2, progress=False, resume=True,
                         overrides=["train.max_steps=8", "train.max_minutes=0"])
    assert again["finetune"]["steps"] == 8 and again["after"]["params"] == report["after"]["params"]
    with pytest.raises(ConfigError, match="own directory"):
        prune_run(base, base, progress=False)
    with pytest.raises(ConfigError, match="finetune-minutes"):
        prune_run(base, tmp_path / "z", finetune_minutes=0, progress=False)


def test_report_compares_a_run_with_its_pruned_variant(base, tmp_path, tiny_classifier):
    """`effusion optimize report`: one row per run, with cost (params, MACs, calls, bytes),
    speed (latency per step, samples/s, cold start) and quality, JSON + PNG written."""
    import json
    import subprocess
    import sys

    from effusion.optimize.report import calls_per_sample, report_runs, table

    pruned = tmp_path / "p"
    prune_run(base, pruned, ratio=0.5, importance="magnitude", progress=False,
              overrides=["train.max_steps=2", "train.max_minutes=0"])
    out = tmp_path / "report.json"
    r = report_runs([base, pruned], 16, out=out, cold_start=False, features=tiny_classifier)
    rows = r["rows"]
    assert [row["variant"] for row in rows] == ["untouched", "prune"]
    assert rows[1]["params"] < 0.5 * rows[0]["params"]
    assert rows[1]["macs_per_call"] < 0.5 * rows[0]["macs_per_call"]
    assert rows[1]["bytes"] < 0.5 * rows[0]["bytes"]
    # guided run at its default guidance: both halves, 2 calls per step
    assert rows[0]["network_calls_per_sample"] == 2 * rows[0]["steps"]
    for row in rows:
        assert set(row["latency_ms"]) == {"1", "8", "64"} and row["samples_per_s"] > 0
        assert 0 <= row["class_accuracy"] <= 1 and row["fid"] > 0
    assert json.loads(out.read_text())["rows"][0]["run"] == str(base)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| p | prune |" in table(r)
    run = load_run(base, device="cpu")
    assert calls_per_sample(run, 10, "dpmpp_2m") == 20 and calls_per_sample(run, 10, "ddpm") == 100
    # the CLI (with a cold start: a fresh process to its first image)
    cli = subprocess.run([sys.executable, "-m", "effusion", "optimize", "report", str(pruned),
                          "--n", "8", "--out", str(tmp_path / "cli.json"), "--json",
                          "--features", str(tiny_classifier)], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads(cli.stdout)["rows"][0]["cold_start_s"] > 0
