"""The sampler skeleton: every fixed-step sampler is a pure ``(init, step)`` pair; one ``lax.scan`` drives
all of them.

A step maps the state at time ``t`` to the state at the next (smaller) time ``s`` of the grid ``ts``. It
sees the network only through a *denoiser* ``denoise(x, t) -> (x0, eps)`` that has already converted the
model's prediction (any of ``diffax.PREDICTIONS``) into the pair (x_0, eps), so one implementation serves
every parameterization. Steps are pure: ``step(denoise, schedule, x, state, i, t, s, key) ->
(x_s, state, nfe)`` where ``state`` is the solver's memory (history of model outputs for multistep
methods, ``()`` otherwise), ``i`` the interval index, ``key`` a per-interval PRNG key (``None`` for
deterministic runs) and ``nfe`` the number of model evaluations the step spent (an int32 scalar).

References: Kidger 2021, "On Neural Differential Equations" (the init/step solver design of diffrax);
Song et al. 2021, "Score-Based Generative Modeling through SDEs", Sec. 4 (the reverse-time samplers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffax.parameterization import to_x0_eps
from diffax.samplers._timesteps import default_edges
from diffax.schedules import Schedule

__all__ = [
    "Denoiser",
    "Sampler",
    "dynamic_threshold",
    "first_order_step",
    "half_log_snr",
    "integrate",
    "make_denoiser",
    "normal_like",
    "push_history",
    "split_callable",
    "stateless",
    "join_callable",
]

Denoiser = Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]]
Step = Callable[..., tuple[jax.Array, Any, jax.Array]]


class Sampler(NamedTuple):
    """A fixed-step sampler: a pure ``init``/``step`` pair and what it promises.

    Attributes:
      init: ``init(x_T) -> state``, the solver memory before the first step.
      step: ``step(denoise, schedule, x, state, i, t, s, key) -> (x_s, state, nfe)``.
      order: the convergence order in the step size (weak order for stochastic samplers).
      nfe_per_step: model evaluations per interval of ``ts``.
      stochastic: whether ``step`` draws noise (``key`` is then required).
      data_prediction: whether the update is written in the data prediction x_0 (dynamic
        thresholding applies to it).
      min_steps: the fewest intervals the method is defined for (its number of history points).
      learned_variance: whether the model returns a second half of channels, the variance
        interpolation v of Nichol & Dhariwal 2021 (eq. 15), which the denoiser passes on.
      warmup_nfe: evaluations beyond ``nfe_per_step`` per interval that a warm-up spends in the first
        intervals (PNDM's Runge-Kutta start).
    """

    init: Callable[[jax.Array], Any]
    step: Step
    order: int
    nfe_per_step: int
    stochastic: bool = False
    data_prediction: bool = False
    min_steps: int = 1
    learned_variance: bool = False
    warmup_nfe: int = 0


def stateless(step: Step, **properties: Any) -> Sampler:
    """A sampler without memory between steps."""
    return Sampler(init=lambda x: (), step=step, **properties)


def half_log_snr(schedule: Schedule, t: ArrayLike) -> jax.Array:
    """lambda(t) = log(alpha / sigma), the time variable of DPM-Solver (Lu et al. 2022, Sec. 3.1)."""
    return 0.5 * schedule.log_snr(t)


def push_history(history: jax.Array, value: jax.Array) -> jax.Array:
    """Prepends ``value`` to a fixed-length history (newest first), dropping the oldest entry."""
    return jnp.concatenate([value[None].astype(history.dtype), history[:-1]], axis=0)


def normal_like(key: jax.Array, x: jax.Array) -> jax.Array:
    """Standard normal noise of x's shape and dtype."""
    return jax.random.normal(key, x.shape, x.dtype)


def first_order_step(schedule: Schedule, x0: jax.Array, eps: jax.Array, s: jax.Array) -> jax.Array:
    """x_s = alpha_s x_0 + sigma_s eps: the deterministic DDIM step, which is also DPM-Solver-1,
    DPM-Solver++(1) and Euler in (x / alpha, sigma / alpha). It stays exact where sigma_s = 0.

    References: Song et al. 2021 (DDIM), eq. 12 with sigma = 0; Lu et al. 2022, eq. 3.7.
    """
    return schedule.alpha(s).astype(x0.dtype) * x0 + schedule.sigma(s).astype(x0.dtype) * eps


def dynamic_threshold(x0: ArrayLike, *, percentile: float = 0.995) -> jax.Array:
    """Imagen's dynamic thresholding of a data prediction.

    Per example, s = max(1, the ``percentile`` quantile of |x_0|); x_0 is clipped to [-s, s] and
    divided by s, pulling saturated pixels back into [-1, 1].

    Args:
      x0: data predictions, shape (batch, ...).
      percentile: the quantile in (0, 1].

    Returns:
      The thresholded prediction, of x0's shape.

    References: Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models...", Sec. 2.3.
    """
    x0 = jnp.asarray(x0)
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def make_denoiser(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    *,
    prediction: str,
    threshold: float | None = None,
    clip: bool = False,
    learned_variance: bool = False,
    epsilon_scale: float | None = None,
    time_shift: tuple[float, float] | None = None,
) -> Denoiser:
    """Wraps ``model_fn(x, t)`` into ``denoise(x, t) -> (x0, eps)`` for a scalar time ``t``.

    With ``threshold`` the data prediction is dynamically thresholded (with ``clip`` clipped to
    [-1, 1]) and eps recomputed from it as (x - alpha x_0) / sigma, so both stay consistent with x.
    With ``learned_variance`` the model returns twice x's last axis, [prediction, v], and the
    denoiser returns (x0, eps, v). With ``epsilon_scale``
    b the noise prediction is divided by b and x_0 recomputed from it, Epsilon Scaling against exposure
    bias (Ning et al. 2024, "Elucidating the Exposure Bias in Diffusion Models", eq. 14, constant
    lambda_t = b). With ``time_shift = (window, cutoff)`` the model is queried, per example and while
    t > cutoff, at the time tau of 9 in [t - window, t + window] whose noise variance sigma_tau^2 is
    closest to the example's variance, and x_0 is read at tau (the Time-Shift Sampler, Li et al. 2024,
    "Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps", Alg. 1-2).
    """

    def denoise(x: jax.Array, t: jax.Array) -> tuple[jax.Array, ...]:
        t_batch = jnp.full((x.shape[0],), t, dtype=jnp.result_type(t, jnp.float32))
        if time_shift is not None:
            t_batch = _shifted_times(schedule, x, t_batch, *time_shift)
        out = model_fn(x, t_batch)
        extra = ()
        if learned_variance:
            if out.shape[:-1] != x.shape[:-1] or out.shape[-1] != 2 * x.shape[-1]:
                raise ValueError(
                    f"variance='learned' needs model_fn to return x's shape with the last axis doubled "
                    f"({x.shape[:-1] + (2 * x.shape[-1],)}: prediction, then v); got {out.shape}."
                )
            out, v = jnp.split(out, 2, axis=-1)
            extra = (v,)
        x0, eps = to_x0_eps(schedule, out, x, t_batch, prediction=prediction)
        if epsilon_scale is not None:
            eps = eps / jnp.asarray(epsilon_scale, eps.dtype)
            x0 = (x - schedule.sigma(t).astype(x.dtype) * eps) / schedule.alpha(t).astype(x.dtype)
        if threshold is not None or clip:
            x0 = jnp.clip(x0, -1.0, 1.0) if clip else dynamic_threshold(x0, percentile=threshold)
            alpha, sigma = schedule.alpha(t).astype(x.dtype), schedule.sigma(t).astype(x.dtype)
            eps = (x - alpha * x0) / sigma
        return (x0, eps, *extra)

    return denoise


def _shifted_times(schedule: Schedule, x: jax.Array, t: jax.Array, window: float, cutoff: float) -> jax.Array:
    """Per example, the time in [t - window, t + window] (9 candidates, inside the default grid's range
    ``default_edges``: not up to a t_max where alpha = 0, where x_0 = (x - sigma eps) / alpha would blow
    up) whose sigma^2 is closest to the example's variance; t itself at or below ``cutoff``."""
    t_high, t_low = default_edges(schedule)
    candidates = t[:, None] + jnp.linspace(-window, window, 9, dtype=t.dtype)[None]
    candidates = jnp.clip(candidates, t_low, t_high)
    variance = jnp.var(x.reshape(x.shape[0], -1), axis=1)
    gap = jnp.abs(jnp.square(schedule.sigma(candidates)) - variance[:, None].astype(t.dtype))
    shifted = jnp.take_along_axis(candidates, jnp.argmin(gap, axis=1)[:, None], axis=1)[:, 0]
    return jnp.where(t > cutoff, shifted, t)


def integrate(
    sampler: Sampler,
    denoise: Denoiser,
    schedule: Schedule,
    x: jax.Array,
    ts: jax.Array,
    key: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Runs ``sampler`` over the intervals (ts[i], ts[i+1]) in one ``lax.scan``.

    Returns:
      ``(x, nfe)``: the state at ts[-1] and the number of model evaluations (int32 scalar).
    """
    num_steps = ts.shape[0] - 1

    def body(carry, inputs):
        x, state, nfe = carry
        i, t, s = inputs
        step_key = None if key is None else jax.random.fold_in(key, i)
        x_s, state_s, used = sampler.step(denoise, schedule, x, state, i, t, s, step_key)
        # float32 coefficients may promote low-precision states; the carry keeps its dtypes
        state_s = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), state_s, state)
        return (x_s.astype(x.dtype), state_s, nfe + used), None

    init = (x, sampler.init(x), jnp.zeros((), jnp.int32))
    (x, _, nfe), _ = jax.lax.scan(body, init, (jnp.arange(num_steps), ts[:-1], ts[1:]))
    return x, nfe


# ----------------------------------------------------------------------------------------------
# Callables as jit arguments: array leaves travel as arguments, the rest is static.


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


class _Static:
    """The non-array part of a callable pytree, hashable so that jit can cache on it. Leaves that are
    unhashable compare by identity."""

    def __init__(self, treedef: Any, leaves: tuple[Any, ...]):
        self.treedef, self.leaves = treedef, leaves

    def _key(self) -> tuple[Any, ...]:
        return (self.treedef,) + tuple(_hashable(leaf) for leaf in self.leaves)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and self._key() == other._key()


class _Identity:
    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj


def _hashable(leaf: Any) -> Any:
    try:
        hash(leaf)
    except TypeError:
        return _Identity(leaf)
    return leaf


def split_callable(fn: Any) -> tuple[list[Any], _Static]:
    """Splits a callable pytree (e.g. ``jax.tree_util.Partial(apply, params)``) into its array leaves,
    passed to jit as arguments, and a hashable static rest. A plain function is all static."""
    leaves, treedef = jax.tree_util.tree_flatten(fn)
    dynamic = [leaf if _is_array(leaf) else None for leaf in leaves]
    static = tuple(None if _is_array(leaf) else leaf for leaf in leaves)
    return dynamic, _Static(treedef, static)


def join_callable(dynamic: list[Any], static: _Static) -> Any:
    """The inverse of ``split_callable``."""
    leaves = [d if s is None else s for d, s in zip(dynamic, static.leaves, strict=True)]
    return jax.tree_util.tree_unflatten(static.treedef, leaves)
