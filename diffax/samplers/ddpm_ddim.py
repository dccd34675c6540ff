"""Ancestral DDPM and DDIM: one model evaluation per interval, written with the Gaussian posterior.

Both use the posterior q(x_s | x_t, x_0) between consecutive grid times, so they work on any schedule:
on a discrete schedule with every grid index they are the original samplers, on a continuous one the
interval posterior of Kingma et al. 2021 (eq. 32-33) takes the place of DDPM's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffax.process import q_posterior, q_transition
from diffax.samplers._base import Sampler, first_order_step, normal_like, stateless
from diffax.schedules import Schedule

__all__ = ["ddpm", "ddim", "ddim_mean_std", "VARIANCES"]

VARIANCES = ("fixed_small", "fixed_large", "learned")


def ddpm(*, variance: str = "fixed_small") -> Sampler:
    """Ancestral sampling from p(x_s | x_t) = N(posterior mean at x0_pred, var).

    Args:
      variance: ``"fixed_small"``: the posterior variance sigma_s^2 (1 - SNR_t / SNR_s) (DDPM's
        beta-tilde); ``"fixed_large"``: the transition variance sigma_{t|s}^2 (DDPM's beta);
        ``"learned"``: log var = f log sigma_{t|s}^2 + (1 - f) log beta-tilde with f = (v + 1) / 2 and v
        the model's second half of channels (Nichol & Dhariwal 2021, eq. 15, "learned range").
        No noise is added on an interval that ends where sigma_s = 0 (DDPM Alg. 2: z = 0 at the end).

    Returns:
      The sampler (order 1, one evaluation per interval, stochastic).

    References: Ho et al. 2020, eq. 6-7 and Alg. 2; Nichol & Dhariwal 2021, eq. 15.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {', '.join(VARIANCES)}; got {variance!r}.")

    def step(denoise, schedule, x, state, i, t, s, key):
        x0, _, *v = denoise(x, t)
        mean, var, log_var = q_posterior(schedule, x, x0, s, t)
        if variance != "fixed_small":
            _, var_large = q_transition(schedule, s, t)
            if variance == "fixed_large":
                var = var_large
            else:
                frac = (v[0] + 1.0) / 2.0
                var = jnp.exp(frac * jnp.log(var_large) + (1.0 - frac) * log_var)
        std = jnp.where(schedule.sigma(s) > 0, jnp.sqrt(var), 0.0).astype(x.dtype)
        return mean + std * normal_like(key, x), state, jnp.int32(1)

    return stateless(
        step,
        order=1,
        nfe_per_step=1,
        stochastic=True,
        data_prediction=True,
        learned_variance=variance == "learned",
    )


def ddim_mean_std(
    schedule: Schedule, x: jax.Array, x0: jax.Array, eps: jax.Array, t: jax.Array, s: jax.Array, *, eta
) -> tuple[jax.Array, jax.Array]:
    """The mean alpha_s x0 + sqrt(sigma_s^2 - c^2) eps and the noise scale c of DDIM's step from t to s,
    c^2 = eta^2 times the posterior variance (Song et al. 2021, eq. 12 and 16)."""
    _, var_post, _ = q_posterior(schedule, x, x0, s, t)
    noise_var = (jnp.square(eta) * var_post).astype(x.dtype)
    direction = jnp.sqrt(jnp.maximum(jnp.square(schedule.sigma(s)) - noise_var, 0.0)).astype(x.dtype)
    return schedule.alpha(s).astype(x.dtype) * x0 + direction * eps, jnp.sqrt(noise_var)


def ddim(*, eta: float = 0.0) -> Sampler:
    """DDIM: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z with c^2 = eta^2 times the posterior
    variance; eta = 0 is the deterministic sampler (a first-order solver of the probability-flow ODE),
    eta = 1 ancestral sampling with DDPM's small variance.

    Args:
      eta: the noise level in [0, 1] (``"euler_ancestral"`` is this sampler with eta = 1 by default: k-
        diffusion's ancestral Euler step in (x / alpha, sigma / alpha) has sigma_up = c / alpha_s and is
        the same update).

    Returns:
      The sampler (order 1, one evaluation per interval, stochastic when eta > 0).

    References: Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 and 16; Karras et al.
    2022, App. B.3 (DDIM as Euler on the scaled ODE).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1]; got {eta}.")

    def step(denoise, schedule, x, state, i, t, s, key):
        x0, eps = denoise(x, t)
        if eta == 0.0:
            return first_order_step(schedule, x0, eps, s), state, jnp.int32(1)
        mean, std = ddim_mean_std(schedule, x, x0, eps, t, s, eta=eta)
        return mean + std * normal_like(key, x), state, jnp.int32(1)

    return stateless(step, order=1, nfe_per_step=1, stochastic=eta > 0, data_prediction=True)
