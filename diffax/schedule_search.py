"""Timestep search: the grid of a given NFE budget that brings a sampler closest to a high-NFE reference.

A candidate grid is parameterised by logits z (num_steps,): the log-SNR decreases from lambda(t_start)
to lambda(t_end) in increments softmax(z) times the range (z = 0 is the uniform-log-SNR grid). A
cross-entropy search keeps a Gaussian over z: each round draws ``population`` candidates, runs the
sampler for all of them at once (``vmap`` over the grids), scores each by the RMS distance of its samples
to the reference samples of the same starting noise, and refits the Gaussian to the best ``elite``.
The best grid seen is returned; it is meant to be judged on held-out noise. ``save`` writes it as an
``.npz`` that ``diffax.timesteps(..., spacing="file", path=...)`` reads back for any sampler.

References: Liu et al. 2024, "A Unified Sampling Framework for Solver Searching of Diffusion
Probabilistic Models" (ICLR), Sec. 4-5 (searching the timesteps of a solver schedule against a
reference); Tong et al. 2024, "Learning to Discretize Denoising Diffusion ODEs" (LD3; teacher-matched
timesteps); Sabour et al. 2024, "Align Your Steps"; Rubinstein 1999 (the cross-entropy method).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffax.samplers import sample, timesteps
from diffax.schedules import Schedule

__all__ = ["grid_from_logits", "search", "save"]


def grid_from_logits(schedule: Schedule, logits: jax.Array, t_start: float, t_end: float) -> jax.Array:
    """The decreasing grid whose log-SNR steps from lambda(t_start) to lambda(t_end) in increments
    proportional to softmax(logits) (zero logits: uniform in log-SNR)."""
    lam_start, lam_end = schedule.log_snr(jnp.float32(t_start)), schedule.log_snr(jnp.float32(t_end))
    fractions = jnp.concatenate([jnp.zeros(1), jnp.cumsum(jax.nn.softmax(logits))])
    ts = schedule.t_from_log_snr(lam_start + fractions * (lam_end - lam_start)).astype(jnp.float32)
    return ts.at[0].set(t_start).at[-1].set(t_end)


def search(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    x_T: jax.Array,
    reference: jax.Array,
    *,
    sampler: str,
    num_steps: int,
    key: jax.Array,
    t_start: float | None = None,
    t_end: float | None = None,
    population: int = 32,
    elite: int = 6,
    rounds: int = 12,
    init_std: float = 0.5,
    prediction: str = "eps",
    **sampler_kwargs: Any,
) -> tuple[jax.Array, dict[str, float]]:
    """Searches a ``num_steps`` grid for ``sampler`` that maps ``x_T`` closest to ``reference``.

    Args:
      model_fn: as for ``diffax.sample``.
      schedule: the noise schedule.
      x_T: starting noise (the search's training seeds).
      reference: the samples a high-NFE solve makes from ``x_T`` (the teacher).
      sampler: a deterministic sampler name.
      num_steps: the grid's intervals.
      key: the search's randomness.
      t_start, t_end: the grid's ends (``diffax.timesteps``' defaults).
      population, elite, rounds, init_std: the cross-entropy search.
      prediction: what the model predicts.
      **sampler_kwargs: the sampler's options.

    Returns:
      ``(ts, info)``: the best grid and ``{"error": its training error, "uniform_error": the
      uniform-log-SNR grid's}``.
    """
    if not 0 < elite <= population:
        raise ValueError(f"need 0 < elite <= population; got elite={elite}, population={population}.")
    uniform = timesteps(schedule, num_steps=num_steps, t_start=t_start, t_end=t_end)
    t_start, t_end = float(uniform[0]), float(uniform[-1])
    reference = jnp.asarray(reference, x_T.dtype)

    def error(logits):
        ts = grid_from_logits(schedule, logits, t_start, t_end)
        x = sample(
            model_fn, schedule, x_T, sampler=sampler, timesteps=ts, prediction=prediction, **sampler_kwargs
        )
        return jnp.sqrt(jnp.mean(jnp.square(x - reference)))

    errors_of = jax.jit(jax.vmap(error))
    mean, std = jnp.zeros(num_steps), jnp.full(num_steps, init_std)
    best_logits = mean
    best = float(errors_of(mean[None])[0])
    uniform_error = best
    for r in range(rounds):
        noise = jax.random.normal(jax.random.fold_in(key, r), (population, num_steps))
        candidates = mean[None] + std[None] * noise
        errors = np.asarray(errors_of(candidates))
        errors = np.where(np.isfinite(errors), errors, np.inf)
        order = np.argsort(errors)
        if errors[order[0]] < best:
            best, best_logits = float(errors[order[0]]), candidates[order[0]]
        chosen = candidates[order[:elite]]
        mean, std = jnp.mean(chosen, axis=0), jnp.std(chosen, axis=0) + 0.02
    return grid_from_logits(schedule, best_logits, t_start, t_end), {
        "error": best,
        "uniform_error": uniform_error,
    }


def save(path: str, ts: jax.Array) -> None:
    """Writes a grid for ``diffax.timesteps(..., spacing="file", path=path)`` (``.npz``, no pickle)."""
    with open(path, "wb") as f:
        np.savez(f, timesteps=np.asarray(ts, np.float32))
