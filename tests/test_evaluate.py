"""`effusion evaluate` and the metrics on real images in the trained feature space."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effusion.config import DataConfig
from effusion.data import DataError, load_source
from effusion.diffusion import NetworkDenoiser, schedule_for
from effusion.evaluate import FeatureScorer, evaluate_images, evaluate_run, fid, kid
from effusion.evaluate.likelihood import bits_per_dim
from effusion.models import build_model
from effusion.recipes import train


@pytest.fixture(scope="module")
def scorer(feature_classifier) -> FeatureScorer:
    return FeatureScorer.for_data(DataConfig(), feature_classifier)


def real_subset(scorer: FeatureScorer, n: int = 1000, seed: int = 0) -> torch.Tensor:
    idx = torch.randperm(len(scorer.real_images), generator=torch.Generator().manual_seed(seed))
    return scorer.real_images[idx[:n]]


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma) + 1
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    y = F.conv2d(F.pad(x.float(), (r, r, 0, 0), mode="replicate"), k)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.transpose(2, 3))
    return y.round().clamp(0, 255).to(torch.uint8)


def noised(x: torch.Tensor, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (x.float() + std * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def test_fid_rises_monotonically_with_blur_and_noise(scorer):
    x = real_subset(scorer)
    clean = scorer.fid(x)
    blurred = [scorer.fid(blur(x, s)) for s in (0.5, 1.0, 1.5, 2.5)]
    noisy = [scorer.fid(noised(x, s)) for s in (10, 25, 50, 100)]
    assert all(a < b for a, b in zip([clean] + blurred, blurred))
    assert all(a < b for a, b in zip([clean] + noisy, noisy))


def test_kid_of_two_halves_of_the_real_data_is_zero_within_std(scorer):
    f = scorer.real_features
    perm = torch.randperm(len(f), generator=torch.Generator().manual_seed(2))
    mean, std = kid(f[perm[:2500]], f[perm[2500:]])
    assert abs(mean) <= 2 * std


def test_the_floor_and_the_samples_share_one_reference(scorer):
    """Scoring the floor's own real images as if they were samples gives exactly the
    floor: both are measured against the same reference set (the rest of the real data)."""
    from effusion.evaluate.evaluate import floor_split

    pick, rest = floor_split(scorer, 300)
    assert len(pick) == 300 and len(set(pick.tolist()) & set(rest.tolist())) == 0
    r = evaluate_images(scorer.real_images[pick], "mnist5k", features=scorer.classifier,
                        labels=scorer.real_labels[pick])
    for key in ("fid", "precision", "recall", "coverage", "class_accuracy"):
        assert r[key] == pytest.approx(r["real_floor"][key]), key


def test_evaluate_images_scores_real_data_near_the_floor(scorer, tmp_path):
    x = real_subset(scorer, 500, seed=5)
    path = tmp_path / "real.npy"
    np.save(path, x[:, 0].numpy())  # N x H x W, as `effusion sample --npy` writes
    labels = scorer.real_labels[
        torch.randperm(5000, generator=torch.Generator().manual_seed(5))[:500]]
    r = evaluate_images(path, "mnist5k", features=scorer.classifier.run_dir, labels=labels,
                        out=tmp_path / "m.json")
    assert r["precision"] > 0.95 and r["recall"] > 0.8 and r["coverage"] > 0.98
    assert r["class_accuracy"] > 0.97
    assert r["fid"] < 2 * r["real_floor"]["fid"] + 1
    assert json.loads((tmp_path / "m.json").read_text())["fid"] == pytest.approx(r["fid"])
    blank = evaluate_images(torch.zeros(50, 1, 28, 28, dtype=torch.uint8), "mnist5k",
                            features=scorer.classifier.run_dir)
    assert blank["fid"] > 10 * r["fid"] and blank["coverage"] < 0.2


@pytest.mark.parametrize("arr,msg", [
    (np.zeros((20, 28, 28), np.float32), "uint8"),
    (np.zeros((20, 28), np.uint8), "N x H x W"),
    (np.zeros((20, 28, 20), np.uint8), "square"),
])
def test_image_array_errors(tmp_path, arr, msg):
    p = tmp_path / "bad.npy"
    np.save(p, arr)
    with pytest.raises(DataError, match=msg):
        evaluate_images(p, "mnist5k")
    with pytest.raises(DataError, match="not found"):
        evaluate_images(tmp_path / "missing.npy", "mnist5k")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="cannot read"):
        evaluate_images(tmp_path / "junk.npy", "mnist5k")


def test_evaluate_run_writes_metrics_and_bpd(tmp_path, make_cfg, tiny_classifier):
    run = tmp_path / "run"
    train(make_cfg("train.max_steps=6", "model.num_classes=10"), run, progress=False)
    r = evaluate_run(run, 40, steps=3, features=tiny_classifier, bpd_n=8, bpd_strata=5)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(r))
    for k in ("fid", "kid", "precision", "recall", "coverage", "class_accuracy", "bpd"):
        assert np.isfinite(r[k]), k
    assert r["bpd_split"] == "held-out" and r["bpd_images"] == 6  # 10% of the 64 images
    assert set(r["bpd_parts"]) == {"prior", "diffusion", "decoder"}
    assert r["real_floor"]["n"] == 40


def test_bits_per_dim_lower_after_brief_training(tmp_path, make_cfg):
    cfg = make_cfg("train.max_steps=60", "train.lr=3e-3", "train.ema_decay=0")
    untrained = build_model(cfg).eval()
    train(cfg, tmp_path / "r", progress=False)
    from effusion.runs import load_run

    trained = load_run(tmp_path / "r", device="cpu").model
    data = load_source(cfg.data)
    x = data.images[:16].float() / 127.5 - 1
    sched = schedule_for(cfg)

    def bpd(net):
        den = NetworkDenoiser(net, sched, cfg.diffusion.prediction, clip_x0=True)
        return bits_per_dim(den, sched, x, strata=49,
                            generator=torch.Generator().manual_seed(0))["bpd"].mean().item()

    before, after = bpd(untrained), bpd(trained)
    assert np.isfinite(before) and np.isfinite(after)
    assert after < before


def test_fid_during_training_is_logged(tmp_path, make_cfg, tiny_classifier):
    from effusion.runs import read_metrics

    run = tmp_path / "run"
    train(make_cfg("train.max_steps=4", "train.eval_every=2", "train.eval_n=16",
                   f"train.eval_features={tiny_classifier}"), run, progress=False)
    fids = [m for m in read_metrics(run) if "fid" in m]
    assert [m["step"] for m in fids] == [2, 4]
    assert all(np.isfinite(m["fid"]) and m["fid"] > 0 for m in fids)


def test_fid_is_independent_of_sample_order(scorer):
    x = real_subset(scorer, 300)
    assert scorer.fid(x) == pytest.approx(scorer.fid(x.flip(0)), rel=1e-6)  # float32 features
    f = scorer.classifier.predict(x)[0]
    assert fid(f, f) == pytest.approx(0.0, abs=1e-3)  # 128-d, some dims near-constant


def test_cli_evaluate_trains_missing_features_explicitly_and_keeps_json_pure(
        tmp_path, make_cfg, tiny_classifier, monkeypatch):
    """Without --features, `effusion evaluate` first takes the explicit feature step; its
    log goes to stderr, so --json prints exactly one JSON document on stdout."""
    import effusion.recipes
    from typer.testing import CliRunner

    from effusion.cli import app
    from effusion.runs import load_classifier

    asked = []

    def fake_step(data, progress=False):  # stands in for training the cached classifier
        asked.append((data.source, data.image_size, progress))
        print("effusion: training the feature classifier ... (log line)")
        return load_classifier(tiny_classifier)

    monkeypatch.setattr(effusion.recipes, "feature_classifier", fake_step)
    run = tmp_path / "run"
    train(make_cfg("train.max_steps=2"), run, progress=False)
    r = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--n", "12", "--steps", "2",
                                 "--bpd-n", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert asked == [("mnist5k", 16, False)]
    assert json.loads(r.stdout)["features"] == str(tiny_classifier)
    assert "training the feature classifier" in r.stderr
