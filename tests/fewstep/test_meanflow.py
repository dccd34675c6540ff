"""MeanFlow against the exact average velocity of the analytic mixture's rectified flow: the identity
u = v - (t - r) du/dt holds (to the reference flow's discretisation error, falling at its order), the
jvp derivative along the path matches finite differences, the loss vanishes at the exact u and not at
the instantaneous velocity, and targets stay float32 for a bfloat16 network."""

import jax
import jax.numpy as jnp
import numpy as np

from diffax import schedules
from diffax.fewstep import meanflow
from diffax.samplers.exact import toy_mixture

MIXTURE = toy_mixture()
RF = schedules.get("rectified_flow")  # z_t = (1 - t) x + t e: MeanFlow's path
VELOCITY = MIXTURE.model_fn(RF, prediction="flow")


def _exact_u(num_steps):
    """u(z, r, t) = (z - Phi_{t -> r}(z)) / (t - r), Phi by Heun on a uniform grid (differentiable in t)."""

    def u(z, r, t):
        h = ((r - t) / num_steps)[:, None]

        def step(i, y):
            tau = t + i * h[:, 0]
            slope = VELOCITY(y, tau)
            return y + 0.5 * h * (slope + VELOCITY(y + h * slope, tau + h[:, 0]))

        return (z - jax.lax.fori_loop(0, num_steps, step, z)) / (t - r)[:, None]

    return u


def test_the_exact_average_velocity_satisfies_the_meanflow_identity():
    n = 256
    key = jax.random.key(0)
    x = jnp.asarray(MIXTURE.sample(np.random.default_rng(0), n), jnp.float32)
    e = jax.random.normal(key, (n, 2))
    t = jax.random.uniform(jax.random.fold_in(key, 1), (n,), minval=0.3, maxval=0.95)
    r = t * jax.random.uniform(jax.random.fold_in(key, 2), (n,), maxval=0.8)
    z = (1 - t)[:, None] * x + t[:, None] * e
    v = VELOCITY(z, t)  # the marginal velocity at z_t
    residual = {}
    for steps in (8, 32):
        u, target = jax.jit(lambda z, r, t, v, s=steps: meanflow.meanflow_target(_exact_u(s), z, r, t, v))(
            z, r, t, v
        )
        residual[steps] = float(jnp.sqrt(jnp.mean(jnp.sum((u - target) ** 2, -1))))
    assert residual[32] < 2e-3 and residual[8] / residual[32] > 8, residual  # Heun: order 2 in 1 / steps
    # The jvp along the path against a central difference of u(z + dt v, r, t + dt).
    exact = _exact_u(32)
    _, du_dt = jax.jvp(exact, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    dt = 1e-3
    fd = (exact(z + dt * v, r, t + dt) - exact(z - dt * v, r, t - dt)) / (2 * dt)
    np.testing.assert_allclose(du_dt, fd, atol=5e-3, rtol=5e-3)


def test_loss_vanishes_at_the_exact_u_only_and_targets_are_float32():
    n = 256
    key = jax.random.key(3)
    x = jnp.asarray(MIXTURE.sample(np.random.default_rng(1), n), jnp.float32)
    e = jax.random.normal(key, (n, 2))
    t = jnp.full((n,), 0.9)
    r = jnp.full((n,), 0.2)
    z = 0.1 * x + 0.9 * e
    exact = _exact_u(32)
    with_marginal = lambda u_fn: meanflow.meanflow_target(u_fn, z, r, t, VELOCITY(z, t))
    u, target = jax.jit(lambda: with_marginal(exact))()
    instantaneous = lambda z, r, t: VELOCITY(z, t)  # u = v is right only when r = t
    u_v, target_v = jax.jit(lambda: with_marginal(instantaneous))()
    gap = lambda a, b: float(jnp.mean(jnp.sum((a - b) ** 2, -1)))
    assert gap(u, target) < 1e-5 < 1e-2 < gap(u_v, target_v)
    bf16 = lambda z, r, t: exact(z.astype(jnp.bfloat16).astype(jnp.float32), r, t).astype(jnp.bfloat16)
    u16, target16 = jax.jit(lambda: with_marginal(bf16))()
    assert u16.dtype == target16.dtype == jnp.float32
    loss, error = jax.jit(lambda: meanflow.meanflow_loss(exact, x, e, r, t))()
    assert loss.shape == error.shape == (n,) and np.all(np.asarray(loss) >= 0)
    # The exact u maps noise to the flow's end in one jump (t = 0.999: the exact mixture field is 0/0 at 1).
    one_step = meanflow.sample(exact, e, t_start=0.999)
    two_step = meanflow.sample(exact, e, num_steps=2, t_start=0.999)
    assert np.all(np.isfinite(np.asarray(one_step)))
    np.testing.assert_allclose(one_step, two_step, atol=2e-3)
