"""Improved precision and recall: k-nearest-neighbour manifolds of real and generated features.

Distances are computed on the device in blocks of query rows against the whole reference set, so
memory grows as ``batch_size * n`` instead of ``n²``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["precision_recall"]


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    a2 = jnp.sum(a * a, axis=1).reshape(-1, 1)
    b2 = jnp.sum(b * b, axis=1).reshape(1, -1)
    return jnp.maximum(a2 + b2 - 2.0 * cross, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_neighbour_sq(block: jax.Array, features: jax.Array, *, k: int) -> jax.Array:
    # Each row's own distance (0) is among the k + 1 smallest, so index k is the k-th neighbour.
    return -jax.lax.top_k(-_squared_distances(block, features), k + 1)[0][:, k]


@jax.jit
def _inside_any_ball(block: jax.Array, centres: jax.Array, radii_sq: jax.Array) -> jax.Array:
    return jnp.any(_squared_distances(block, centres) <= radii_sq.reshape(1, -1), axis=1)


def _blocks(x: np.ndarray, batch_size: int):
    return (x[i : i + batch_size] for i in range(0, x.shape[0], batch_size))


def _coverage(query: np.ndarray, centres: np.ndarray, *, k: int, batch_size: int) -> float:
    """Fraction of ``query`` rows inside the k-NN manifold of ``centres``."""
    radii_sq = jnp.concatenate(
        [_kth_neighbour_sq(block, centres, k=k) for block in _blocks(centres, batch_size)]
    )
    inside = [np.asarray(_inside_any_ball(b, centres, radii_sq)) for b in _blocks(query, batch_size)]
    return float(np.concatenate(inside).mean())


def precision_recall(
    real_features: ArrayLike,
    generated_features: ArrayLike,
    *,
    k: int = 3,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Improved precision and recall of generated features against real ones.

    The manifold of a set is the union of balls around its points, each with the radius to that
    point's k-th nearest neighbour in the set. Precision is the fraction of generated points inside
    the real manifold; recall the fraction of real points inside the generated manifold.

    Args:
      real_features: shape (n_real, d).
      generated_features: shape (n_generated, d).
      k: the neighbour that sets each radius (3 in the paper).
      batch_size: query rows per distance block; a block holds ``batch_size * n`` distances.

    Returns:
      ``(precision, recall)``, each in [0, 1].

    References:
      Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing Generative Models",
      NeurIPS 2019, eq. (1)-(3).
    """
    real = np.asarray(real_features, np.float32)
    generated = np.asarray(generated_features, np.float32)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"features must be (n, d) with one d, got {real.shape} and {generated.shape}.")
    if not 1 <= k < min(real.shape[0], generated.shape[0]):
        raise ValueError(f"k must be in [1, smaller set size - 1], got k={k}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    precision = _coverage(generated, real, k=k, batch_size=batch_size)
    recall = _coverage(real, generated, k=k, batch_size=batch_size)
    return precision, recall
