"""Samplers of categorical diffusion and of the autoregressive baseline: pure steps under one ``lax.scan``.

A diffusion sampler is a pure ``step(process, z, weights, t, s, key) -> z_s`` that moves tokens ``z``
``(B, L)`` from time ``t`` to the earlier time ``s`` given the network's clean-token weights (``p̃(x_0 |
z_t)`` up to a constant factor per position); :func:`sample` runs the steps over a time grid in one
``lax.scan`` and counts the network evaluations it actually spends. With ``cache=True`` (a time-free
network only: RADD, MDLM without time conditioning) each sequence is evaluated on its own (a
``lax.map`` of ``lax.cond``), and its previous weights are reused, without calling the network,
whenever none of its tokens changed in the last step; the draws are then identical to the uncached
run's with the same key.

Categorical draws are Gumbel-argmax with the noise of 52-bit uniforms, both tails exact to float32
rounding (computed on the device, so the samplers export to TPU and GPU): 32-bit uniforms truncate the
Gumbel tail at about 16.6 and lower the effective temperature (Zheng et al. 2024, "Masked Diffusion
Models are Secretly Time-Agnostic Masked Models and Exploit Inaccurate Categorical Sampling", Sec. 4).

References:
  Austin et al. 2021 (D3PM), Sec. 3.3 (ancestral sampling with the x_0-parameterisation).
  Sahoo et al. 2024 (MDLM), eq. 7 and App. B.2 (``ddpm`` and ``ddpm_cache``).
  Lou et al. 2024 (SEDD), Sec. 4.1 (τ-leaping, Tweedie τ-leaping).
  Ou et al. 2024 (RADD), Sec. 3.2 and Alg. 1 (caching, E-NFE).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffax.discrete import processes
from diffax.discrete.losses import shift_right
from diffax.discrete.processes import D3PM, MaskedProcess

WeightsFn = Callable[[jax.Array, jax.Array], jax.Array]


def _gumbel_argmax(log_weights: jax.Array, bits: jax.Array) -> jax.Array:
    """``argmax(log w + g)`` with Gumbel noise ``g = -log(-log u)`` of the 52-bit uniform
    ``u = (k + 1/2) / 2^52`` the two 26-bit halves of ``bits`` spell, exact to float32 rounding in both
    tails: ``-log u`` comes from ``u`` where ``u < 1/2`` and from ``-log1p(-(1 - u))`` above, each side
    spelled from its own integer so that neither is rounded to 1 (float32 represents tiny numbers to
    full relative precision). Largest noise: ``-log(-log(1 - 2^-53)) ≈ 36.7``; with float32 uniforms
    it stops at about 16.6."""
    hi = (bits[..., 0] >> 6).astype(jnp.float32)
    lo = (bits[..., 1] >> 6).astype(jnp.float32)
    top = jnp.float32(2.0**26 - 1.0)

    def uniform(high, low):
        return (high * jnp.float32(2.0**26) + low + jnp.float32(0.5)) * jnp.float32(2.0**-52)

    u, one_minus_u = uniform(hi, lo), uniform(top - hi, top - lo)
    exponential = jnp.where(u < 0.5, -jnp.log(u), -jnp.log1p(-one_minus_u))  # -log u, > 0
    return jnp.argmax(log_weights - jnp.log(exponential), axis=-1).astype(jnp.int32)


def categorical_f64(key: jax.Array, weights: ArrayLike) -> jax.Array:
    """One index per row of non-negative ``weights`` ``(..., K)`` (any scale), by Gumbel-argmax with the
    tails of float64 Gumbel noise (52-bit uniforms), computed on the device in float32."""
    weights = jnp.asarray(weights, jnp.float32)
    bits = jax.random.bits(key, (*weights.shape, 2), jnp.uint32)
    return _gumbel_argmax(jnp.log(weights), bits)


def d3pm_ancestral_step(
    process: D3PM, z: jax.Array, weights: jax.Array, t: jax.Array, s: jax.Array, key: jax.Array
) -> jax.Array:
    """``x_s ~ p_θ(x_s | x_t) ∝ Σ_{x_0} q(x_s, x_t | x_0) p̃(x_0 | x_t)`` (Austin et al. Sec. 3.3)."""
    b = z.shape[0]
    probs = weights / weights.sum(-1, keepdims=True)
    logits = processes.d3pm_posterior_logits(process, probs, z, jnp.full((b,), s), jnp.full((b,), t))
    return categorical_f64(key, jnp.exp(logits - logits.max(-1, keepdims=True)))


def _unmask(
    process: MaskedProcess, z: jax.Array, move: jax.Array, stay: jax.Array, key: jax.Array
) -> jax.Array:
    """Masked positions go to token ``y`` with weight ``move_y`` or stay masked with weight ``stay``."""
    draw = categorical_f64(key, jnp.concatenate([move, jnp.broadcast_to(stay, move.shape[:-1] + (1,))], -1))
    return jnp.where(z == process.mask_index, draw, z).astype(jnp.int32)


def masked_ancestral_step(
    process: MaskedProcess, z: jax.Array, weights: jax.Array, t: jax.Array, s: jax.Array, key: jax.Array
) -> jax.Array:
    """Each masked token is revealed w.p. ``(α_s − α_t)/(1 − α_t)`` as a draw from ``p̃``, else stays masked.

    This is MDLM's ancestral ``ddpm`` update (Sahoo et al. eq. 7) and, for the absorbing process,
    SEDD's Tweedie τ-leaping and RADD's ``tweedie`` update: the exact reverse transition given the
    clean-token conditional.
    """
    a_t, a_s = process.alpha(t), process.alpha(s)
    p = weights / weights.sum(-1, keepdims=True)
    return _unmask(process, z, (a_s - a_t) / (1.0 - a_t) * p, (1.0 - a_s) / (1.0 - a_t), key)


def tau_leaping_step(
    process: MaskedProcess, z: jax.Array, weights: jax.Array, t: jax.Array, s: jax.Array, key: jax.Array
) -> jax.Array:
    """Euler τ-leaping: reveal ``y`` w.p. ``(t − s) σ'(t) s_θ(z_t)_y`` with ``s_θ = α_t/(1 − α_t) p̃``.

    The last step (``s = 0``) reveals every remaining token (SEDD's final denoiser). Lou et al. 2024,
    Sec. 4.1; Ou et al. 2024 ``euler``.
    """
    p = weights / weights.sum(-1, keepdims=True)
    rate = (t - s) * process.alpha_rate(t)  # σ'(t) α_t/(1 − α_t) = −α'_t/(1 − α_t), finite at α_t = 0
    move = jnp.minimum(rate, 1.0) * p
    stay = jnp.where(s > 0, jnp.maximum(1.0 - move.sum(-1, keepdims=True), 0.0), 0.0)
    return _unmask(process, z, move, stay, key)


SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    "d3pm_ancestral": d3pm_ancestral_step,
    "masked_ancestral": masked_ancestral_step,
    "tau_leaping": tau_leaping_step,
}
_PROCESS_OF = {"d3pm_ancestral": D3PM, "masked_ancestral": MaskedProcess, "tau_leaping": MaskedProcess}


def time_grid(process: D3PM | MaskedProcess, steps: int) -> jax.Array:
    """Times from the prior to the data, ``(steps + 1,)``: ``T .. 0`` integer (D3PM) or ``1 .. 0``."""
    if isinstance(process, D3PM):
        if not 1 <= steps <= process.num_steps:
            raise ValueError(
                f"steps={steps} must be in [1, {process.num_steps}] for a D3PM of T={process.num_steps}."
            )
        return jnp.asarray(np.round(np.linspace(process.num_steps, 0, steps + 1)).astype(np.int32))
    return jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32)


def prior_tokens(process: D3PM | MaskedProcess, shape: tuple[int, int], key: jax.Array) -> jax.Array:
    """``x_T``: all mask (absorbing, masked) or uniform tokens (D3PM uniform)."""
    if isinstance(process, D3PM) and process.kind == "uniform":
        return jax.random.randint(key, shape, 0, process.vocab_size, dtype=jnp.int32)
    return jnp.full(shape, process.mask_index, jnp.int32)


def sample(
    weights_fn: WeightsFn,
    process: D3PM | MaskedProcess,
    shape: tuple[int, int],
    *,
    sampler: str,
    steps: int,
    key: jax.Array,
    cache: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Draws token sequences by running ``sampler`` over ``steps`` intervals in one ``lax.scan``.

    Args:
      weights_fn: ``weights_fn(z, t) -> (B, L, K)`` non-negative clean-token weights.
      process: the forward process.
      shape: ``(B, L)``.
      sampler: a key of ``SAMPLERS``.
      steps: number of intervals.
      key: PRNG key.
      cache: reuse the last weights while no token has changed (only for a time-free ``weights_fn``).

    Returns:
      ``(tokens, info)``: int32 ``(B, L)`` and ``info["nfe"]``, the network evaluations spent per
      sequence (float32; with the cache, the mean over sequences: RADD's E-NFE).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown token sampler {sampler!r}; known: {', '.join(SAMPLERS)}.")
    if not isinstance(process, _PROCESS_OF[sampler]):
        raise ValueError(f"sampler {sampler!r} needs a {_PROCESS_OF[sampler].__name__} process.")
    step_fn = SAMPLERS[sampler]
    ts = time_grid(process, steps)
    prior_key, key = jax.random.split(key)
    z = prior_tokens(process, shape, prior_key)
    empty = jax.eval_shape(weights_fn, z, ts[0])

    def evaluate_changed(z, weights, fresh, t):
        """Per sequence: the cached weights if its tokens did not change, else a new evaluation."""

        def row(args):
            z_row, w_row, fresh_row = args
            return jax.lax.cond(fresh_row, lambda: w_row, lambda: weights_fn(z_row[None], t)[0])

        return jax.lax.map(row, (z, weights, fresh))

    def body(carry, inputs):
        z, weights, fresh, nfe = carry
        i, t, s = inputs
        if cache:  # `fresh[b]` says the cached weights of sequence b are those of its current tokens
            weights = evaluate_changed(z, weights, fresh, t)
            nfe = nfe + jnp.mean(jnp.where(fresh, 0.0, 1.0))
        else:
            weights, nfe = weights_fn(z, t), nfe + 1.0
        z_s = step_fn(process, z, weights, t, s, jax.random.fold_in(key, i))
        return (z_s, weights, jnp.all(z_s == z, axis=1), nfe), None

    b = shape[0]
    init = (z, jnp.zeros(empty.shape, empty.dtype), jnp.zeros((b,), bool), jnp.float32(0.0))
    (z, _, _, nfe), _ = jax.lax.scan(body, init, (jnp.arange(steps), ts[:-1], ts[1:]))
    return z, {"nfe": nfe}


def sample_autoregressive(
    logits_fn: Callable[[jax.Array], jax.Array], shape: tuple[int, int], *, bos: int, key: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Draws ``x_l ~ p_θ(x_l | x_{<l})`` left to right, one network evaluation per position, one ``lax.scan``.

    Args:
      logits_fn: ``logits_fn(inputs (B, L)) -> (B, L, V)``, a causal model on BOS-shifted inputs.
      shape: ``(B, L)``.
      bos: the BOS token.
      key: PRNG key.
    """
    b, length = shape

    def body(x, i):
        logits = logits_fn(shift_right(x, bos))
        row = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
        draw = categorical_f64(jax.random.fold_in(key, i), jax.nn.softmax(row))
        return jax.lax.dynamic_update_index_in_dim(x, draw, i, axis=1), None

    x, _ = jax.lax.scan(body, jnp.zeros(shape, jnp.int32), jnp.arange(length))
    return x, {"nfe": jnp.float32(length)}


def sample_entropy(tokens: ArrayLike, vocab_size: int) -> jax.Array:
    """Mean over sequences of the entropy (nats) of each sequence's token histogram (Zheng et al. 2024)."""
    tokens = jnp.asarray(tokens)
    counts = jax.nn.one_hot(tokens, vocab_size).sum(1)
    p = counts / tokens.shape[1]
    return jnp.mean(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1))


__all__ = [
    "SAMPLERS",
    "categorical_f64",
    "d3pm_ancestral_step",
    "masked_ancestral_step",
    "prior_tokens",
    "sample",
    "sample_autoregressive",
    "sample_entropy",
    "tau_leaping_step",
    "time_grid",
]
