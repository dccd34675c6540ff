"""Exact log-likelihood of a diffusion model through its probability-flow ODE.

The ODE dx/dt = F(x, t) carries x_data at t_data to x_prior at t_prior, and the instantaneous change of
variables gives log p(x_data) = log p_prior(x_prior) + int_{t_data}^{t_prior} div F(x_t, t) dt. The
divergence is either exact (one Jacobian-vector product per dimension, for small data) or Hutchinson's
unbiased estimate z^T (dF/dx) z with a Rademacher or Gaussian probe z held fixed along the path.

References: Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. D.2 (eq. 39-40);
Chen et al. 2018 (Neural ODEs), Thm. 1; Grathwohl et al. 2019 (FFJORD), Sec. 3.1 (Hutchinson);
Ho et al. 2020, Sec. 3.3 and Theis et al. 2016 (uniform dequantization, bits/dim).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.parameterization import check_prediction
from diffax.samplers._base import join_callable, make_denoiser, split_callable
from diffax.samplers._timesteps import default_range
from diffax.samplers.ode import SOLVERS, probability_flow, solve_adaptive
from diffax.schedules import Schedule

__all__ = ["Likelihood", "log_likelihood", "TRACES", "NOISES"]

TRACES = ("hutchinson", "exact")
NOISES = ("rademacher", "gaussian")


class Likelihood(NamedTuple):
    """The result of ``log_likelihood``.

    Attributes:
      log_prob: (batch,) log-density in nats of the (dequantized) data under the model.
      bits_per_dim: (batch,) -log_prob / (D ln 2), plus (bits - 1) with dequantization of data in
        [-1, 1]: the discrete negative log-likelihood bound in bits per dimension.
      nfe: evaluations of the augmented field (each one Jacobian-vector product of the model, or D of
        them with the exact trace).
    """

    log_prob: jax.Array
    bits_per_dim: jax.Array
    nfe: jax.Array


class _Config(NamedTuple):
    prediction: str
    trace: str
    noise: str
    dequantize: int | None
    solver: str
    rtol: float
    atol: float
    max_steps: int


def _probe(key: jax.Array, shape: tuple[int, ...], dtype, noise: str) -> jax.Array:
    if noise == "rademacher":
        return jax.random.rademacher(key, shape, dtype)
    return jax.random.normal(key, shape, dtype)


@functools.partial(jax.jit, static_argnames=("model_static", "config"))
def _run(model_dynamic, schedule, x, key, t_data, t_prior, *, model_static, config: _Config):
    model_fn = join_callable(model_dynamic, model_static)
    drift = probability_flow(make_denoiser(model_fn, schedule, prediction=config.prediction), schedule)
    batch, dims = x.shape[0], math.prod(x.shape[1:])
    dequant_key, probe_key = jax.random.split(key)
    if config.dequantize:
        levels = 2**config.dequantize
        k = jnp.round((x + 1.0) / 2.0 * (levels - 1))
        x = 2.0 * (k + jax.random.uniform(dequant_key, x.shape, x.dtype)) / levels - 1.0

    if config.trace == "hutchinson":
        z = _probe(probe_key, x.shape, x.dtype, config.noise)

        def field(t, state):
            f, jz = jax.jvp(lambda y: drift(t, y), (state[0],), (z,))
            return f, jnp.sum((jz * z).reshape(batch, -1), axis=1)

    else:
        basis = jnp.eye(dims, dtype=x.dtype).reshape((dims,) + x.shape[1:])

        def field(t, state):
            column = lambda e: jax.jvp(lambda y: drift(t, y), (state[0],), (jnp.broadcast_to(e, x.shape),))
            f, columns = jax.vmap(column)(basis)
            return f[0], jnp.trace(columns.reshape(dims, batch, dims), axis1=0, axis2=2)

    state0 = (x, jnp.zeros((batch,), x.dtype))
    (x_prior, delta), info = solve_adaptive(
        field,
        state0,
        t_data,
        t_prior,
        solver=config.solver,
        rtol=config.rtol,
        atol=config.atol,
        max_steps=config.max_steps,
    )
    log_prob = schedule.prior_log_prob(x_prior) + delta
    bpd = -log_prob / (dims * math.log(2.0))
    if config.dequantize:
        bpd = bpd + (config.dequantize - 1)
    return Likelihood(log_prob, bpd, info["nfe"])


def log_likelihood(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    x0: ArrayLike,
    *,
    prediction: str = "eps",
    key: jax.Array | None = None,
    trace: str = "hutchinson",
    noise: str = "rademacher",
    dequantize: int | None = None,
    t_data: float | None = None,
    t_prior: float | None = None,
    solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
) -> Likelihood:
    """log p(x0) under the model's probability-flow ODE, and bits per dimension.

    Args:
      model_fn: ``model_fn(x, t) -> prediction`` (a callable pytree works as in ``diffax.sample``).
      schedule: the noise schedule.
      x0: data, shape (batch, ...). With ``dequantize`` it holds b-bit values scaled to [-1, 1]
        (k / (2^b - 1) * 2 - 1).
      prediction: what the model predicts.
      key: PRNG key for the Hutchinson probe and the dequantization noise (required by either).
      trace: ``"hutchinson"`` (one JVP per evaluation, unbiased) or ``"exact"`` (D JVPs).
      noise: the Hutchinson probe, ``"rademacher"`` or ``"gaussian"``.
      dequantize: None for continuous data, or b: x = 2 (k + u) / 2^b - 1, u ~ U[0, 1), and
        bits_per_dim gains b - 1 (the log of the bin width 2 / 2^b), so it bounds the discrete NLL.
      t_data: where the data sits; default the start of ``diffax.timesteps``' range (t_min, or 1e-3 of
        the range above it where sigma(t_min) = 0, the usual epsilon).
      t_prior: where the prior ``schedule.prior_log_prob`` is used; default ``t_max``.
      solver, rtol, atol, max_steps: the adaptive solver (see ``diffax.samplers.get("ode")``); a solve
        that runs out of steps gives NaN log-probabilities.

    Returns:
      A ``Likelihood`` (log_prob, bits_per_dim, nfe).

    References: Song et al. 2021, App. D.2; Grathwohl et al. 2019, Sec. 3.1.
    """
    check_prediction(prediction)
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {', '.join(TRACES)}; got {trace!r}.")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {', '.join(NOISES)}; got {noise!r}.")
    if solver not in SOLVERS:
        raise ValueError(f"Unknown ODE solver {solver!r}; known solvers: {', '.join(SOLVERS)}.")
    if dequantize is not None and (int(dequantize) != dequantize or not 1 <= dequantize <= 16):
        raise ValueError(f"dequantize must be None or a bit depth in 1..16; got {dequantize}.")
    x0 = jnp.asarray(x0)
    if x0.ndim < 2 or not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ValueError(f"x0 must be a floating array of shape (batch, ...); got {x0.dtype} {x0.shape}.")
    needs_key = trace == "hutchinson" or dequantize is not None
    if key is None:
        if needs_key:
            raise ValueError("the Hutchinson probe and dequantization need key=jax.random.key(seed).")
        key = jax.random.key(0)
    t_prior_default, t_data_default = default_range(schedule, None, None)
    t_data = t_data_default if t_data is None else float(t_data)
    t_prior = t_prior_default if t_prior is None else float(t_prior)
    schedule.check_t(jnp.array([t_data, t_prior]), name="t_data/t_prior")
    if not t_prior > t_data or not float(schedule.sigma(t_data)) > 0:
        raise ValueError(
            f"need t_prior > t_data with sigma(t_data) > 0; got t_data={t_data:g}, t_prior={t_prior:g}."
        )
    config = _Config(
        prediction, trace, noise, None if dequantize is None else int(dequantize), solver,
        float(rtol), float(atol), int(max_steps),
    )  # fmt: skip
    model_dynamic, model_static = split_callable(model_fn)
    return _run(
        model_dynamic,
        schedule,
        x0,
        key,
        jnp.float32(t_data),
        jnp.float32(t_prior),
        model_static=model_static,
        config=config,
    )
