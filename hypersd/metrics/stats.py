"""Fréchet distance and confidence intervals, in float64."""

from __future__ import annotations

import numpy as np
from scipy import linalg


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (N, D) features."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})  [Dowson & Landau 1982; FID, Heusel 2017]."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    # Tr (S1 S2)^{1/2} = sum of sqrt eigenvalues of the symmetric S1^{1/2} S2 S1^{1/2}: two
    # symmetric eigendecompositions, faster and steadier than a general matrix square root
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def feature_fd(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def bootstrap_ci(values_fn, n: int, rounds: int = 200, seed: int = 0,
                 level: float = 0.95, centred: bool = False) -> tuple[float, float]:
    """Bootstrap interval of ``values_fn(indices)`` over resamples of n items.

    Percentile interval by default. ``centred=True`` shifts it by the resampling bias (the
    resamples' mean minus the full-sample estimate), keeping its width: FD grows when a
    resample repeats images, so its percentile interval can lie wholly above the estimate.
    The centred interval then shows how far FD moves with the sample, for comparing rows
    measured on the same number of images.
    """
    rng = np.random.default_rng(seed)
    stats = np.array([values_fn(rng.integers(0, n, n)) for _ in range(rounds)])
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    if centred:
        shift = stats.mean() - values_fn(np.arange(n))
        lo, hi = lo - shift, hi - shift
    return float(lo), float(hi)


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD² with k(x, y) = (x·y / d + 1)³, as mean and std
    over random subsets [Bińkowski et al. 2018]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
        values.append(off(kxx) + off(kyy) - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))
