"""Losses of categorical diffusion and of the autoregressive baseline, in nats per sequence.

Each ``*_terms`` function is deterministic given the noised sample (it is what the tests check against
closed forms); :func:`make_loss` draws the time and the noise and averages over the batch. Every loss
returns the per-sequence bound on ``−log p(x)`` in nats (its mean per token is the training loss), so
bits per character is ``bound / (L ln 2)``.

Networks are called as ``apply_fn(params, tokens (B, L) int32, t (B,) float32, key) -> logits``:
``(B, L, V)`` for the masked family and the AR model (data tokens only: SUBS's mask logit −∞),
``(B, L, K)`` for D3PM (Austin et al. 2021 predict every state).

References:
  Austin et al. 2021 (D3PM), eq. 1, 5 (L_vb) and Sec. 3.4 (L_λ = L_vb + λ·CE).
  Sahoo et al. 2024 (MDLM), eq. 10-11 (continuous NELBO, SUBS parameterisation, Sec. 3.2).
  Lou et al. 2024 (SEDD), eq. 8 and 16 (denoising score entropy, DWDSE bound), Sec. 3.3 (absorbing).
  Ou et al. 2024 (RADD), Theorem 1 (time-free conditional), eq. 13 (λ-DCE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.discrete import processes
from diffax.discrete.processes import D3PM, MaskedProcess

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]

LOSSES = ("d3pm_hybrid", "d3pm_vlb", "mdlm", "sedd", "radd_lambda_dce", "autoregressive")
# How the masked family draws z: "time" (t antithetic, each token masked w.p. t; MDLM, SEDD, RADD's
# λ-DCE) or "count" (k stratified over 1..L, exactly k masked, weight L/k: the same NELBO at ε = 0).
MASK_SAMPLING = ("time", "count")


def _token_nll(log_probs: jax.Array, x0: jax.Array) -> jax.Array:
    """``−log p(x0)`` per token: ``(B, L, V)``, ``(B, L)`` → ``(B, L)``."""
    return -jnp.take_along_axis(log_probs, x0[..., None], axis=-1)[..., 0]


def _categorical_kl(q_logits: jax.Array, p_logits: jax.Array) -> jax.Array:
    """``KL(q ‖ p)`` over the last axis (zero-probability states of ``q`` contribute 0)."""
    log_q, log_p = jax.nn.log_softmax(q_logits), jax.nn.log_softmax(p_logits)
    q = jnp.exp(log_q)
    return jnp.sum(jnp.where(q > 0, q * (log_q - log_p), 0.0), axis=-1)


def d3pm_terms(
    process: D3PM, logits: ArrayLike, x0: ArrayLike, x_t: ArrayLike, t: ArrayLike
) -> dict[str, jax.Array]:
    """The step-``t`` terms of D3PM's bound for one noised batch, per sequence (nats).

    Args:
      process: the D3PM process.
      logits: ``(B, L, K)`` network logits of ``p̃(x_0 | x_t)``.
      x0: ``(B, L)`` clean tokens.
      x_t: ``(B, L)`` tokens at step ``t`` (drawn from ``q(x_t | x_0)``).
      t: ``(B,)`` int steps in ``1 .. T``.

    Returns:
      ``vlb_t``: ``KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t))`` for ``t ≥ 2`` and the decoder
      ``−log p_θ(x_0 | x_1)`` for ``t = 1`` (Austin et al. eq. 5); ``ce``: ``−log p̃(x_0 | x_t)``;
      ``prior``: ``KL(q(x_T | x_0) ‖ π)``.
    """
    x0, t = jnp.asarray(x0), jnp.asarray(t)
    k = process.num_states
    s = t - 1
    log_p_tilde = jax.nn.log_softmax(logits)
    p_logits = processes.d3pm_posterior_logits(process, jnp.exp(log_p_tilde), x_t, s, t)
    q_logits = processes.d3pm_posterior_logits(process, jax.nn.one_hot(x0, k), x_t, s, t)
    kl = _categorical_kl(q_logits, p_logits)
    decoder = _token_nll(jax.nn.log_softmax(p_logits), x0)
    vlb_t = jnp.where((t == 1)[:, None], decoder, kl).sum(-1)
    last = jnp.full_like(t, process.num_steps)
    q_T = processes.d3pm_marginal(process, jax.nn.one_hot(x0, k), last)
    prior = _categorical_kl(jnp.log(q_T), jnp.log(process.stationary())[None, None]).sum(-1)
    return {"vlb_t": vlb_t, "ce": _token_nll(log_p_tilde, x0).sum(-1), "prior": prior}


def subs_log_probs(logits: ArrayLike) -> jax.Array:
    """SUBS's clean-token distribution over the ``V`` data tokens (the mask's logit is −∞ by omission).

    Carry-over of unmasked tokens happens where the distribution is used: the losses count masked
    positions only and the samplers keep unmasked tokens (Sahoo et al. 2024, Sec. 3.2).
    """
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))


def mdlm_terms(
    process: MaskedProcess, log_probs: ArrayLike, x0: ArrayLike, z_t: ArrayLike, t: ArrayLike
) -> jax.Array:
    """MDLM's continuous-time NELBO integrand at ``t``, per sequence: ``w(t) Σ_{masked} −log p_θ(x_0|z_t)``.

    ``w(t) = −α'_t / (1 − α_t)`` (``1/t`` for log-linear with ``ε = 0``); Sahoo et al. eq. 10.
    """
    masked = jnp.asarray(z_t) == process.mask_index
    nll = jnp.where(masked, _token_nll(jnp.asarray(log_probs), jnp.asarray(x0)), 0.0)
    return process.alpha_rate(t) * nll.sum(-1)


def sedd_log_score(
    process: MaskedProcess, logits: ArrayLike, t: ArrayLike, *, parameterization: str
) -> jax.Array:
    """``log s_θ(z_t)_{·, y}`` over the ``V`` data tokens for the absorbing score entropy.

    ``"sedd"``: the network's raw output minus ``log(e^σ − 1)`` (Lou et al. 2024, App. C.2);
    ``"radd"``: ``log(α_t/(1 − α_t)) + log p_θ(y | z_t^{UM})``, the time-free conditional times the
    analytic factor ``e^{−σ}/(1 − e^{−σ}) = 1/(e^σ − 1)`` (Ou et al. 2024, Theorem 1).
    """
    scale = -jnp.log(jnp.expm1(process.sigma(t)))[:, None, None]
    logits = jnp.asarray(logits, jnp.float32)
    if parameterization == "sedd":
        return logits + scale
    if parameterization == "radd":
        return subs_log_probs(logits) + scale
    raise ValueError(f"sedd_log_score: unknown parameterization {parameterization!r}; use 'sedd' or 'radd'.")


def score_entropy_terms(
    process: MaskedProcess, log_score: ArrayLike, x0: ArrayLike, z_t: ArrayLike, t: ArrayLike
) -> jax.Array:
    """SEDD's denoising score entropy for the absorbing process, weighted by ``σ'(t)``, per sequence.

    At a masked position with clean token ``x_0``: ``Σ_y s_y − r log s_{x_0} + K(r)``, with the ratio
    ``r = q(z_t with x_0 | x_0)/q(z_t | x_0) = 1/(e^σ − 1)`` and ``K(r) = r(log r − 1)``; unmasked
    positions contribute nothing (Lou et al. 2024, eq. 8, 16).
    """
    log_score, x0 = jnp.asarray(log_score), jnp.asarray(x0)
    masked = jnp.asarray(z_t) == process.mask_index
    sigma = process.sigma(t)[:, None]
    log_ratio = -jnp.log(jnp.expm1(sigma))
    ratio = jnp.exp(log_ratio)
    log_s_x0 = jnp.take_along_axis(log_score, x0[..., None], axis=-1)[..., 0]
    entropy = jnp.exp(log_score).sum(-1) - ratio * log_s_x0 + ratio * (log_ratio - 1.0)
    return process.sigma_rate(t) * jnp.where(masked, entropy, 0.0).sum(-1)


def lambda_dce_terms(
    log_probs: ArrayLike, x0: ArrayLike, z: ArrayLike, lam: ArrayLike, *, mask_index: int
) -> jax.Array:
    """RADD's λ-DCE integrand per sequence: ``(1/λ) Σ_{masked} −log c_θ(x_0 | z^{UM})``.

    Each token of ``z`` was masked with probability λ.

    The time-free network sees only ``z`` (Ou et al. 2024, eq. 13).
    """
    masked = jnp.asarray(z) == mask_index
    nll = jnp.where(masked, _token_nll(jnp.asarray(log_probs), jnp.asarray(x0)), 0.0)
    return nll.sum(-1) / jnp.asarray(lam)


def autoregressive_terms(logits: ArrayLike, x0: ArrayLike) -> jax.Array:
    """``Σ_l −log p_θ(x_l | x_{<l})`` per sequence from a causal model's logits ``(B, L, V)``."""
    return _token_nll(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)), jnp.asarray(x0)).sum(-1)


