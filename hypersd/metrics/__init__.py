"""Measurement: the mini world's metrics (and the real-model metrics behind the same interface)."""

from hypersd.metrics.stats import bootstrap_ci, feature_fd, frechet_distance, gaussian_stats, kid

__all__ = ["bootstrap_ci", "feature_fd", "frechet_distance", "gaussian_stats", "kid"]
