"""Continuous-time consistency models in TrigFlow (sCM): the consistency function, the tangent by
``jax.jvp`` with normalisation and warm-up, and the adaptively weighted loss.

TrigFlow (``diffax.schedules.TrigFlow``): x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in
[0, pi/2]. The consistency function f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t) is x_t
at t = 0 exactly (eq. 7). The continuous-time consistency gradient with weight 1 / (sigma_d tan t) is that
of ||F_theta - F_theta^- - g||^2 at F_theta = F_theta^- with the tangent
g = cos(t) df^-/dt = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt)
(eq. 8-9, Alg. 1), r = min(1, step / warm-up steps) (tangent warm-up), g normalised to g / (||g|| + c)
(tangent normalisation), and the loss adaptively weighted by a learned log-variance w(t):
e^{-w(t)} / D ||F_theta - F^- - g||^2 + w(t) (eq. 10). dx_t/dt is cos(t) z - sin(t) x_0 for training
(sCT) or a teacher's velocity (sCD). The tangent, F^- and g are float32 whatever the network computes in.

References: Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
Sec. 3-4, eq. 7-10, Alg. 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "consistency_function",
    "init_logvar",
    "logvar",
    "scm_loss",
    "tangent",
    "trigflow_times",
]

Network = Callable[[jax.Array, jax.Array], jax.Array]  # F(x / sigma_d, t)

_LOGVAR_FREQUENCIES = np.exp(np.linspace(0.0, np.log(1000.0), 16)).astype(np.float32)


def _column(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _flat_norm_sq(v: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=-1)


def trigflow_times(key: jax.Array, n: int, *, sigma_data: float, p_mean: float, p_std: float) -> jax.Array:
    """t = arctan(e^tau / sigma_d) with tau ~ N(P_mean, P_std^2): EDM's lognormal levels in TrigFlow time
    (Lu & Song 2024, Sec. 4.3)."""
    tau = p_mean + p_std * jax.random.normal(key, (n,), jnp.float32)
    return jnp.arctan(jnp.exp(tau) / sigma_data)


def consistency_function(
    network_out: jax.Array, x_t: jax.Array, t: jax.Array, *, sigma_data: float
) -> jax.Array:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F (eq. 7): x_t itself at t = 0."""
    cos, sin = _column(jnp.cos(t), x_t).astype(x_t.dtype), _column(jnp.sin(t), x_t).astype(x_t.dtype)
    return cos * x_t - sin * sigma_data * network_out.astype(x_t.dtype)


def tangent(
    network: Network,
    x_t: jax.Array,
    t: jax.Array,
    dxt_dt: jax.Array,
    *,
    sigma_data: float,
    warmup: jax.Array | float = 1.0,
    normalization: float | None = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """(F^-, g): the target network's output and the tangent g = cos(t) df^-/dt (eq. 8, Alg. 1),
    dF^-/dt = d_x F dx_t/dt + d_t F by one ``jax.jvp`` with tangents (dx_t/dt, 1), all in float32;
    ``warmup`` r scales the second term, ``normalization`` c divides g by ||g|| + c (None: raw g).
    Both outputs are stop-gradient."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    x_t, t, dxt_dt = f32(x_t), f32(t), f32(dxt_dt)
    fn = lambda x, t: f32(network(x / sigma_data, t))
    out, d_out = jax.jvp(fn, (x_t, t), (dxt_dt, jnp.ones_like(t)))
    cos, sin = _column(jnp.cos(t), x_t), _column(jnp.sin(t), x_t)
    g = -jnp.square(cos) * (sigma_data * out - dxt_dt) - warmup * cos * sin * (x_t + sigma_data * d_out)
    if normalization is not None:
        g = g / _column(jnp.sqrt(_flat_norm_sq(g)) + normalization, g)
    return jax.lax.stop_gradient(out), jax.lax.stop_gradient(g)


def init_logvar() -> dict[str, jax.Array]:
    """Parameters of the adaptive weight's log-variance w(t): a linear map of Fourier features of t."""
    return {
        "kernel": jnp.zeros((2 * _LOGVAR_FREQUENCIES.size,), jnp.float32),
        "bias": jnp.zeros((), jnp.float32),
    }


def logvar(params: dict[str, jax.Array], t: jax.Array) -> jax.Array:
    """w(t) = kernel . [cos(omega t), sin(omega t)] + bias, omega geometric in [1, 1000] (eq. 10)."""
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(_LOGVAR_FREQUENCIES)[None]
    features = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return features @ params["kernel"] + params["bias"]


def scm_loss(
    network: Network,
    target_network: Network,
    logvar_params: dict[str, Any] | None,
    x0: jax.Array,
    z: jax.Array,
    t: jax.Array,
    *,
    sigma_data: float,
    warmup: jax.Array | float = 1.0,
    normalization: float | None = 0.1,
    dxt_dt: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-example sCM loss (eq. 10) and the plain squared error ||F_theta - F^- - g||^2 / D.

    Args:
      network, target_network: F_theta and F_theta^- (the same weights under stop-gradient for sCT).
      logvar_params: the adaptive weight's parameters (``None``: no adaptive weighting).
      x0, z: data and noise z ~ N(0, sigma_d^2 I), same shape.
      t: TrigFlow times (batch,).
      dxt_dt: a teacher's velocity (sCD); default cos(t) z - sin(t) x_0 (sCT).
    """
    cos, sin = _column(jnp.cos(t), x0).astype(x0.dtype), _column(jnp.sin(t), x0).astype(x0.dtype)
    x_t = cos * x0 + sin * z
    if dxt_dt is None:
        dxt_dt = cos * z - sin * x0
    target_out, g = tangent(
        target_network, x_t, t, dxt_dt, sigma_data=sigma_data, warmup=warmup, normalization=normalization
    )
    out = jnp.asarray(network(x_t / sigma_data, t), jnp.float32)
    error = _flat_norm_sq(out - target_out - g) / np.prod(x0.shape[1:])
    if logvar_params is None:
        return error, error
    w = logvar(logvar_params, t)
    return jnp.exp(-w) * error + w, error
