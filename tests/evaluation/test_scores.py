"""Inception Score, classifier statistics and KID against brute-force float64 numpy."""

import jax
import numpy as np
import pytest
import scipy.special
import scipy.stats
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffax.evaluation import (
    inception_score,
    inception_score_from_stats,
    init_classifier_stats,
    kernel_inception_distance,
    update_classifier_stats,
)
from diffax.evaluation._harness import uniform_chi2_pvalue


def _reference_is(logits, splits):
    """The original algorithm: per split, exp of the mean KL(p(y|x) || p(y)), one row at a time."""
    p = scipy.special.softmax(logits.astype(np.float64), axis=1)
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(axis=0)
        scores.append(np.exp(np.mean([scipy.stats.entropy(row, marginal) for row in part])))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize(("n", "splits"), [(103, 10), (40, 1), (57, 4)])
def test_inception_score_matches_reference(n, splits):
    logits = 3.0 * np.random.default_rng(n).normal(size=(n, 7)).astype(np.float32)
    np.testing.assert_allclose(
        inception_score(logits, splits=splits), _reference_is(logits, splits), rtol=2e-5
    )


def test_inception_score_closed_forms():
    num_classes = 5
    # Identical predictions: p(y|x) = p(y), so every KL is 0 and the score is 1.
    same = np.tile(np.random.default_rng(0).normal(size=(1, num_classes)), (20, 1))
    np.testing.assert_allclose(inception_score(same, splits=2), (1.0, 0.0), atol=1e-6)
    # Certain and evenly spread predictions (probabilities with exact zeros, passed as log p):
    # the score is the number of classes.
    probs = np.eye(num_classes)[np.arange(30) % num_classes]
    with np.errstate(divide="ignore"):
        log_probs = np.log(probs)
    np.testing.assert_allclose(inception_score(log_probs, splits=3), (5.0, 0.0), rtol=1e-6)


def test_streaming_masked_and_sharded_equal_one_shot():
    rng = np.random.default_rng(1)
    logits = (2.0 * rng.normal(size=(48, 6))).astype(np.float32)
    expected = _reference_is(logits, 5)
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data", None))
    stats = init_classifier_stats(6, num_samples=48, splits=5)
    # Batches of 16 rows (sharded 2 per device); the last one is padded with 8 masked rows.
    for start in (0, 16, 32):
        batch = np.zeros((16, 6), np.float32)
        rows = logits[start : start + 16]
        batch[: len(rows)] = rows
        mask = (np.arange(16) < len(rows)).astype(np.float32)
        stats = update_classifier_stats(stats, jax.device_put(batch, sharding), start_index=start, mask=mask)
    np.testing.assert_allclose(inception_score_from_stats(stats), expected, rtol=2e-5)
    probs = scipy.special.softmax(logits.astype(np.float64), axis=1)
    np.testing.assert_array_equal(stats.class_counts, np.bincount(probs.argmax(1), minlength=6))
    assert stats.confident_count == np.sum(probs.max(1) > 0.9)
    assert stats.split_counts.sum() == 48


def test_classifier_stats_bad_input():
    with pytest.raises(ValueError, match="splits"):
        init_classifier_stats(10, num_samples=5, splits=6)
    stats = init_classifier_stats(10, num_samples=20, splits=2)
    with pytest.raises(ValueError, match=r"logits must have shape \(batch, 10\)"):
        update_classifier_stats(stats, np.zeros((4, 3)), start_index=0)
    with pytest.raises(ValueError, match="every split"):
        inception_score_from_stats(update_classifier_stats(stats, np.zeros((4, 10)), start_index=0))


def _reference_mmd2(x, y):
    """Unbiased MMD² with the cubic polynomial kernel, summed pair by pair."""
    k = lambda a, b: (a @ b / len(a) + 1.0) ** 3
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2.0 * xy


def test_kid_matches_pairwise_reference():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(15, 4)), rng.normal(loc=0.5, size=(15, 4))
    # One subset that is all of both sets: the estimate is that of the full sets.
    mean, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=15)
    np.testing.assert_allclose(mean, _reference_mmd2(x, y), rtol=1e-12)
    assert std == 0.0
    # Subsets: the mean over rounds equals the mean of the reference on the same draws.
    mean, _ = kernel_inception_distance(x, y, num_subsets=3, subset_size=6, seed=5)
    draws = np.random.default_rng(5)
    reference = [
        _reference_mmd2(x[draws.choice(15, 6, replace=False)], y[draws.choice(15, 6, replace=False)])
        for _ in range(3)
    ]
    np.testing.assert_allclose(mean, np.mean(reference), rtol=1e-12)


def test_kid_known_cases():
    rng = np.random.default_rng(3)
    # Two samples of one distribution: the unbiased estimate is centred on 0.
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    mean, std = kernel_inception_distance(x, y, num_subsets=50, subset_size=100)
    bound = 3 * std / np.sqrt(50)
    assert abs(mean) < bound
    shifted, _ = kernel_inception_distance(x, y + 0.3, num_subsets=50, subset_size=100)
    assert shifted > 5 * bound
    # Constant sets at 0 and at c·1: k = 1 within the zeros and across, (c² + 1)³ within the
    # constants, so MMD² = (c² + 1)³ - 1 exactly.
    c = 0.5
    mean, std = kernel_inception_distance(np.zeros((20, 3)), np.full((20, 3), c), subset_size=10)
    np.testing.assert_allclose((mean, std), ((c * c + 1) ** 3 - 1, 0.0), atol=1e-12)
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(x, y[:50], subset_size=100)


@pytest.mark.parametrize("seed", range(4))
def test_class_balance_pvalue_is_scipys_chisquare(seed):
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(rng.integers(20, 2000), rng.dirichlet(np.full(10, 5.0)))
    np.testing.assert_allclose(
        uniform_chi2_pvalue(counts), scipy.stats.chisquare(counts).pvalue, rtol=1e-10, atol=1e-300
    )
    assert uniform_chi2_pvalue(np.full(10, 7)) == 1.0
