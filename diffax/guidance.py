"""Guidance: steering a diffusion model towards a condition at sampling time.

Both constructors return a pure function ``guided(x, t, cond)`` of the same prediction type as the model
(bind ``cond`` with ``jax.tree_util.Partial(guided, cond=c)`` to get the ``model_fn(x, t)`` that
``diffax.sample`` takes; as a ``Partial`` the condition and the scale travel as runtime arguments).
Guidance is an affine combination of predictions at fixed (x, t), and every prediction type is affine
in eps there, so guiding eps, x_0, v or the score gives the same sampler.

References: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6; Dhariwal & Nichol 2021,
"Diffusion Models Beat GANs on Image Synthesis", Sec. 4 and Alg. 2; Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4 (guidance rescale).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.parameterization import check_prediction, from_x0_eps, to_x0_eps
from diffax.schedules import Schedule

__all__ = ["classifier_free", "classifier_guidance"]


def _per_example_std(v: jax.Array) -> jax.Array:
    flat = v.reshape(v.shape[0], -1)
    return jnp.std(flat, axis=1).reshape((-1,) + (1,) * (v.ndim - 1))


def _classifier_free(model_fn, x, t, cond, *, scale, null_cond, rescale):
    batch = x.shape[0]
    null = jax.tree_util.tree_map(lambda c, n: jnp.broadcast_to(n, c.shape).astype(c.dtype), cond, null_cond)
    both = jax.tree_util.tree_map(lambda c, n: jnp.concatenate([c, n]), cond, null)
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    cond_out, uncond_out = out[:batch], out[batch:]
    guided = uncond_out + scale * (cond_out - uncond_out)
    rescaled = guided * (_per_example_std(cond_out) / _per_example_std(guided))
    return jnp.where(rescale > 0, rescale * rescaled + (1.0 - rescale) * guided, guided)


def classifier_free(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    scale: ArrayLike,
    *,
    null_cond: Any,
    rescale: float = 0.0,
) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """Classifier-free guidance: uncond + scale (cond - uncond), both branches in one batched call.

    Args:
      model_fn: ``model_fn(x, t, cond)`` trained with condition dropout to ``null_cond``.
      scale: the guidance scale w (1: the conditional model, 0: the unconditional one; Ho & Salimans'
        (1 + w) convention is scale = 1 + w).
      null_cond: the null condition, a pytree like ``cond`` whose leaves broadcast to cond's (e.g. one
        null embedding for the whole batch).
      rescale: phi in [0, 1] of guidance rescale: the guided output is rescaled to the conditional
        output's per-example standard deviation and mixed in with weight phi (Lin et al. 2024, eq. 15-16).

    Returns:
      ``guided(x, t, cond)``, a ``jax.tree_util.Partial``.

    References: Ho & Salimans 2022, eq. 6; Lin et al. 2024, eq. 15-16.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must lie in [0, 1]; got {rescale}.")
    return jax.tree_util.Partial(
        _classifier_free, model_fn, scale=scale, null_cond=null_cond, rescale=rescale
    )


def _classifier_guidance(model_fn, log_prob_fn, x, t, cond, *, scale, schedule, prediction):
    pred = model_fn(x, t)
    x0, eps = to_x0_eps(schedule, pred, x, t, prediction=prediction)
    grad = jax.grad(lambda y: jnp.sum(log_prob_fn(y, t, cond)))(x)
    sigma = schedule.sigma(t).reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    eps = eps - scale * sigma * grad
    alpha = schedule.alpha(t).reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return from_x0_eps(schedule, (x - sigma * eps) / alpha, eps, t, prediction=prediction)


def classifier_guidance(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    log_prob_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    scale: ArrayLike,
    *,
    schedule: Schedule,
    prediction: str,
) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """Classifier guidance: eps <- eps - scale sigma_t grad_x log p(y | x_t), i.e. the score gains
    scale grad log p(y | x_t).

    With scale = 1 and the exact classifier this is the conditional model's prediction (Bayes' rule:
    grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t)).

    Args:
      model_fn: the unconditional ``model_fn(x, t)``.
      log_prob_fn: ``log_prob_fn(x_t, t, y) -> (batch,)``, the classifier's log p(y | x_t) (examples
        independent of each other).
      scale: the guidance scale s.
      schedule: the noise schedule (for sigma_t and the conversion).
      prediction: the model's prediction type; the guided function returns the same type.

    Returns:
      ``guided(x, t, cond)``, a ``jax.tree_util.Partial``.

    References: Dhariwal & Nichol 2021, Sec. 4.2 and Alg. 2 (eq. 14, eps-hat = eps - sqrt(1 - abar) s grad).
    """
    check_prediction(prediction)
    return jax.tree_util.Partial(
        _classifier_guidance,
        model_fn,
        log_prob_fn,
        scale=scale,
        schedule=schedule,
        prediction=prediction,
    )
