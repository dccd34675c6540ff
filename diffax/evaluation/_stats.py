"""Streaming feature statistics (count, mean, scatter) merged in float64 across batches and hosts.

Each batch is reduced by one jitted function on whatever sharding the features carry: under a
``jax.sharding.Mesh`` that splits the batch axis, XLA sums over devices (an all-reduce) and only the
``(d,)`` mean and ``(d, d)`` scatter matrix leave the devices; no image or feature is gathered. The
batch is centred on its own mean before the outer products, so float32 on the device loses no
precision to a large common offset; batches are then merged on the host in float64 with the
parallel update of Chan et al., which is exact in exact arithmetic.

References: Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for computing sample
variances", COMPSTAT 1982, eq. 2.1; Welford, Technometrics 4(3), 1962.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

__all__ = [
    "FeatureStats",
    "init_feature_stats",
    "update_feature_stats",
    "merge_feature_stats",
    "feature_mean_cov",
]


class FeatureStats(NamedTuple):
    """Sufficient statistics of a set of feature vectors, in float64 on the host.

    Attributes:
      count: number of vectors seen, a float64 scalar.
      mean: their mean, shape (d,).
      scatter: the sum of outer products of the centred vectors, shape (d, d).
    """

    count: np.ndarray
    mean: np.ndarray
    scatter: np.ndarray


def init_feature_stats(dim: int) -> FeatureStats:
    """Statistics of the empty set of ``dim``-dimensional vectors."""
    if dim < 1:
        raise ValueError(f"dim must be a positive feature dimension, got {dim}.")
    return FeatureStats(np.float64(0.0), np.zeros(dim), np.zeros((dim, dim)))


def replicated_out_sharding(x: jax.Array) -> NamedSharding | None:
    """The replicated output sharding for a contraction over ``x``'s (possibly sharded) batch axis.

    Under a mesh with explicit axes, a matmul that contracts a sharded axis must be told where its
    result lives; replicated (each device holds the all-reduced sum) is what a reduction wants.
    Without a mesh (one device, or inputs not yet placed) no sharding is named.
    """
    mesh = jax.typeof(x).sharding.mesh
    return None if mesh.empty else NamedSharding(mesh, P())


def batch_weights(mask: ArrayLike | None, batch_size: int) -> ArrayLike:
    """The (batch,) 0/1 row weights: ``mask`` checked against the batch, or all ones."""
    if mask is None:
        return np.ones(batch_size, np.float32)
    if jnp.shape(mask) != (batch_size,):
        raise ValueError(f"mask must have shape ({batch_size},), got {jnp.shape(mask)}.")
    return mask


@jax.jit
def _batch_moments(features: jax.Array, weights: jax.Array) -> tuple[jax.Array, ...]:
    x = features.astype(jnp.float32)
    w = weights.astype(jnp.float32).reshape(-1, 1)
    count = jnp.sum(w)
    mean = jnp.sum(x * w, axis=0) / jnp.maximum(count, 1.0)
    centred = x - mean.reshape(1, -1)
    # HIGHEST: accelerators may otherwise run float32 matmuls in TF32/bf16 passes.
    scatter = jnp.matmul(
        (centred * w).T,
        centred,
        precision=jax.lax.Precision.HIGHEST,
        out_sharding=replicated_out_sharding(x),
    )
    return count, mean, scatter


def merge_feature_stats(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """Statistics of the union of two disjoint sets (Chan et al. 1982, eq. 2.1), in float64.

    Args:
      a: statistics of the first set.
      b: statistics of the second set, of the same dimension.

    Returns:
      The statistics of both sets together; merging is associative and commutative, so partial
      statistics from several hosts or runs may be combined in any order.
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"cannot merge statistics of dims {a.mean.shape} and {b.mean.shape}.")
    count = a.count + b.count
    if count == 0:
        return a
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / count)
    scatter = a.scatter + b.scatter + np.outer(delta, delta) * (a.count * b.count / count)
    return FeatureStats(count, mean, scatter)


def update_feature_stats(
    stats: FeatureStats, features: ArrayLike, *, mask: ArrayLike | None = None
) -> FeatureStats:
    """Adds a batch of features, reduced on its devices, to host float64 statistics.

    Args:
      stats: the statistics so far.
      features: a batch, shape (batch, d), possibly a global array sharded over a mesh.
      mask: optional (batch,) 0/1 weights; rows with 0 (padding in a last partial batch) are left
        out.

    Returns:
      The statistics including the batch.
    """
    features = jnp.asarray(features)
    if features.ndim != 2 or features.shape[1] != stats.mean.shape[0]:
        raise ValueError(f"features must have shape (batch, {stats.mean.shape[0]}), got {features.shape}.")
    count, mean, scatter = jax.device_get(_batch_moments(features, batch_weights(mask, features.shape[0])))
    batch = FeatureStats(np.float64(count), mean.astype(np.float64), scatter.astype(np.float64))
    return merge_feature_stats(stats, batch)


def feature_mean_cov(stats: FeatureStats, *, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the accumulated features.

    Args:
      stats: accumulated statistics.
      ddof: delta degrees of freedom; 1 (the default) gives the unbiased estimate, as ``np.cov``.

    Returns:
      ``(mean, cov)`` in float64, shapes (d,) and (d, d).
    """
    if stats.count <= ddof:
        raise ValueError(f"need more than ddof={ddof} feature vectors, got {stats.count:g}.")
    return stats.mean, stats.scatter / (stats.count - ddof)
