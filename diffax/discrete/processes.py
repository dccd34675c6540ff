"""Categorical forward processes over token sequences: D3PM (uniform, absorbing) and continuous-time masking.

Token sequences are int32 ``(batch, length)``. Data tokens are ``0 .. V-1``; the absorbing and masked
processes add the mask token ``V``, so their state space has ``K = V + 1`` states (``K = V`` for
uniform). Both D3PM families have cumulative transitions of one closed form,
``Q̄_t = ᾱ_t I + (1 − ᾱ_t) 𝟙 πᵀ`` with ``π`` uniform or the mask's one-hot, so the transition between any
two steps ``s < t`` is ``Q_{t|s} = (ᾱ_t/ᾱ_s) I + (1 − ᾱ_t/ᾱ_s) 𝟙 πᵀ``; rows index the earlier state.

References:
  Austin et al. 2021, "Structured Denoising Diffusion Models in Discrete State-Spaces" (D3PM),
  Sec. 3 eq. 1-3, App. A.2 (uniform), A.2.4 (absorbing, β_t = 1/(T − t + 1)).
  Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models" (MDLM), Sec. 3, eq. 2
  and the log-linear schedule of App. C.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

D3PM_KINDS = ("uniform", "absorbing")


@flax.struct.dataclass
class D3PM:
    """A discrete-time D3PM process with ``num_steps`` steps.

    Attributes:
      alpha_bar: ``(num_steps + 1,)`` float32, ``ᾱ_0 = 1`` and ``ᾱ_t = Π_{s ≤ t} (1 − β_s)``.
      kind: ``"uniform"`` or ``"absorbing"``.
      vocab_size: ``V``, the data tokens.
    """

    alpha_bar: jax.Array
    kind: str = flax.struct.field(pytree_node=False)
    vocab_size: int = flax.struct.field(pytree_node=False)

    @property
    def num_states(self) -> int:
        """``K``: ``V + 1`` with the mask (absorbing), ``V`` otherwise."""
        return self.vocab_size + (self.kind == "absorbing")

    @property
    def num_steps(self) -> int:
        return self.alpha_bar.shape[0] - 1

    @property
    def mask_index(self) -> int:
        """The mask token (absorbing), ``V``; ``-1`` for uniform."""
        return self.vocab_size if self.kind == "absorbing" else -1

    def stationary(self) -> jax.Array:
        """``π``, float32 ``(K,)``: where all mass ends (uniform over ``V``, or the mask)."""
        if self.kind == "uniform":
            return jnp.full((self.vocab_size,), 1.0 / self.vocab_size, jnp.float32)
        return jax.nn.one_hot(self.mask_index, self.num_states, dtype=jnp.float32)


def d3pm_betas(kind: str, num_steps: int) -> np.ndarray:
    """The papers' schedules, float64 ``(num_steps,)``: ``β_1 .. β_T``.

    Absorbing uses β_t = 1/(T − t + 1) (so ᾱ_T = 0 exactly); uniform uses the cosine schedule of
    Hoogeboom et al. 2021, ᾱ(t) ∝ cos²((t/T + 0.008)/1.008 · π/2) (Austin et al. 2021, Sec. 4).
    """
    t = np.arange(1, num_steps + 1, dtype=np.float64)
    if kind == "absorbing":
        return 1.0 / (num_steps - t + 1.0)
    if kind == "uniform":
        f = np.cos((np.arange(num_steps + 1) / num_steps + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.clip(1.0 - f[1:] / f[:-1], 0.0, 1.0)
    raise ValueError(f"d3pm: unknown kind {kind!r}; known: {D3PM_KINDS}.")


def d3pm(kind: str, *, vocab_size: int, num_steps: int) -> D3PM:
    """Builds a D3PM process (ᾱ from the cumulative product of ``1 − β_t`` in float64).

    Args:
      kind: ``"uniform"`` or ``"absorbing"``.
      vocab_size: ``V`` data tokens (at least 2).
      num_steps: ``T`` (at least 1).
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size} must be at least 2.")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1.")
    betas = d3pm_betas(kind, num_steps)
    alpha_bar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    return D3PM(alpha_bar=jnp.asarray(alpha_bar, jnp.float32), kind=kind, vocab_size=vocab_size)


