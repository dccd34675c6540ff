"""The KL-regularised autoencoder of latent diffusion (the Stable Diffusion VAE), from the U-Net's layers.

``AutoencoderKL`` has the architecture of diffusers' ``AutoencoderKL`` (the published
``stabilityai/sd-vae-ft-ema`` / ``-ft-mse`` weights load into it through
``diffax.models.from_diffusers``): an encoder of residual blocks with stride-2 downsampling, a
middle block (residual, single-head self-attention, residual), a 1x1 ``quant_conv`` to the diagonal
Gaussian posterior's mean and log-variance, and the mirrored decoder behind a 1x1
``post_quant_conv``. Residual and attention blocks are the U-Net's own (``unet.ResBlock`` without a
time input, ``unet.AttentionBlock``).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.models import layers
from diffax.models.unet import AttentionBlock, ResBlock, _resample

Dtype = Any

# The posterior's log-variance is clamped to this range (LDM's DiagonalGaussianDistribution).
LOGVAR_RANGE = (-30.0, 20.0)


class _Trunk(nn.Module):
    """Shared settings of the encoder and decoder, and their middle block."""

    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    out_features: int
    norm_groups: int
    norm_eps: float
    mid_attention: bool
    norm_impl: str
    conv_impl: str
    attention_impl: str
    dtype: Dtype
    param_dtype: Dtype

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    def _kw(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _res(self, h: jax.Array, channels: int, name: str, train: bool) -> jax.Array:
        return ResBlock(
            channels,
            norm_groups=self.norm_groups,
            norm_eps=self.norm_eps,
            dropout=0.0,
            scale_shift=False,
            norm_impl=self.norm_impl,
            conv_impl=self.conv_impl,
            name=name,
            **self._kw(),
        )(h, None, train)

    def _mid(self, h: jax.Array, train: bool) -> jax.Array:
        c = h.shape[-1]
        h = self._res(h, c, "mid_res0", train)
        if self.mid_attention:
            h = AttentionBlock(
                1,
                c,
                norm_groups=self.norm_groups,
                norm_eps=self.norm_eps,
                attention_impl=self.attention_impl,
                norm_impl=self.norm_impl,
                name="mid_attn",
                **self._kw(),
            )(h, None, train)
        return self._res(h, c, "mid_res1", train)

    def _out(self, h: jax.Array, train: bool) -> jax.Array:
        h = layers.GroupNorm(
            self.norm_groups, self.norm_eps, impl=self.norm_impl, name="norm_out", **self._kw()
        )(h, train=train)
        conv_kw = dict(impl=self.conv_impl, train=train, **self._kw())
        return layers.conv(self.out_features, 3, ("conv_in", "channels"), name="conv_out", **conv_kw)(h)


class Encoder(_Trunk):
    """Images (B, H, W, C) to (B, H/f, W/f, out_features) moments, f = 2**(levels - 1)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv_kw = dict(impl=self.conv_impl, train=train, **self._kw())
        h = layers.conv(self.base_channels, 3, ("channels", "conv_out"), name="conv_in", **conv_kw)(x)
        last = len(self.channel_mult) - 1
        for level, channels in enumerate(self.level_channels):
            for i in range(self.num_res_blocks):
                h = self._res(h, channels, f"down{level}_{i}", train)
            if level != last:  # pad (0, 1), then a VALID stride-2 conv (= TensorFlow's "SAME")
                h = layers.conv(
                    channels, 3, strides=2, padding=((0, 1), (0, 1)), name=f"down{level}_resample", **conv_kw
                )(h)
        return self._out(self._mid(h, train), train)


