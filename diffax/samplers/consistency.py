"""The multistep consistency sampler (Song et al. 2023, Alg. 1).

The model is a consistency function: its data prediction at (x, t) is already the end point of the
probability-flow ODE at the run's smallest noise level sigma_min (in scaled units sigma / alpha). Each
interval (t, s) maps x to that end point and, unless s is the last level, noises it back to s:
x_s = alpha_s (x_0 + sqrt(sigma~_s^2 - sigma_min^2) z). One model evaluation per interval; with the grid
[T, sigma_min] it is one-step generation.

References: Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models", Alg. 1.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffax.samplers._base import Sampler, half_log_snr, normal_like, stateless

__all__ = ["consistency"]


def consistency(*, sigma_min: float = 0.0) -> Sampler:
    """Alg. 1 of Song et al. 2023: x_0 = f(x_t, t), then x_s = alpha_s (x_0 + sqrt(sigma~_s^2 -
    sigma_min^2) z).

    Args:
      sigma_min: the consistency model's boundary level eps in scaled units sigma / alpha; a grid that
        ends at that level adds no noise on its last interval and returns alpha x_0 there.

    Returns:
      The sampler (one evaluation per interval, stochastic).
    """
    if not sigma_min >= 0.0:
        raise ValueError(f"sigma_min must be >= 0; got {sigma_min}.")

    def step(denoise, schedule, x, state, i, t, s, key):
        x0 = denoise(x, t)[0]
        scaled_sigma = jnp.exp(-half_log_snr(schedule, s))
        # No noise at sigma_min itself, which float32 times reach only up to rounding.
        excess = jnp.where(
            scaled_sigma > sigma_min * (1.0 + 1e-4), jnp.square(scaled_sigma) - sigma_min**2, 0.0
        )
        std = jnp.sqrt(excess).astype(x.dtype)
        return schedule.alpha(s).astype(x.dtype) * (x0 + std * normal_like(key, x)), state, jnp.int32(1)

    return stateless(step, order=1, nfe_per_step=1, stochastic=True, data_prediction=True)
