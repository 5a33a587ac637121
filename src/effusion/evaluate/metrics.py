"""Sample-quality metrics over feature vectors (float64 torch tensors (N, D)) and class
predictions. Pure functions: no model, no I/O.
"""

from __future__ import annotations

import math

import torch


def _mean_cov(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = f.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor,
                     s2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    Tr (S1 S2)^(1/2) is the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    which is symmetric PSD, so a symmetric eigen-solver suffices (no complex sqrtm).
    """
    w, v = torch.linalg.eigh(s1)
    r1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of the Gaussians fitted to two feature sets (Heusel et al. 2017)."""
    if min(real.shape[0], fake.shape[0]) < 2:
        raise ValueError("FID needs at least 2 feature vectors on each side")
    return frechet_distance(*_mean_cov(real), *_mean_cov(fake))


def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD^2 estimate with
    the cubic polynomial kernel, averaged over random subsets. Returns (mean, std)."""
    real, fake = real.double(), fake.double()
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors on each side")
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        x = real[torch.randperm(real.shape[0], generator=g)[:m]]
        y = fake[torch.randperm(fake.shape[0], generator=g)[:m]]
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        off = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        vals.append(float(off - 2 * kxy.mean()))
    t = torch.tensor(vals)
    return float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0


def _knn_radii(f: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour within the same set."""
    d = torch.cdist(f, f)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
            chunk: int = 1024) -> torch.Tensor:
    """For each point: is it inside at least one ball (centre, radius)?"""
    out = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i:i + chunk], centres)
        out.append((d <= radii[None]).any(1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour. Precision: share of fake points inside the real manifold (fidelity); recall:
    share of real points inside the fake manifold (diversity).
    """
    real, fake = real.double(), fake.double()
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points on each side")
    precision = _inside(fake, real, _knn_radii(real, k)).double().mean()
    recall = _inside(real, fake, _knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def class_accuracy(predicted: torch.Tensor, requested: torch.Tensor) -> float:
    """Share of samples the classifier assigns to the class that was asked for."""
    return float((predicted == requested).double().mean())


def coverage(predicted: torch.Tensor, num_classes: int) -> float:
    """Entropy of the predicted-class histogram over log(num_classes): 1 when every class
    is produced equally often, 0 when all samples fall in one class."""
    p = torch.bincount(predicted, minlength=num_classes).double()
    p = p / p.sum()
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / math.log(num_classes))


def nearest_distances(points: torch.Tensor, to: torch.Tensor, chunk: int = 1024,
                      exclude_self: bool = False) -> torch.Tensor:
    """Euclidean distance from each of `points` (N, D) to its nearest row of `to` (M, D);
    `exclude_self` when `points` is `to` (the zero distance to itself is skipped)."""
    points, to = points.double(), to.double()
    out = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i:i + chunk], to)
        if exclude_self:
            d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = math.inf
        out.append(d.min(1).values)
    return torch.cat(out)


def memorisation(train: torch.Tensor, held_out: torch.Tensor, samples: torch.Tensor
                 ) -> dict[str, float]:
    """How close samples come to the training images, against how close unseen real images
    (the held-out split) come to them, in one space (features or flattened pixels):

    - `copies`: share of samples nearer to their nearest training image than the nearest
      held-out image is to the training set (closer than any real unseen image comes: a
      near copy). A generator that does not copy gives ~0.
    - `closer_than_p5`: share of samples nearer than the 5th percentile of the held-out
      images' distances; a generator whose samples are as novel as unseen images gives
      ~0.05, one that copies more.
    - `distance_ratio`: median sample distance / median held-out distance (< 1: samples sit
      closer to the training set than new real images do; Meehan et al. 2020 test the same
      thing)."""
    d_held = nearest_distances(held_out, train)
    d_samp = nearest_distances(samples, train)
    p5 = torch.quantile(d_held, 0.05)
    return {"copies": float((d_samp < d_held.min()).double().mean()),
            "closer_than_p5": float((d_samp < p5).double().mean()),
            "distance_ratio": float(d_samp.median() / d_held.median().clamp_min(1e-12))}
