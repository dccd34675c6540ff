"""``sample`` and ``invert``: validate in Python, then run one jitted program."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffax.parameterization import check_prediction
from diffax.samplers._base import integrate, join_callable, make_denoiser, split_callable
from diffax.samplers._registry import get
from diffax.samplers.ode import AdaptiveSampler
from diffax.schedules import Schedule

__all__ = ["sample", "invert"]


class _Config(NamedTuple):
    """Everything static about a run; part of the jit cache key."""

    sampler: str
    options: tuple[tuple[str, Any], ...]
    prediction: str
    threshold: float | None
    denoise_final: bool
    inverse: bool
    epsilon_scale: float | None = None
    time_shift: tuple[float, float] | None = None
    clip: bool = False


@functools.partial(jax.jit, static_argnames=("model_static", "config"))
def _run(model_dynamic, schedule, x, ts, key, *, model_static, config: _Config):
    model_fn = join_callable(model_dynamic, model_static)
    dtype = x.dtype
    sampler = get(config.sampler, **dict(config.options))
    denoise = make_denoiser(
        model_fn,
        schedule,
        prediction=config.prediction,
        threshold=config.threshold,
        clip=config.clip,
        learned_variance=getattr(sampler, "learned_variance", False),
        epsilon_scale=config.epsilon_scale,
        time_shift=config.time_shift,
    )
    if config.inverse:
        ts = ts[::-1]
    if isinstance(sampler, AdaptiveSampler):
        x, info = sampler.solve(denoise, schedule, x, ts[0], ts[-1])
    else:
        x, nfe = integrate(sampler, denoise, schedule, x, ts, key)
        info = {"nfe": nfe}
    if config.denoise_final:
        x = denoise(x, ts[-1])[0]
        info["nfe"] = info["nfe"] + 1
    return x.astype(dtype), info


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _execute(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    x: ArrayLike,
    ts: ArrayLike,
    key: jax.Array | None,
    *,
    name: str,
    options: dict[str, Any],
    prediction: str,
    threshold: float | None,
    denoise_final: bool,
    inverse: bool,
    return_info: bool,
    epsilon_scale: float | None = None,
    time_shift: tuple[float, float] | None = None,
    clip: bool = False,
):
    """Checks every argument before anything compiles, then runs the compiled program."""
    sampler = get(name, **options)
    check_prediction(prediction)
    x, ts = jnp.asarray(x), jnp.asarray(ts)
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating array of shape (batch, ...); got {x.dtype} {x.shape}.")
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(
            f"timesteps must be a 1-D array of num_steps + 1 >= 2 times (see diffax.timesteps); got shape "
            f"{ts.shape}."
        )
    ts = ts.astype(jnp.float32)
    num_steps = ts.shape[0] - 1
    if num_steps < sampler.min_steps:
        raise ValueError(
            f"Sampler {name!r} is a {sampler.min_steps}-step multistep method and needs at least "
            f"{sampler.min_steps} intervals; got timesteps with {num_steps}: use more steps."
        )
    if sampler.stochastic:
        if inverse:
            raise ValueError(f"Sampler {name!r} is stochastic; inversion needs a deterministic one.")
        if key is None:
            raise ValueError(f"Sampler {name!r} is stochastic: pass key=jax.random.key(seed).")
    else:
        key = None
    if (threshold is not None or clip) and not sampler.data_prediction:
        raise ValueError(
            f"thresholding and clip_denoised apply to data-prediction samplers; {name!r} is not one (use "
            "e.g. 'dpm_solver++_2m', 'ddim', 'unipc')."
        )
    if threshold is not None:
        if clip:
            raise ValueError("thresholding and clip_denoised both bound the data prediction; choose one.")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"thresholding is a percentile in (0, 1]; got {threshold}.")
    if epsilon_scale is not None and not float(epsilon_scale) > 0:
        raise ValueError(f"epsilon_scale must be > 0 (about 1.00-1.02); got {epsilon_scale}.")
    if time_shift is not None:
        if len(time_shift) != 2 or not 0 < float(time_shift[0]) < float(time_shift[1]):
            raise ValueError(
                f"time_shift must be (window, cutoff) with 0 < window < cutoff; got {time_shift}."
            )
        time_shift = (float(time_shift[0]), float(time_shift[1]))
    if _concrete(ts):
        _check_grid(
            schedule,
            np.asarray(ts),
            last_needs_noise=inverse or denoise_final or isinstance(sampler, AdaptiveSampler),
        )
    config = _Config(
        name,
        tuple(sorted(options.items())),
        prediction,
        threshold,
        bool(denoise_final),
        inverse,
        None if epsilon_scale is None else float(epsilon_scale),
        time_shift,
        bool(clip),
    )
    model_dynamic, model_static = split_callable(model_fn)
    x, info = _run(model_dynamic, schedule, x, ts, key, model_static=model_static, config=config)
    return (x, info) if return_info else x


@jax.jit
def _alpha_sigma(schedule: Schedule, ts: jax.Array) -> tuple[jax.Array, jax.Array]:
    return schedule.alpha(ts), schedule.sigma(ts)


def _check_grid(schedule: Schedule, ts: np.ndarray, *, last_needs_noise: bool) -> None:
    if not np.all(np.isfinite(ts)):
        raise ValueError("timesteps must be finite.")
    if not np.all(np.diff(ts) < 0):
        raise ValueError(f"timesteps must be strictly decreasing (t_start first); got {ts}.")
    schedule.check_t(ts, name="timesteps")
    evaluated = ts if last_needs_noise else ts[:-1]
    with jax.ensure_compile_time_eval():  # a host check, also when sample runs inside a jit trace
        alpha, sigma = (np.asarray(v) for v in _alpha_sigma(schedule, evaluated))
    if not (np.all(alpha > 0) and np.all(sigma > 0)):
        bad = evaluated[(alpha <= 0) | (sigma <= 0)]
        raise ValueError(
            f"the model is evaluated at times {bad} where alpha or sigma is 0 (infinite log-SNR); keep "
            "evaluation times inside the schedule's range (diffax.timesteps' defaults do). Only the last "
            "time may reach sigma = 0, and not with 'ode', denoise_final=True or inversion."
        )


def sample(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    x_T: ArrayLike,
    *,
    sampler: str,
    timesteps: ArrayLike,
    prediction: str = "eps",
    key: jax.Array | None = None,
    return_info: bool = False,
    denoise_final: bool = False,
    thresholding: float | None = None,
    epsilon_scale: float | None = None,
    time_shift: tuple[float, float] | None = None,
    clip_denoised: bool = False,
    **sampler_kwargs: Any,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Integrates the reverse process from ``x_T`` at ts[0] to ts[-1] in one jitted program.

    Args:
      model_fn: ``model_fn(x, t) -> prediction`` with x of shape (batch, ...) and t of shape (batch,).
        It may be a pytree such as ``jax.tree_util.Partial(apply, params)``: its array leaves are passed
        to the compiled program as arguments (new parameters do not recompile); other callables are
        static and keyed by identity, so build them once.
      schedule: the noise schedule.
      x_T: the starting point at ts[0], e.g. ``schedule.prior_sample(key, shape)``.
      sampler: a name from ``diffax.samplers.SAMPLERS``.
      timesteps: decreasing times, shape (num_steps + 1,) (see ``diffax.timesteps``).
      prediction: what the model predicts, one of ``diffax.PREDICTIONS``.
      key: PRNG key, required by stochastic samplers.
      return_info: also return ``info`` (``info["nfe"]``: the model evaluations used).
      denoise_final: finish with x_0 = the data prediction at ts[-1] (one more evaluation).
      thresholding: dynamic-thresholding percentile (Saharia et al. 2022) for data-prediction
        samplers, applied to every data prediction; None disables it.
      epsilon_scale: b of Epsilon Scaling (Ning et al. 2024) against exposure bias: every sampler sees
        eps / b and the matching x_0 (b slightly above 1, e.g. 1.005); None disables it.
      time_shift: ``(window, cutoff)`` of the Time-Shift Sampler (Li et al. 2024): above ``cutoff``
        the model is queried at the nearby time whose noise level matches each example's variance.
      clip_denoised: clip every data prediction to [-1, 1] instead (static thresholding, as DDPM's
        sampler does; Ho et al. 2020, Sec. 3.3 and its code): saturated pixels are cut without
        rescaling the others, so an exact -1 background stays -1.
      **sampler_kwargs: the sampler's options (e.g. ``eta`` for ``"ddim"``).

    Returns:
      The sample at ts[-1] (x's shape), and ``info`` if ``return_info``.

    Raises:
      ValueError: for an unknown sampler or option, an unsorted or ill-shaped grid, a grid with fewer
        intervals than a multistep method needs, a missing key, or a bad option.

    References: each sampler cites its paper (``diffax.samplers.get(name)``'s factory); the reverse
    process is Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 6 and 13.
    """
    return _execute(
        model_fn,
        schedule,
        x_T,
        timesteps,
        key,
        name=sampler,
        options=sampler_kwargs,
        prediction=prediction,
        threshold=thresholding,
        clip=clip_denoised,
        denoise_final=denoise_final,
        inverse=False,
        return_info=return_info,
        epsilon_scale=epsilon_scale,
        time_shift=time_shift,
    )


