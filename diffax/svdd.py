"""SVDD: derivative-free guidance towards a reward by soft value-based decoding.

At every interval, ``num_candidates`` next states are drawn from the ancestral (DDIM eta) proposal
p(x_s | x_t); each is scored by the soft value v(x_s) ~ r(x0_hat(x_s)) (SVDD-PM: the reward of the
model's posterior-mean denoising of the candidate; the reward itself on the last interval) and one is
kept with probability proportional to exp(v / alpha) (alpha = 0: the best). The reward need not be
differentiable. With one candidate this is the ancestral sampler itself.

References: Li et al. 2024, "Derivative-Free Guidance in Continuous and Discrete Diffusion Models with
Soft Value-Based Decoding", Alg. 1 (SVDD) and eq. 6 (SVDD-PM's value).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.samplers._base import join_callable, make_denoiser, split_callable
from diffax.samplers.ddpm_ddim import ddim_mean_std
from diffax.schedules import Schedule

__all__ = ["sample"]


@functools.partial(jax.jit, static_argnames=("model_static", "reward_static", "num_candidates", "prediction"))
def _run(
    model_dynamic,
    reward_dynamic,
    schedule,
    x,
    ts,
    key,
    alpha,
    eta,
    *,
    model_static,
    reward_static,
    num_candidates,
    prediction,
):
    denoise = make_denoiser(join_callable(model_dynamic, model_static), schedule, prediction=prediction)
    reward_fn = join_callable(reward_dynamic, reward_static)
    last = ts.shape[0] - 2

    def body(x, inputs):
        i, t, s = inputs
        x0, eps = denoise(x, t)[:2]
        mean, std = ddim_mean_std(schedule, x, x0, eps, t, s, eta=eta)
        step_key = jax.random.fold_in(key, i)
        noise = jax.random.normal(step_key, (num_candidates,) + x.shape, x.dtype)
        candidates = mean[None] + std * noise  # (M, B, ...)
        if num_candidates == 1:
            return candidates[0], None
        flat = candidates.reshape((-1,) + x.shape[1:])
        denoised = jax.lax.cond(i < last, lambda c: denoise(c, s)[0], lambda c: c, flat)
        values = reward_fn(denoised).reshape(num_candidates, x.shape[0])
        logits = jnp.where(alpha > 0, values / jnp.where(alpha > 0, alpha, 1.0), values)
        sampled = jax.random.categorical(jax.random.fold_in(step_key, 1), logits, axis=0)
        chosen = jnp.where(alpha > 0, sampled, jnp.argmax(values, axis=0))  # (B,)
        return jnp.take_along_axis(candidates, chosen.reshape((1, -1) + (1,) * (x.ndim - 1)), axis=0)[0], None

    x, _ = jax.lax.scan(body, x, (jnp.arange(ts.shape[0] - 1), ts[:-1], ts[1:]))
    return x


def sample(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    x_T: ArrayLike,
    reward_fn: Callable[[jax.Array], jax.Array],
    *,
    timesteps: ArrayLike,
    key: jax.Array,
    num_candidates: int = 8,
    alpha: float = 0.0,
    eta: float = 1.0,
    prediction: str = "eps",
) -> jax.Array:
    """SVDD sampling towards high ``reward_fn``.

    Args:
      model_fn: as for ``diffax.sample``.
      schedule: the noise schedule.
      x_T: the start at ts[0].
      reward_fn: ``reward_fn(x0) -> (batch,)``, any (non-differentiable) score of clean samples.
      timesteps: the decreasing grid.
      key: the proposals' and the selection's randomness (the proposals as ``"ddim"`` draws them).
      num_candidates: M proposals per interval (M - 1 more evaluations per interval for the values).
      alpha: the temperature of the selection (0: greedy).
      eta: DDIM's noise level of the proposal (1: DDPM's ancestral step).
      prediction: what the model predicts.

    Returns:
      The samples at ts[-1].
    """
    if int(num_candidates) < 1 or not alpha >= 0:
        raise ValueError(f"need num_candidates >= 1 and alpha >= 0; got {num_candidates}, {alpha}.")
    x_T, ts = jnp.asarray(x_T), jnp.asarray(timesteps, jnp.float32)
    model_dynamic, model_static = split_callable(model_fn)
    reward_dynamic, reward_static = split_callable(reward_fn)
    return _run(
        model_dynamic,
        reward_dynamic,
        schedule,
        x_T,
        ts,
        key,
        jnp.float32(alpha),
        jnp.float32(eta),
        model_static=model_static,
        reward_static=reward_static,
        num_candidates=int(num_candidates),
        prediction=prediction,
    )
