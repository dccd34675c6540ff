"""Evaluation: Fréchet distance, Inception Score, KID, precision/recall, streaming statistics."""

from diffax.evaluation._frechet import frechet_distance
from diffax.evaluation._stats import (
    FeatureStats,
    feature_mean_cov,
    init_feature_stats,
    merge_feature_stats,
    update_feature_stats,
)

__all__ = [
    "FeatureStats",
    "feature_mean_cov",
    "frechet_distance",
    "init_feature_stats",
    "merge_feature_stats",
    "update_feature_stats",
]