def invert(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    x: ArrayLike,
    *,
    timesteps: ArrayLike,
    prediction: str = "eps",
    sampler: str = "ddim",
    return_info: bool = False,
    **sampler_kwargs: Any,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Deterministic inversion: integrates the probability-flow ODE forward from ts[-1] to ts[0].

    ``sample`` with the same sampler and grid maps the result back to ``x`` up to the discretisation
    error of both passes (exactly, as the steps shrink); DDIM inversion is Song et al. 2021 (DDIM),
    Sec. 5.4 / eq. 14; with ``sampler="ode"`` the adaptive solver does it to its tolerance.

    Args:
      model_fn: as for ``sample``.
      schedule: the noise schedule.
      x: the data (or noisy data) at ts[-1], which must have sigma > 0.
      timesteps: the decreasing grid, as for ``sample``; it is walked backwards.
      prediction: what the model predicts.
      sampler: any deterministic sampler name (``"ddim"``, ``"dpm_solver++_2m"``, ``"ode"``, ...).
      return_info: also return ``info``.
      **sampler_kwargs: the sampler's options.

    Returns:
      The latent at ts[0], and ``info`` if ``return_info``.
    """
    return _execute(
        model_fn,
        schedule,
        x,
        timesteps,
        None,
        name=sampler,
        options=sampler_kwargs,
        prediction=prediction,
        threshold=None,
        denoise_final=False,
        inverse=True,
        return_info=return_info,
    )
