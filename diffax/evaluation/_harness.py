"""A whole evaluation: draw samples in batches, stream their features and logits, report floats.

Nothing but the running statistics stays in memory, unless KID and precision/recall are asked
for (they need every sample's features, which are then gathered to every host) or a judge of the
whole sample set is (it gets every sample, gathered likewise).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
import scipy.special
from jax.experimental import multihost_utils
from jax.typing import ArrayLike

from diffax.evaluation._frechet import frechet_distance
from diffax.evaluation._precision_recall import precision_recall
from diffax.evaluation._scores import (
    inception_score_from_stats,
    init_classifier_stats,
    kernel_inception_distance,
    update_classifier_stats,
)
from diffax.evaluation._stats import (
    FeatureStats,
    feature_mean_cov,
    init_feature_stats,
    update_feature_stats,
)

__all__ = ["Extractor", "SampleJudge", "evaluate_samples", "floor_fd", "reference_feature_stats"]

Extractor = Callable[[jax.Array], tuple[jax.Array, jax.Array]]
"""Images (N, ...) → (features (N, d), logits (N, classes)), e.g. a ``functools.partial`` of
:func:`inception_features_and_logits` or :func:`digits_features_and_logits`."""

SampleJudge = Callable[[np.ndarray], Mapping[str, float]]
"""All the evaluated images (N, ...) on the host → further metrics, e.g. the digits' independent
judge (:func:`judge_digits`)."""


def uniform_chi2_pvalue(counts: ArrayLike) -> float:
    """Pearson's chi-square test of category counts against equal frequencies: the p-value
    ``P(chi2_{k-1} > X^2)``, ``X^2 = sum_i (n_i - N/k)^2 / (N/k)`` (``scipy.stats.chisquare``'s, without
    importing ``scipy.stats``, a second at every start of ``python -m diffax.main``).

    References: Pearson, "On the criterion that a given system of deviations...", 1900.
    """
    counts = np.asarray(counts, np.float64)
    expected = counts.sum() / counts.size
    statistic = np.sum((counts - expected) ** 2) / expected
    return float(scipy.special.chdtrc(counts.size - 1, statistic))


def reference_feature_stats(
    images: ArrayLike, *, extractor: Extractor, batch_size: int = 500
) -> FeatureStats:
    """Feature statistics of a reference image set (e.g. the training or held-out split).

    Args:
      images: the images, shape (N, ...), as the extractor takes them.
      extractor: maps an image batch to ``(features, logits)``.
      batch_size: images per extractor call.

    Returns:
      The streamed statistics of all N feature vectors.
    """
    images = np.asarray(images)
    stats = None
    for start in range(0, images.shape[0], batch_size):
        features, _ = extractor(images[start : start + batch_size])
        stats = init_feature_stats(features.shape[1]) if stats is None else stats
        stats = update_feature_stats(stats, features)
    if stats is None:
        raise ValueError("images is empty; pass at least two reference images.")
    return stats


def floor_fd(
    heldout: ArrayLike, *, extractor: Extractor, reference_stats: FeatureStats, batch_size: int = 500
) -> float:
    """The Fréchet distance of held-out real images to the reference: what a perfect model scores.

    Args:
      heldout: held-out images, as many as the samples that will be evaluated.
      extractor: maps an image batch to ``(features, logits)``.
      reference_stats: the reference (training) statistics.
      batch_size: images per extractor call.
    """
    heldout_stats = reference_feature_stats(heldout, extractor=extractor, batch_size=batch_size)
    return frechet_distance(*feature_mean_cov(heldout_stats), *feature_mean_cov(reference_stats))


def _evaluate_batches(
    batches: Iterable[ArrayLike],
    *,
    num_samples: int,
    extractor: Extractor,
    reference_stats: FeatureStats,
    floor_fd: float | None,
    reference_features: ArrayLike | None,
    splits: int,
    confidence_threshold: float,
    class_metrics: bool,
    sample_judge: SampleJudge | None = None,
) -> dict[str, float]:
    """Streams the first ``num_samples`` images of ``batches`` and summarises them."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}.")
    feature_stats = classifier_stats = None
    kept, kept_images, seen = [], [], 0
    for images in batches:
        features, logits = extractor(images)
        n = features.shape[0]
        valid = min(n, num_samples - seen)
        mask = (np.arange(n) < valid).astype(np.float32)
        if feature_stats is None:
            feature_stats = init_feature_stats(features.shape[1])
            classifier_stats = init_classifier_stats(
                logits.shape[1], num_samples=num_samples, splits=min(splits, num_samples)
            )
        feature_stats = update_feature_stats(feature_stats, features, mask=mask)
        classifier_stats = update_classifier_stats(
            classifier_stats,
            logits,
            start_index=seen,
            mask=mask,
            confidence_threshold=confidence_threshold,
        )
        if reference_features is not None:
            kept.append(multihost_utils.process_allgather(features, tiled=True)[:valid])
        if sample_judge is not None:
            kept_images.append(np.asarray(multihost_utils.process_allgather(images, tiled=True))[:valid])
        seen += valid
        if seen == num_samples:
            break
    if seen < num_samples:
        raise ValueError(f"the samples ran out after {seen} of num_samples={num_samples}.")

    metrics = {"num_samples": float(num_samples)}
    metrics["fd"] = frechet_distance(*feature_mean_cov(feature_stats), *feature_mean_cov(reference_stats))
    if floor_fd is not None:
        metrics["fd_floor"] = float(floor_fd)
        metrics["fd_ratio"] = metrics["fd"] / float(floor_fd)
    metrics["is"], metrics["is_std"] = inception_score_from_stats(classifier_stats)
    if class_metrics:
        counts = classifier_stats.class_counts
        metrics["confident_fraction"] = float(classifier_stats.confident_count / num_samples)
        metrics["class_chi2_pvalue"] = uniform_chi2_pvalue(counts)
        metrics.update({f"class_fraction/{c}": float(v / num_samples) for c, v in enumerate(counts)})
    if reference_features is not None:
        generated = np.concatenate(kept)
        metrics["kid"], metrics["kid_std"] = kernel_inception_distance(
            generated, reference_features, subset_size=None
        )
        metrics["precision"], metrics["recall"] = precision_recall(reference_features, generated)
    if sample_judge is not None:
        metrics.update(sample_judge(np.concatenate(kept_images)))
    return metrics


