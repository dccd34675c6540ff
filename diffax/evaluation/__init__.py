"""Evaluation: Fréchet distance, Inception Score, KID, precision/recall, streaming statistics."""

from diffax.evaluation._frechet import frechet_distance
from diffax.evaluation._inception import (
    InceptionV3,
    inception_features_and_logits,
    inception_variables_from_torch,
    load_inception_variables,
    save_inception_variables,
)
from diffax.evaluation._precision_recall import precision_recall
from diffax.evaluation._scores import (
    ClassifierStats,
    inception_score,
    inception_score_from_stats,
    init_classifier_stats,
    kernel_inception_distance,
    update_classifier_stats,
)
from diffax.evaluation._stats import (
    FeatureStats,
    feature_mean_cov,
    init_feature_stats,
    merge_feature_stats,
    update_feature_stats,
)

__all__ = [
    "InceptionV3",
    "ClassifierStats",
    "FeatureStats",
    "feature_mean_cov",
    "frechet_distance",
    "inception_features_and_logits",
    "inception_score",
    "inception_score_from_stats",
    "inception_variables_from_torch",
    "init_classifier_stats",
    "init_feature_stats",
    "kernel_inception_distance",
    "load_inception_variables",
    "merge_feature_stats",
    "precision_recall",
    "save_inception_variables",
    "update_classifier_stats",
    "update_feature_stats",
]