def transition(process: D3PM, s: ArrayLike, t: ArrayLike) -> jax.Array:
    """``Q_{t|s}``, ``[i, j] = q(x_t = j | x_s = i)`` for steps ``s ≤ t``; ``(..., K, K)`` float32.

    ``s = t − 1`` gives the one-step matrix Q_t, ``s = 0`` the cumulative Q̄_t (Austin et al. eq. 3).
    """
    s, t = jnp.asarray(s), jnp.asarray(t)
    ratio = process.alpha_bar[t] / process.alpha_bar[s]
    ratio = jnp.where(t == s, 1.0, ratio)[..., None, None]  # 0/0 after the absorbing chain's end
    lead = (1,) * (ratio.ndim - 2)
    eye = jnp.eye(process.num_states, dtype=jnp.float32).reshape(
        *lead, process.num_states, process.num_states
    )
    return ratio * eye + (1.0 - ratio) * process.stationary().reshape(*lead, 1, process.num_states)


def d3pm_marginal(process: D3PM, x0_probs: ArrayLike, t: ArrayLike) -> jax.Array:
    """``q(x_t | x_0) = x_0 Q̄_t`` for a distribution over ``x_0``: ``(B, L, K)`` → ``(B, L, K)``.

    ``t`` has shape ``(B,)``. Uses the closed form ``ᾱ_t p + (1 − ᾱ_t) π``.
    """
    a = process.alpha_bar[jnp.asarray(t)][:, None, None]
    return a * jnp.asarray(x0_probs) + (1.0 - a) * process.stationary()[None, None]


def d3pm_sample(process: D3PM, x0: ArrayLike, t: ArrayLike, key: jax.Array) -> jax.Array:
    """Draws ``x_t ~ q(x_t | x_0)`` for int tokens ``x0`` ``(B, L)`` at steps ``t`` ``(B,)``."""
    x0 = jnp.asarray(x0)
    a = process.alpha_bar[jnp.asarray(t)][:, None]
    keep_key, noise_key = jax.random.split(key)
    keep = jax.random.uniform(keep_key, x0.shape) < a
    if process.kind == "uniform":
        noise = jax.random.randint(noise_key, x0.shape, 0, process.vocab_size)
    else:
        noise = jnp.full(x0.shape, process.mask_index)
    return jnp.where(keep, x0, noise).astype(jnp.int32)


def d3pm_posterior_logits(
    process: D3PM, x0_probs: ArrayLike, x_t: ArrayLike, s: ArrayLike, t: ArrayLike
) -> jax.Array:
    """Logits of ``q(x_s | x_t, x_0)`` averaged over ``x_0 ~ x0_probs`` (``s < t``), ``(B, L, K)``.

    ``q(x_s | x_t, x_0) ∝ Q_{t|s}[x_s, x_t] · (x_0 Q̄_s)[x_s]``; with a one-hot ``x0_probs`` it is the
    true posterior, with the network's ``p̃(x_0 | x_t)`` it is the x_0-parameterised reverse step
    ``p_θ(x_s | x_t) ∝ Σ_{x_0} q(x_s, x_t | x_0) p̃(x_0 | x_t)`` (Austin et al. eq. 4 and Sec. 3.3).

    Args:
      process: the D3PM process.
      x0_probs: ``(B, L, K)`` distribution over the clean token.
      x_t: ``(B, L)`` int tokens at step ``t``.
      s: ``(B,)`` earlier steps.
      t: ``(B,)`` later steps.
    """
    q_ts = transition(process, s, t)  # (B, K, K): [x_s, x_t]
    x_t = jnp.asarray(x_t)
    # column x_t of Q_{t|s} for each token: (B, L, K) over x_s
    likelihood = jnp.take_along_axis(jnp.swapaxes(q_ts, 1, 2), x_t[:, :, None], axis=1)
    prior = d3pm_marginal(process, x0_probs, s)
    return jnp.log(likelihood) + jnp.log(prior)