def evaluate_samples(
    sample_fn: Callable[[jax.Array, int], jax.Array],
    *,
    num_samples: int,
    batch_size: int,
    key: jax.Array,
    extractor: Extractor,
    reference_stats: FeatureStats,
    floor_fd: float | None = None,
    reference_features: ArrayLike | None = None,
    splits: int = 10,
    confidence_threshold: float = 0.9,
    class_metrics: bool = False,
    sample_judge: SampleJudge | None = None,
) -> dict[str, float]:
    """Draws ``num_samples`` samples in batches and returns every metric as a float.

    Batch ``i`` is ``sample_fn(jax.random.fold_in(key, i), batch_size)``; it may be a global array
    sharded over a mesh, and its features and logits are reduced where they live. The last batch
    is drawn whole and its surplus rows are masked out.

    Args:
      sample_fn: ``(key, n) -> images`` of shape (n, ...), as ``extractor`` takes them.
      num_samples: how many samples to evaluate.
      batch_size: samples drawn per call.
      key: the base PRNG key.
      extractor: images → ``(features, logits)``.
      reference_stats: feature statistics of the reference (training) set.
      floor_fd: the same distance between a held-out set of the same size and the reference; the
        floor a perfect model reaches. Reported with the ratio ``fd / fd_floor`` when given.
      reference_features: reference features (n_ref, d); when given, KID and precision/recall are
        computed too (the samples' features are then kept on the host).
      splits: Inception Score splits (at most ``num_samples``).
      confidence_threshold: threshold of ``confident_fraction``.
      class_metrics: also report ``confident_fraction``, the argmax histogram
        ``class_fraction/<c>`` and ``class_chi2_pvalue`` (chi-square test against uniform
        classes); meant for classifiers with few classes, like the digits one.
      sample_judge: given every sample (gathered to every host), returns further metrics.

    Returns:
      ``num_samples``, ``fd``, ``is``, ``is_std``; ``fd_floor`` and ``fd_ratio`` with
      ``floor_fd``; the class metrics with ``class_metrics``; ``kid``, ``kid_std``,
      ``precision``, ``recall`` with ``reference_features``; ``sample_judge``'s metrics.

    References:
      Heusel et al., NeurIPS 2017 (FID); Salimans et al., NeurIPS 2016 (IS); Bińkowski et al.,
      ICLR 2018 (KID); Kynkäänniemi et al., NeurIPS 2019 (precision/recall).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    batches = (sample_fn(jax.random.fold_in(key, i), batch_size) for i in itertools.count())
    return _evaluate_batches(
        batches,
        num_samples=num_samples,
        extractor=extractor,
        reference_stats=reference_stats,
        floor_fd=floor_fd,
        reference_features=reference_features,
        splits=splits,
        confidence_threshold=confidence_threshold,
        class_metrics=class_metrics,
        sample_judge=sample_judge,
    )
