"""Reverse-time SDE samplers: Euler-Maruyama and the predictor-corrector sampler of Song et al. 2021.

The reverse SDE of dx = f x dt + g dW is dx = [f x - g^2 score] dt + g dW-bar, score = -eps / sigma
(Anderson 1982; Song et al. 2021, eq. 6). Both samplers evaluate the model at the start of each interval
only, so grids ending at sigma = 0 are allowed.

References: Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 6, Alg. 2-3 and
App. G (reverse diffusion predictor, Langevin corrector with signal-to-noise ratio r).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffax.process import q_transition
from diffax.samplers._base import Sampler, normal_like, stateless

__all__ = ["euler_maruyama", "pc"]


def _score(denoise, schedule, x, t):
    return -denoise(x, t)[1] / schedule.sigma(t).astype(x.dtype)


def euler_maruyama() -> Sampler:
    """Euler-Maruyama on the reverse SDE: x_s = x + (f x - g^2 score)(s - t) + g sqrt(t - s) z, with f, g
    at the interval's start (weak order 1, one evaluation per interval).

    References: Song et al. 2021, eq. 6; Kloeden & Platen 1992, Sec. 9.1.
    """

    def step(denoise, schedule, x, state, i, t, s, key):
        score = _score(denoise, schedule, x, t)
        f, g2 = schedule.drift(t).astype(x.dtype), schedule.diffusion_sq(t).astype(x.dtype)
        dt = (s - t).astype(x.dtype)
        x_s = x + (f * x - g2 * score) * dt + jnp.sqrt(-g2 * dt) * normal_like(key, x)
        return x_s, state, jnp.int32(1)

    return stateless(step, order=1, nfe_per_step=1, stochastic=True)


def pc(*, snr: float = 0.16, corrector_steps: int = 1) -> Sampler:
    """Predictor-corrector sampling: ``corrector_steps`` Langevin steps at t, then one reverse-diffusion
    step to s.

    Langevin: eps_L = 2 a^2 (snr ||z|| / ||score||)^2 (a^2 = alpha_{t|s}^2, the 1 - beta_i of the VP
    discretisation, 1 for VE), x <- x + eps_L score + sqrt(2 eps_L) z. Reverse diffusion: with
    q(x_t | x_s) = N(a x_s, v), x_s = (2 - a) x + v score + sqrt(v) z (the discretised reverse SDE,
    f_i(x) = (a - 1) x, G_i^2 = v). As in score_sde the norms are averaged over the batch (one step size
    for the batch): per-example norms blow the step up wherever a score happens to be small, which in
    low dimensions is common, so a sample depends on its batch through this step size.

    Args:
      snr: the signal-to-noise ratio r of the corrector (> 0).
      corrector_steps: Langevin steps per interval (>= 0).

    Returns:
      The sampler (weak order 1, 1 + corrector_steps evaluations per interval, stochastic).

    References: Song et al. 2021, Alg. 2-5 (PC sampling) and App. G.
    """
    if not snr > 0:
        raise ValueError(f"snr must be > 0; got {snr}.")
    if int(corrector_steps) != corrector_steps or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be an integer >= 0; got {corrector_steps}.")

    def mean_norm(v):
        return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=1)))

    def step(denoise, schedule, x, state, i, t, s, key):
        a, v = (c.astype(x.dtype) for c in q_transition(schedule, s, t))
        keys = jax.random.split(key, corrector_steps + 1)
        for k in range(corrector_steps):
            score = _score(denoise, schedule, x, t)
            z = normal_like(keys[k], x)
            step_size = 2.0 * jnp.square(a) * jnp.square(snr * mean_norm(z) / mean_norm(score))
            x = x + step_size * score + jnp.sqrt(2.0 * step_size) * z
        score = _score(denoise, schedule, x, t)
        x_s = (2.0 - a) * x + v * score + jnp.sqrt(v) * normal_like(keys[-1], x)
        return x_s, state, jnp.int32(corrector_steps + 1)

    return stateless(step, order=1, nfe_per_step=int(corrector_steps) + 1, stochastic=True)
