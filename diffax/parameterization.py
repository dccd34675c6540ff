"""What a denoising network predicts, and conversions between the choices.

With x_t = alpha x_0 + sigma eps, a network may predict
  - ``"eps"``: the noise eps (Ho et al. 2020);
  - ``"x0"``: the data x_0;
  - ``"v"``: v = alpha eps - sigma x_0 (Salimans & Ho 2022, Sec. 4 and App. D);
  - ``"score"``: grad_x log p_t(x_t) = -eps / sigma (Song et al. 2021; Vincent 2011);
  - ``"flow"``: the velocity dx_t/dt = alpha' x_0 + sigma' eps (Lipman et al. 2023; Liu et al. 2023).
Every conversion goes through the pair (x_0, eps), which x_t and any one prediction determine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.process import broadcast_to_data
from diffax.schedules import Schedule

__all__ = [
    "PREDICTIONS",
    "check_prediction",
    "to_x0_eps",
    "from_x0_eps",
    "convert",
    "x0_error_scale",
    "edm_preconditioning",
]

PREDICTIONS = ("eps", "x0", "v", "score", "flow")


def check_prediction(prediction: str) -> None:
    """Raises a ValueError naming the known prediction types if ``prediction`` is unknown."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"Unknown prediction {prediction!r}; known predictions: {', '.join(PREDICTIONS)}.")


def _coefficients(schedule: Schedule, t: ArrayLike, x: jax.Array, prediction: str):
    """alpha, sigma (and their time derivatives for "flow") shaped to broadcast against x."""
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    coefs = [alpha, sigma]
    if prediction == "flow":
        t = jnp.asarray(t, jnp.result_type(float))
        ones = jnp.ones_like(t)
        coefs += [jax.jvp(schedule.alpha, (t,), (ones,))[1], jax.jvp(schedule.sigma, (t,), (ones,))[1]]
    return [broadcast_to_data(c, x).astype(x.dtype) for c in coefs]


def to_x0_eps(
    schedule: Schedule, pred: ArrayLike, x_t: ArrayLike, t: ArrayLike, *, prediction: str
) -> tuple[jax.Array, jax.Array]:
    """Recovers (x_0, eps) from x_t and a prediction of type ``prediction``.

    Args:
      schedule: the noise schedule.
      pred: the network output, x_t's shape.
      x_t: the noisy input, shape (batch, ...).
      t: times, shape (batch,) or scalar.
      prediction: one of ``PREDICTIONS``.

    Returns:
      ``(x0, eps)``, each of x_t's shape.

    References: Salimans & Ho 2022, eq. 12 and App. D (v); Song et al. 2021, eq. 7 (score).
    """
    check_prediction(prediction)
    pred, x_t = jnp.asarray(pred), jnp.asarray(x_t)
    if pred.shape != x_t.shape:
        raise ValueError(f"pred must have x_t's shape {x_t.shape}; got {pred.shape}.")
    alpha, sigma, *derivs = _coefficients(schedule, t, x_t, prediction)
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if prediction == "x0":
        return pred, (x_t - alpha * pred) / sigma
    if prediction == "v":
        norm = jnp.square(alpha) + jnp.square(sigma)
        return (alpha * x_t - sigma * pred) / norm, (sigma * x_t + alpha * pred) / norm
    if prediction == "score":
        return (x_t + jnp.square(sigma) * pred) / alpha, -sigma * pred
    d_alpha, d_sigma = derivs  # "flow": solve [alpha sigma; alpha' sigma'] [x0; eps] = [x_t; pred]
    det = alpha * d_sigma - sigma * d_alpha
    return (d_sigma * x_t - sigma * pred) / det, (alpha * pred - d_alpha * x_t) / det


def from_x0_eps(
    schedule: Schedule, x0: ArrayLike, eps: ArrayLike, t: ArrayLike, *, prediction: str
) -> jax.Array:
    """The quantity of type ``prediction`` for a given (x_0, eps) at time t (the regression target).

    References: Salimans & Ho 2022, Sec. 4 (v = alpha eps - sigma x_0).
    """
    check_prediction(prediction)
    x0, eps = jnp.asarray(x0), jnp.asarray(eps)
    alpha, sigma, *derivs = _coefficients(schedule, t, x0, prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "score":
        return -eps / sigma
    d_alpha, d_sigma = derivs
    return d_alpha * x0 + d_sigma * eps


def convert(
    schedule: Schedule,
    pred: ArrayLike,
    x_t: ArrayLike,
    t: ArrayLike,
    *,
    source: str,
    target: str,
) -> jax.Array:
    """Converts a prediction of type ``source`` into the equivalent prediction of type ``target``."""
    x0, eps = to_x0_eps(schedule, pred, x_t, t, prediction=source)
    return from_x0_eps(schedule, x0, eps, t, prediction=target)


def x0_error_scale(schedule: Schedule, t: ArrayLike, *, prediction: str) -> jax.Array:
    """c(t) such that ||target - pred||^2 = c(t) ||x_0 - x0_pred||^2 at fixed x_t.

    Holding x_t fixed, an error d in x_0 moves eps by -(alpha / sigma) d, so the target moves by
    d target / d x_0; c is its square: SNR for eps, 1 for x0, (alpha^2 + sigma^2)^2 / sigma^2 for v.
    Used to express losses on any target as weighted x_0 errors (Hang et al. 2023, Sec. 3.4).
    """
    t = jnp.asarray(t, jnp.result_type(float))
    x0 = jnp.ones(t.shape + (1,), t.dtype)
    eps = -(schedule.alpha(t) / schedule.sigma(t))[..., None]
    slope = from_x0_eps(schedule, x0, eps, t, prediction=prediction)
    return jnp.square(slope[..., 0])


def edm_preconditioning(
    sigma: ArrayLike, *, sigma_data: float = 0.5
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """EDM's network preconditioning: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

    Returns:
      ``(c_skip, c_out, c_in, c_noise)`` with c_skip = sigma_d^2 / (sigma^2 + sigma_d^2),
      c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2), c_in = 1 / sqrt(sigma^2 + sigma_d^2),
      c_noise = ln(sigma) / 4.

    References: Karras et al. 2022, Table 1 and eq. 7.
    """
    sigma = jnp.asarray(sigma)
    total = jnp.square(sigma) + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data * jax.lax.rsqrt(total)
    c_in = jax.lax.rsqrt(total)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise
