"""DiT: the Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffax.models import layers, moe
from diffax.models.interval import split_times

Dtype = Any


def sincos_pos_embed(grid_h: int, grid_w: int, dim: int, base: int | None = None) -> np.ndarray:
    """Fixed 2D sin-cos position embedding, (grid_h * grid_w, dim) float64, row-major patches.

    The first half of each vector encodes the column index, the second half the row index, each as
    ``[sin(p w_i) | cos(p w_i)]`` with ``w_i = 10000**(-i / (dim/4))``. With ``base``, positions are
    scaled by ``base / grid`` on each axis (diffusers' ``PatchEmbed``: a grid of another size spans
    the same range as the ``base`` grid it was trained at).

    References:
      Vaswani et al. 2017, Sec. 3.5; He et al., "Masked Autoencoders Are Scalable Vision
      Learners", 2022 (2D variant); Peebles & Xie 2023, Sec. 3.2.
    """
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4) / (dim // 4))
    scale_h, scale_w = (1.0, 1.0) if base is None else (base / grid_h, base / grid_w)
    rows, cols = np.meshgrid(np.arange(grid_h) * scale_h, np.arange(grid_w) * scale_w, indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        args = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return np.concatenate([np.sin(args), np.cos(args)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift`` with (B, D) shift/scale broadcast over the tokens of (B, T, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(dtype: Dtype, epsilon: float = 1e-6) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=epsilon, use_bias=False, use_scale=False, dtype=dtype)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: six (B, D) shift/scale/gate vectors regressed from c.

    References:
      Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023, Sec. 3.2 and Fig. 3.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    attention_impl: str = "xla"
    routing: moe.Routing | None = None  # DiT-MoE: the MLP becomes a mixture of experts
    mlp_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, train: bool) -> jax.Array:
        x = layers.shard_batch(x)
        d = self.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = layers.dense(6 * d, ("embed", "mlp"), kernel_init=layers.ZEROS, name="adaln", **kw)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        attn = layers.Attention(
            self.num_heads, d // self.num_heads, impl=self.attention_impl, name="attn", **kw
        )
        h = attn(_modulate(_layer_norm(self.dtype)(x), shift_msa, scale_msa), train=train)
        x = x + gate_msa[:, None, :] * h
        h = _modulate(_layer_norm(self.dtype, self.mlp_norm_eps)(x), shift_mlp, scale_mlp)
        if self.routing is not None:  # DiT-MoE (Fei et al. 2024, Fig. 2)
            h = moe.MoEFeedForward(self.routing, int(d * self.mlp_ratio), name="moe", **kw)(h, train)
        else:
            h = layers.dense(int(d * self.mlp_ratio), ("embed", "mlp"), name="mlp_in", **kw)(h)
            h = layers.dense(d, ("mlp", "embed"), name="mlp_out", **kw)(nn.gelu(h, approximate=True))
        return layers.shard_batch(x + gate_mlp[:, None, :] * h)


class DiT(nn.Module):
    """Diffusion Transformer: ``apply({"params": p}, x, t, cond=None, train=False)``.

    Attributes:
      patch_size: side of the square patches.
      hidden_size: token width D.
      depth: number of DiT blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / D.
      num_classes: classes for class conditioning (table has a null row), or None.
      label_dropout: probability of replacing a label by the null label when ``train=True``.
      learned_variance: output 2x channels (the paper's learned sigma).
      freq_dim: width of the time features fed to the time MLP.
      time_embedding: "sinusoidal" (of ``t * time_scale``) or "fourier".
      time_scale: multiplies t in the sinusoidal embedding (1000 maps t in [0, 1] to DDPM steps).
      fourier_scale: standard deviation of the Fourier frequencies.
      time_freq_shift, time_offset: the sinusoidal features' frequency shift and time offset (see
        ``layers.time_features``); published checkpoints set them (``models.from_diffusers``).
      mlp_norm_eps: epsilon of each block's LayerNorm before the MLP (1e-6 in DiT; diffusers'
        ``DiTTransformer2DModel`` uses its ``norm_eps``, 1e-5 by default).
      block_embedders: each block has its own time and label embedders (diffusers' layout; the
        final layer uses block 0's); DiT shares one.
      pos_embed_base: patches per side the position embedding was made for; other grids are
        scaled to its range as in diffusers' ``PatchEmbed``. None: integer positions at any size.
      remat: rematerialise each block in the backward pass.
      remat_policy: with ``remat``, the ``jax.checkpoint_policies`` member naming what each block
        saves (e.g. ``"dots_with_no_batch_dims_saveable"``); None saves nothing.
      scan_blocks: the blocks as one ``nn.scan`` over stacked parameters (leading axis ``"layers"``):
        one block is traced and compiled instead of ``depth``. Not with ``block_embedders`` or experts;
        the parameter tree differs from the unrolled one (``block_{i}`` becomes ``blocks``).
      dtype: compute dtype.
      param_dtype: parameter dtype.
      attention_impl: "xla" or "cpu" (see ``layers.dot_product_attention``).
      num_experts: 0 for the dense MLP; otherwise DiT-MoE's mixture of this many routed experts in
        every block (``diffax.models.moe.MoEFeedForward``).
      experts_per_token: routed experts per token (K).
      num_shared_experts: DiT-MoE's shared experts n_s (every token uses them).
      balance_loss_weight: α of DiT-MoE's expert-level balance loss (its gradient joins training).
      capacity_factor: expert slots per example relative to an even split; 0: no token dropped.
      interval_embedding: also condition on an interval length: t is (B,) or (B, 2) (time, interval),
        the interval embedded like the time and added (``diffax.models.interval``; MeanFlow, shortcut).

    References:
      Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023, Sec. 3 (patchify, adaLN-Zero,
      zero-initialised final layer), Table 1 (S/B/L/XL), App. A (initialisation). Fei et al., "Scaling
      Diffusion Transformers to 16 Billion Parameters", 2024, Sec. 2.2 and Table 1 (DiT-MoE).
    """

    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int | None = 1000
    label_dropout: float = 0.1
    learned_variance: bool = True
    freq_dim: int = 256
    time_embedding: str = "sinusoidal"
    time_scale: float = 1000.0
    fourier_scale: float = 16.0
    time_freq_shift: float = 0.0
    time_offset: float = 0.0
    mlp_norm_eps: float = 1e-6
    block_embedders: bool = False
    pos_embed_base: int | None = None
    remat: bool = False
    remat_policy: str | None = None
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    num_experts: int = 0
    experts_per_token: int = 2
    num_shared_experts: int = 2
    balance_loss_weight: float = 0.005
    capacity_factor: float = 0.0
    interval_embedding: bool = False

    def __post_init__(self) -> None:
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        layers.check_common(
            "DiT",
            time_embedding=self.time_embedding,
            attention_impl=self.attention_impl,
            num_classes=self.num_classes,
            label_dropout=self.label_dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        for field in ("patch_size", "hidden_size", "depth", "num_heads", "freq_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"DiT: {field}={getattr(self, field)}; use a positive int.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiT: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}."
            )
        if self.hidden_size % 4:
            raise ValueError(f"DiT: hidden_size={self.hidden_size} must be divisible by 4 (2D pos-embed).")
        if self.freq_dim % 2:
            raise ValueError(f"DiT: freq_dim={self.freq_dim} must be even.")
        if self.num_experts < 0 or self.num_shared_experts < 0:
            raise ValueError(
                "DiT: num_experts and num_shared_experts must be >= 0 (num_experts=0: dense MLP)."
            )
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"DiT: experts_per_token={self.experts_per_token} must be in"
                f" [1, num_experts={self.num_experts}]."
            )
        if self.balance_loss_weight < 0 or self.capacity_factor < 0:
            raise ValueError("DiT: balance_loss_weight and capacity_factor must be >= 0.")
        layers.remat_policy(self.remat_policy, owner="DiT")
        if self.scan_blocks and (self.block_embedders or self.num_experts):
            raise ValueError(
                "DiT: scan_blocks needs alike blocks (no block_embedders or experts); set scan_blocks=False."
            )
        if self.pos_embed_base is not None and self.pos_embed_base < 1:
            raise ValueError(f"DiT: pos_embed_base={self.pos_embed_base}; use a positive int or None.")

    @nn.compact
    def __call__(self, x: ArrayLike, t: ArrayLike, cond: Any = None, train: bool = False) -> jax.Array:
        """Predicts from noisy latents.

        Args:
          x: (B, H, W, C) noisy latents; H and W divisible by ``patch_size``.
          t: (B,) continuous times ((B, 2) times and intervals with ``interval_embedding``).
          cond: None, int labels (B,), or {"label": (B,)}.
          train: enables label dropout (needs the "dropout" rng).

        Returns:
          (B, H, W, C), or (B, H, W, 2C) with ``learned_variance`` (eps first), in x's dtype.
        """
        x, t = jnp.asarray(x), jnp.asarray(t)
        t, interval = split_times("DiT", x, t, enabled=self.interval_embedding)
        layers.check_inputs("DiT", x, t)
        b, height, width, channels = x.shape
        p, d = self.patch_size, self.hidden_size
        if height % p or width % p:
            raise ValueError(
                f"DiT: image size {height}x{width} is not divisible by patch_size={p}; "
                "change the image size or patch_size."
            )
        labels, _ = layers.split_cond(cond, b, num_classes=self.num_classes, context_dim=None, owner="DiT")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gh, gw = height // p, width // p
        h = layers.conv(d, p, ("channels", "embed"), strides=p, padding="VALID", name="patch", **kw)(
            x.astype(self.dtype)
        )
        pos = jnp.asarray(sincos_pos_embed(gh, gw, d, self.pos_embed_base), self.dtype)
        h = layers.shard_batch(h.reshape(b, gh * gw, d) + pos[None])

        def embed(suffix: str, label_dropout: float) -> jax.Array:
            def time_embedding(name: str, value: jax.Array) -> jax.Array:
                return layers.TimeEmbedding(
                    d,
                    self.freq_dim,
                    kind=self.time_embedding,
                    time_scale=self.time_scale,
                    fourier_scale=self.fourier_scale,
                    freq_shift=self.time_freq_shift,
                    time_offset=self.time_offset,
                    kernel_init=nn.initializers.normal(0.02),
                    name=f"{name}{suffix}",
                    **kw,
                )(value)

            c = time_embedding("time_embed", t)
            if interval is not None:
                c = c + time_embedding("interval_embed", interval)
            if labels is None:
                return layers.shard_batch(c)
            table = layers.LabelEmbedding(
                self.num_classes, d, dropout=label_dropout, name=f"label_embed{suffix}", **kw
            )
            return layers.shard_batch(c + table(labels, train))

        if self.block_embedders:
            if train and labels is not None and self.label_dropout > 0:  # one draw for every table
                drop = jax.random.bernoulli(self.make_rng("dropout"), self.label_dropout, labels.shape)
                labels = jnp.where(drop, self.num_classes, labels)
            conds = [embed(f"_{i}", 0.0) for i in range(self.depth)]
        else:
            conds = [embed("", self.label_dropout)] * self.depth
        c = conds[0]

        block_cls = (
            nn.remat(
                DiTBlock, static_argnums=(3,), policy=layers.remat_policy(self.remat_policy, owner="DiT")
            )
            if self.remat
            else DiTBlock
        )
        routing = None
        if self.num_experts:
            routing = moe.Routing(
                self.num_experts,
                self.experts_per_token,
                self.num_shared_experts,
                self.balance_loss_weight,
                self.capacity_factor,
            )
        block_args = (d, self.num_heads, self.mlp_ratio, self.attention_impl, routing, self.mlp_norm_eps)
        if self.scan_blocks:
            scanned = nn.scan(
                lambda block, h, c: (block(h, c, train), None),
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            h, _ = scanned(block_cls(*block_args, name="blocks", **kw), h, c)
        for i in range(0 if self.scan_blocks else self.depth):
            h = block_cls(*block_args, name=f"block_{i}", **kw)(h, conds[i], train)

        shift, scale = jnp.split(
            layers.dense(2 * d, ("embed", "mlp"), kernel_init=layers.ZEROS, name="final_adaln", **kw)(
                nn.silu(c)
            ),
            2,
            axis=-1,
        )
        h = _modulate(_layer_norm(self.dtype)(h), shift, scale)
        out_channels = channels * (2 if self.learned_variance else 1)
        h = layers.dense(
            p * p * out_channels, ("embed", "patch"), kernel_init=layers.ZEROS, name="final", **kw
        )(h)
        h = h.reshape(b, gh, gw, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, height, width, out_channels).astype(x.dtype)
