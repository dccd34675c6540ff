"""Evaluation: FID and its digits twin, Inception Score, KID, precision/recall, streamed and sharded.

Digits samples are also scored by an independent judge fitted only on the real digits
(:func:`judge_digits`: a kernel SVM, a PCA Fréchet distance, the near-zero pixel fraction).

Feature statistics and classifier sums are reduced on the devices that hold each batch and merged
in float64 on the host; :func:`evaluate_samples` runs a whole evaluation from a sampler.
"""

from diffax.evaluation._bits_per_dim import BPD_METHODS, bits_per_dim
from diffax.evaluation._digits import (
    DigitsClassifier,
    digits_classifier_params,
    digits_classifier_shapes,
    digits_features_and_logits,
    load_digits_reference,
)
from diffax.evaluation._digits_judge import (
    DigitsJudge,
    digits_judge,
    judge_digits,
    judge_targets,
    to_digit_pixels,
)
from diffax.evaluation._digits_metrics import digits_metrics, digits_reference, digits_targets
from diffax.evaluation._frechet import frechet_distance
from diffax.evaluation._harness import (
    Extractor,
    SampleJudge,
    evaluate_samples,
    floor_fd,
    reference_feature_stats,
)
from diffax.evaluation._inception import (
    InceptionV3,
    inception_features_and_logits,
    inception_variables_from_torch,
    load_inception_variables,
    save_inception_variables,
)
from diffax.evaluation._precision_recall import precision_recall
from diffax.evaluation._reference_batch import (
    fid_against_reference,
    image_batch_stats,
    read_image_batch,
    reference_batch_stats,
)
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
    "BPD_METHODS",
    "bits_per_dim",
    "ClassifierStats",
    "DigitsClassifier",
    "DigitsJudge",
    "Extractor",
    "FeatureStats",
    "InceptionV3",
    "digits_classifier_params",
    "digits_classifier_shapes",
    "digits_features_and_logits",
    "digits_judge",
    "digits_metrics",
    "digits_reference",
    "digits_targets",
    "evaluate_samples",
    "feature_mean_cov",
    "fid_against_reference",
    "floor_fd",
    "frechet_distance",
    "image_batch_stats",
    "inception_features_and_logits",
    "inception_score",
    "inception_score_from_stats",
    "inception_variables_from_torch",
    "init_classifier_stats",
    "init_feature_stats",
    "judge_digits",
    "judge_targets",
    "kernel_inception_distance",
    "load_digits_reference",
    "load_inception_variables",
    "merge_feature_stats",
    "precision_recall",
    "read_image_batch",
    "reference_feature_stats",
    "reference_batch_stats",
    "SampleJudge",
    "save_inception_variables",
    "to_digit_pixels",
    "update_classifier_stats",
    "update_feature_stats",
]
