"""Euler and Heun on the probability-flow ODE in EDM's scaled variables.

With y = x / alpha and sigma~ = sigma / alpha = e^{-lambda}, the probability-flow ODE of any schedule
becomes dy / d sigma~ = eps(alpha y, t) (Karras et al. 2022, eq. 4 with s(t) = alpha, and Table 1), which
is what k-diffusion and EDM integrate. Euler on it is DDIM; Heun's trapezoid rule adds a second
evaluation at the end of the interval and is skipped where sigma_s = 0 (EDM Alg. 1, line 6).

References: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
eq. 4 and Alg. 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffax.samplers._base import Sampler, half_log_snr, stateless

__all__ = ["euler", "heun"]


def _euler(schedule, x, slope, t, s):
    """alpha_s (y + (sigma~_s - sigma~_t) slope), y = x / alpha_t: one Euler step in (y, sigma~)."""
    scaled_sigma = lambda u: jnp.exp(-half_log_snr(schedule, u))
    y = x / schedule.alpha(t).astype(x.dtype)
    dy = (scaled_sigma(s) - scaled_sigma(t)).astype(x.dtype) * slope
    return schedule.alpha(s).astype(x.dtype) * (y + dy)


def euler() -> Sampler:
    """EDM's Euler step (order 1, one evaluation per interval); algebraically equal to DDIM.

    References: Karras et al. 2022, Alg. 1 without the correction (lines 5-7).
    """

    def step(denoise, schedule, x, state, i, t, s, key):
        return _euler(schedule, x, denoise(x, t)[1], t, s), state, jnp.int32(1)

    return stateless(step, order=1, nfe_per_step=1, data_prediction=True)


def heun() -> Sampler:
    """EDM's Heun step: Euler, then the trapezoid rule with the slope at the Euler point (order 2, two
    evaluations per interval, one on an interval ending at sigma = 0).

    References: Karras et al. 2022, Alg. 1.
    """

    def step(denoise, schedule, x, state, i, t, s, key):
        eps_t = denoise(x, t)[1]
        x_euler = _euler(schedule, x, eps_t, t, s)

        def correct(x_euler):
            eps_s = denoise(x_euler, s)[1]
            return _euler(schedule, x, 0.5 * (eps_t + eps_s), t, s)

        reaches_zero = schedule.sigma(s) <= 0
        x_s = jax.lax.cond(reaches_zero, lambda x_euler: x_euler, correct, x_euler)
        return x_s, state, jnp.where(reaches_zero, 1, 2).astype(jnp.int32)

    return stateless(step, order=2, nfe_per_step=2, data_prediction=True)
