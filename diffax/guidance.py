"""Guidance: steering a diffusion model towards a condition at sampling time.

Both constructors return a pure function ``guided(x, t, cond)`` of the same prediction type as the model
(bind ``cond`` with ``jax.tree_util.Partial(guided, cond=c)`` to get the ``model_fn(x, t)`` that
``diffax.sample`` takes; as a ``Partial`` the condition and the scale travel as runtime arguments).
Guidance is an affine combination of predictions at fixed (x, t), and every prediction type is affine
in eps there, so guiding eps, x_0, v or the score gives the same sampler.

References: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", eq. 6; Dhariwal & Nichol 2021,
"Diffusion Models Beat GANs on Image Synthesis", Sec. 4 and Alg. 2; Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4 (guidance rescale); Kynkäänniemi et
al. 2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality"; Castillo
et al. 2023, "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models", Sec. 4;
Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance", eq. 9-10.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.models.layers import Attention
from diffax.parameterization import check_prediction, from_x0_eps, to_x0_eps
from diffax.schedules import Schedule

__all__ = [
    "adaptive",
    "attention_layers",
    "classifier_free",
    "classifier_guidance",
    "perturbed_attention",
]


def _per_example_std(v: jax.Array) -> jax.Array:
    flat = v.reshape(v.shape[0], -1)
    return jnp.std(flat, axis=1).reshape((-1,) + (1,) * (v.ndim - 1))


def _both_branches(model_fn, x, t, cond, null_cond):
    """(conditional, unconditional) outputs from one batched call."""
    batch = x.shape[0]
    null = jax.tree_util.tree_map(lambda c, n: jnp.broadcast_to(n, c.shape).astype(c.dtype), cond, null_cond)
    both = jax.tree_util.tree_map(lambda c, n: jnp.concatenate([c, n]), cond, null)
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    return out[:batch], out[batch:]


def _classifier_free(model_fn, x, t, cond, *, scale, null_cond, rescale, interval, channels=None):
    def guide():
        cond_out, uncond_out = _both_branches(model_fn, x, t, cond, null_cond)
        guided = uncond_out + scale * (cond_out - uncond_out)
        if channels is not None:  # a mask, not a slice: ``channels`` travels as a runtime argument
            guided = jnp.where(jnp.arange(guided.shape[-1]) < channels, guided, cond_out)
        rescaled = guided * (_per_example_std(cond_out) / _per_example_std(guided))
        guided = jnp.where(rescale > 0, rescale * rescaled + (1.0 - rescale) * guided, guided)
        if interval is None:
            return guided
        return jnp.where(_inside(t, interval, x.ndim), guided, cond_out)

    if interval is None:
        return guide()
    # outside the interval only the conditional branch runs (half the evaluations)
    inside = (t >= interval[0]) & (t <= interval[1])
    return jax.lax.cond(
        jnp.any(inside), lambda: guide().astype(x.dtype), lambda: model_fn(x, t, cond).astype(x.dtype)
    )


def _inside(t, interval, ndim):
    return ((t >= interval[0]) & (t <= interval[1])).reshape((-1,) + (1,) * (ndim - 1))


def classifier_free(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    scale: ArrayLike,
    *,
    null_cond: Any,
    rescale: float = 0.0,
    interval: tuple[float, float] | None = None,
    channels: int | None = None,
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
      interval: guidance only at times t_lo <= t <= t_hi, the conditional model elsewhere (Kynkäänniemi
        et al. 2024); a call with no time inside evaluates the conditional branch alone.
      channels: guide only the output's first ``channels`` channels; the rest (e.g. a learned
        variance) are the conditional branch's. DiT's published samples guide 3 of 4 latent
        channels (Peebles & Xie 2023, ``models.py::forward_with_cfg``). None: every channel.

    Returns:
      ``guided(x, t, cond)``, a ``jax.tree_util.Partial``.

    References: Ho & Salimans 2022, eq. 6; Lin et al. 2024, eq. 15-16; Kynkäänniemi et al. 2024, eq. 2.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must lie in [0, 1]; got {rescale}.")
    if interval is not None and not (len(interval) == 2 and interval[0] <= interval[1]):
        raise ValueError(f"interval must be (t_lo, t_hi) with t_lo <= t_hi; got {interval}.")
    return jax.tree_util.Partial(
        _classifier_free,
        model_fn,
        scale=scale,
        null_cond=null_cond,
        rescale=rescale,
        interval=interval,
        channels=channels,
    )


def _adaptive(model_fn, x, t, cond, *, scale, null_cond, threshold):
    cond_out, uncond_out = _both_branches(model_fn, x, t, cond, null_cond)
    flat_c, flat_u = cond_out.reshape(x.shape[0], -1), uncond_out.reshape(x.shape[0], -1)
    cosine = jnp.sum(flat_c * flat_u, axis=1) / (
        jnp.linalg.norm(flat_c, axis=1) * jnp.linalg.norm(flat_u, axis=1) + jnp.finfo(x.dtype).tiny
    )
    guided = uncond_out + scale * (cond_out - uncond_out)
    agree = (cosine > threshold).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(agree, cond_out, guided)


def adaptive(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    scale: ArrayLike,
    *,
    null_cond: Any,
    threshold: float = 0.991,
) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """Adaptive guidance: classifier-free guidance, replaced by the conditional prediction for the
    examples whose two branches agree, cosine(cond, uncond) > ``threshold`` (the paper's gamma-bar).

    diffax's ``model_fn(x, t)`` is stateless, so the decision is taken afresh at every call from both
    branches; the evaluations AG saves once the branches agree are saved by ``classifier_free``'s
    ``interval``, set to the time at which the switch happens (Castillo et al. 2023 find it stable
    across prompts). At scale 1 this is the conditional model.

    Args:
      model_fn, scale, null_cond: as for ``classifier_free``.
      threshold: the cosine similarity above which guidance stops.

    Returns:
      ``guided(x, t, cond)``, a ``jax.tree_util.Partial``.

    References: Castillo et al. 2023, Sec. 4 (eq. for gamma_t, the AG policy).
    """
    return jax.tree_util.Partial(_adaptive, model_fn, scale=scale, null_cond=null_cond, threshold=threshold)


def _identity_attention_in(paths: frozenset[str]):
    """A Flax interceptor that gives the self-attention layers at ``paths`` the identity map."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, Attention) and context.method_name == "__call__":
            if "/".join(module.path) in paths:
                kwargs = dict(kwargs, identity_map=True)
        return next_fun(*args, **kwargs)

    return interceptor


def attention_layers(model_fn: Callable[..., jax.Array], *args: Any) -> list[str]:
    """The paths ("block/self_attn") of the ``layers.Attention`` modules a call ``model_fn(*args)``
    runs, for ``perturbed_attention``'s ``layers`` (found by tracing, no evaluation)."""
    seen: list[str] = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Attention) and context.method_name == "__call__":
            seen.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model_fn, *args)
    return list(dict.fromkeys(seen))


