"""Superposition of diffusion models (SuperDiff): sampling from the mixture (OR) or the equal-density
AND of models, with each model's log-density tracked along the trajectory by the Itô density estimator.

Along the reverse SDE dx = (f x - g^2 s) dt + g dW (dt < 0) driven by the mixed score s = sum_i kappa_i
s_i, the log-density of model i changes by (the Laplacian terms of Fokker-Planck and Itô's lemma cancel)

  d log q_i(x_t) = <s_i, dx> + (-div f - <f x, s_i> + g^2 / 2 |s_i|^2) dt,

no divergence of a network needed (div f = f D is the same for every model and dropped). OR:
kappa = softmax(log w_i + log q_i); AND (two models): kappa solves d log q_1 = d log q_2 (linear in
kappa), with the current gap ell_1 - ell_2 added so the densities stay equal. A model superposed with
itself is that model, whatever kappa.

References: Skreta, Atanackovic, Bose, Tong & Neklyudov 2025, "The Superposition of Diffusion Models
Using the Itô Density Estimator" (ICLR), Thm. 1 (the estimator), Prop. 3-4 and Alg. 1 (OR, AND).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.samplers._base import join_callable, make_denoiser, split_callable
from diffax.schedules import Schedule

__all__ = ["sample", "MODES"]

MODES = ("or", "and")


def _sum(v: jax.Array) -> jax.Array:
    return jnp.sum(v.reshape(v.shape[0], -1), axis=1)


def _per_example(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


@functools.partial(jax.jit, static_argnames=("statics", "mode", "prediction"))
def _run(dynamics, schedule, x, ts, key, log_weights, *, statics, mode, prediction):
    denoisers = [
        make_denoiser(join_callable(d, s), schedule, prediction=prediction)
        for d, s in zip(dynamics, statics, strict=True)
    ]

    def body(carry, inputs):
        x, ell = carry  # ell: (B, M) log-densities up to a shared constant
        i, t, s = inputs
        scores = jnp.stack([-d(x, t)[1] / schedule.sigma(t).astype(x.dtype) for d in denoisers])
        f, g2 = schedule.drift(t).astype(x.dtype), schedule.diffusion_sq(t).astype(x.dtype)
        dt = (s - t).astype(x.dtype)
        noise = jnp.sqrt(-g2 * dt) * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        # d ell_i = <s_i, dx> + c_i dt with c_i = -<f x, s_i> + g^2/2 |s_i|^2
        c = jnp.stack([_sum(-f * x * sc + 0.5 * g2 * jnp.square(sc)) for sc in scores], axis=1)
        if mode == "or":
            kappa = jax.nn.softmax(log_weights[None] + ell, axis=1)  # (B, M)
        else:
            diff = scores[0] - scores[1]
            base = (f * x - g2 * scores[1]) * dt + noise  # dx at kappa = 0
            slope = _sum(diff * (-g2 * diff * dt))  # d(dx)/d kappa projected on s_1 - s_2
            gap = _sum(diff * base) + (c[:, 0] - c[:, 1]) * dt + ell[:, 0] - ell[:, 1]
            safe = jnp.where(slope != 0, slope, 1.0)
            k1 = jnp.where(slope != 0, -gap / safe, 0.5)
            kappa = jnp.stack([k1, 1.0 - k1], axis=1)
        score = sum(_per_example(kappa[:, m], x) * scores[m] for m in range(scores.shape[0]))
        dx = (f * x - g2 * score) * dt + noise
        ell = ell + jnp.stack([_sum(sc * dx) for sc in scores], axis=1) + c * dt
        return (x + dx, ell), None

    ell = jnp.zeros((x.shape[0], len(denoisers)), x.dtype)
    steps = jnp.arange(ts.shape[0] - 1)
    (x, ell), _ = jax.lax.scan(body, (x, ell), (steps, ts[:-1], ts[1:]))
    return x, ell


def sample(
    model_fns: Sequence[Callable[[jax.Array, jax.Array], jax.Array]],
    schedule: Schedule,
    x_T: ArrayLike,
    *,
    timesteps: ArrayLike,
    key: jax.Array,
    mode: str = "or",
    weights: ArrayLike | None = None,
    prediction: str = "eps",
) -> tuple[jax.Array, jax.Array]:
    """Euler-Maruyama on the reverse SDE with the superposed score of ``model_fns``.

    Args:
      model_fns: the models, each ``model_fn(x, t) -> prediction`` (as for ``diffax.sample``); two for
        ``mode="and"``.
      schedule: their common noise schedule.
      x_T: the start at ts[0] (their common prior).
      timesteps: the decreasing grid.
      key: the noise (drawn per interval as ``sampler="euler_maruyama"`` does).
      mode: ``"or"`` (the mixture with ``weights``) or ``"and"``.
      weights: the OR mixture weights (default equal).
      prediction: what the models predict.

    Returns:
      ``(x, log_q)``: the samples at ts[-1] and each model's tracked log-density, (batch, M), up to a
      constant shared by the models.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    if not model_fns or (mode == "and" and len(model_fns) != 2):
        raise ValueError(f"mode={mode!r} needs {'two models' if mode == 'and' else 'at least one model'}.")
    x_T, ts = jnp.asarray(x_T), jnp.asarray(timesteps, jnp.float32)
    weights = jnp.ones(len(model_fns)) if weights is None else jnp.asarray(weights)
    if weights.shape != (len(model_fns),) or not bool(jnp.all(weights > 0)):
        raise ValueError(f"weights must be {len(model_fns)} positive numbers; got {weights}.")
    parts = [split_callable(fn) for fn in model_fns]
    dynamics, statics = [p[0] for p in parts], tuple(p[1] for p in parts)
    log_weights = jnp.log(weights / jnp.sum(weights)).astype(x_T.dtype)
    return _run(
        dynamics, schedule, x_T, ts, key, log_weights, statics=statics, mode=mode, prediction=prediction
    )
