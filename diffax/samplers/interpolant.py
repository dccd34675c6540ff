"""The stochastic interpolant's generative SDE with a tunable diffusion coefficient.

Along any schedule x_tau = alpha x_0 + sigma eps (a stochastic interpolant in tau = 1 - t, see
``diffax.fewstep.interpolants.InterpolantSchedule``) the velocity towards the data is
b = -(alpha' x_0 + sigma' eps) (derivatives in tau) and the score s = -eps / sigma. The SDE
dX = (b + eps_d s) dt + sqrt(2 eps_d) dW keeps the marginals for every constant eps_d >= 0 (Albergo et al.
2023, Thm. 2.21, eq. 2.32); eps_d = 0 is the probability-flow ODE. An interval that ends at sigma = 0
returns alpha x_0 there (no noise at the data end).

References: Albergo, Boffi, Vanden-Eijnden 2023, "Stochastic Interpolants: A Unifying Framework for
Flows and Diffusions", eq. 2.32-2.33.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffax.samplers._base import Sampler, first_order_step, normal_like, stateless

__all__ = ["interpolant_sde"]


def interpolant_sde(*, diffusion: float = 1.0) -> Sampler:
    """Euler-Maruyama on dX = (b + eps_d s) dt + sqrt(2 eps_d) dW (Albergo et al. 2023, eq. 2.32).

    Args:
      diffusion: eps_d >= 0, per unit of the schedule's time; 0 is Euler on the probability-flow ODE.

    Returns:
      The sampler (one evaluation per interval; stochastic unless ``diffusion`` is 0).
    """
    if not diffusion >= 0.0:
        raise ValueError(f"diffusion must be >= 0; got {diffusion}.")

    def step(denoise, schedule, x, state, i, t, s, key):
        x0, eps = denoise(x, t)[:2]
        one = jnp.ones_like(t)
        dalpha = jax.jvp(schedule.alpha, (t,), (one,))[1].astype(x.dtype)
        dsigma = jax.jvp(schedule.sigma, (t,), (one,))[1].astype(x.dtype)
        h = (t - s).astype(x.dtype)
        drift = -(dalpha * x0 + dsigma * eps) - diffusion * eps / schedule.sigma(t).astype(x.dtype)
        x_s = x + h * drift
        if diffusion > 0.0:
            x_s = x_s + jnp.sqrt(2.0 * diffusion * h) * normal_like(key, x)
        x_s = jnp.where(schedule.sigma(s) > 0, x_s, first_order_step(schedule, x0, eps, s))
        return x_s, state, jnp.int32(1)

    return stateless(step, order=1, nfe_per_step=1, stochastic=diffusion > 0.0, data_prediction=True)
