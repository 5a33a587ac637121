"""The remedies table's switches (issue 13): long-tailed data and class reweighting,
post-hoc EMA, the diversity, multi-scale and feature terms, per-class metrics."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from typer.testing import CliRunner

import effusion.recipes.generative as generative
from effusion.cli import app
from effusion.config import Config, ConfigError, DataConfig
from effusion.data import (DataError, WeightedBatchStream, class_weights, load_source,
                           long_tail_counts, make_stream)
from effusion.data.sources import ImageSet
from effusion.diffusion import schedule_for
from effusion.evaluate import FeatureScorer, per_class_scores, score
from effusion.evaluate.metrics import fid
from effusion.precision import Precision
from effusion.recipes import train
from effusion.runs import load_classifier, load_run, read_lineage
from effusion.runs.files import list_checkpoints
from effusion.train.objective import X0Terms, diffusion_loss, multiscale_loss, within_class_spread
from effusion.train.posthoc import (PowerEMAs, Target, ema_profile, exponential_profile,
                                    gamma_to_sigma_rel, list_snapshots, power_profile,
                                    reconstruct, sigma_rel_to_gamma)

CPU = Precision(torch.device("cpu"), "fp32")


# ------------------------------------------------------------------------ long tail

def test_long_tailed_subset_has_the_configured_class_counts():
    counts = long_tail_counts(500, 10, 50.0)
    assert counts[0] == 500 and counts[-1] == 10
    assert all(a > b for a, b in zip(counts, counts[1:]))  # exponential, strictly falling
    assert counts[5] == round(500 * 50 ** (-5 / 9))
    full = load_source(DataConfig())
    n_max = int(torch.bincount(full.labels).min())
    data = load_source(DataConfig(imbalance=50))
    assert torch.bincount(data.labels).tolist() == long_tail_counts(n_max, 10, 50.0)
    # deterministic per seed, a different draw for another seed
    again = load_source(DataConfig(imbalance=50))
    other = load_source(DataConfig(imbalance=50, imbalance_seed=1))
    assert torch.equal(again.images, data.images)
    assert torch.equal(torch.bincount(other.labels), torch.bincount(data.labels))
    assert not torch.equal(other.images, data.images)


def test_imbalance_needs_labels_and_a_sane_ratio(tmp_path):
    from effusion.config import load_config

    with pytest.raises(ConfigError, match="data.imbalance must be"):
        load_config(None, ["data.imbalance=0.5"])
    np.savez(tmp_path / "x.npz", images=np.zeros((10, 8, 8), np.uint8))
    with pytest.raises(DataError, match="needs a labelled source"):
        load_source(DataConfig(source=f"npz:{tmp_path / 'x.npz'}", image_size=8, imbalance=10))


@pytest.mark.parametrize("scheme", ["none", "inverse", "sqrt", "effective_number"])
def test_reweighting_draws_classes_at_the_configured_frequency(scheme):
    counts = torch.tensor(long_tail_counts(300, 5, 30.0))
    labels = torch.cat([torch.full((int(n),), k) for k, n in enumerate(counts)])
    data = ImageSet(torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), labels,
                    [str(k) for k in range(5)])
    expected = {"none": counts.double(), "inverse": torch.ones(5, dtype=torch.float64),
                "sqrt": counts.double().sqrt(),
                "effective_number": counts * 0.1 / (1 - 0.9 ** counts.double())}[scheme]
    expected = expected / expected.sum()
    assert torch.allclose(class_weights(counts, scheme, beta=0.9), expected)
    stream = WeightedBatchStream(data, 256, seed=0, reweight=scheme, beta=0.9)
    drawn = torch.cat([stream.next_indices() for _ in range(200)])  # 51,200 draws
    freq = torch.bincount(labels[drawn], minlength=5).double() / len(drawn)
    assert torch.allclose(freq, expected, atol=0.006), (freq, expected)


def test_the_reweighted_stream_resumes_from_its_position():
    data = load_source(DataConfig(imbalance=20, limit=0))
    a = make_stream(data, 32, seed=3, reweight="inverse")
    for _ in range(5):
        a.next_indices()
    b = make_stream(data, 32, seed=3, reweight="inverse")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_indices(), b.next_indices())
    assert a.state_dict() == {"epoch": 0, "index": 6 * 32}
    unlabelled = ImageSet(data.images, None, [])
    with pytest.raises(DataError, match="needs labelled data"):
        make_stream(unlabelled, 8, 0, "sqrt")


# ------------------------------------------------------------------------ post-hoc EMA

def _trajectory(t: int) -> torch.Tensor:
    return torch.tensor([np.sin(t / 50), np.cos(t / 80), t / 400, (t / 400) ** 2,
                         0.5 * np.sin(t / 30), 1 + t / 1000], dtype=torch.float32)


def _set(model: nn.Linear, v: torch.Tensor) -> None:
    with torch.no_grad():
        model.weight.copy_(v.view(2, 3))
        model.bias.copy_(v[:2] * 0.3)


def test_sigma_rel_and_gamma_round_trip():
    for s in (0.02, 0.05, 0.1, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's values
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    with pytest.raises(ConfigError, match="sigma_rel must be in"):
        sigma_rel_to_gamma(0.5)


def test_profiles_are_the_recursions_they_describe():
    # a fixed-decay EMA with the initial copy: weights of (theta_0..theta_T) sum to 1
    p = ema_profile(np.full(30, 0.9), init_weight=True)
    assert p.sum() == pytest.approx(1.0) and p[0] == pytest.approx(0.9 ** 30)
    q = exponential_profile(30, 0.9, 30)
    assert q[0] == 0 and q.sum() == pytest.approx(1.0)
    assert q[1:] == pytest.approx(p[1:] / p[1:].sum())
    pw = power_profile(40, 3.0, 50)  # ~ tau^3 over steps 1..40, zero after
    assert pw[41:].sum() == 0 and pw[0] == 0 and pw.sum() == pytest.approx(1.0)
    tau = np.arange(1, 41)
    assert np.corrcoef(pw[1:41], tau ** 3.0)[0, 1] > 0.999


def test_posthoc_ema_reconstructs_a_known_ema_from_snapshots(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    tracked = PowerEMAs(model, (0.05, 0.10))
    truth = PowerEMAs(model, (0.07,))  # what the reconstruction must find
    decay, avg, norm = 0.99, torch.zeros(6), 0.0
    for t in range(1, 401):
        _set(model, _trajectory(t))
        tracked.update(model, t)
        truth.update(model, t)
        avg, norm = decay * avg + (1 - decay) * _trajectory(t), decay * norm + (1 - decay)
        if t % 20 == 0:
            tracked.save_snapshot(tmp_path, t)
    assert len(list_snapshots(tmp_path)) == 40
    state, info = reconstruct(tmp_path, Target(sigma_rel=0.07))
    assert info["step"] == 400 and info["snapshots"] == 40
    assert torch.allclose(state["weight"], truth.avgs[0]["weight"], atol=1e-4)
    assert torch.allclose(state["bias"], truth.avgs[0]["bias"], atol=1e-4)
    # a tracked profile itself comes back exactly
    state, info = reconstruct(tmp_path, Target(sigma_rel=0.05))
    assert info["residual"] < 1e-9
    assert torch.allclose(state["weight"], tracked.avgs[0]["weight"], atol=1e-6)
    # an exponential EMA is approximated, and the fit says how well
    state, info = reconstruct(tmp_path, Target(decay=decay))
    assert 0 < info["residual"] < 0.05
    assert torch.allclose(state["weight"].flatten(), (avg / norm)[:6], atol=0.02)
    # earlier steps use only the snapshots taken by then
    _, info = reconstruct(tmp_path, Target(sigma_rel=0.1), step=200)
    assert info["snapshots"] == 20 and info["residual"] < 1e-9
    with pytest.raises(ConfigError, match="cannot rebuild an average at step 401"):
        reconstruct(tmp_path, Target(sigma_rel=0.1), step=401)
    with pytest.raises(ConfigError, match="one of sigma_rel or decay"):
        Target()


# ------------------------------------------------------------------------ loss terms

def _loss(terms, x0, labels, net) -> float:
    cfg = Config()
    return diffusion_loss(lambda x, t, c: net(x), x0, labels, cfg.diffusion, schedule_for(cfg),
                          torch.Generator().manual_seed(0), CPU, cond_drop=0.1, null_class=10,
                          terms=terms).item()


def test_the_multiscale_loss_equals_the_plain_loss_when_its_extra_weights_are_zero():
    torch.manual_seed(0)
    net = nn.Conv2d(1, 1, 3, padding=1)
    x0, labels = torch.rand(8, 1, 28, 28) * 2 - 1, torch.randint(0, 3, (8,))
    plain = _loss(None, x0, labels, net)
    assert _loss(X0Terms((1.0, 0.0, 0.0)), x0, labels, net) == pytest.approx(plain, abs=0)
    assert _loss(X0Terms((2.0,)), x0, labels, net) == pytest.approx(2 * plain)
    more = _loss(X0Terms((1.0, 0.5, 0.25)), x0, labels, net)
    assert more > plain
    # the pooled error: a blur the half-resolution loss cannot see costs it nothing
    x = torch.randn(2, 1, 8, 8)
    checker = (torch.arange(8)[:, None] + torch.arange(8)).remainder(2).float() * 2 - 1
    w = torch.ones(2)
    assert multiscale_loss(x + checker, x, (1, 1), w) == pytest.approx(0, abs=1e-12)
    assert multiscale_loss(x + 1, x, (1, 1), w) == pytest.approx(1.0)


def test_the_diversity_term_pushes_identical_same_class_predictions_apart():
    f_hat = torch.zeros(2, 4, requires_grad=True)  # two identical predictions ...
    f = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]])  # ... of two different images
    loss = within_class_spread(f_hat - f, torch.tensor([3, 3]), torch.ones(2))
    loss.backward()
    step = -f_hat.grad  # gradient descent direction
    assert loss.item() > 0
    assert (step[0] @ (f[0] - f[1])).item() > 0 and (step[1] @ (f[1] - f[0])).item() > 0
    # another class, or an error that both share, costs nothing
    assert within_class_spread(f_hat - f, torch.tensor([3, 4]), torch.ones(2)).item() == 0
    shared = torch.ones(2, 4)
    assert within_class_spread(shared, torch.tensor([3, 3]), torch.ones(2)).item() == 0
    # the pairwise form it stands for: ||(fh_i - fh_j) - (f_i - f_j)||^2 / (2 D) for a pair
    e = torch.randn(2, 4)
    pair = ((e[0] - e[1]) ** 2).sum() / (2 * 4) / 2
    assert within_class_spread(e, torch.tensor([0, 0]), torch.ones(2)) == pytest.approx(pair.item())


def test_the_diversity_term_is_zero_when_its_weight_is_zero():
    torch.manual_seed(0)
    net = nn.Conv2d(1, 1, 3, padding=1)
    x0, labels = torch.rand(8, 1, 28, 28) * 2 - 1, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    feats = lambda x: x.flatten(1)  # noqa: E731
    plain = _loss(None, x0, labels, net)
    assert _loss(X0Terms(diversity_weight=0.0, features=feats), x0, labels, net) == plain
    with_div = _loss(X0Terms(diversity_weight=1.0, features=feats), x0, labels, net)
    with_feat = _loss(X0Terms(feature_weight=1.0, features=feats), x0, labels, net)
    assert with_div > plain and with_feat > plain
    # the feature term alone scores only the low-noise samples: the same value
    both = _loss(X0Terms(feature_weight=1.0, diversity_weight=1e-12, features=feats), x0, labels, net)
    assert both == pytest.approx(with_feat, rel=1e-6)
    with pytest.raises(ValueError, match="need X0Terms.features"):
        _loss(X0Terms(diversity_weight=1.0), x0, labels, net)


def test_feature_and_diversity_terms_refuse_latent_runs():
    cfg = Config()
    from dataclasses import replace

    latent = replace(cfg, model=replace(cfg.model, space="latent", vae="somewhere"),
                     train=replace(cfg.train, diversity_weight=0.1))
    with pytest.raises(ConfigError, match="pixel-space runs only"):
        generative.x0_terms(latent, torch.device("cpu"))
    ms = replace(latent, train=replace(cfg.train, multiscale_weights=(1.0, 0.5)))
    assert generative.x0_terms(ms, torch.device("cpu")).multiscale == (1.0, 0.5)


# ------------------------------------------------------------------------ per-class metrics

def test_per_class_metrics_agree_with_the_overall_metrics_for_one_class(scorer_one_class):
    scorer, images, ref, ref_labels = scorer_one_class
    requested = torch.zeros(len(images), dtype=torch.long)
    overall = score(scorer, images, requested, reference=ref)
    pc = per_class_scores(scorer, images, requested, ref, ref_labels)
    row = pc["classes"]["0"]
    for k in ("fid", "kid", "precision", "recall", "class_accuracy"):
        assert row[k] == pytest.approx(overall[k], rel=1e-9, abs=1e-12), k


@pytest.fixture(scope="module")
def scorer_one_class(feature_classifier):
    """The digits 0 only: a one-class data set scored by the real feature classifier."""
    full = FeatureScorer.for_data(DataConfig(), feature_classifier)
    zero = full.real_labels == 0
    images, feats = full.real_images[zero], full.real_features[zero]
    n = 200  # more than the 128 feature dimensions, so the per-class FID is defined
    return full, images[:n], feats[n:], torch.zeros(len(feats) - n, dtype=torch.long)


def test_per_class_fid_is_withheld_below_the_feature_dimension(scorer_one_class):
    scorer, images, ref, ref_labels = scorer_one_class
    requested = torch.zeros(60, dtype=torch.long)
    pc = per_class_scores(scorer, images[:60], requested, ref, ref_labels)
    assert pc["classes"]["0"]["fid"] is None and pc["classes"]["0"]["kid"] is not None
    feats, _ = scorer.classifier.predict(images[:60])
    assert fid(ref, feats) > 0  # computable, but meaningless: 60 points in 128 dimensions


def test_head_and_tail_follow_the_training_counts(scorer_one_class):
    scorer, _, _, _ = scorer_one_class
    perm = torch.randperm(len(scorer.real_images), generator=torch.Generator().manual_seed(0))
    pick, rest = perm[:600], perm[600:]  # mnist5k is sorted by class
    images, labels = scorer.real_images[pick], scorer.real_labels[pick]
    ref, ref_labels = scorer.real_features[rest], scorer.real_labels[rest]
    counts = torch.tensor(long_tail_counts(500, 10, 50.0))
    pc = per_class_scores(scorer, images, labels, ref, ref_labels, counts)
    assert pc["groups"] == {"head": ["0", "1", "2"], "tail": ["7", "8", "9"]}
    accs = [pc["classes"][c]["class_accuracy"] for c in ("7", "8", "9")]
    assert pc["tail"]["class_accuracy"] == pytest.approx(sum(accs) / 3)
    balanced = per_class_scores(scorer, images, labels, ref, ref_labels, torch.full((10,), 450))
    assert "head" not in balanced and "groups" not in balanced


# ------------------------------------------------------------------------ in training

def test_training_keeps_power_ema_snapshots_resumes_them_and_effusion_ema_rebuilds(
        tmp_path, make_cfg):
    cfg = make_cfg("train.max_steps=8", "train.checkpoint_every=4", "train.keep_checkpoints=3",
                   "train.posthoc_ema=[0.05,0.1]", "train.posthoc_every=3")
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    train(cfg, run_a, progress=False)
    snaps = sorted(p.name for p in (run_a / "posthoc").iterdir())
    assert snaps == ["step-0000003.safetensors", "step-0000006.safetensors",
                     "step-0000008.safetensors"]  # every 3 steps, and the last
    assert (list_checkpoints(run_a)[-1] / "posthoc.safetensors").is_file()
    # killed after the step-4 checkpoint, resumed by the same command: the same snapshots
    shutil.copytree(run_a, run_b)
    shutil.rmtree(run_b / "checkpoints" / "step-0000008")
    for p in ("step-0000006.safetensors", "step-0000008.safetensors"):
        (run_b / "posthoc" / p).unlink()
    train(cfg, run_b, progress=False)
    for name in snaps:
        a, b = load_file(str(run_a / "posthoc" / name)), load_file(str(run_b / "posthoc" / name))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name

    out = tmp_path / "posthoc-0.07"
    r = CliRunner().invoke(app, ["ema", "--run", str(run_a), "--sigma-rel", "0.07",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "sigma_rel=0.07 at step 8 from 6 snapshots" in r.output
    rebuilt = load_run(out, device="cpu")
    assert rebuilt.step == 8
    lineage = read_lineage(out)
    assert lineage[-1]["pass"] == "posthoc-ema" and lineage[-1]["target"] == "sigma_rel=0.07"
    state, _ = reconstruct(run_a, Target(sigma_rel=0.07))
    for k, v in rebuilt.model.state_dict().items():
        assert torch.allclose(v, state[k].to(v.dtype)), k
    # errors name the problem
    r = CliRunner().invoke(app, ["ema", "--run", str(run_a), "--sigma-rel", "0.07", "--out", str(out)])
    assert r.exit_code != 0 and "not empty" in r.output
    plain = tmp_path / "plain"
    train(make_cfg(), plain, progress=False)
    r = CliRunner().invoke(app, ["ema", "--run", str(plain), "--decay", "0.99", "--out",
                                 str(tmp_path / "x")])
    assert r.exit_code != 0 and "no post-hoc EMA snapshots" in r.output


def test_training_with_every_remedy_on_runs_and_reweights(tmp_path, make_cfg, tiny_classifier,
                                                           monkeypatch):
    clf = load_classifier(tiny_classifier)
    monkeypatch.setattr(generative, "feature_classifier", lambda data: clf)
    cfg = make_cfg("model.num_classes=-1", "data.limit=0", "data.imbalance=20",
                   "train.reweight=sqrt", "train.diversity_weight=0.1",
                   "train.feature_loss_weight=0.1", "train.multiscale_weights=[1,0.5]",
                   "train.max_steps=3")
    res = train(cfg, tmp_path / "run", progress=False)
    assert res.step == 3 and np.isfinite(res.loss)


def test_ema_sweep_scores_rebuilt_emas_like_a_written_run(tmp_path, make_cfg, tiny_classifier):
    from effusion.evaluate import ema_sweep, evaluate_run
    from effusion.train.posthoc import write_posthoc_run

    run = tmp_path / "run"
    train(make_cfg("train.max_steps=6", "train.posthoc_ema=[0.05,0.1]", "train.posthoc_every=2"),
          run, progress=False)
    r = ema_sweep(run, [0.05, 0.2], [0.9], n=16, features=tiny_classifier, device="cpu")
    assert [x["ema"] for x in r["sweep"]] == ["tracked (decay 0.999, warm-up)", "sigma_rel=0.05",
                                             "sigma_rel=0.2", "decay=0.9"]
    assert r["best"] == min(r["sweep"], key=lambda x: x["fid"])["ema"]
    assert (run / "ema_sweep.json").is_file()
    assert r["sweep"][1]["residual"] < 1e-9 and r["sweep"][2]["residual"] > 0
    # the sweep's row is what the same EMA, written out as a run, scores
    write_posthoc_run(run, tmp_path / "s005", Target(sigma_rel=0.05))
    alone = evaluate_run(tmp_path / "s005", 16, features=tiny_classifier, bpd_n=0, device="cpu")
    assert alone["fid"] == pytest.approx(r["sweep"][1]["fid"], rel=1e-6)
    tracked = evaluate_run(run, 16, features=tiny_classifier, bpd_n=0, device="cpu")
    assert tracked["fid"] == pytest.approx(r["sweep"][0]["fid"], rel=1e-6)
