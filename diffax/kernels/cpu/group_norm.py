"""GroupNorm(+modulation)(+SiLU) for the CPU: the C++ kernel (``cpu_group_norm.cc`` via ``ffi``) where
the program is traced on the CPU backend and the kernel is built, else an XLA formulation tuned for XLA's CPU
backend (per-channel sums first, folded into one per-channel scale and shift); the two agree in value
and gradient (``tests/perf/test_cpu_formulations.py``, ``test_cpu_kernels.py``).

References:
  Wu & He, "Group Normalization", 2018, Eq. (1)-(3); Dhariwal & Nichol, "Diffusion Models Beat GANs on
  Image Synthesis", 2021, Sec. 3 (AdaGN: ``y_s * GroupNorm(h) + y_b``).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.kernels.cpu import ffi
from diffax.kernels.forms import differentiated_through


def channelwise(v: jax.Array, ndim: int) -> jax.Array:
    """Reshapes (B, C) to (B, 1, ..., 1, C) with ``ndim`` axes in all (explicit, no rank promotion)."""
    return v.reshape(v.shape[0], *([1] * (ndim - 2)), v.shape[-1])


def _group_scale_shift(
    x: jax.Array, gamma: jax.Array, beta: jax.Array, *, num_groups: int, epsilon: float, train: bool
) -> tuple[jax.Array, jax.Array]:
    """Per-(example, channel) ``a``, ``shift`` with ``GroupNorm(x) * gamma + beta = x * a + shift``,
    from ``_group_moments`` (with ``train``, its reverse-mode-only form ``_group_moments_train``)."""
    per_group = x.shape[-1] // num_groups
    mean, var = (_group_moments_train if train else _group_moments)(x, num_groups)
    a = jnp.repeat(jax.lax.rsqrt(var + epsilon), per_group, axis=1) * gamma
    return a, beta - jnp.repeat(mean, per_group, axis=1) * a


def _group_moments(x: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """(B, G) mean and biased variance of each example's channel groups of (B, *spatial, C) x, in two
    exact passes: per-channel sums give the group means, then per-channel sums of squared deviations
    from them the variances (no cancellation however large the mean)."""
    b, per_group, spatial = x.shape[0], x.shape[-1] // num_groups, tuple(range(1, x.ndim - 1))
    n = _group_size(x, num_groups)
    mean = jnp.sum(x, axis=spatial).reshape(b, num_groups, per_group).sum(-1) / n
    deviation = x - _group_to_channels(mean, x)
    var = jnp.sum(deviation * deviation, axis=spatial).reshape(b, num_groups, per_group).sum(-1) / n
    return mean, var


def _group_size(x: jax.Array, num_groups: int) -> int:
    """Elements per (example, group) of (B, *spatial, C) x."""
    return int(np.prod(x.shape[1:-1])) * (x.shape[-1] // num_groups)


def _group_to_channels(v: jax.Array, x: jax.Array) -> jax.Array:
    """(B, G) per-group values broadcastable against (B, *spatial, C) x, each repeated over its group's
    channels."""
    return channelwise(jnp.repeat(v, x.shape[-1] // v.shape[1], axis=1), x.ndim)


# ``_group_moments`` whose backward pass is one elementwise expression in x,
# ``d_mean / n + 2 d_var (x - mean) / n``, instead of autodiff's saved deviations (reverse mode only).
_group_moments_train = jax.custom_vjp(_group_moments, nondiff_argnums=(1,))


def _group_moments_train_fwd(x, num_groups):
    mean, var = _group_moments(x, num_groups)
    return (mean, var), (x, mean)


def _group_moments_train_bwd(num_groups, residuals, cotangents):
    x, mean = residuals
    d_mean, d_var = cotangents
    n = _group_size(x, num_groups)
    return (
        _group_to_channels(d_mean / n, x)
        + _group_to_channels(2 * d_var / n, x) * (x - _group_to_channels(mean, x)),
    )


_group_moments_train.defvjp(_group_moments_train_fwd, _group_moments_train_bwd)


@jax.custom_vjp
def _scale_shift_silu(x: jax.Array, a: jax.Array, shift: jax.Array) -> jax.Array:
    """``silu(x * a + shift)`` with (B, C) ``a`` and ``shift``; the backward pass recomputes
    ``x * a + shift`` from x instead of storing it."""
    nd = x.ndim
    return nn.silu(x * channelwise(a, nd) + channelwise(shift, nd))


def _scale_shift_silu_fwd(x, a, shift):
    return _scale_shift_silu(x, a, shift), (x, a, shift)


def _scale_shift_silu_bwd(residuals, dy):
    x, a, shift = residuals
    nd = x.ndim
    z = x * channelwise(a, nd) + channelwise(shift, nd)
    sig = jax.nn.sigmoid(z)
    dz = dy * sig * (1.0 + z * (1.0 - sig))  # d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))
    spatial = tuple(range(1, nd - 1))
    return dz * channelwise(a, nd), jnp.sum(dz * x, axis=spatial), jnp.sum(dz, axis=spatial)


_scale_shift_silu.defvjp(_scale_shift_silu_fwd, _scale_shift_silu_bwd)


def _group_norm_folded(
    x: jax.Array, gamma: jax.Array, beta: jax.Array, groups: int, epsilon: float, silu: bool
) -> jax.Array:
    """``group_norm`` of (B, P, C) x with per-example (B, C) gamma and beta, by XLA (``_group_moments``)."""
    mean, var = _group_moments(x, groups)
    a = _group_to_channels(jax.lax.rsqrt(var + epsilon), x)[:, 0] * gamma
    shift = beta - _group_to_channels(mean, x)[:, 0] * a
    y = x * a[:, None] + shift[:, None]
    return nn.silu(y) if silu else y


@functools.cache
def _kernel_group_norm(groups: int, epsilon: float, silu: bool):
    """``_group_norm_folded`` by the CPU kernel, differentiable in every mode through XLA's form."""
    return differentiated_through(
        lambda x, gamma, beta: ffi.group_norm_forward(
            x, gamma, beta, groups=groups, epsilon=epsilon, silu=silu
        )[0],
        lambda x, gamma, beta: _group_norm_folded(x, gamma, beta, groups, epsilon, silu),
    )


