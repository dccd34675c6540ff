"""The DDPM / improved-DDPM / ADM U-Net.

One configurable network covers the family: DDPM (Ho et al. 2020: time added to the residual
branch, convolutional resampling), and ADM (Dhariwal & Nichol 2021: scale-shift norm, BigGAN
resampling residual blocks, multi-head attention at several resolutions, class conditioning,
learned-variance head). Optional cross-attention to a context sequence follows the latent-diffusion
U-Net (Rombach et al. 2022).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.models import layers
from diffax.models.interval import split_times

Dtype = Any

TIME_INJECTIONS = ("add", "scale_shift")


def _resample(x: jax.Array, direction: str) -> jax.Array:
    """Nearest-neighbour 2x upsampling (``"up"``) or 2x2 average pooling (``"down"``), NHWC."""
    if direction == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-conv, time injection, GN-SiLU-dropout-conv(zero), 1x1 skip if needed.

    ``emb=None`` leaves out the time injection (the autoencoder's blocks).
    ``resample`` ("up"/"down") makes it a BigGAN-style resampling block: both branches are resampled
    after the first normalisation. ``scale_shift`` injects time as ``GN(h) * (1 + s) + b`` (AdaGN).
    ``materialize_input_cotangent`` passes x through ``layers.materialized_cotangent`` (same values and
    gradients; a different backward program).

    References:
      Ho et al. 2020, App. B; Dhariwal & Nichol 2021, Sec. 3 (AdaGN, BigGAN up/down blocks).
    """

    out_channels: int
    norm_groups: int
    norm_eps: float
    dropout: float
    scale_shift: bool
    resample: str | None = None
    norm_impl: str = "xla"
    conv_impl: str = "xla"
    materialize_input_cotangent: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array | None, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(num_groups=self.norm_groups, epsilon=self.norm_eps, impl=self.norm_impl, **kw)
        conv_kw = dict(impl=self.conv_impl, train=train, **kw)
        out = self.out_channels
        if self.materialize_input_cotangent and train:  # a reverse-mode device (a custom VJP)
            x = layers.materialized_cotangent(x)
        h = layers.GroupNorm(**norm)(x, train=train)
        if self.resample is not None:
            h, x = _resample(h, self.resample), _resample(x, self.resample)
        h = layers.conv(out, 3, **conv_kw)(h)
        if emb is None:  # no time input (the autoencoder's blocks)
            h = layers.GroupNorm(**norm)(h, train=train)
        elif self.scale_shift:
            e = layers.dense(2 * out, ("embed", "conv_out"), **kw)(nn.silu(emb))
            scale, shift = jnp.split(e, 2, axis=-1)
            h = layers.GroupNorm(**norm)(h, (scale, shift), train=train)
        else:
            e = layers.dense(out, ("embed", "conv_out"), **kw)(nn.silu(emb))
            h = layers.GroupNorm(**norm)(h + e[:, None, None, :], train=train)
        if train and self.dropout > 0:
            h = layers.dropout(h, self.dropout, self.make_rng("dropout"))
        h = layers.conv(out, 3, kernel_init=layers.ZEROS, **conv_kw)(h)
        if x.shape[-1] != out:
            x = layers.conv(out, 1, **conv_kw)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Residual self-attention over all positions, then (with a context) residual cross-attention.

    Each sub-block is ``x + out(Attention(GroupNorm(x)))`` with a zero-initialised output projection.
    """

    num_heads: int
    head_dim: int
    norm_groups: int
    norm_eps: float
    attention_impl: str = "xla"
    norm_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None, train: bool) -> jax.Array:
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(num_groups=self.norm_groups, epsilon=self.norm_eps, impl=self.norm_impl, silu=False)
        attn = dict(
            num_heads=self.num_heads, head_dim=self.head_dim, impl=self.attention_impl, zero_init_out=True
        )
        for ctx, name in ((None, "self"), (context, "cross"))[: 1 if context is None else 2]:
            y = layers.GroupNorm(**norm, name=f"{name}_norm", **kw)(x, train=train).reshape(b, h * w, c)
            x = x + layers.Attention(**attn, name=f"{name}_attn", **kw)(y, ctx, train).reshape(b, h, w, c)
        return x


class UNet(nn.Module):
    """The DDPM/ADM U-Net: ``apply({"params": p}, x, t, cond=None, train=False)``.

    Attributes:
      base_channels: channels at the first level; level i has ``base_channels * channel_mult[i]``.
      channel_mult: per-level channel multipliers; one 2x downsampling between levels.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attention_resolutions: feature-map heights at which attention blocks are inserted.
      num_heads: attention heads (used when ``head_channels`` is None).
      head_channels: channels per head; overrides ``num_heads`` when set (ADM's num_head_channels).
      dropout: dropout rate inside residual blocks (``layers.dropout``: rounded to a multiple of 2^-16).
      norm_groups: GroupNorm groups.
      norm_eps: GroupNorm epsilon.
      time_embedding: "sinusoidal" (of ``t * time_scale``) or "fourier" (Gaussian Fourier features).
      time_scale: multiplies t in the sinusoidal embedding (1000 maps t in [0, 1] to DDPM steps).
      fourier_scale: standard deviation of the Fourier frequencies.
      time_sin_first, time_freq_shift, time_offset: the sinusoidal features' order, frequency
        shift and time offset (see ``layers.time_features``); published checkpoints set them
        (``diffax.models.from_diffusers``).
      time_injection: "add" (DDPM: add a projection of the embedding) or "scale_shift" (ADM AdaGN).
      resblock_updown: resample with residual blocks (BigGAN/ADM) instead of conv resampling.
      downsample_padding: (before, after) padding of the stride-2 downsampling conv on each spatial
        axis; (0, 1) is TensorFlow's "SAME" (DDPM's code, diffusers' ``downsample_padding=0``).
      attention_levels: level indices with attention blocks; when set, used instead of
        ``attention_resolutions`` (attention then does not depend on the input size).
      num_classes: number of classes for class conditioning, or None; the table has a null row.
      label_dropout: probability of replacing a label by the null label when ``train=True``.
      context_dim: width of a cross-attention context (``cond["context"]``), or None.
      learned_variance: output 2x channels (mean/eps prediction, then variance interpolation).
      interval_embedding: also condition on an interval length: t is (B,) or (B, 2) (time, interval),
        the interval embedded like the time and added (``diffax.models.interval``; MeanFlow, shortcut).
      remat: rematerialise each residual/attention block in the backward pass.
      remat_policy: with ``remat``, the ``jax.checkpoint_policies`` member naming what each block
        saves (e.g. ``"dots_with_no_batch_dims_saveable"``); None saves nothing.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      attention_impl: "xla" or "cpu" (see ``layers.dot_product_attention``).
      norm_impl: "xla" or "cpu" (see ``layers.group_norm``).
      resblock_impl: "xla", or "cpu": with ``train=True`` each residual block materialises its
        input's cotangent (``layers.materialized_cotangent``), which XLA's CPU backend otherwise
        recomputes in every consumer.
      conv_impl: "xla", or "cpu": 3x3 convolutions of maps 16 wide or more as Winograd F(4x4, 3x3)
        (see ``layers.conv``).
        "auto" (here and in the three above): chosen where the program is lowered ("cpu" on the
        CPU, fused attention on TPU and GPU, see ``layers.dot_product_attention``, else "xla"). With
        ``train=True`` the "cpu" forms have backward passes of their own (custom VJPs: reverse mode
        only); with ``train=False`` (sampling, evaluation, the exact likelihood) every form is
        differentiable in every mode.

    References:
      Ho et al., "Denoising Diffusion Probabilistic Models", 2020, App. B; Nichol & Dhariwal,
      "Improved Denoising Diffusion Probabilistic Models", 2021, Sec. 3.1 (learned variance);
      Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021, Sec. 3;
      Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", 2022, Sec. 3.3.
    """

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    head_channels: int | None = None
    dropout: float = 0.1
    norm_groups: int = 32
    norm_eps: float = 1e-5
    time_embedding: str = "sinusoidal"
    time_scale: float = 1000.0
    fourier_scale: float = 16.0
    time_sin_first: bool = False
    time_freq_shift: float = 0.0
    time_offset: float = 0.0
    time_injection: str = "add"
    resblock_updown: bool = False
    downsample_padding: tuple[int, int] = (1, 1)
    attention_levels: tuple[int, ...] | None = None
    num_classes: int | None = None
    label_dropout: float = 0.0
    context_dim: int | None = None
    learned_variance: bool = False
    interval_embedding: bool = False
    remat: bool = False
    remat_policy: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    norm_impl: str = "xla"
    resblock_impl: str = "xla"
    conv_impl: str = "xla"

    def __post_init__(self) -> None:
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        name = "UNet"
        layers.check_common(
            name,
            time_embedding=self.time_embedding,
            attention_impl=self.attention_impl,
            num_classes=self.num_classes,
            label_dropout=self.label_dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        for field in ("norm_impl", "resblock_impl", "conv_impl"):
            if getattr(self, field) not in layers.IMPLS:
                raise ValueError(f"{name}: {field}={getattr(self, field)!r}; use one of {layers.IMPLS}.")
        if self.time_injection not in TIME_INJECTIONS:
            raise ValueError(f"{name}: time_injection={self.time_injection!r}; use one of {TIME_INJECTIONS}.")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"{name}: channel_mult={self.channel_mult}; use positive ints, e.g. (1, 2).")
        if self.num_res_blocks < 1:
            raise ValueError(f"{name}: num_res_blocks={self.num_res_blocks}; use at least 1.")
        levels = range(len(self.channel_mult))
        if self.attention_levels is not None and not set(self.attention_levels) <= set(levels):
            raise ValueError(
                f"{name}: attention_levels={self.attention_levels}; use level indices in {tuple(levels)}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}: dropout={self.dropout}; use a rate in [0, 1).")
        if self.base_channels % 2:
            raise ValueError(f"{name}: base_channels={self.base_channels} must be even (time features).")
        for c in self.level_channels:
            if c % self.norm_groups:
                raise ValueError(
                    f"{name}: channels {c} (base_channels={self.base_channels} x channel_mult) are not "
                    f"divisible by norm_groups={self.norm_groups}; change one of them."
                )
            per_head = self.head_channels or self.num_heads
            if c % per_head:
                field = "head_channels" if self.head_channels else "num_heads"
                raise ValueError(
                    f"{name}: channels {c} are not divisible by {field}={per_head}; change {field}."
                )

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    def _heads(self, channels: int) -> tuple[int, int]:
        if self.head_channels:
            return channels // self.head_channels, self.head_channels
        return self.num_heads, channels // self.num_heads

    def _check_resolution(self, x: jax.Array) -> None:
        h, w = x.shape[1:3]
        factor = 2 ** (len(self.channel_mult) - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"UNet: image size {h}x{w} is not divisible by 2**(levels-1) = {factor} "
                f"(channel_mult={self.channel_mult}); change the image size or channel_mult."
            )
        reached = [h // 2**i for i in range(len(self.channel_mult))]
        if self.attention_levels is not None:
            return
        missing = sorted(set(self.attention_resolutions) - set(reached))
        if missing:
            raise ValueError(
                f"UNet: attention_resolutions {missing} are never reached for {h}x{w} inputs "
                f"(feature-map heights {reached}); use resolutions from that list."
            )

    @nn.compact
    def __call__(self, x: ArrayLike, t: ArrayLike, cond: Any = None, train: bool = False) -> jax.Array:
        """Predicts from noisy images.

        Args:
          x: (B, H, W, C) noisy images.
          t: (B,) continuous times ((B, 2) times and intervals with ``interval_embedding``).
          cond: None, int labels (B,), or {"label": (B,), "context": (B, L, context_dim)}.
          train: enables dropout and label dropout (needs the "dropout" rng).

        Returns:
          (B, H, W, C), or (B, H, W, 2C) with ``learned_variance``, in x's dtype.
        """
        x, t = jnp.asarray(x), jnp.asarray(t)
        t, interval = split_times("UNet", x, t, enabled=self.interval_embedding)
        layers.check_inputs("UNet", x, t)
        self._check_resolution(x)
        labels, context = layers.split_cond(
            cond, x.shape[0], num_classes=self.num_classes, context_dim=self.context_dim, owner="UNet"
        )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb_dim = 4 * self.base_channels
        embedding = dict(
            kind=self.time_embedding,
            time_scale=self.time_scale,
            fourier_scale=self.fourier_scale,
            sin_first=self.time_sin_first,
            freq_shift=self.time_freq_shift,
            time_offset=self.time_offset,
            **kw,
        )
        emb = layers.TimeEmbedding(emb_dim, self.base_channels, name="time_embed", **embedding)(t)
        if interval is not None:
            emb = emb + layers.TimeEmbedding(emb_dim, self.base_channels, name="interval_embed", **embedding)(
                interval
            )
        if labels is not None:
            emb = emb + layers.LabelEmbedding(
                self.num_classes, emb_dim, dropout=self.label_dropout, name="label_embed", **kw
            )(labels, train)

        policy = layers.remat_policy(self.remat_policy, owner="UNet")
        res_cls = nn.remat(ResBlock, static_argnums=(3,), policy=policy) if self.remat else ResBlock
        attn_cls = (
            nn.remat(AttentionBlock, static_argnums=(3,), policy=policy) if self.remat else AttentionBlock
        )
        block_kw = dict(
            norm_groups=self.norm_groups,
            norm_eps=self.norm_eps,
            norm_impl=self.norm_impl,
            **kw,
        )
        conv_kw = dict(impl=self.conv_impl, train=train, **kw)

        # Explicit names keep the parameter tree the same with and without remat.
        def res_block(h: jax.Array, channels: int, name: str, resample: str | None = None) -> jax.Array:
            return res_cls(
                channels,
                dropout=self.dropout,
                scale_shift=self.time_injection == "scale_shift",
                resample=resample,
                conv_impl=self.conv_impl,
                materialize_input_cotangent=self.resblock_impl != "xla",
                name=name,
                **block_kw,
            )(h, emb, train)

        def attend(h: jax.Array, name: str) -> jax.Array:
            heads, head_dim = self._heads(h.shape[-1])
            return attn_cls(heads, head_dim, attention_impl=self.attention_impl, name=name, **block_kw)(
                h, context, train
            )

        def block(h: jax.Array, channels: int, level: int, name: str) -> jax.Array:
            h = res_block(h, channels, f"{name}_res")
            if self.attention_levels is None:
                attends = h.shape[1] in self.attention_resolutions
            else:
                attends = level in self.attention_levels
            return attend(h, f"{name}_attn") if attends else h

        def resample(h: jax.Array, direction: str, name: str) -> jax.Array:
            if self.resblock_updown:
                return res_block(h, h.shape[-1], name, direction)
            if direction == "up":
                return layers.conv(h.shape[-1], 3, name=name, **conv_kw)(_resample(h, "up"))
            pad = tuple(self.downsample_padding)
            return layers.conv(h.shape[-1], 3, strides=2, padding=(pad, pad), name=name, **conv_kw)(h)

        h = layers.conv(self.base_channels, 3, ("channels", "conv_out"), name="conv_in", **conv_kw)(
            x.astype(self.dtype)
        )
        skips = [h]
        last = len(self.channel_mult) - 1
        for level, channels in enumerate(self.level_channels):
            for i in range(self.num_res_blocks):
                h = block(h, channels, level, f"down{level}_{i}")
                skips.append(h)
            if level != last:
                h = resample(h, "down", f"down{level}_resample")
                skips.append(h)

        mid = self.level_channels[-1]
        h = res_block(attend(res_block(h, mid, "mid_res0"), "mid_attn"), mid, "mid_res1")

        for level, channels in reversed(list(enumerate(self.level_channels))):
            for i in range(self.num_res_blocks + 1):
                h = block(jnp.concatenate([h, skips.pop()], axis=-1), channels, level, f"up{level}_{i}")
            if level != 0:
                h = resample(h, "up", f"up{level}_resample")

        h = layers.GroupNorm(self.norm_groups, self.norm_eps, impl=self.norm_impl, name="norm_out", **kw)(
            h, train=train
        )
        out_channels = x.shape[-1] * (2 if self.learned_variance else 1)
        out = layers.conv(
            out_channels, 3, ("conv_in", "channels"), kernel_init=layers.ZEROS, name="conv_out", **conv_kw
        )(h)
        return out.astype(x.dtype)
