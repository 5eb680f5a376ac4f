import numpy as np
import pytest
import torch

from hypersd.metrics import bootstrap_ci, feature_fd, frechet_distance
from hypersd.metrics.classifier import EmojiNet, augment
from hypersd.metrics.mini import diversity_per_prompt


def test_fd_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(feature_fd(x, x)) < 1e-6


def test_fd_matches_closed_form_for_gaussians():
    # diagonal covariances: FD = |mu1-mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # a full covariance, rotated: FD is invariant to a shared rotation
    rot = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    rotated = frechet_distance(rot @ mu1, rot @ np.diag(s1) @ rot.T, rot @ mu2, rot @ np.diag(s2) @ rot.T)
    assert rotated == pytest.approx(expected, rel=1e-6)


def test_fd_of_samples_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal(0.5, 2.0, size=(20000, 2))
    expected = 2 * 0.25 + 2 * (1 + 4 - 2 * 2)
    assert feature_fd(a, b) == pytest.approx(expected, rel=0.05)


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(3)
    widths = []
    for n in (100, 2500):
        x = rng.normal(size=n)
        lo, hi = bootstrap_ci(lambda idx: x[idx].mean(), n)
        assert lo < x.mean() < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3


def test_diversity_is_zero_for_copies_and_grows_with_spread():
    f = np.zeros((4, 3))
    assert diversity_per_prompt(f, ["a", "a", "b", "b"]).tolist() == [0.0, 0.0]
    f[1, 0] = 2.0
    assert diversity_per_prompt(f, ["a", "a", "b", "b"]).tolist() == [2.0, 0.0]


def test_emojinet_shapes_and_augment_range():
    net = EmojiNet(num_classes=10, width=8, feature_dim=16)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert net.features(x).shape == (4, 16) and net(x).shape == (4, 10)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    white = augment(torch.ones(2, 3, 32, 32), torch.Generator().manual_seed(0))
    assert white.mean() > 0.8, "augmentation must pad with white"


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    from hypersd.metrics import kid
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(600, 4)), rng.normal(size=(600, 4))
    same, _ = kid(a, b, subsets=20, subset_size=300)
    shifted, _ = kid(a, b + 1.0, subsets=20, subset_size=300)
    assert abs(same) < 0.02 and shifted > 0.5
    # a larger shift, a larger distance
    assert kid(a, b + 2.0, subsets=5, subset_size=300)[0] > shifted


def test_centred_bootstrap_interval_covers_fd_despite_its_upward_bias():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 64)), rng.normal(0.1, 1.0, size=(200, 64))
    fd_of = lambda idx: feature_fd(a[idx], b)  # noqa: E731
    estimate = fd_of(np.arange(200))
    lo, hi = bootstrap_ci(fd_of, 200, rounds=100)
    assert lo > estimate  # resampling repeats points, which inflates FD: the percentile misses
    clo, chi = bootstrap_ci(fd_of, 200, rounds=100, centred=True)
    assert clo < estimate < chi and chi - clo == pytest.approx(hi - lo)