def shift_right(tokens: ArrayLike, bos: int) -> jax.Array:
    """``(B, L)`` → the causal model's input ``[bos, x_1, .., x_{L−1}]``."""
    tokens = jnp.asarray(tokens)
    return jnp.concatenate([jnp.full_like(tokens[:, :1], bos), tokens[:, :-1]], axis=1)


def counts_estimate_nelbo(process: D3PM | MaskedProcess | None, loss: str) -> bool:
    """Whether ``mask_sampling="count"`` estimates the NELBO of ``loss`` on ``process``: the time-free
    masked losses at ε = 0 (the network must ignore ``t`` too, which the loss cannot see)."""
    return loss in ("mdlm", "radd_lambda_dce") and isinstance(process, MaskedProcess) and process.eps == 0.0


def make_loss(
    process: D3PM | MaskedProcess | None,
    apply_fn: ApplyFn,
    *,
    loss: str,
    hybrid_coeff: float = 0.01,
    vocab_size: int | None = None,
    mask_sampling: str = "time",
) -> Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]:
    """Builds ``loss_fn(params, batch, key) -> (loss, aux)`` for ``batch = {"tokens": (B, L) int32}``.

    The loss is the batch mean per token (nats); ``aux["bound"]`` is the per-sequence bound on
    ``−log p(x)`` (nats) whose mean over held-out data is the reported bits per character.

    Args:
      process: ``D3PM`` for the D3PM losses, ``MaskedProcess`` for MDLM/SEDD/RADD, ``None`` for AR.
      apply_fn: the network, ``apply_fn(params, tokens, t, key) -> logits``.
      loss: one of ``LOSSES``. ``"d3pm_hybrid"``: ``T·L_t + L_T + λ·CE`` (bound reported without
        the CE); ``"d3pm_vlb"``: the full bound alone; ``"mdlm"``; ``"sedd"`` (SEDD's
        parameterisation); ``"radd_lambda_dce"``; ``"autoregressive"`` (BOS is token ``vocab_size``).
      hybrid_coeff: λ of the hybrid loss (Austin et al. use 0.01 for text).
      vocab_size: the data vocabulary (the AR loss's BOS token); taken from ``process`` otherwise.
      mask_sampling: ``"time"`` or, for the time-free ``"mdlm"`` and ``"radd_lambda_dce"`` at ε = 0,
        ``"count"``: the number of masked tokens ``k`` uniform on ``1 .. L`` (stratified over the batch),
        exactly ``k`` masked, bound ``(L/k) Σ_{masked} −log p_θ``. Its mean, ``Σ_k (1/k) E[Σ_{masked}
        −log p_θ | k]``, is MDLM's NELBO (``∫_0^1 (1/t) Bin(k; L, t) dt = 1/k``), estimated without the
        heavy ``1/t`` tail of a few masked tokens at small ``t`` (the any-order form of the bound, Ou et
        al. 2024, Sec. 4; their k-DCE).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {LOSSES}.")
    needs = D3PM if loss.startswith("d3pm") else (None if loss == "autoregressive" else MaskedProcess)
    if loss == "autoregressive" and vocab_size is None:
        raise ValueError("the autoregressive loss needs vocab_size (its BOS token).")
    if (needs is None) != (process is None) or (needs is not None and not isinstance(process, needs)):
        kind = "no process" if needs is None else needs.__name__
        raise ValueError(f"loss {loss!r} needs {kind}, got {type(process).__name__}.")
    if mask_sampling not in MASK_SAMPLING:
        raise ValueError(f"mask_sampling {mask_sampling!r}: known {MASK_SAMPLING}.")
    by_count = mask_sampling == "count"
    if by_count and not counts_estimate_nelbo(process, loss):
        raise ValueError(
            f"mask_sampling 'count' estimates the NELBO of a time-free masked model at eps=0, not loss"
            f" {loss!r} (eps={getattr(process, 'eps', None)}); use 'time'."
        )

    def loss_fn(params, batch, key):
        x0 = jnp.asarray(batch["tokens"], jnp.int32)
        b, length = x0.shape
        time_key, noise_key, net_key = jax.random.split(key, 3)
        aux = {}
        if loss == "autoregressive":
            logits = apply_fn(params, shift_right(x0, vocab_size), jnp.zeros((b,), jnp.float32), net_key)
            bound = autoregressive_terms(logits, x0)
            objective = bound
        elif isinstance(process, D3PM):
            # one stratified step per example: t = 1 + floor(T u_i), u antithetic over the batch
            t = jnp.minimum(
                jnp.floor((1.0 - processes.antithetic_times(time_key, b)) * process.num_steps).astype(
                    jnp.int32
                )
                + 1,
                process.num_steps,
            )
            x_t = processes.d3pm_sample(process, x0, t, noise_key)
            terms = d3pm_terms(
                process, apply_fn(params, x_t, t.astype(jnp.float32) / process.num_steps, net_key), x0, x_t, t
            )
            bound = process.num_steps * terms["vlb_t"] + terms["prior"]
            objective = bound + hybrid_coeff * terms["ce"] if loss == "d3pm_hybrid" else bound
            aux["ce"] = terms["ce"]
        elif by_count:  # both time-free losses are (1/λ) Σ_{masked} −log p_θ with λ = k/L
            count = processes.stratified_counts(time_key, b, length)
            z_t = processes.masked_sample_count(process, x0, count, noise_key)
            t = count.astype(jnp.float32) / length
            logits = apply_fn(params, z_t, t if loss == "mdlm" else jnp.zeros_like(t), net_key)
            bound = lambda_dce_terms(subs_log_probs(logits), x0, z_t, t, mask_index=process.mask_index)
            objective = bound
        else:
            t = processes.antithetic_times(time_key, b)
            z_t = processes.masked_sample(process, x0, t, noise_key)
            # RADD's network is time-free: it is called with t = 0 so nothing about t reaches it
            t_in = jnp.zeros_like(t) if loss == "radd_lambda_dce" else t
            logits = apply_fn(params, z_t, t_in, net_key)
            if loss == "mdlm":
                bound = mdlm_terms(process, subs_log_probs(logits), x0, z_t, t)
            elif loss == "sedd":
                log_score = sedd_log_score(process, logits, t, parameterization="sedd")
                bound = score_entropy_terms(process, log_score, x0, z_t, t)
            else:  # λ = 1 − α_t is the masking probability of the sample just drawn
                lam = 1.0 - process.alpha(t)
                bound = lambda_dce_terms(subs_log_probs(logits), x0, z_t, lam, mask_index=process.mask_index)
            objective = bound
        aux["bound"] = bound
        return jnp.mean(objective) / length, aux

    return loss_fn


__all__ = [
    "LOSSES",
    "MASK_SAMPLING",
    "autoregressive_terms",
    "counts_estimate_nelbo",
    "d3pm_terms",
    "lambda_dce_terms",
    "make_loss",
    "mdlm_terms",
    "score_entropy_terms",
    "sedd_log_score",
    "shift_right",
    "subs_log_probs",
]
