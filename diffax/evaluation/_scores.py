"""Classifier-output statistics (Inception Score, class histogram, confidence) and KID.

The Inception Score needs, per split of the samples, the mean class distribution and the mean
negative entropy ``Σ_y p log p``: ``IS = exp(E_x KL(p(y|x) || p(y))) = exp(E_x[Σ_y p log p] -
Σ_y p(y) log p(y))``. Both are sums over samples, so they stream over sharded batches like the
feature statistics; the same sums give the argmax class histogram and the fraction of confident
samples.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from jax.typing import ArrayLike

from diffax.evaluation._stats import batch_weights, replicated_out_sharding

__all__ = [
    "ClassifierStats",
    "init_classifier_stats",
    "update_classifier_stats",
    "inception_score_from_stats",
    "inception_score",
    "kernel_inception_distance",
]


class ClassifierStats(NamedTuple):
    """Streaming sums of classifier outputs ``p(y|x)``, in float64 on the host.

    Attributes:
      num_samples: the total number of samples the splits are laid over (known in advance).
      split_counts: samples seen per split, shape (splits,).
      split_prob_sums: the sum of ``p(y|x)`` over each split, shape (splits, classes).
      split_neg_entropy_sums: the sum of ``Σ_y p(y|x) log p(y|x)`` over each split, (splits,).
      class_counts: histogram of ``argmax_y p(y|x)``, shape (classes,).
      confident_count: samples whose largest probability exceeds the confidence threshold.
    """

    num_samples: int
    split_counts: np.ndarray
    split_prob_sums: np.ndarray
    split_neg_entropy_sums: np.ndarray
    class_counts: np.ndarray
    confident_count: np.ndarray


def init_classifier_stats(num_classes: int, *, num_samples: int, splits: int) -> ClassifierStats:
    """Empty statistics for ``num_samples`` samples cut into ``splits`` consecutive splits.

    Sample ``i`` (in the order samples are added) falls in split ``s`` when
    ``s * N // splits <= i < (s + 1) * N // splits``, as in the original Inception Score code.
    """
    if splits < 1 or splits > num_samples:
        raise ValueError(f"splits must be in [1, num_samples={num_samples}], got {splits}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    return ClassifierStats(
        num_samples,
        np.zeros(splits),
        np.zeros((splits, num_classes)),
        np.zeros(splits),
        np.zeros(num_classes),
        np.float64(0.0),
    )


@functools.partial(jax.jit, static_argnames=("num_splits",))
def _batch_classifier_sums(logits, split_ids, weights, threshold, *, num_splits):
    logits = logits.astype(jnp.float32)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    neg_entropy = jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1, keepdims=True)
    w = weights.astype(jnp.float32).reshape(-1, 1)
    in_split = jax.nn.one_hot(split_ids, num_splits, dtype=jnp.float32) * w
    out = replicated_out_sharding(logits)
    hi = jax.lax.Precision.HIGHEST
    return (
        jnp.sum(in_split, axis=0),
        jnp.matmul(in_split.T, p, precision=hi, out_sharding=out),
        jnp.matmul(in_split.T, neg_entropy, precision=hi, out_sharding=out)[:, 0],
        jnp.sum(jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1]) * w, axis=0),
        jnp.sum(w * (jnp.max(p, axis=-1, keepdims=True) > threshold)),
    )


def update_classifier_stats(
    stats: ClassifierStats,
    logits: ArrayLike,
    *,
    start_index: int,
    mask: ArrayLike | None = None,
    confidence_threshold: float = 0.9,
) -> ClassifierStats:
    """Adds a batch of classifier logits, reduced on its devices, to host float64 statistics.

    Args:
      stats: the statistics so far.
      logits: shape (batch, classes); unnormalised log-probabilities (log-probabilities, including
        ``log(0) = -inf``, work as they are). May be a global array sharded over a mesh.
      start_index: the index of the batch's first sample among all ``stats.num_samples``; it
        places each sample in its split.
      mask: optional (batch,) 0/1 weights; rows with 0 (padding) are left out.
      confidence_threshold: a sample counts as confident when its largest probability exceeds it.

    Returns:
      The statistics including the batch.
    """
    logits = jnp.asarray(logits)
    num_classes = stats.class_counts.shape[0]
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must have shape (batch, {num_classes}), got {logits.shape}.")
    n = logits.shape[0]
    splits = stats.split_counts.shape[0]
    bounds = (np.arange(splits + 1) * stats.num_samples) // splits
    index = start_index + np.arange(n)
    split_ids = np.clip(np.searchsorted(bounds, index, side="right") - 1, 0, splits - 1)
    sums = jax.device_get(
        _batch_classifier_sums(
            logits, split_ids, batch_weights(mask, n), np.float32(confidence_threshold), num_splits=splits
        )
    )
    return ClassifierStats(
        stats.num_samples,
        *(total + np.asarray(part, np.float64) for total, part in zip(stats[1:], sums, strict=True)),
    )


def inception_score_from_stats(stats: ClassifierStats) -> tuple[float, float]:
    """Mean and standard deviation over splits of ``exp(E_x KL(p(y|x) || p(y)))``.

    Args:
      stats: accumulated classifier statistics; every split must have samples.

    Returns:
      ``(mean, std)`` over the splits (std with ddof=0, as the original code).

    References:
      Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016, Sec. 4 (the
      score ``exp(E_x KL(p(y|x) || p(y)))``).
    """
    counts = stats.split_counts
    if np.any(counts == 0):
        raise ValueError(f"every split needs samples; samples per split: {counts.tolist()}.")
    marginal = stats.split_prob_sums / counts.reshape(-1, 1)
    marginal_neg_entropy = np.sum(scipy.special.xlogy(marginal, marginal), axis=1)
    scores = np.exp(stats.split_neg_entropy_sums / counts - marginal_neg_entropy)
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits: ArrayLike, *, splits: int = 10) -> tuple[float, float]:
    """The Inception Score of a set of classifier logits.

    Args:
      logits: shape (num_samples, classes); unnormalised log-probabilities (``log(probs)`` works).
        For the standard score these are the Inception network's 1008 logits without the fc bias.
      splits: the samples are cut, in order, into this many consecutive splits.

    Returns:
      ``(mean, std)`` of the score over the splits.

    References:
      Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016, Sec. 4.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (num_samples, classes), got {logits.shape}.")
    stats = init_classifier_stats(logits.shape[1], num_samples=logits.shape[0], splits=splits)
    return inception_score_from_stats(update_classifier_stats(stats, logits, start_index=0))


