"""Exact inversion: latents from which a sampler reproduces given data to rounding error, for editing.

- **Edit-friendly DDPM noise space** (Huberman-Spiegelglas et al. 2024): noisy states x_t = alpha_t x_0
  + sigma_t n_t are drawn *independently* at every grid time, and each interval's noise map is what
  makes DDIM(eta)'s ancestral step land on the next one: z = (x_s - mu(x_t)) / c, with mu and c the
  step's mean and noise scale. Sampling with (x_T, z) then returns x_0 by construction, for any
  model; sampling with another model (a changed condition, a guidance scale) along the same noise maps
  is the edit. Where c = 0 (the last interval onto sigma = 0, or eta = 0) the map holds the residual
  x_s - mu itself.
- **BDIA-DDIM** (Zhang et al. 2023): the update of ``samplers.bdia`` is affine in the older state, so
  the trajectory runs backwards exactly from its last two states, z_{i+1} = phi(z_i -> t_{i+1}) +
  (z_{i-1} - phi(z_i -> t_{i-1})) / gamma. The latent is the pair (z_N, z_{N-1}); the first backward
  interval, from the data alone, is a DDIM inversion step.

Both are jitted programs over ``lax.scan``/``lax.map``; the model is passed as for ``diffax.sample``.

References: Huberman-Spiegelglas, Kulikov & Michaeli 2024, "An Edit Friendly DDPM Noise Space:
Inversion and Manipulations" (CVPR), eq. 6 and Alg. 1; Zhang, Lewis & Kleijn 2023, "Exact Diffusion
Inversion via Bi-directional Integration Approximation", eq. 13-17.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.parameterization import check_prediction
from diffax.samplers._base import first_order_step, integrate, join_callable, make_denoiser, split_callable
from diffax.samplers.bdia import bdia
from diffax.samplers.ddpm_ddim import ddim_mean_std
from diffax.schedules import Schedule

__all__ = ["bdia_invert", "bdia_sample", "edit_friendly_invert", "edit_friendly_sample"]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _prepare(model_fn, x, timesteps, prediction, *, gamma: float | None = None):
    """Checks the arguments before anything compiles; returns (x, ts, model arrays, model static)."""
    check_prediction(prediction)
    x, ts = jnp.asarray(x), jnp.asarray(timesteps, jnp.float32)
    min_steps = 1 if gamma is None else 2
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating array of shape (batch, ...); got {x.dtype} {x.shape}.")
    if ts.ndim != 1 or ts.shape[0] < min_steps + 1:
        raise ValueError(
            f"timesteps must be a 1-D decreasing grid with at least {min_steps} intervals (see "
            f"diffax.timesteps); got shape {ts.shape}."
        )
    if gamma is not None and not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must lie in (0, 1]; got {gamma}.")
    return (x, ts, *split_callable(model_fn))


def _ancestral_mean_std(denoise, schedule, x, t, s, eta):
    x0, eps = denoise(x, t)[:2]
    return ddim_mean_std(schedule, x, x0, eps, t, s, eta=eta)


@functools.partial(jax.jit, static_argnames=("model_static", "prediction"))
def _edit_friendly_invert(model_dynamic, schedule, x0, ts, key, eta, *, model_static, prediction):
    denoise = make_denoiser(join_callable(model_dynamic, model_static), schedule, prediction=prediction)
    num_steps = ts.shape[0] - 1
    noise = jax.random.normal(key, (num_steps,) + x0.shape, x0.dtype)
    alpha = schedule.alpha(ts[:-1]).astype(x0.dtype).reshape((-1,) + (1,) * x0.ndim)
    sigma = schedule.sigma(ts[:-1]).astype(x0.dtype).reshape((-1,) + (1,) * x0.ndim)
    states = jnp.concatenate([alpha * x0[None] + sigma * noise, x0[None]])  # x at every grid time

    def noise_map(args):
        x_t, x_s, t, s = args
        mean, std = _ancestral_mean_std(denoise, schedule, x_t, t, s, eta)
        residual = x_s - mean
        return jnp.where(std > 0, residual / jnp.where(std > 0, std, 1.0), residual)

    maps = jax.lax.map(noise_map, (states[:-1], states[1:], ts[:-1], ts[1:]))
    return states[0], maps


@functools.partial(jax.jit, static_argnames=("model_static", "prediction"))
def _edit_friendly_sample(model_dynamic, schedule, x_T, maps, ts, eta, *, model_static, prediction):
    denoise = make_denoiser(join_callable(model_dynamic, model_static), schedule, prediction=prediction)

    def body(x, inputs):
        z, t, s = inputs
        mean, std = _ancestral_mean_std(denoise, schedule, x, t, s, eta)
        return mean + jnp.where(std > 0, std * z, z), None

    x, _ = jax.lax.scan(body, x_T, (maps, ts[:-1], ts[1:]))
    return x


def edit_friendly_invert(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: ArrayLike,
    *,
    timesteps: ArrayLike,
    key: jax.Array,
    prediction: str = "eps",
    eta: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """The edit-friendly noise space of ``x0``: (x_T, noise maps) that ``edit_friendly_sample``
    turns back into x0 exactly (to rounding) with the same model, grid and eta.

    Args:
      model_fn: ``model_fn(x, t) -> prediction``, as for ``diffax.sample``.
      schedule: the noise schedule.
      x0: the data, placed at ts[-1], shape (batch, ...).
      timesteps: the decreasing sampling grid (``diffax.timesteps``).
      key: draws the independent noisy states.
      prediction: what the model predicts.
      eta: DDIM's noise level (1: DDPM's ancestral step, the paper's choice).

    Returns:
      ``(x_T, maps)`` with maps of shape (num_steps,) + x0.shape, one per interval (Alg. 1).
    """
    x0, ts, dynamic, static = _prepare(model_fn, x0, timesteps, prediction)
    return _edit_friendly_invert(
        dynamic, schedule, x0, ts, key, jnp.float32(eta), model_static=static, prediction=prediction
    )


def edit_friendly_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: ArrayLike,
    maps: ArrayLike,
    *,
    timesteps: ArrayLike,
    prediction: str = "eps",
    eta: float = 1.0,
) -> jax.Array:
    """DDIM(eta) ancestral sampling with the given noise maps instead of fresh noise: x_s = mu(x_t) +
    c z (z itself where c = 0). With ``edit_friendly_invert``'s output and the same model it returns
    the inverted data; with another model it is the edit (Huberman-Spiegelglas et al. 2024, Sec. 4).

    Returns:
      The state at ts[-1], x_T's shape and dtype.
    """
    x_T, ts, dynamic, static = _prepare(model_fn, x_T, timesteps, prediction)
    maps = jnp.asarray(maps)
    if maps.shape != (ts.shape[0] - 1,) + x_T.shape:
        raise ValueError(
            f"maps must have shape (num_steps,) + x_T.shape = {(ts.shape[0] - 1,) + x_T.shape}; got "
            f"{maps.shape}."
        )
    return _edit_friendly_sample(
        dynamic,
        schedule,
        x_T,
        maps.astype(x_T.dtype),
        ts,
        jnp.float32(eta),
        model_static=static,
        prediction=prediction,
    )


@functools.partial(jax.jit, static_argnames=("model_static", "prediction", "gamma"))
def _bdia_invert(model_dynamic, schedule, x0, x1, ts, *, model_static, prediction, gamma):
    denoise = make_denoiser(join_callable(model_dynamic, model_static), schedule, prediction=prediction)
    rising = ts[::-1]  # t_0 (the data's time) < t_1 < ... < t_N
    if x1 is None:  # one DDIM inversion step from the data
        pred = denoise(x0, rising[0])
        x1 = first_order_step(schedule, pred[0], pred[1], rising[1])

    def body(carry, inputs):
        z_prev, z = carry  # states at t_{i-1}, t_i
        t_prev, t, t_next = inputs
        x0_hat, eps = denoise(z, t)[:2]
        forward = first_order_step(schedule, x0_hat, eps, t_next)
        backward = first_order_step(schedule, x0_hat, eps, t_prev)
        z_next = forward + (z_prev - backward) / jnp.asarray(gamma, z.dtype)
        return (z, z_next.astype(z.dtype)), None

    (z_last, z_top), _ = jax.lax.scan(body, (x0, x1), (rising[:-2], rising[1:-1], rising[2:]))
    return z_top, z_last


def bdia_invert(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: ArrayLike,
    *,
    timesteps: ArrayLike,
    prediction: str = "eps",
    gamma: float = 1.0,
    x1: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    """BDIA-DDIM's exact inversion of ``x0`` (at ts[-1]) to the pair (z_N at ts[0], z_{N-1} at ts[1]).

    Args:
      model_fn, schedule, prediction: as for ``diffax.sample``.
      x0: the data at ts[-1] (sigma > 0 there, as for ``diffax.invert``, unless ``x1`` is given).
      timesteps: the decreasing grid, at least 2 intervals.
      gamma: BDIA's weight in (0, 1], as for ``sampler="bdia"``.
      x1: the state at ts[-2]; default one DDIM inversion step from x0 (the only inexact step: the
        pair is exact for the trajectory through (x1, x0)).

    Returns:
      ``(z_N, z_{N-1})``, which ``bdia_sample`` maps back to x0 to rounding error.
    """
    x0, ts, dynamic, static = _prepare(model_fn, x0, timesteps, prediction, gamma=gamma)
    x1 = None if x1 is None else jnp.asarray(x1, x0.dtype)
    return _bdia_invert(
        dynamic, schedule, x0, x1, ts, model_static=static, prediction=prediction, gamma=float(gamma)
    )


@functools.partial(jax.jit, static_argnames=("model_static", "prediction", "gamma"))
def _bdia_sample(model_dynamic, schedule, z_top, z_next, ts, *, model_static, prediction, gamma):
    denoise = make_denoiser(join_callable(model_dynamic, model_static), schedule, prediction=prediction)
    sampler = bdia(gamma=gamma)
    state = (z_top, ts[0], jnp.ones((), bool))
    sampler = sampler._replace(init=lambda x: state)
    x, _ = integrate(sampler, denoise, schedule, z_next, ts[1:], None)
    return x


def bdia_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    z_top: ArrayLike,
    z_next: ArrayLike,
    *,
    timesteps: ArrayLike,
    prediction: str = "eps",
    gamma: float = 1.0,
) -> jax.Array:
    """BDIA-DDIM from the pair (z_N at ts[0], z_{N-1} at ts[1]) down to ts[-1]: the inverse of
    ``bdia_invert`` (with the same model, grid and gamma), or an edit along the pair with another model.

    Returns:
      The state at ts[-1].
    """
    z_top, ts, dynamic, static = _prepare(model_fn, z_top, timesteps, prediction, gamma=gamma)
    return _bdia_sample(
        dynamic,
        schedule,
        z_top,
        jnp.asarray(z_next, z_top.dtype),
        ts,
        model_static=static,
        prediction=prediction,
        gamma=float(gamma),
    )
