"""Immiscible diffusion (Li et al. 2024, "Immiscible Diffusion: Accelerating Diffusion Training with
Noise Assignment"): within a batch, each image is noised with the Gaussian draw assigned to it by a
minimum-total-distance linear assignment, instead of the draw at its own index (Alg. 1).

The assignment is the Hungarian algorithm with potentials (Kuhn 1955; the shortest-augmenting-path
form of Jonker & Volgenant 1987) written with ``lax`` loops, so it runs inside the jitted train step
on any backend and ``vmap`` batches it over groups. Cost ``O(B^3)`` for a batch of ``B``.
"""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


@jax.jit
def linear_assignment(cost: ArrayLike) -> jax.Array:
    """The permutation ``σ`` minimising ``Σ_i cost[i, σ(i)]`` of a square cost matrix.

    Each of the ``n`` rows is added in turn; dual potentials ``u`` (rows), ``v`` (columns) keep the
    reduced costs ``cost - u - v`` non-negative, and a Dijkstra-like search over columns finds the
    shortest augmenting path from the new row to a free column.

    Args:
      cost: ``(n, n)`` float costs.

    Returns:
      int32 ``(n,)``: the column assigned to each row.
    """
    cost = jnp.asarray(cost)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"linear_assignment: cost must be square, got shape {cost.shape}.")
    dtype = jnp.promote_types(cost.dtype, jnp.float32)
    # 1-based rows and columns; column 0 is the virtual start of every augmenting path.
    a = jnp.pad(cost.astype(dtype), ((1, 0), (1, 0)))
    inf = jnp.array(jnp.inf, dtype)

    def add_row(i, carry):
        u, v, row_of = carry  # row_of[j]: the row assigned to column j (0: none)
        row_of = row_of.at[0].set(i)

        def search(state):
            j0, used, min_reduced, came_from, u, v = state
            used = used.at[j0].set(True)
            i0 = row_of[j0]
            reduced = a[i0] - u[i0] - v
            better = ~used & (reduced < min_reduced)
            min_reduced = jnp.where(better, reduced, min_reduced)
            came_from = jnp.where(better, j0, came_from)
            candidates = jnp.where(used, inf, min_reduced)
            j1 = jnp.argmin(candidates).astype(jnp.int32)
            delta = candidates[j1]
            u = u.at[row_of].add(jnp.where(used, delta, 0.0))  # rows of used columns are distinct
            v = jnp.where(used, v - delta, v)
            min_reduced = jnp.where(used, min_reduced, min_reduced - delta)
            return j1, used, min_reduced, came_from, u, v

        start = (
            jnp.int32(0),
            jnp.zeros(n + 1, bool),
            jnp.full(n + 1, inf),
            jnp.zeros(n + 1, jnp.int32),
            u,
            v,
        )
        j0, _, _, came_from, u, v = jax.lax.while_loop(lambda s: row_of[s[0]] != 0, search, start)

        def augment(state):
            j, row_of = state
            previous = came_from[j]
            return previous, row_of.at[j].set(row_of[previous])

        _, row_of = jax.lax.while_loop(lambda s: s[0] != 0, augment, (j0, row_of))
        return u, v, row_of

    zeros = jnp.zeros(n + 1, dtype)
    _, _, row_of = jax.lax.fori_loop(1, n + 1, add_row, (zeros, zeros, jnp.zeros(n + 1, jnp.int32)))
    return jnp.zeros(n, jnp.int32).at[row_of[1:] - 1].set(jnp.arange(n, dtype=jnp.int32))


def assign_noise(x0: ArrayLike, noise: ArrayLike) -> jax.Array:
    """Reorders a batch of noise so that the total squared distance ``Σ_i ||x0_i - noise_i||²`` is minimal.

    ``||x - n||² = ||x||² + ||n||² - 2 x·n``: the norms add the same total to every assignment, so
    the cost is ``-x0_i · noise_j`` (Li et al. 2024, Alg. 1, which assigns on L2 distance).

    Args:
      x0: ``(B, ...)`` data.
      noise: ``(B, ...)`` Gaussian draws, same shape.

    Returns:
      ``noise[σ]`` with ``σ`` the optimal assignment: every draw is used exactly once.
    """
    x0, noise = jnp.asarray(x0), jnp.asarray(noise)
    flat_x, flat_n = x0.reshape(x0.shape[0], -1), noise.reshape(noise.shape[0], -1)
    cost = -jnp.matmul(flat_x, flat_n.T, precision=jax.lax.Precision.HIGHEST)
    return noise[linear_assignment(jax.lax.stop_gradient(cost))]


__all__ = ["assign_noise", "linear_assignment"]
