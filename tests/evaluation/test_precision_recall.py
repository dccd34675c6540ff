"""Precision/recall against a brute-force float64 k-NN computation and known cases."""

import numpy as np
import pytest
import scipy.spatial.distance

from diffax.evaluation import precision_recall


def _reference_coverage(query, centres, k):
    within = scipy.spatial.distance.cdist(centres, centres)
    radii = np.sort(within, axis=1)[:, k]  # column 0 is the point itself
    across = scipy.spatial.distance.cdist(query, centres)
    return np.mean(np.any(across <= radii.reshape(1, -1), axis=1))


@pytest.mark.parametrize(("k", "batch_size"), [(3, 16), (1, 1000), (5, 7)])
def test_matches_brute_force(k, batch_size):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(70, 5))
    generated = rng.normal(size=(50, 5)) + 1.0
    expected = (_reference_coverage(generated, real, k), _reference_coverage(real, generated, k))
    assert 0 < min(expected) and max(expected) < 1  # neither fraction is trivial
    assert precision_recall(real, generated, k=k, batch_size=batch_size) == pytest.approx(expected)


def test_identical_and_disjoint_sets():
    x = np.random.default_rng(0).normal(size=(40, 8))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_bad_input_raises():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(x, x, k=5)
    with pytest.raises(ValueError, match="one d"):
        precision_recall(x, np.zeros((5, 4)))
