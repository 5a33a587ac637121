"""Metric functions against independent computations and known invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from effusion.evaluate.metrics import (class_accuracy, coverage, fid, frechet_distance, kid,
                                       precision_recall)


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root (Heusel et al. 2017)."""
    from scipy import linalg

    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def correlated(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix) * scale + shift


def test_fid_of_a_set_with_itself_is_zero():
    f = correlated(500, 16, 0)
    assert abs(fid(f, f)) < 1e-8


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.3, 1.0), (0.0, 1.7), (1.0, 0.5)])
def test_fid_matches_scipy(shift, scale):
    a = correlated(800, 12, 1)
    b = correlated(600, 12, 2, shift=shift, scale=scale)
    ours, ref = fid(a, b), scipy_fid(a.numpy(), b.numpy())
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    # Diagonal covariances: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(s1) - sqrt(s2))^2.
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]).double(), torch.tensor([4.0, 1.0, 9.0]).double()
    mu1, mu2 = torch.zeros(3).double(), torch.tensor([1.0, 0.0, 2.0]).double()
    want = 1.0 + 4.0 + ((s1.sqrt() - s2.sqrt()) ** 2).sum().item()
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(want)


def test_kid_is_zero_within_its_std_for_two_samples_of_one_distribution():
    f = correlated(2000, 16, 3)
    mean, std = kid(f[:1000], f[1000:], subsets=20, subset_size=500)
    assert abs(mean) < 3 * std + 1e-6
    far_mean, far_std = kid(f[:1000], f[1000:] + 0.5, subsets=20, subset_size=500)
    assert far_mean > 10 * far_std and far_mean > 100 * abs(mean)


def test_kid_unbiased_estimate_matches_brute_force():
    a, b = correlated(30, 5, 4), correlated(30, 5, 5, shift=0.2)
    k = lambda x, y: (x @ y.T / 5 + 1) ** 3  # noqa: E731
    m = 30
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    want = ((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
            - 2 * kxy.mean())
    mean, std = kid(a, b, subsets=3, subset_size=30)  # each subset is the whole set
    assert mean == pytest.approx(float(want), rel=1e-9) and std == pytest.approx(0, abs=1e-9)


def test_precision_of_a_subset_of_the_reference_is_one():
    ref = correlated(400, 8, 6)
    p, r = precision_recall(ref, ref[:100])
    assert p == 1.0
    assert precision_recall(ref, ref) == (1.0, 1.0)


def test_precision_recall_separate_fidelity_from_diversity():
    ref = correlated(500, 4, 7)
    collapsed = ref[:50].repeat(10, 1) + 1e-6 * correlated(500, 4, 8)  # faithful, not diverse
    p, r = precision_recall(ref, collapsed)
    assert p > 0.95 and r < 0.5
    off = correlated(500, 4, 9, shift=5.0)  # diverse but off the manifold
    p2, _ = precision_recall(ref, off)
    assert p2 < 0.05


def test_coverage_and_class_accuracy():
    assert coverage(torch.arange(1000) % 10, 10) == pytest.approx(1.0)
    assert coverage(torch.zeros(100, dtype=torch.long), 10) == 0.0
    half = coverage(torch.arange(100) % 5, 10)  # 5 of 10 classes evenly: log 5 / log 10
    assert half == pytest.approx(math.log(5) / math.log(10))
    pred, want = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 3])
    assert class_accuracy(pred, want) == 0.75


def test_metric_input_errors():
    one = torch.zeros(1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 2"):
        fid(one, one)
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2))