class Decoder(_Trunk):
    """Latents (B, h, w, latent_channels) to (B, h f, w f, out_features) images."""

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        conv_kw = dict(impl=self.conv_impl, train=train, **self._kw())
        h = layers.conv(self.level_channels[-1], 3, ("channels", "conv_out"), name="conv_in", **conv_kw)(z)
        h = self._mid(h, train)
        for level, channels in reversed(list(enumerate(self.level_channels))):
            for i in range(self.num_res_blocks + 1):
                h = self._res(h, channels, f"up{level}_{i}", train)
            if level != 0:
                h = layers.conv(channels, 3, name=f"up{level}_resample", **conv_kw)(_resample(h, "up"))
        return self._out(h, train)


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``apply({"params": p}, x, method="encode") -> (mean, logvar)``,
    ``apply({"params": p}, z, method="decode") -> x``,
    ``apply({"params": p}, x, key) -> (x_rec, mean, logvar)``.

    All arrays are NHWC. The latent scaling factor is not applied inside: a latent diffusion model
    works on ``z * scaling_factor`` and decodes ``z / scaling_factor``.

    Attributes:
      image_channels: channels of the images (input of the encoder, output of the decoder).
      latent_channels: channels of the latents.
      base_channels: channels at the first level; level i has ``base_channels * channel_mult[i]``.
      channel_mult: per-level multipliers; one 2x down/upsampling between levels, so the latents are
        ``2**(len(channel_mult) - 1)`` times smaller than the images.
      num_res_blocks: residual blocks per encoder level (the decoder has one more per level).
      norm_groups: GroupNorm groups.
      norm_eps: GroupNorm epsilon (1e-6 in LDM / Stable Diffusion).
      mid_attention: single-head self-attention in the middle blocks.
      use_quant_conv: a 1x1 conv on the encoder's moments.
      use_post_quant_conv: a 1x1 conv on the latents before the decoder.
      scaling_factor: the latent scale of the latent diffusion model (0.18215 for SD), as data only.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      norm_impl, conv_impl, attention_impl: formulations (see ``diffax.models.UNet``).

    References:
      Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", 2022, Sec. 3
      and App. G (KL-regularised autoencoder, f = 8); Kingma & Welling, "Auto-Encoding Variational
      Bayes", 2014 (diagonal Gaussian posterior).
    """

    image_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm_impl: str = "xla"
    conv_impl: str = "xla"
    attention_impl: str = "xla"

    def __post_init__(self) -> None:
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        name = "AutoencoderKL"
        for field in ("image_channels", "latent_channels", "base_channels", "num_res_blocks", "norm_groups"):
            if getattr(self, field) < 1:
                raise ValueError(f"{name}: {field}={getattr(self, field)}; use a positive int.")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(
                f"{name}: channel_mult={self.channel_mult}; use positive ints, e.g. (1, 2, 4, 4)."
            )
        for c in (self.base_channels * m for m in self.channel_mult):
            if c % self.norm_groups:
                raise ValueError(
                    f"{name}: channels {c} (base_channels={self.base_channels} x channel_mult) are not "
                    f"divisible by norm_groups={self.norm_groups}; change one of them."
                )
        for field in ("norm_impl", "conv_impl", "attention_impl"):
            if getattr(self, field) not in layers.IMPLS:
                raise ValueError(f"{name}: {field}={getattr(self, field)!r}; use one of {layers.IMPLS}.")

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.channel_mult) - 1)

    def setup(self) -> None:
        trunk = dict(
            base_channels=self.base_channels,
            channel_mult=tuple(self.channel_mult),
            num_res_blocks=self.num_res_blocks,
            norm_groups=self.norm_groups,
            norm_eps=self.norm_eps,
            mid_attention=self.mid_attention,
            norm_impl=self.norm_impl,
            conv_impl=self.conv_impl,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(out_features=2 * self.latent_channels, **trunk)
        self.decoder = Decoder(out_features=self.image_channels, **trunk)
        if self.use_quant_conv:
            self.quant_conv = layers.conv(2 * self.latent_channels, 1, ("channels", "channels"), **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = layers.conv(self.latent_channels, 1, ("channels", "channels"), **kw)

    def encode(self, x: ArrayLike, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """The posterior q(z | x): (mean, logvar), each (B, H/f, W/f, latent_channels), logvar clamped.

        Args:
          x: (B, H, W, image_channels) images in [-1, 1]; H and W divisible by ``downsampling_factor``.
          train: the reverse-mode-only forms of the "cpu" formulations (a train step).
        """
        x = jnp.asarray(x)
        f = self.downsampling_factor
        if x.ndim != 4 or x.shape[-1] != self.image_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"AutoencoderKL.encode: x must be (B, H, W, {self.image_channels}) with H and W divisible by "
                f"{f}; got {x.shape}. Change the image size or image_channels."
            )
        moments = self.encoder(x.astype(self.dtype), train)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: ArrayLike, train: bool = False) -> jax.Array:
        """Images (B, h f, w f, image_channels) from (B, h, w, latent_channels) latents (unscaled)."""
        z = jnp.asarray(z)
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(
                f"AutoencoderKL.decode: z must be (B, h, w, {self.latent_channels}); got {z.shape}. "
                "Change the latents or latent_channels."
            )
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z, train).astype(jnp.float32)

    def __call__(
        self, x: ArrayLike, key: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x reconstructed through a posterior sample (the mean without ``key``): (x_rec, mean, logvar)."""
        mean, logvar = self.encode(x, train)
        z = mean if key is None else sample_posterior(mean, logvar, key)
        return self.decode(z, train), mean, logvar


def sample_posterior(mean: ArrayLike, logvar: ArrayLike, key: jax.Array) -> jax.Array:
    """A draw ``mean + exp(logvar / 2) * eps`` from the diagonal Gaussian posterior."""
    mean, logvar = jnp.asarray(mean), jnp.asarray(logvar)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
