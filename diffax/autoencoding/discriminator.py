"""The PatchGAN discriminator of the LDM autoencoder (pix2pix ``NLayerDiscriminator``)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models import layers

Dtype = Any
_CONV_INIT = nn.initializers.normal(0.02)


class PatchDiscriminator(nn.Module):
    """Patch logits (B, h, w, 1) of images (B, H, W, C).

    ``conv(ndf, 4, s2) → LeakyReLU(0.2)``, then ``n_layers − 1`` times ``conv(ndf·min(2^n, 8), 4, s2)
    → BatchNorm → LeakyReLU``, one more at stride 1, and a stride-1 ``conv(1, 4)``; padding 1
    throughout, conv weights N(0, 0.02), BatchNorm scale N(1, 0.02). BatchNorm normalises with the
    statistics of the batch it is given (the discriminator only ever runs in training mode, so no
    running averages are kept).

    References:
      Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks", 2017,
      Sec. 3.2.2 (PatchGAN); Esser et al. 2021 and Rombach et al. 2022 use it with n_layers = 3.
    """

    channels: int = 64
    n_layers: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _conv(self, features: int, stride: int, *, bias: bool, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            (4, 4),
            strides=(stride, stride),
            padding=((1, 1), (1, 1)),
            use_bias=bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(_CONV_INIT, (None, None, "conv_in", "conv_out")),
            name=name,
        )

    def _norm(self, h: jax.Array, name: str) -> jax.Array:
        mean = h.mean(axis=(0, 1, 2), keepdims=True)
        var = jnp.square(h - mean).mean(axis=(0, 1, 2), keepdims=True)
        scale = self.param(
            f"{name}_scale",
            nn.with_logical_partitioning(lambda k, s, d: 1.0 + 0.02 * jax.random.normal(k, s, d), ("norm",)),
            (h.shape[-1],),
            self.param_dtype,
        )
        bias = self.param(
            f"{name}_bias",
            nn.with_logical_partitioning(layers.ZEROS, ("norm",)),
            (h.shape[-1],),
            self.param_dtype,
        )
        return (h - mean) * jax.lax.rsqrt(var + 1e-5) * scale.reshape(1, 1, 1, -1) + bias.reshape(1, 1, 1, -1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.leaky_relu(self._conv(self.channels, 2, bias=True, name="conv0")(x.astype(self.dtype)), 0.2)
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            features = self.channels * min(2**n, 8)
            h = self._conv(features, stride, bias=False, name=f"conv{n}")(h)
            h = nn.leaky_relu(self._norm(h, f"norm{n}"), 0.2)
        return self._conv(1, 1, bias=True, name="logits")(h).astype(jnp.float32)
