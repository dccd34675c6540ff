"""MeanFlow: one-step generation by learning the average velocity of a flow, with an exact JVP.

On the path z_t = (1 - t) x + t e (t = 1 noise, diffax's ``rectified_flow`` schedule) with velocity
v = e - x, the average velocity u(z, r, t) = (1 / (t - r)) int_r^t v(z_tau, tau) d tau satisfies the
MeanFlow identity u = v - (t - r) du/dt, with du/dt = v . d_z u + d_t u the derivative along the path.
The loss regresses u on stopgrad(v - clip(t - r, 0, 1) du/dt), the derivative computed by one
``jax.jvp`` with tangents (v, 0, 1), in float32 whatever the network computes in, and adaptively
weighted by stopgrad(1 / (||err||^2 + c)^p). One step samples x = e - u(e, 0, 1).

References: Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling", eq. 6-11,
Alg. 1-2.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["meanflow_loss", "meanflow_target", "sample"]

AverageVelocity = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _column(t: jax.Array, like: jax.Array) -> jax.Array:
    return t.reshape((-1,) + (1,) * (like.ndim - 1))


def meanflow_target(
    u_fn: AverageVelocity, z: jax.Array, r: jax.Array, t: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(u(z, r, t), stopgrad(v - clip(t - r, 0, 1) du/dt)) with du/dt from ``jax.jvp`` (eq. 8, Alg. 1).

    Primals, tangents and the combination are float32, so a bfloat16 network still gets float32 targets.
    """
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    z, r, t, v = f32(z), f32(r), f32(t), f32(v)
    fn = lambda z, r, t: f32(u_fn(z, r, t))
    u, du_dt = jax.jvp(fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    target = v - _column(jnp.clip(t - r, 0.0, 1.0), z) * du_dt
    return u, jax.lax.stop_gradient(target)


def meanflow_loss(
    u_fn: AverageVelocity,
    x: jax.Array,
    e: jax.Array,
    r: jax.Array,
    t: jax.Array,
    *,
    norm_p: float = 1.0,
    norm_eps: float = 0.01,
    target_fn: AverageVelocity | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-example adaptively weighted MeanFlow loss and the plain squared error (eq. 9-11).

    Args:
      u_fn: the network u(z, r, t) (batched; r, t of shape (batch,)).
      x, e: data and noise, same shape.
      r, t: times with r <= t, shape (batch,).
      norm_p, norm_eps: the adaptive weight stopgrad(1 / (||err||^2 + eps)^p); p = 0 is plain l2.
      target_fn: the same network in a form ``jax.jvp`` can differentiate (e.g. a training network
        with reverse-mode-only kernels runs as ``u_fn``, its plain formulation under stop-gradient as
        ``target_fn``); default ``u_fn``, whose jvp primal is then the prediction.
    """
    z = (1.0 - _column(t, x)) * x + _column(t, x) * e
    u, target = meanflow_target(u_fn if target_fn is None else target_fn, z, r, t, e - x)
    if target_fn is not None:
        u = jnp.asarray(u_fn(z, r, t), jnp.float32)
    error = jnp.sum(jnp.square(u - target).reshape(x.shape[0], -1), axis=-1)
    weight = jax.lax.stop_gradient(1.0 / jnp.power(error + norm_eps, norm_p))
    return weight * error, error


def sample(u_fn: AverageVelocity, e: jax.Array, *, num_steps: int = 1, t_start: float = 1.0) -> jax.Array:
    """x = z_0 from noise e at ``t_start`` by ``num_steps`` average-velocity jumps
    z_r = z_t - (t - r) u(z_t, r, t) (Alg. 2)."""
    ts = jnp.linspace(t_start, 0.0, num_steps + 1)
    z = e
    for t, r in zip(ts[:-1], ts[1:], strict=True):
        ones = jnp.ones((e.shape[0],), jnp.float32)
        z = z - (t - r) * u_fn(z, r * ones, t * ones)
    return z