@flax.struct.dataclass
class MaskedProcess:
    """Continuous-time absorbing (masked) diffusion on ``t ∈ [0, 1]``: each token is masked w.p. ``1 − α_t``.

    The log-linear schedule ``σ(t) = −log(1 − (1 − ε) t)``, ``α_t = e^{−σ(t)} = 1 − (1 − ε) t``;
    ``ε = 0`` reaches the all-mask prior at ``t = 1`` exactly, which makes the NELBO an exact bound.

    Attributes:
      vocab_size: ``V`` data tokens; the mask is token ``V``.
      eps: ``ε`` of the schedule.
    """

    vocab_size: int = flax.struct.field(pytree_node=False)
    eps: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def mask_index(self) -> int:
        return self.vocab_size

    @property
    def num_states(self) -> int:
        return self.vocab_size + 1

    def alpha(self, t: ArrayLike) -> jax.Array:
        """``α_t``, the probability that a token is still clean at time ``t``."""
        return 1.0 - (1.0 - self.eps) * jnp.asarray(t, jnp.float32)

    def alpha_rate(self, t: ArrayLike) -> jax.Array:
        """``−α'_t / (1 − α_t)``, the NELBO's weight (``1/t`` at ``ε = 0``; MDLM eq. 10)."""
        t = jnp.asarray(t, jnp.float32)
        return (1.0 - self.eps) / (1.0 - self.alpha(t))

    def sigma(self, t: ArrayLike) -> jax.Array:
        """Total noise ``σ(t) = −log α_t``."""
        return -jnp.log(self.alpha(t))

    def sigma_rate(self, t: ArrayLike) -> jax.Array:
        """``σ'(t) = −α'_t / α_t``."""
        return (1.0 - self.eps) / self.alpha(t)


def masked_sample(process: MaskedProcess, x0: ArrayLike, t: ArrayLike, key: jax.Array) -> jax.Array:
    """Draws ``z_t ~ q(z_t | x_0)``: each token of ``x0`` ``(B, L)`` masked w.p. ``1 − α_t``."""
    x0 = jnp.asarray(x0)
    masked = jax.random.uniform(key, x0.shape) >= process.alpha(t)[:, None]
    return jnp.where(masked, process.mask_index, x0).astype(jnp.int32)


def masked_sample_count(process: MaskedProcess, x0: ArrayLike, count: ArrayLike, key: jax.Array) -> jax.Array:
    """``x0`` ``(B, L)`` with exactly ``count[i]`` positions of row ``i`` masked, uniformly among such sets.

    The ``k``-masked states of the any-order form of the masked NELBO (Ou et al. 2024, Sec. 4).
    """
    x0 = jnp.asarray(x0)
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, x0.shape), axis=-1), axis=-1)
    return jnp.where(rank < jnp.asarray(count)[:, None], process.mask_index, x0).astype(jnp.int32)


def stratified_counts(key: jax.Array, n: int, length: int) -> jax.Array:
    """``n`` mask counts in ``1 .. length``, each uniform, stratified like :func:`antithetic_times`."""
    u = jnp.mod(jax.random.uniform(key, ()) + jnp.arange(n, dtype=jnp.float32) / n, 1.0)
    return jnp.minimum(jnp.floor(u * length).astype(jnp.int32) + 1, length)


def antithetic_times(key: jax.Array, n: int) -> jax.Array:
    """``n`` times in ``(0, 1]``, one in each stratum ``(i/n, (i+1)/n]``, from one uniform shift.

    ``t_i = 1 − ((u + i/n) mod 1)``: the low-discrepancy ("antithetic") sampler of Kingma et al. 2021
    (VDM, App. I.1) and MDLM (Sec. 3.5), which lowers the variance of the NELBO estimate.
    """
    u = jax.random.uniform(key, ())
    return 1.0 - jnp.mod(u + jnp.arange(n, dtype=jnp.float32) / n, 1.0)


__all__ = [
    "D3PM",
    "D3PM_KINDS",
    "MaskedProcess",
    "antithetic_times",
    "d3pm",
    "d3pm_betas",
    "d3pm_marginal",
    "d3pm_posterior_logits",
    "d3pm_sample",
    "masked_sample",
    "masked_sample_count",
    "stratified_counts",
    "transition",
]
