"""The forward process q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I), its transitions and posteriors.

Coefficients of shape ``(batch,)`` (or scalars) broadcast over the trailing axes of ``x``.

References: Ho et al. 2020 (DDPM), eq. 4, 6-7; Kingma et al. 2021 (VDM), eq. 2-3, 32-33.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.schedules import DiscreteSchedule, Schedule

__all__ = [
    "broadcast_to_data",
    "q_sample",
    "q_transition",
    "q_step",
    "q_posterior",
    "q_posterior_discrete",
]


def broadcast_to_data(coef: ArrayLike, x: ArrayLike) -> jax.Array:
    """Reshapes a per-example coefficient ``(batch,)`` (or a scalar) to broadcast against ``x``.

    Raises:
      ValueError: if ``coef`` is neither a scalar nor of shape ``(x.shape[0],)``.
    """
    coef, x = jnp.asarray(coef), jnp.asarray(x)
    if coef.ndim == 0:
        return coef
    if coef.ndim != 1 or coef.shape[0] != x.shape[0]:
        raise ValueError(
            f"t must be a scalar or have shape (batch,) = ({x.shape[0]},); got shape {coef.shape}."
        )
    return coef.reshape(coef.shape + (1,) * (x.ndim - 1))


def _check_same_shape(**arrays: ArrayLike) -> None:
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match: {', '.join(f'{k}={v}' for k, v in shapes.items())}.")


def q_sample(schedule: Schedule, x0: ArrayLike, t: ArrayLike, noise: ArrayLike) -> jax.Array:
    """Draws x_t = alpha(t) x_0 + sigma(t) noise from q(x_t | x_0).

    Args:
      schedule: the noise schedule.
      x0: clean data, shape (batch, ...).
      t: times, shape (batch,) or scalar, in the schedule's range.
      noise: standard normal noise of x0's shape.

    Returns:
      x_t, of x0's shape.

    References: Ho et al. 2020, eq. 4; Song et al. 2021, eq. 29-30.
    """
    _check_same_shape(x0=x0, noise=noise)
    schedule.check_t(t)
    x0, noise = jnp.asarray(x0), jnp.asarray(noise)
    alpha = broadcast_to_data(schedule.alpha(t), x0).astype(x0.dtype)
    sigma = broadcast_to_data(schedule.sigma(t), x0).astype(x0.dtype)
    return alpha * x0 + sigma * noise


def q_transition(schedule: Schedule, s: ArrayLike, t: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Coefficients of q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I) for s < t.

    Returns:
      ``(alpha_ts, var_ts)`` with alpha_{t|s} = alpha_t / alpha_s and
      sigma_{t|s}^2 = sigma_t^2 (1 - exp(lambda_t - lambda_s)), computed with expm1 for accuracy.

    References: Kingma et al. 2021 (VDM), eq. 32-33.
    """
    schedule.check_t(s, name="s")
    schedule.check_t(t)
    alpha_ts = jnp.exp(schedule.log_alpha(t) - schedule.log_alpha(s))
    var_ts = -jnp.square(schedule.sigma(t)) * jnp.expm1(schedule.log_snr(t) - schedule.log_snr(s))
    return alpha_ts, var_ts


def q_step(schedule: Schedule, x_s: ArrayLike, s: ArrayLike, t: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of the one-step kernel q(x_t | x_s) applied to ``x_s``.

    For a discrete schedule with s = t - 1/T this is DDPM's q(x_t | x_{t-1}) =
    N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Ho et al. 2020, eq. 2).

    Returns:
      ``(mean, var)``: mean of x_s's shape, variance broadcastable to it.
    """
    alpha_ts, var_ts = q_transition(schedule, s, t)
    return broadcast_to_data(alpha_ts, x_s) * jnp.asarray(x_s), broadcast_to_data(var_ts, x_s)


def q_posterior(
    schedule: Schedule,
    x_t: ArrayLike,
    x0: ArrayLike,
    s: ArrayLike,
    t: ArrayLike,
    *,
    min_variance: float = 1e-20,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The Gaussian posterior q(x_s | x_t, x_0) for s < t.

    mean = r (alpha_s / alpha_t) x_t + alpha_s (1 - r) x_0 and var = sigma_s^2 (1 - r), where
    r = exp(lambda_t - lambda_s) = SNR(t) / SNR(s).

    Args:
      schedule: the noise schedule.
      x_t: noisy data at time t.
      x0: clean data (or a prediction of it), x_t's shape.
      s: the earlier time, scalar or (batch,).
      t: the later time, scalar or (batch,).
      min_variance: floor under the variance in the clipped log-variance (s = 0 has variance 0).

    Returns:
      ``(mean, var, log_var_clipped)``; var and log_var broadcast against x_t.

    References: Kingma et al. 2021 (VDM), eq. 32-33; Ho et al. 2020, eq. 6-7.
    """
    _check_same_shape(x_t=x_t, x0=x0)
    schedule.check_t(s, name="s")
    schedule.check_t(t)
    x_t, x0 = jnp.asarray(x_t), jnp.asarray(x0)
    one_minus_r = -jnp.expm1(schedule.log_snr(t) - schedule.log_snr(s))
    alpha_s = schedule.alpha(s)
    coef_xt = (1.0 - one_minus_r) * alpha_s / schedule.alpha(t)
    coef_x0 = alpha_s * one_minus_r
    var = jnp.square(schedule.sigma(s)) * one_minus_r
    mean = broadcast_to_data(coef_xt, x_t) * x_t + broadcast_to_data(coef_x0, x_t) * x0
    var = broadcast_to_data(var, x_t)
    return mean, var, jnp.log(jnp.maximum(var, min_variance))


def q_posterior_discrete(
    schedule: DiscreteSchedule, x_t: ArrayLike, x0: ArrayLike, index: ArrayLike
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DDPM's posterior q(x_{t-1} | x_t, x_0) at integer grid index ``index`` (0-based).

    mean = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t,
    var = beta_t (1 - abar_{t-1}) / (1 - abar_t), with abar_{-1} = 1. The clipped log-variance
    replaces the zero variance at index 0 by the variance at index 1, as DDPM does.

    Returns:
      ``(mean, var, log_var_clipped)``.

    References: Ho et al. 2020, eq. 6-7.
    """
    _check_same_shape(x_t=x_t, x0=x0)
    x_t, x0 = jnp.asarray(x_t), jnp.asarray(x0)
    index = jnp.asarray(index)
    betas, abar = schedule.betas, schedule.alphas_cumprod
    abar_prev_all = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
    var_all = betas * (1.0 - abar_prev_all) / (1.0 - abar)
    log_var_all = jnp.log(jnp.concatenate([var_all[1:2], var_all[1:]]))
    beta, abar_t, abar_prev = betas[index], abar[index], abar_prev_all[index]
    coef_x0 = beta * jnp.sqrt(abar_prev) / (1.0 - abar_t)
    coef_xt = (1.0 - abar_prev) * jnp.sqrt(1.0 - beta) / (1.0 - abar_t)
    mean = broadcast_to_data(coef_x0, x0) * x0 + broadcast_to_data(coef_xt, x_t) * x_t
    return mean, broadcast_to_data(var_all[index], x_t), broadcast_to_data(log_var_all[index], x_t)
