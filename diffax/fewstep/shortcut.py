"""Shortcut models: one network s(x_t, t, d) of the step size d, trained by flow matching at d = 0 and,
on a fraction of the batch, by self-consistency s(x_t, t, 2d) = (s(x_t, t, d) + s(x_t - d s(x_t, t, d),
t - d, d)) / 2 (two steps of d make one of 2d).

diffax's convention (the ``rectified_flow`` schedule): x_t = (1 - t) x + t e, t = 1 noise, the velocity
v = e - x, a step of d towards the data x_{t - d} = x_t - d s(x_t, t, d). s(x, t, d) is the average
velocity over [t - d, t], MeanFlow's u(x, t - d, t); sampling in K steps takes d = 1 / K.

References: Frans, Hafner, Levine, Abbeel 2024, "One Step Diffusion via Shortcut Models", eq. 5-6, Alg. 1-2.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["self_consistency_target", "step_sizes"]

Shortcut = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # s(x, t, d), t and d of shape (batch,)


def _column(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def self_consistency_target(
    s_fn: Shortcut, x_t: jax.Array, t: jax.Array, d: jax.Array, *, clip: float | None = None
) -> jax.Array:
    """stopgrad((s(x_t, t, d) + s(x_t - d s(x_t, t, d), t - d, d)) / 2), the target of s(x_t, t, 2d)
    (eq. 6), in float32 whatever ``s_fn`` computes in; ``clip`` bounds it (the authors' code uses 4)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    x_t, t, d = f32(x_t), f32(t), f32(d)
    first = f32(s_fn(x_t, t, d))
    second = f32(s_fn(x_t - _column(d, x_t) * first, t - d, d))
    target = 0.5 * (first + second)
    if clip is not None:
        target = jnp.clip(target, -clip, clip)
    return jax.lax.stop_gradient(target)


def step_sizes(key: jax.Array, n: int, *, min_step: float) -> tuple[jax.Array, jax.Array]:
    """(t, d) of the self-consistency part: 2d = 2^-j with j uniform in {0, ..., log2(1 / min_step) - 1}
    and t uniform on the 2d-grid {2d, 4d, ..., 1} (so t - 2d >= 0), as the authors' ``targets_shortcut``."""
    levels = round(-math.log2(min_step))
    j_key, t_key = jax.random.split(key)
    j = jax.random.randint(j_key, (n,), 0, levels)
    big = jnp.exp2(-j.astype(jnp.float32))
    k = jnp.floor(jax.random.uniform(t_key, (n,)) * jnp.exp2(j.astype(jnp.float32))) + 1.0
    return k * big, 0.5 * big
