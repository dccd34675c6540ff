"""The offline default's metrics: digits FD against the training split, its floor, IS, classes.

The floor is the digits FD between held-out digits and the training split at the same sample
count (capped by the held-out set's size): what a perfect model would score. The same held-out
digits give every other metric's ceiling (``real_*``), and the independent judge
(:func:`judge_digits`) scores the samples beside the digits classifier.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
from jax.typing import ArrayLike

from diffax.evaluation._digits import digits_features_and_logits, load_digits_reference
from diffax.evaluation._digits_judge import judge_digits, judge_targets
from diffax.evaluation._harness import _evaluate_batches, reference_feature_stats

__all__ = ["digits_reference", "digits_metrics", "digits_targets"]


def digits_reference(
    num_samples: int,
    *,
    params: Mapping | None = None,
    reference_train: ArrayLike | None = None,
    reference_heldout: ArrayLike | None = None,
) -> dict:
    """The digits extractor, training-split statistics and floor, as :func:`evaluate_samples` takes them.

    Use as ``evaluate_samples(sample_fn, num_samples=n, batch_size=b, key=k,
    **digits_reference(n))``.

    Args:
      num_samples: the number of samples that will be evaluated.
      params: digits classifier parameters; defaults to the cached classifier.
      reference_train: training images, (N, 8k, 8k[, 1]) in [-1, 1]; defaults to the ``train``
        split of :func:`diffax.data.digits.load_digits`.
      reference_heldout: held-out images; defaults to its ``test`` split. The first
        ``min(num_samples, len)`` of them give the floor.

    Returns:
      A dict with ``extractor``, ``reference_stats``, ``floor_fd``, ``class_metrics=True`` and a
      ``sample_judge`` adding the held-out digits' own IS, confident fraction and class p-value
      (``real_is``, ``real_confident_fraction``, ``real_class_chi2_pvalue``) and
      :func:`judge_digits` against the same held-out digits.
    """
    train = load_digits_reference("train")[0] if reference_train is None else reference_train
    heldout = load_digits_reference("test")[0] if reference_heldout is None else reference_heldout
    heldout = np.asarray(heldout)[:num_samples]
    extractor = functools.partial(digits_features_and_logits, params=params)
    train_stats = reference_feature_stats(train, extractor=extractor)
    real = _evaluate_batches(
        [heldout],
        num_samples=len(heldout),
        extractor=extractor,
        reference_stats=train_stats,
        floor_fd=None,
        reference_features=None,
        splits=10,
        confidence_threshold=0.9,
        class_metrics=True,
    )
    ceilings = {f"real_{k}": real[k] for k in ("is", "confident_fraction", "class_chi2_pvalue")}

    def sample_judge(images: np.ndarray) -> dict[str, float]:
        return ceilings | judge_digits(images, heldout=heldout)

    return dict(
        extractor=extractor,
        reference_stats=train_stats,
        floor_fd=real["fd"],
        class_metrics=True,
        sample_judge=sample_judge,
    )


def digits_metrics(
    images: ArrayLike,
    *,
    params: Mapping | None = None,
    reference_train: ArrayLike | None = None,
    reference_heldout: ArrayLike | None = None,
    splits: int = 10,
    batch_size: int = 500,
) -> dict[str, float]:
    """Digits FD (and its floor), digits IS, confident fraction and class histogram of images.

    Args:
      images: generated digits, (N, 8k, 8k) or (N, 8k, 8k, 1) in [-1, 1].
      params: digits classifier parameters; defaults to the cached classifier.
      reference_train: training images; defaults to the digits ``train`` split.
      reference_heldout: held-out images for the floor; defaults to the digits ``test`` split.
      splits: Inception Score splits.
      batch_size: images per classifier call.

    Returns:
      The keys of :func:`evaluate_samples` with ``class_metrics``: ``fd``, ``fd_floor``,
      ``fd_ratio``, ``is``, ``is_std``, ``confident_fraction`` (max softmax > 0.9),
      ``class_fraction/0`` … ``/9`` and ``class_chi2_pvalue``; the held-out digits' ``real_is``,
      ``real_confident_fraction``, ``real_class_chi2_pvalue``; and :func:`judge_digits`'s
      ``judge/*``.
    """
    images = np.asarray(images)
    n = images.shape[0]
    reference = digits_reference(
        n, params=params, reference_train=reference_train, reference_heldout=reference_heldout
    )
    batches = (images[i : i + batch_size] for i in range(0, n, batch_size))
    return _evaluate_batches(
        batches,
        num_samples=n,
        reference_features=None,
        splits=splits,
        confidence_threshold=0.9,
        **reference,
    )


def digits_targets(metrics: Mapping[str, float]) -> dict[str, bool]:
    """The embedded default's targets, checked on :func:`digits_metrics` output.

    Returns:
      ``fd_within_2x_floor`` (``fd <= 2 fd_floor``), ``confident_90pct`` (at least 90% of samples
      with max softmax above 0.9), ``classes_uniform`` (the chi-square test against uniform
      classes does not reject at the 1% level), and the independent judge's
      :func:`judge_targets`.
    """
    return {
        "fd_within_2x_floor": metrics["fd"] <= 2.0 * metrics["fd_floor"],
        "confident_90pct": metrics["confident_fraction"] >= 0.9,
        "classes_uniform": metrics["class_chi2_pvalue"] >= 0.01,
    } | judge_targets(metrics)
