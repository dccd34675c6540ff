"""PNDM and PLMS: pseudo numerical methods, a linear multistep (or Runge-Kutta) combination of noise
predictions pushed through DDIM's transfer step.

The transfer phi(x_t, eps, t, s) = alpha_s (x_t - sigma_t eps) / alpha_t + sigma_s eps is the DDIM step
with a given eps (eq. 9). The gradient part estimates the eps to transfer with:

- pseudo linear multistep (eq. 12): eps' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24 over the newest four
  evaluations, one evaluation per interval;
- pseudo Runge-Kutta (eq. 13), PNDM's warm-up for the first three intervals: e1 = eps(x_t, t),
  e2 = eps(phi(x_t, e1, t, m), m), e3 = eps(phi(x_t, e2, t, m), m), e4 = eps(phi(x_t, e3, t, s), s)
  with m the midpoint time, then eps' = (e1 + 2 e2 + 2 e3 + e4) / 6 (four evaluations per interval).

PLMS (diffusers' ``skip_prk_steps``) replaces the Runge-Kutta warm-up by a pseudo-improved-Euler first
interval (eps' = (e(x_t, t) + e(phi(x_t, e, t, s), s)) / 2, two evaluations) and the lower-order
Adams-Bashforth combinations (3 e_0 - e_1) / 2 and (23 e_0 - 16 e_1 + 5 e_2) / 12 until four
evaluations exist.

The fixed coefficients assume intervals of equal length in the grid's own variable, as on the paper's
uniform index grids, so the method carries no order guarantee in the probability-flow ODE: on the
exact-score mixture with a uniform-log-SNR grid both measure order 2 (see ``tests/samplers``).

References: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds" (ICLR), eq.
9, 12-13 and Alg. 1-2; diffusers' ``PNDMScheduler`` (the PLMS warm-up).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffax.samplers._base import Sampler, push_history

__all__ = ["pndm", "plms", "transfer"]

_ADAMS_BASHFORTH = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
_PRK_STEPS = 3


def transfer(schedule, x: jax.Array, eps: jax.Array, t: jax.Array, s: jax.Array) -> jax.Array:
    """phi(x_t, eps, t, s): the DDIM step from t to s with the noise estimate ``eps`` (Liu et al. eq. 9)."""
    alpha_t, sigma_t = schedule.alpha(t).astype(x.dtype), schedule.sigma(t).astype(x.dtype)
    alpha_s, sigma_s = schedule.alpha(s).astype(x.dtype), schedule.sigma(s).astype(x.dtype)
    return alpha_s * (x - sigma_t * eps) / alpha_t + sigma_s * eps


def _adams_bashforth(e_t: jax.Array, history: jax.Array, order: jax.Array) -> jax.Array:
    """The pseudo linear multistep estimate of ``order`` (1-4) over e_t and the newest history."""
    points = jnp.concatenate([e_t[None], history])

    def combine(weights):
        return lambda: sum(w * points[k] for k, w in enumerate(weights))

    return jax.lax.switch(order - 1, [combine(w) for w in _ADAMS_BASHFORTH])


def _init(x: jax.Array) -> jax.Array:
    return jnp.zeros((3,) + x.shape, x.dtype)


def _eps(denoise, x, t):
    return denoise(x, t)[1]


def pndm() -> Sampler:
    """F-PNDM: three pseudo Runge-Kutta intervals (four evaluations each), then the pseudo linear
    multistep method (one evaluation each); N + 9 evaluations on N >= 4 intervals.

    Returns:
      The sampler (measured order 2 on a uniform-log-SNR grid, ``min_steps = 4``,
      ``warmup_nfe = 9``).

    References: Liu et al. 2022, eq. 12-13, Alg. 2 (F-PNDM).
    """

    def step(denoise, schedule, x, history, i, t, s, key):
        e_t = _eps(denoise, x, t)

        def runge_kutta():
            mid = 0.5 * (t + s)
            e2 = _eps(denoise, transfer(schedule, x, e_t, t, mid), mid)
            e3 = _eps(denoise, transfer(schedule, x, e2, t, mid), mid)
            e4 = _eps(denoise, transfer(schedule, x, e3, t, s), s)
            return (e_t + 2.0 * e2 + 2.0 * e3 + e4) / 6.0

        warm = i < _PRK_STEPS
        eps = jax.lax.cond(warm, runge_kutta, lambda: _adams_bashforth(e_t, history, jnp.int32(4)))
        x_s = transfer(schedule, x, eps, t, s)
        return x_s, push_history(history, e_t), jnp.where(warm, 4, 1).astype(jnp.int32)

    return Sampler(init=_init, step=step, order=2, nfe_per_step=1, min_steps=4, warmup_nfe=9)


def plms() -> Sampler:
    """PLMS: the pseudo linear multistep method with a cheap warm-up (a pseudo-improved-Euler first
    interval, then Adams-Bashforth of orders 2 and 3); N + 1 evaluations on N intervals (N on one
    interval that ends at sigma = 0, which takes the plain DDIM step).

    Returns:
      The sampler (measured order 2 on a uniform-log-SNR grid, ``warmup_nfe = 1``).

    References: Liu et al. 2022, eq. 12; diffusers' ``PNDMScheduler.step_plms``.
    """

    def step(denoise, schedule, x, history, i, t, s, key):
        e_t = _eps(denoise, x, t)

        def improved_euler():
            predicted = transfer(schedule, x, e_t, t, s)
            return 0.5 * (e_t + _eps(denoise, predicted, s))

        def multistep():
            return _adams_bashforth(e_t, history, jnp.minimum(i, 3) + 1)

        first = i == 0
        heun = first & (schedule.sigma(s) > 0)
        eps = jax.lax.cond(heun, improved_euler, multistep)
        x_s = transfer(schedule, x, eps, t, s)
        return x_s, push_history(history, e_t), jnp.where(heun, 2, 1).astype(jnp.int32)

    return Sampler(init=_init, step=step, order=2, nfe_per_step=1, warmup_nfe=1)