# ``_group_norm_folded`` by the CPU kernel with its own backward pass (reverse mode only).
@functools.cache
def _kernel_group_norm_train(groups: int, epsilon: float, silu: bool):
    train = jax.custom_vjp(_kernel_group_norm(groups, epsilon, silu))

    def forward(x, gamma, beta):
        y, mean, rstd = ffi.group_norm_forward(x, gamma, beta, groups=groups, epsilon=epsilon, silu=silu)
        return y, (x, gamma, beta, mean, rstd)

    train.defvjp(
        forward, lambda residuals, dy: ffi.group_norm_backward(*residuals, dy, groups=groups, silu=silu)
    )
    return train


def modulated(a: jax.Array, shift: jax.Array, modulation: tuple[jax.Array, jax.Array] | None):
    """Per-(example, channel) ``a``, ``shift`` of ``y = x a + shift`` followed by ADM's scale-shift
    modulation ``y (1 + m_scale) + m_shift``, folded into one scale and shift."""
    if modulation is None:
        return a, shift
    m_scale, m_shift = (jnp.asarray(m, jnp.float32) for m in modulation)
    return a * (1.0 + m_scale), shift * (1.0 + m_scale) + m_shift


def group_norm(
    x: jax.Array,
    gamma: jax.Array,
    beta: jax.Array,
    modulation: tuple[jax.Array, jax.Array] | None,
    *,
    num_groups: int,
    epsilon: float,
    silu: bool,
    train: bool,
) -> jax.Array:
    """GroupNorm of float32 (B, *spatial, C) ``x`` with (1, C) ``gamma`` and ``beta``, then the
    optional (B, C) ``modulation`` pair (``modulated``), then SiLU if ``silu``; float32.

    Traced on the CPU backend, the C++ kernel wherever it builds (``ffi.runs()``): one example's slab
    at a time, the moments in two exact passes, then normalisation, affine, modulation and SiLU in a
    third; its own backward with ``train=True``, XLA's form differentiated with ``train=False``.
    Elsewhere, or without it, per-channel sums first (the group means, then the squared deviations
    from them: ``_group_moments``), folded with the affine and modulation into one per-channel scale
    and shift, applied with the SiLU in a single pass; with ``train=True`` the moments' backward is
    one expression in x and the SiLU pass's backward recomputes the pre-activation (custom VJPs:
    reverse mode only).
    """
    b, c, nd = x.shape[0], x.shape[-1], x.ndim
    if ffi.runs():
        gamma_b, beta_b = modulated(
            jnp.broadcast_to(gamma, (b, c)), jnp.broadcast_to(beta, (b, c)), modulation
        )
        form = (_kernel_group_norm_train if train else _kernel_group_norm)(num_groups, float(epsilon), silu)
        return form(x.reshape(b, -1, c), gamma_b, beta_b).reshape(x.shape)
    a, shift = _group_scale_shift(x, gamma, beta, num_groups=num_groups, epsilon=epsilon, train=train)
    a, shift = modulated(a, shift, modulation)
    if silu and train:
        return _scale_shift_silu(x, a, shift)
    y = x * channelwise(a, nd) + channelwise(shift, nd)
    return nn.silu(y) if silu else y
