"""A transformer over token sequences: bidirectional for diffusion, causal for the autoregressive baseline.

``TokenTransformer.apply({"params": p}, tokens (B, L) int32, t (B,), cond=None, train=False)`` returns
logits ``(B, L, out_dim)``. Positions are rotary (relative offsets in every attention layer): with learned
absolute positions a bidirectional masked model learned no use of its neighbours in 500 steps (4.17
bits per masked token at t = 0.02, the unigram level), where the causal model, whose own input is
the previous token, did. The input table has ``vocab_size + 1`` rows (the mask token of the masked
processes, or BOS of the causal model). With ``time_conditioning`` every block is modulated by an
embedding of ``t`` (adaLN-Zero as in DiT); without it (MDLM's default, RADD's time-free network)
the modulation is a learned constant, so the network cannot depend on ``t``.

References:
  Peebles & Xie 2023 (DiT), Sec. 3.2 (adaLN-Zero blocks); Su et al. 2021 (rotary positions);
  Vaswani et al. 2017 (causal masking); Sahoo et al. 2024, App. B (MDLM's DiT backbone over tokens,
  with rotary embeddings).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.models import layers

Dtype = Any


def rotary(x: jax.Array, *, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding of queries or keys ``(B, T, N, H)``: pairs ``(x_i, x_{i+H/2})`` turned by
    ``t · base^(−2i/H)`` at position ``t``, so that ``q·k`` depends on positions only through their offset.

    References: Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding", eq. 34.
    """
    t, h = x.shape[1], x.shape[-1]
    freq = base ** (-jnp.arange(h // 2, dtype=jnp.float32) * 2.0 / h)
    angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]  # (T, H/2)
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class _Block(nn.Module):
    """Pre-norm attention + MLP block; the six modulation vectors (shift, scale, gate ×2) come from ``c``."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float
    causal: bool
    dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, train: bool) -> jax.Array:
        b, length, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        mod = layers.dense(6 * d, ("embed", "mlp"), kernel_init=layers.ZEROS, name="adaln", **kw)(nn.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, :] for m in jnp.split(mod, 6, axis=-1))
        norm = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=self.dtype)
        h = norm(x) * (1 + scale1) + shift1
        heads = self.num_heads
        qkv = layers.dense(3 * d, ("embed", "heads"), name="qkv", **kw)(h).reshape(
            b, length, 3, heads, d // heads
        )
        q, k, v = (qkv[:, :, i] for i in range(3))
        q, k = rotary(q), rotary(k)
        h = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal).reshape(b, length, d)
        h = layers.dense(d, ("heads", "embed"), name="attn_out", **kw)(h)
        if train and self.dropout > 0:
            h = layers.dropout(h, self.dropout, self.make_rng("dropout"))
        x = x + gate1 * h
        h = norm(x) * (1 + scale2) + shift2
        h = layers.dense(int(d * self.mlp_ratio), ("embed", "mlp"), name="mlp_in", **kw)(h)
        h = layers.dense(d, ("mlp", "embed"), name="mlp_out", **kw)(nn.gelu(h, approximate=True))
        if train and self.dropout > 0:
            h = layers.dropout(h, self.dropout, self.make_rng("dropout"))
        return x + gate2 * h


class TokenTransformer(nn.Module):
    """Transformer over ``seq_len`` tokens with rotary positions.

    Attributes:
      vocab_size: data tokens ``V``; the input table has ``V + 1`` rows.
      seq_len: sequence length ``L`` (inputs of another length are refused).
      out_dim: logits per position (``V`` by default; D3PM absorbing predicts ``V + 1`` states).
      hidden_size, depth, num_heads, mlp_ratio: the usual widths.
      causal: causal attention (the autoregressive baseline).
      time_conditioning: modulate by an embedding of ``t``; otherwise the network ignores ``t``.
      dropout: residual-branch dropout rate in training.
      dtype: compute dtype (parameters are float32).
    """

    vocab_size: int = 27
    seq_len: int = 128
    out_dim: int = 0
    hidden_size: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = False
    time_conditioning: bool = False
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}."
            )
        if self.vocab_size < 2 or self.seq_len < 1:
            raise ValueError(f"vocab_size={self.vocab_size} must be >= 2 and seq_len={self.seq_len} >= 1.")
        super().__post_init__()

    @property
    def num_outputs(self) -> int:
        return self.out_dim or self.vocab_size

    @nn.compact
    def __call__(self, tokens: ArrayLike, t: ArrayLike, cond: Any = None, train: bool = False) -> jax.Array:
        del cond
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(
                f"TokenTransformer: tokens of shape {tokens.shape}; the model takes"
                f" (batch, seq_len={self.seq_len})."
            )
        d = self.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("classes", "embed")),
            (self.vocab_size + 1, d),
        )
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)  # positions enter through rotary q, k
        if self.time_conditioning:
            c = layers.TimeEmbedding(d, 256, **kw)(jnp.asarray(t, jnp.float32))
        else:
            constant = self.param(
                "constant_cond", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,)
            )
            c = jnp.broadcast_to(constant, (tokens.shape[0], d)).astype(self.dtype)
        for i in range(self.depth):
            x = _Block(
                d, self.num_heads, self.mlp_ratio, self.causal, self.dropout, self.dtype, name=f"block_{i}"
            )(x, c, train)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="final_norm")(x)
        logits = layers.dense(self.num_outputs, ("embed", "classes"), name="head", **kw)(x)
        return logits.astype(jnp.float32)


__all__ = ["TokenTransformer"]
