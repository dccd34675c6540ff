"""Uniform quantizers: per-output-channel symmetric weights, per-tensor asymmetric activations.

Weights: ``w ≈ s_c q``, ``q ∈ [-(2^(b-1) - 1), 2^(b-1) - 1]`` per output channel ``c`` (the last
kernel axis), the clipping ``s_c`` chosen by an MSE grid search (Nagel et al. 2021, "A White Paper on
Neural Network Quantization", Sec. 3.4). Activations: ``x ≈ s (q - z)``, ``q ∈ [0, 2^b - 1]`` with an
integer zero point so that 0 is exact (zero padding stays exact), the range ``[lo, hi]`` shrunk from
the calibration min/max by the same kind of search.
"""

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

# Shrink factors of the clipping range searched for both weights and activations.
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(20))


def channelwise(v: ArrayLike, ndim: int) -> jax.Array:
    """A per-output-channel vector shaped to broadcast against a rank-``ndim`` array (channels last)."""
    v = jnp.asarray(v)
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def weight_scale(kernel: ArrayLike, bits: int, *, clip: ArrayLike = 1.0) -> jax.Array:
    """Per-output-channel step ``clip * max|w_c| / (2^(b-1) - 1)``; shape ``(cout,)``."""
    kernel = jnp.asarray(kernel, jnp.float32)
    absmax = jnp.max(jnp.abs(kernel.reshape(-1, kernel.shape[-1])), axis=0)
    return jnp.maximum(clip * absmax, 1e-12) / (2 ** (bits - 1) - 1)


def weight_codes(kernel: ArrayLike, scale: ArrayLike, bits: int) -> jax.Array:
    """Signed integer codes ``clip(round(w / s_c))`` (int8 storage for ``bits <= 8``)."""
    top = 2 ** (bits - 1) - 1
    kernel = jnp.asarray(kernel, jnp.float32)
    return jnp.clip(jnp.round(kernel / channelwise(scale, kernel.ndim)), -top, top).astype(jnp.int8)


def fake_quant_weight(kernel: ArrayLike, scale: ArrayLike, bits: int) -> jax.Array:
    """``s_c q``: the kernel after quantization, in float32."""
    codes = weight_codes(kernel, scale, bits)
    return codes.astype(jnp.float32) * channelwise(scale, codes.ndim)


@functools.partial(jax.jit, static_argnums=1)
def search_weight_scale(kernel: ArrayLike, bits: int) -> jax.Array:
    """The per-channel step whose quantized kernel is nearest (per channel, MSE) over ``CLIP_GRID``."""
    kernel = jnp.asarray(kernel, jnp.float32)
    flat = kernel.reshape(-1, kernel.shape[-1])
    scales = jnp.stack([weight_scale(kernel, bits, clip=c) for c in CLIP_GRID])  # (G, cout)
    errors = jnp.stack([jnp.mean((fake_quant_weight(flat, s, bits) - flat) ** 2, axis=0) for s in scales])
    return jnp.take_along_axis(scales, jnp.argmin(errors, axis=0)[None], axis=0)[0]


def activation_params(lo: ArrayLike, hi: ArrayLike, bits: int) -> tuple[jax.Array, jax.Array]:
    """Step ``s`` and integer zero point ``z`` of the range ``[min(lo, 0), max(hi, 0)]``."""
    lo, hi = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0), jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    scale = jnp.maximum(hi - lo, 1e-8) / (2**bits - 1)
    return scale, jnp.clip(jnp.round(-lo / scale), 0, 2**bits - 1)


def activation_codes(x: ArrayLike, scale: ArrayLike, zero: ArrayLike, bits: int) -> jax.Array:
    """Unsigned integer codes ``clip(round(x / s) + z, 0, 2^b - 1)`` as float32 (exact integers)."""
    return jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) / scale) + zero, 0, 2**bits - 1)


def fake_quant_activation(x: ArrayLike, scale: ArrayLike, zero: ArrayLike, bits: int) -> jax.Array:
    """``s (q - z)`` in x's dtype; the gradient passes straight through (Bengio et al. 2013)."""
    x = jnp.asarray(x)
    q = (activation_codes(x, scale, zero, bits) - zero) * scale
    return x + jax.lax.stop_gradient(q.astype(x.dtype) - x)


def activation_errors(x: ArrayLike, lo: ArrayLike, hi: ArrayLike, bits: int) -> jax.Array:
    """Summed squared quantization error of ``x`` for every ``CLIP_GRID`` shrink of ``[lo, hi]``."""
    x = jnp.asarray(x, jnp.float32)
    errors = []
    for c in CLIP_GRID:
        scale, zero = activation_params(c * lo, c * hi, bits)
        errors.append(jnp.sum((fake_quant_activation(x, scale, zero, bits) - x) ** 2))
    return jnp.stack(errors)