def _polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features1: ArrayLike,
    features2: ArrayLike,
    *,
    num_subsets: int = 100,
    subset_size: int | None = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased MMD² with kernel ``(x·y/d + 1)³``, over subsets.

    Each of ``num_subsets`` rounds draws ``subset_size`` rows from each set without replacement
    and computes the unbiased estimate (diagonals of the within-set kernels left out, the cross
    term averaged over all pairs), in float64.

    Args:
      features1: shape (n1, d).
      features2: shape (n2, d).
      num_subsets: number of random subsets.
      subset_size: rows per subset and set; ``None`` uses ``min(1000, n1, n2)``.
      seed: seed of the subset draws.

    Returns:
      ``(mean, std)`` of the estimate over the subsets.

    References:
      Bińkowski et al., "Demystifying MMD GANs", ICLR 2018, eq. (3) and Sec. 4 (KID).
    """
    x = np.asarray(features1, np.float64)
    y = np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (n, d) with one d, got {x.shape} and {y.shape}.")
    largest = min(x.shape[0], y.shape[0])
    m = min(1000, largest) if subset_size is None else subset_size
    if not 2 <= m <= largest:
        raise ValueError(f"subset_size must be in [2, {largest}] (the smaller set), got {m}.")
    rng = np.random.default_rng(seed)
    estimates = [
        _unbiased_mmd2(
            x[rng.choice(x.shape[0], m, replace=False)], y[rng.choice(y.shape[0], m, replace=False)]
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(estimates)), float(np.std(estimates))
