"""Immiscible diffusion's noise assignment: optimal against brute force on small batches and against
SciPy's solver on a training-size batch, batched with vmap, and used by ``make_loss(immiscible=True)``."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from diffax import immiscible, losses, schedules


def _brute_force_minimum(cost: np.ndarray) -> float:
    n = cost.shape[0]
    return min(cost[np.arange(n), list(p)].sum() for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("n, dtype", [(1, np.float32), (3, np.float32), (6, np.float32), (4, np.float64)])
def test_assignment_is_optimal_against_brute_force(n, dtype):
    costs = np.random.default_rng(n).normal(size=(25, n, n)).astype(dtype)
    if n > 2:
        costs[0] = np.round(costs[0])  # ties
    with jax.enable_x64(dtype == np.float64):
        assigned = np.asarray(jax.jit(jax.vmap(immiscible.linear_assignment))(costs))
    for cost, columns in zip(costs, assigned, strict=True):
        assert sorted(columns) == list(range(n))
        np.testing.assert_allclose(cost[np.arange(n), columns].sum(), _brute_force_minimum(cost), atol=1e-5)


def test_assignment_matches_scipy_on_a_training_batch():
    cost = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    _, expected = linear_sum_assignment(cost)
    np.testing.assert_array_equal(immiscible.linear_assignment(cost), expected)


def test_non_square_cost_is_refused():
    with pytest.raises(ValueError, match="cost must be square"):
        immiscible.linear_assignment(jnp.zeros((3, 4)))


def test_assigned_noise_minimises_the_total_distance():
    key_x, key_n = jax.random.split(jax.random.key(0))
    x0 = jax.random.uniform(key_x, (6, 4, 4, 1), minval=-1.0, maxval=1.0)
    noise = jax.random.normal(key_n, x0.shape)
    assigned = np.asarray(immiscible.assign_noise(x0, noise))
    flat_x, flat_n = np.asarray(x0).reshape(6, -1), np.asarray(noise).reshape(6, -1)
    distances = np.square(flat_x[:, None] - flat_n[None]).sum(-1)
    order = [int(np.flatnonzero((flat_n == row).all(-1))[0]) for row in assigned.reshape(6, -1)]
    assert sorted(order) == list(range(6))  # every draw used once
    np.testing.assert_allclose(
        distances[np.arange(6), order].sum(), _brute_force_minimum(distances), rtol=1e-6
    )
    assert distances[np.arange(6), order].sum() < np.trace(distances)


def test_immiscible_loss_regresses_on_the_assigned_noise():
    """With a network that outputs 0, the eps loss is the mean square of the noise each image got."""
    x0 = jax.random.uniform(jax.random.key(1), (8, 4, 4, 1), minval=-1.0, maxval=1.0)

    def zero_net(params, x, t, cond, key):
        return jnp.zeros_like(x)

    key = jax.random.key(2)
    make = lambda flag: losses.make_loss(schedules.get("vp_linear"), zero_net, immiscible=flag)
    _, plain = make(False)(None, {"image": x0}, key)
    _, assigned = make(True)(None, {"image": x0}, key)
    noise = jax.random.normal(jax.random.split(key, 3)[1], x0.shape)
    expected = losses.mean_flat(jnp.square(immiscible.assign_noise(x0, noise)))
    np.testing.assert_allclose(plain["mse"], losses.mean_flat(jnp.square(noise)), rtol=1e-6)
    np.testing.assert_allclose(assigned["mse"], expected, rtol=1e-6)
    assert not np.allclose(assigned["mse"], plain["mse"])
