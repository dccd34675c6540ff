"""The Fréchet distance between two Gaussians, in float64 with a stable matrix square root."""

from __future__ import annotations

import numpy as np
from jax.typing import ArrayLike


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix via eigh.

    Eigenvalues that rounding pushed below zero are clipped to zero, so the result is always real.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _as_float64(name: str, value: ArrayLike, ndim: int) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf; check the features it was computed from.")
    return array


def frechet_distance(
    mean1: ArrayLike,
    cov1: ArrayLike,
    mean2: ArrayLike,
    cov2: ArrayLike,
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mean1, cov1) and N(mean2, cov2).

    ``d² = |m1 - m2|² + tr(S1) + tr(S2) - 2 tr((S1^½ S2 S1^½)^½)``. ``S1^½ S2 S1^½`` is symmetric
    positive semi-definite with the eigenvalues of ``S1 S2``, so the last trace is the sum of the
    square roots of its eigenvalues: one symmetric eigendecomposition for ``S1^½`` and one
    eigenvalue solve, in float64. Unlike ``scipy.linalg.sqrtm(S1 @ S2)`` this never takes the
    square root of a non-symmetric matrix, stays real, and needs no diagonal offset when a
    covariance is singular (fewer samples than feature dimensions).

    Args:
      mean1: mean of the first Gaussian, shape (d,).
      cov1: covariance of the first Gaussian, shape (d, d), symmetric positive semi-definite.
      mean2: mean of the second Gaussian, shape (d,).
      cov2: covariance of the second Gaussian, shape (d, d), symmetric positive semi-definite.

    Returns:
      The squared Fréchet distance as a Python float (FID when the statistics are Inception pool3
      features).

    References:
      Dowson & Landau, "The Fréchet distance between multivariate normal distributions", J.
      Multivariate Anal. 1982, eq. (2); Heusel et al., "GANs Trained by a Two Time-Scale Update Rule
      Converge to a Local Nash Equilibrium", NeurIPS 2017, eq. (6).
    """
    m1 = _as_float64("mean1", mean1, 1)
    m2 = _as_float64("mean2", mean2, 1)
    s1 = _as_float64("cov1", cov1, 2)
    s2 = _as_float64("cov2", cov2, 2)
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            "means must have shape (d,) and covariances (d, d) with one d; got mean1 "
            f"{m1.shape}, cov1 {s1.shape}, mean2 {m2.shape}, cov2 {s2.shape}."
        )
    sqrt1 = _psd_sqrt(s1)
    product = sqrt1 @ s2 @ sqrt1
    eigenvalues = np.linalg.eigvalsh(0.5 * (product + product.T))
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
