"""Feature spaces a person can trust: the random conv ensemble, the degradation ladder they
are checked on, the memorisation check, and the colour default."""

from __future__ import annotations

import pytest
import torch

from effusion.config import DataConfig
from effusion.data import load_source
from effusion.data.icons import ICON_THEMES, IconError, find_theme
from effusion.evaluate import degrade
from effusion.evaluate.features import (FeatureScorer, default_space, feature_space)
from effusion.evaluate.metrics import fid, kid, memorisation, nearest_distances
from effusion.models.embeddings import RandomFeatures


def _icons_installed() -> bool:
    try:
        for name in ICON_THEMES:
            find_theme(name)
        return True
    except IconError:
        return False


needs_icons = pytest.mark.skipif(
    not _icons_installed(), reason="icon themes not installed: apt-get install "
    + " ".join(ICON_THEMES.values()) + " (make test installs them as root)")


def test_random_features_are_fixed_by_the_seed():
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    a, b, c = RandomFeatures(3), RandomFeatures(3), RandomFeatures(3, seed=1)
    assert torch.equal(a(x), b(x))  # no weights file needed: same seed, same network
    assert not torch.allclose(a(x), c(x))
    assert a(x).shape == (5, a.dim) and a.dim == 2 * (2 * (16 + 32 + 64) + 64 * 4)
    assert RandomFeatures(1)(x[:, :1, :28, :28]).shape == (5, a.dim)  # digits' size too


def test_blur_and_noise_are_what_they_say():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    flat = torch.full((2, 1, 16, 16), 100, dtype=torch.uint8)
    assert torch.equal(degrade.blur(flat, 1.0), flat)  # a constant image stays constant

    def roughness(y: torch.Tensor) -> float:  # mean squared difference of neighbours
        return float((y[..., 1:].float() - y[..., :-1].float()).pow(2).mean())

    assert roughness(x) > roughness(degrade.blur(x, 0.5)) > roughness(degrade.blur(x, 1.0))
    mid = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
    std = (degrade.noise(mid, 0.1).float() / 255 - 128 / 255).std()
    assert abs(float(std) - 0.1) < 0.005
    assert torch.equal(degrade.noise(x, 0.05, seed=3), degrade.noise(x, 0.05, seed=3))


def test_patch_shuffle_moves_whole_tiles():
    x = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    y = degrade.patch_shuffle(x, 8, seed=0)

    def tiles(img: torch.Tensor) -> set:
        return {img[:, r:r + 8, c:c + 8].numpy().tobytes() for r in (0, 8) for c in (0, 8)}

    for i in range(2):
        assert tiles(x[i]) == tiles(y[i])  # the same four tiles, in another order
    moved = [not torch.equal(degrade.patch_shuffle(x, 8, seed=s), x) for s in range(4)]
    assert any(moved)  # 4 tiles: 1 in 24 orders is the identity, not all four seeds
    with pytest.raises(ValueError, match="do not tile into 8x8"):
        degrade.patch_shuffle(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), 8)
    assert degrade.ladder(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))["patch shuffle"].shape \
        == (2, 1, 28, 28)  # 7 px patches at 28 px


def test_colour_jitter_keeps_gray_gray_and_a_full_hue_turn_is_identity():
    g = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (3, 1, 8, 8), generator=g, dtype=torch.uint8).expand(3, 3, 8, 8)
    y = degrade.colour_jitter(gray.contiguous(), 0.3).float()
    assert (y[:, 0] - y[:, 1]).abs().max() <= 1 and (y[:, 1] - y[:, 2]).abs().max() <= 1
    rgb = torch.rand(2, 3, 4, 4)
    assert torch.allclose(degrade._rotate_hue(rgb, torch.ones(2)), rgb, atol=1e-5)
    assert not torch.allclose(degrade._rotate_hue(rgb, torch.full((2,), 0.3)), rgb, atol=1e-2)


def test_memorisation_tells_copies_from_new_images():
    g = torch.Generator().manual_seed(0)
    train, held = torch.randn(400, 8, generator=g), torch.randn(200, 8, generator=g)
    fresh = torch.randn(300, 8, generator=g)
    copies = train[:300] + 1e-4 * torch.randn(300, 8, generator=g)
    m_copy, m_new = memorisation(train, held, copies), memorisation(train, held, fresh)
    assert m_copy["copies"] == 1.0 and m_copy["distance_ratio"] < 0.01
    assert m_new["copies"] < 0.02 and 0.0 < m_new["closer_than_p5"] < 0.12
    assert 0.8 < m_new["distance_ratio"] < 1.25
    d = nearest_distances(train[:5], train, exclude_self=True)
    assert (d > 0).all()


def _ladder_checks(embed, real: torch.Tensor, n: int, extra: dict | None = None) -> list[dict]:
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(1))
    pick, rest = real[perm[:n]], real[perm[n:]]
    ref = embed(rest)
    table = {}
    for name, x in {"real": pick, **degrade.ladder(pick), **(extra or {})}.items():
        f = embed(x)
        table[name] = {"fid": fid(ref, f), "kid": kid(ref, f, subsets=10, subset_size=n)[0]}
    return degrade.ranking_checks(table)


def test_digit_features_rank_the_ladder_as_a_person_does(feature_classifier, digits_run):
    """Digits: the classifier's features (the default for grayscale data)."""
    from effusion.runs import load_run
    from effusion.sampling import generate

    data = DataConfig()
    assert default_space(data) == "classifier"
    real = load_source(data).images
    samples = generate(load_run(digits_run), 500, seed=0)
    embed = feature_space("classifier", data, real, feature_classifier)
    checks = _ladder_checks(embed, real, 500, {"late checkpoint": samples})
    assert len(checks) >= 10
    assert all(c["fid_ok"] for c in checks), [c for c in checks if not c["fid_ok"]]


@needs_icons
def test_colour_features_rank_the_icon_ladder_as_a_person_does():
    """Colour: the random conv ensemble (the default for RGB data), on real icons."""
    data = DataConfig(source="icons")  # all 2,718: shuffle vs jitter is the tightest pair
    assert default_space(data) == "random-std"
    real = load_source(data).images
    checks = _ladder_checks(feature_space("random-std", data, real), real, 1000)
    assert all(c["fid_ok"] for c in checks), [c for c in checks if not c["fid_ok"]]
    # the classifier of the six weak labels is no part of this: no training needed


def test_colour_runs_default_to_the_random_ensemble(tmp_path, monkeypatch):
    """An RGB scorer names its space and keeps the classifier for the class scores."""
    from effusion.recipes import classifier_config, train

    clf_run = tmp_path / "clf"
    train(classifier_config(["model.arch=convnet", "data.source=shapes:120", "data.image_size=16",
                             "train.epochs=1", "train.threads=1", "train.precision=fp32"]),
          clf_run, progress=False)
    from effusion.runs import load_classifier

    data = DataConfig(source="shapes:120", image_size=16)
    scorer = FeatureScorer.for_data(data, load_classifier(clf_run))
    assert scorer.name.startswith("random-std") and str(clf_run) in scorer.name
    feats, probs = scorer.classifier.predict(scorer.real_images[:7])
    assert feats.shape == (7, RandomFeatures(3).dim) and probs.shape == (7, 6)
    assert torch.allclose(probs.sum(1), torch.ones(7))
    own = FeatureScorer.for_data(data, load_classifier(clf_run), space="classifier")
    assert own.real_features.shape[1] == 128 and own.name == str(clf_run)
