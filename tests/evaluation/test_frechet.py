"""The Fréchet distance against a scipy.linalg.sqrtm reference and closed forms."""

import numpy as np
import pytest
import scipy.linalg

from diffax.evaluation import frechet_distance


def _reference_fd(m1, s1, m2, s2):
    """The classic formula with scipy's general matrix square root of the non-symmetric product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean).real)


def _random_cov(rng, d, rank, jitter=0.0):
    a = rng.normal(size=(d, rank)) / np.sqrt(rank)
    return a @ a.T + jitter * np.eye(d)


@pytest.mark.parametrize(
    ("d", "rank1", "rank2", "jitter"),
    [
        (16, 32, 32, 0.0),  # full rank
        (64, 200, 150, 0.0),  # full rank, larger
        (32, 20, 32, 1e-9),  # cov1 near-singular (rank 20 plus a 1e-9 ridge)
        (32, 10, 12, 1e-12),  # both near-singular
    ],
)
def test_matches_scipy_sqrtm_reference(d, rank1, rank2, jitter):
    rng = np.random.default_rng(d + rank1 + rank2)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1 = _random_cov(rng, d, rank1, jitter)
    s2 = _random_cov(rng, d, rank2, jitter)
    expected = _reference_fd(m1, s1, m2, s2)
    np.testing.assert_allclose(frechet_distance(m1, s1, m2, s2), expected, rtol=1e-6)


def test_exactly_singular_covariances_from_few_samples():
    # Fewer samples than dimensions: both covariances are singular (rank 9 and 11 in 40-d). The
    # distance is symmetric and agrees with sqrtm of the exactly singular product; no ridge is
    # added on either side (a ridge eps shifts the trace term by O(sqrt(eps))).
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 40)), rng.normal(loc=0.3, size=(12, 40))
    m1, s1, m2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    expected = _reference_fd(m1, s1, m2, s2)
    np.testing.assert_allclose(frechet_distance(m1, s1, m2, s2), expected, rtol=1e-6)
    np.testing.assert_allclose(frechet_distance(m2, s2, m1, s1), expected, rtol=1e-6)


def test_closed_forms():
    rng = np.random.default_rng(1)
    d = 8
    s = _random_cov(rng, d, 20)
    m = rng.normal(size=d)
    # Same covariance: only the means differ.
    shift = rng.normal(size=d)
    np.testing.assert_allclose(frechet_distance(m, s, m + shift, s), shift @ shift, rtol=1e-9)
    # Commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 2.0, size=d), rng.uniform(0.1, 2.0, size=d)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(
        frechet_distance(np.zeros(d), np.diag(a), np.zeros(d), np.diag(b)), expected, rtol=1e-9
    )
    assert abs(frechet_distance(m, s, m, s)) < 1e-9


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="cov2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mean1"):
        frechet_distance(np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3))