def _perturbed_attention(model_fn, x, t, cond, *, scale, layers):
    out = model_fn(x, t, cond)
    with nn.intercept_methods(_identity_attention_in(layers)):
        perturbed = model_fn(x, t, cond)
    return out + scale * (out - perturbed)


def perturbed_attention(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    scale: ArrayLike,
    *,
    layers: tuple[str, ...] | list[str],
) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """Perturbed-attention guidance: out + scale (out - out_perturbed), where the perturbed call
    replaces the self-attention map of the chosen layers by the identity.

    Works with any ``model_fn(x, t, cond)`` that calls a Flax module (U-Net, DiT) built from
    ``diffax.models.layers.Attention``; conditional or not (pass ``cond=None``). With no layers it is the
    model itself.

    Args:
      model_fn: ``model_fn(x, t, cond)``, calling ``module.apply`` inside.
      scale: the PAG scale s.
      layers: module paths of the perturbed self-attention layers (``attention_layers`` lists them).

    Returns:
      ``guided(x, t, cond)``, a ``jax.tree_util.Partial``.

    References: Ahn et al. 2024, eq. 9-10 (identity attention map, guidance away from it).
    """
    return jax.tree_util.Partial(_perturbed_attention, model_fn, scale=scale, layers=frozenset(layers))


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
