"""Building blocks shared by the U-Net and DiT: attention, GroupNorm(+SiLU), time and label embeddings.

Convolution, attention and GroupNorm each live in exactly one function here, behind an ``impl`` switch:
``"xla"`` is the plain formulation (the default), ``"cpu"`` a formulation that XLA's CPU backend
fuses better (see ``/work/shared/PERF-NOTES.md``); the two agree in value and gradient.

Every parameter carries logical axis names (Flax partitioning metadata); ``LOGICAL_AXIS_RULES``
maps them onto a ``("data", "fsdp", "expert")`` device mesh.
"""

import functools
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffax.kernels.cpu import ffi as cpu_kernels
from diffax.kernels.cpu import winograd

Dtype = Any
Initializer = Any

IMPLS = ("xla", "cpu", "auto")  # the values of every ``*_impl`` switch
TIME_EMBEDDINGS = ("sinusoidal", "fourier")

# Logical axis names used on parameters, and the default mapping onto mesh axes. Earlier rules win
# when two dimensions of one parameter would take the same mesh axis (Flax's priority order), so a
# kernel shards its model-width dimension first. Dimensions that may be small or odd (image channels,
# class table rows, head groups, normalisation vectors, frequencies, patch outputs) stay replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("expert", "expert"),  # the stacked experts of a mixture-of-experts layer (diffax.models.moe)
    ("embed", "fsdp"),  # model width: DiT hidden size, U-Net channels in dense/attention layers
    ("mlp", "fsdp"),  # MLP hidden width, adaLN modulation outputs
    ("conv_out", "fsdp"),  # convolution output channels
    ("conv_in", "fsdp"),  # convolution input channels
    ("heads", None),  # heads x head_dim (joint) of q/k/v projections
    ("context", None),  # width of a cross-attention context sequence
    ("channels", None),  # image / latent channels
    ("classes", None),  # rows of the class-label table (num_classes + 1)
    ("freq", None),  # time-frequency features
    ("patch", None),  # patch_size**2 * out_channels of the DiT output layer
    ("norm", None),  # GroupNorm scale and bias
)

XAVIER = nn.initializers.xavier_uniform()
ZEROS = nn.initializers.zeros_init()


def check_common(
    owner: str,
    *,
    time_embedding: str,
    attention_impl: str,
    num_classes: int | None,
    label_dropout: float,
    dtype: Dtype,
    param_dtype: Dtype,
) -> None:
    """Validates the fields the U-Net and DiT share; raises a one-line ValueError naming the field."""
    if time_embedding not in TIME_EMBEDDINGS:
        raise ValueError(f"{owner}: time_embedding={time_embedding!r}; use one of {TIME_EMBEDDINGS}.")
    if attention_impl not in IMPLS:
        raise ValueError(f"{owner}: attention_impl={attention_impl!r}; use one of {IMPLS}.")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"{owner}: num_classes={num_classes}; use a positive int or None.")
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"{owner}: label_dropout={label_dropout}; use a probability in [0, 1].")
    if label_dropout > 0 and num_classes is None:
        raise ValueError(f"{owner}: label_dropout={label_dropout} needs num_classes; set num_classes.")
    for field, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        try:
            is_float = jnp.issubdtype(jnp.dtype(value), jnp.floating)
        except TypeError:
            is_float = False
        if not is_float:
            raise ValueError(f"{owner}: {field}={value!r} is not a float dtype; use e.g. 'float32'.")


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    kernel_init: Initializer = XAVIER,
    name: str | None = None,
) -> nn.Dense:
    """A ``nn.Dense`` whose kernel carries logical axes ``axes`` and whose bias carries ``axes[1]``."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(ZEROS, axes[1:]),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    axes: tuple[str, str] = ("conv_in", "conv_out"),
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    strides: int = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    kernel_init: Initializer = XAVIER,
    impl: str = "xla",
    train: bool = False,
    name: str | None = None,
) -> nn.Conv:
    """A square NHWC ``nn.Conv``; the kernel's channel dimensions carry logical axes ``axes``.

    ``impl``: ``"xla"``: ``lax.conv_general_dilated``. ``"cpu"``: 3x3 stride-1 "SAME" float32 (or
    float64) convolutions of maps at least ``winograd.MIN_SPATIAL`` wide as Winograd F(4x4, 3x3)
    (values and gradients equal up to rounding), every other one as ``"xla"``: ``winograd.conv3x3``
    (derivatives of every order, forward mode included), or with ``train=True``
    ``winograd.conv3x3_train`` (a Winograd backward pass too; reverse mode only). ``"auto"``:
    ``"cpu"`` on the CPU backend, ``"xla"`` elsewhere.
    """
    impl = resolve_impl(impl, owner="conv")
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, *axes)),
        bias_init=nn.with_logical_partitioning(ZEROS, axes[1:]),
        conv_general_dilated=(
            functools.partial(winograd.conv_general_dilated, train=train) if impl == "cpu" else None
        ),
        name=name,
    )


def resolve_impl(impl: str, owner: str = "resolve_impl") -> str:
    """The formulation ``impl`` stands for: ``"auto"`` is ``"cpu"`` on the CPU backend, else ``"xla"``.

    Raises a ValueError naming ``owner`` for a value outside ``IMPLS``.
    """
    if impl not in IMPLS:
        raise ValueError(f"{owner}: impl={impl!r}; use one of {IMPLS}.")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def _channelwise(v: jax.Array, ndim: int) -> jax.Array:
    """Reshapes (B, C) to (B, 1, ..., 1, C) with ``ndim`` axes in all (explicit, no rank promotion)."""
    return v.reshape(v.shape[0], *([1] * (ndim - 2)), v.shape[-1])


def group_norm(
    x: ArrayLike,
    scale: ArrayLike,
    bias: ArrayLike,
    *,
    num_groups: int,
    epsilon: float = 1e-5,
    modulation: tuple[ArrayLike, ArrayLike] | None = None,
    silu: bool = True,
    impl: str = "xla",
    train: bool = False,
) -> jax.Array:
    """Group normalisation with affine, optional FiLM modulation, optional SiLU, in float32.

    ``y = norm(x) * scale + bias``; with ``modulation=(m_scale, m_shift)`` then
    ``y = y * (1 + m_scale) + m_shift`` (ADM's scale-shift norm); then ``silu(y)`` if ``silu``.

    Args:
      x: (B, *spatial, C) activations.
      scale: (C,) affine scale.
      bias: (C,) affine bias.
      num_groups: number of channel groups G; C must be divisible by G.
      epsilon: added to the group variance.
      modulation: optional pair of (B, C) arrays (scale, shift).
      silu: apply SiLU at the end.
      impl: ``"xla"``: mean and variance over a (B, *spatial, G, C/G) view. ``"cpu"``: on the CPU
        backend, the C++ kernel ``cpu_group_norm.cc`` (``cpu_kernels``: one example's slab at a time,
        the moments in two exact passes, then normalisation, affine, modulation and SiLU in a third;
        its own backward with ``train=True``, XLA's form below differentiated with ``train=False``)
        wherever it builds; elsewhere, or without it, per-channel sums first (the group means, then
        the squared deviations from them: ``_group_moments``), folded with the affine and modulation
        into one per-channel scale and shift, applied with the SiLU in a single pass; with
        ``train=True`` the moments' backward is one expression in x and
        the SiLU pass's backward recomputes the pre-activation (custom VJPs: reverse mode only).
        ``"auto"``: ``"cpu"`` on the CPU backend, ``"xla"`` elsewhere.
      train: the form to differentiate in reverse mode only (a train step). With ``False`` every
        form is differentiable in every mode, forward mode included (the exact likelihood's JVPs).

    Returns:
      float32 array of x's shape.

    References:
      Wu & He, "Group Normalization", 2018, Eq. (1)-(3); Dhariwal & Nichol, "Diffusion Models Beat
      GANs on Image Synthesis", 2021, Sec. 3 (AdaGN: ``y_s * GroupNorm(h) + y_b``).
    """
    impl = resolve_impl(impl, owner="group_norm")
    xf = jnp.asarray(x, jnp.float32)
    b, c, nd = xf.shape[0], xf.shape[-1], xf.ndim
    g = num_groups
    gamma = jnp.asarray(scale, jnp.float32).reshape(1, c)
    beta = jnp.asarray(bias, jnp.float32).reshape(1, c)
    if impl == "xla":
        grouped = xf.reshape(*xf.shape[:-1], g, c // g)
        axes = (*range(1, nd - 1), nd)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        var = jnp.var(grouped, axis=axes, keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + epsilon)).reshape(xf.shape)
        a = jnp.broadcast_to(gamma, (b, c))
        shift = jnp.broadcast_to(beta, (b, c))
    elif cpu_kernels.runs():
        gamma_b, beta_b = jnp.broadcast_to(gamma, (b, c)), jnp.broadcast_to(beta, (b, c))
        if modulation is not None:
            m_scale, m_shift = (jnp.asarray(m, jnp.float32) for m in modulation)
            gamma_b, beta_b = gamma_b * (1.0 + m_scale), beta_b * (1.0 + m_scale) + m_shift
        kernel = _kernel_group_norm_train if train else _kernel_group_norm
        return kernel(xf.reshape(b, -1, c), gamma_b, beta_b, g, float(epsilon), silu).reshape(xf.shape)
    else:
        y = xf
        a, shift = _group_scale_shift(xf, gamma, beta, num_groups=g, epsilon=epsilon, train=train)
    if modulation is not None:
        m_scale, m_shift = (jnp.asarray(m, jnp.float32) for m in modulation)
        a, shift = a * (1.0 + m_scale), shift * (1.0 + m_scale) + m_shift
    if silu and impl == "cpu" and train:
        return _scale_shift_silu(y, a, shift)
    y = y * _channelwise(a, nd) + _channelwise(shift, nd)
    return nn.silu(y) if silu else y


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
    return _channelwise(jnp.repeat(v, x.shape[-1] // v.shape[1], axis=1), x.ndim)


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
    return nn.silu(x * _channelwise(a, nd) + _channelwise(shift, nd))


def _scale_shift_silu_fwd(x, a, shift):
    return _scale_shift_silu(x, a, shift), (x, a, shift)


def _scale_shift_silu_bwd(residuals, dy):
    x, a, shift = residuals
    nd = x.ndim
    z = x * _channelwise(a, nd) + _channelwise(shift, nd)
    sig = jax.nn.sigmoid(z)
    dz = dy * sig * (1.0 + z * (1.0 - sig))  # d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))
    spatial = tuple(range(1, nd - 1))
    return dz * _channelwise(a, nd), jnp.sum(dz * x, axis=spatial), jnp.sum(dz, axis=spatial)


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


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _kernel_group_norm(x, gamma, beta, groups, epsilon, silu):
    """``_group_norm_folded`` by the CPU kernel, differentiable in every mode through XLA's form."""
    return cpu_kernels.group_norm_forward(x, gamma, beta, groups=groups, epsilon=epsilon, silu=silu)[0]


@_kernel_group_norm.defjvp
def _kernel_group_norm_jvp(groups, epsilon, silu, primals, tangents):
    return jax.jvp(lambda *a: _group_norm_folded(*a, groups, epsilon, silu), primals, tangents)


# ``_group_norm_folded`` by the CPU kernel with its own backward pass (reverse mode only).
_kernel_group_norm_train = jax.custom_vjp(_kernel_group_norm, nondiff_argnums=(3, 4, 5))


def _kernel_group_norm_train_fwd(x, gamma, beta, groups, epsilon, silu):
    y, mean, rstd = cpu_kernels.group_norm_forward(x, gamma, beta, groups=groups, epsilon=epsilon, silu=silu)
    return y, (x, gamma, beta, mean, rstd)


def _kernel_group_norm_train_bwd(groups, epsilon, silu, residuals, dy):
    return cpu_kernels.group_norm_backward(*residuals, dy, groups=groups, silu=silu)


_kernel_group_norm_train.defvjp(_kernel_group_norm_train_fwd, _kernel_group_norm_train_bwd)


@jax.custom_vjp
def materialized_cotangent(x: jax.Array) -> jax.Array:
    """The identity, whose backward pass materialises the incoming cotangent behind an optimization barrier.

    Placed on a residual block's input, whose cotangent sums the skip path's gradient and the residual
    branch's: without the barrier XLA's CPU fusion recomputes that sum, and the sums it is built from
    block after block, inside each consumer (the convolution weight gradients' operand transposes).
    """
    return x


def _materialized_cotangent_fwd(x):
    return x, None


def _materialized_cotangent_bwd(_, g):
    return (jax.lax.optimization_barrier(g),)


materialized_cotangent.defvjp(_materialized_cotangent_fwd, _materialized_cotangent_bwd)


class GroupNorm(nn.Module):
    """GroupNorm(+modulation)(+SiLU) with learned per-channel scale and bias; see ``group_norm``."""

    num_groups: int
    epsilon: float = 1e-5
    silu: bool = True
    impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: ArrayLike, modulation: tuple[ArrayLike, ArrayLike] | None = None, train: bool = False
    ) -> jax.Array:
        c = jnp.shape(x)[-1]
        init = nn.initializers.ones_init()
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (c,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(ZEROS, ("norm",)), (c,), self.param_dtype)
        y = group_norm(
            x,
            scale,
            bias,
            num_groups=self.num_groups,
            epsilon=self.epsilon,
            modulation=modulation,
            silu=self.silu,
            impl=self.impl,
            train=train,
        )
        return y.astype(self.dtype)


def l2_cache_bytes(cache_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The size of CPU 0's level-2 cache from Linux's sysfs (``index*/level``, ``index*/size`` such as
    ``2048K``), or None where sysfs does not list it."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for index in sorted(pathlib.Path(cache_dir).glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if size[-1:] in units and size[:-1].isdigit():
            return int(size[:-1]) * units[size[-1]]
        if size.isdigit():
            return int(size)
    return None


def attention_block_bytes(l2_bytes: int | None) -> int:
    """Bytes of float32 scores per step of the blocked "cpu" attention with a backward pass, chosen by
    the L2 cache per core: 8 MiB from 2 MiB of L2, 4 MiB below it or where the L2 is unknown.

    Measured in one process, both variants alternating (speedup of the whole train step):
    - 2-core AMD EPYC, 1 MiB L2: 4 MiB trains 3% (``small``) and 4-6% (``ddpm-cifar10``) faster than
      1 MiB; 2 MiB 6%, 8 MiB 1-3%, 16 MiB 11% slower than 4 MiB
      (``benchmarks/results/2026-12-01-train.md``).
    - 2-core Intel Xeon (AVX-512, AMX), 2 MiB L2: 8 MiB 1.046 (``small`` b32), 1.062 (b16) and 1.045
      (``ddpm-cifar10`` b32) over 4 MiB; 16 MiB 1.007 over 8 (``benchmarks/results/2026-12-02-intel.md``).
    """
    return 8 << 20 if l2_bytes is not None and l2_bytes >= 2 << 20 else 4 << 20


# Bytes of float32 scores one step of the "cpu" attention keeps live between the QK^T product, the
# exponential and the PV product, in a train step (see ``attention_block_bytes``).
ATTENTION_BLOCK_BYTES = attention_block_bytes(l2_cache_bytes())
# Without a backward pass (sampling, evaluation) XLA's CPU backend hands a block's whole attention, both
# products and the softmax, to one YNNPACK fusion, which does not keep the block's scores. There, larger
# blocks ran faster while one head's float32 (T, S) scores took at most 256 KiB (T = S = 256: all heads
# at once 1.2-1.6x faster than 4 MiB blocks; 1.0-1.2x at 64), slower from 1.3 MiB (T = S = 576 to 4096:
# 1.1-1.45x). Such heads go in blocks of up to INFERENCE_BLOCK_BYTES, which bounds the memory where no
# YNNPACK fusion takes the block (1 GiB of scores at batch 256 of `small` without the bound). The U-Net's
# forward pass and samplers ran 1.02-1.14x faster (benchmarks/results/2026-12-01-inference-attention.md).
INFERENCE_HEAD_BYTES = 512 << 10
INFERENCE_BLOCK_BYTES = 256 << 20


def _heads_per_block(groups: int, t: int, s: int, block_bytes: int | None = None) -> int:
    """The largest divisor of ``groups`` whose (t, s) float32 score blocks fit ``block_bytes``
    (``ATTENTION_BLOCK_BYTES`` if None)."""
    fit = max(1, (ATTENTION_BLOCK_BYTES if block_bytes is None else block_bytes) // (4 * t * s))
    return max(d for d in range(1, min(groups, fit) + 1) if groups % d == 0)


def _blocked(fn, *arrays: jax.Array, block_bytes: int | None = None) -> tuple[jax.Array, ...]:
    """Maps ``fn`` over blocks of the leading (batch x heads) axis, one block after the other."""
    groups, t = arrays[0].shape[:2]
    block = _heads_per_block(groups, t, arrays[1].shape[1], block_bytes)
    if block == groups:
        return fn(*arrays)
    split = tuple(a.reshape(groups // block, block, *a.shape[1:]) for a in arrays)
    return tuple(o.reshape(groups, *o.shape[2:]) for o in jax.lax.map(lambda a: fn(*a), split))


def _attention_block(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of pre-scaled heads-first float32 (G, T, H) blocks; returns (out, logsumexp)."""
    s = jnp.einsum("gth,gsh->gts", q, k)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    rows = jnp.sum(p, axis=-1, keepdims=True)
    return jnp.einsum("gts,gsh->gth", p, v) / rows, (m + jnp.log(rows))[..., 0]


def _attention_block_grads(
    q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array, lse: jax.Array, delta: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of one block, recomputing the probabilities from the saved logsumexp.

    The blocks are built transposed, (S, T): dK = dS^T Q and dV = P^T dO are then plain products.
    XLA's CPU backend runs a product whose left operand is contracted on its first dimension ~3x
    slower, so dS^T is transposed once (in cache) for dQ = dS K; the barrier keeps XLA from folding
    that transpose back into the product.
    """
    p_t = jnp.exp(jnp.einsum("gsh,gth->gst", k, q) - lse[:, None, :])
    ds_t = p_t * (jnp.einsum("gsh,gth->gst", v, do) - delta[:, None, :])
    dk = jnp.einsum("gst,gth->gsh", ds_t, q)
    dv = jnp.einsum("gst,gth->gsh", p_t, do)
    dq = jnp.einsum("gts,gsh->gth", jax.lax.optimization_barrier(jnp.swapaxes(ds_t, 1, 2)), k)
    return dq, dk, dv


def _inference_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Attention of pre-scaled heads-first (G, T, H) float32 arrays, block by block over G, for a
    forward pass (differentiable in every mode): heads whose scores fit ``INFERENCE_HEAD_BYTES`` go
    in blocks of ``INFERENCE_BLOCK_BYTES``."""
    short = 4 * q.shape[1] * k.shape[1] <= INFERENCE_HEAD_BYTES
    return _blocked(_attention_block, q, k, v, block_bytes=INFERENCE_BLOCK_BYTES if short else None)[0]


# ``_inference_attention`` with a blockwise backward pass recomputing the probabilities from the saved
# logsumexp (reverse mode only); its primal runs only without a backward pass.
_blocked_attention = jax.custom_vjp(_inference_attention)


def _blocked_attention_fwd(q, k, v):
    out, lse = _blocked(_attention_block, q, k, v)
    return out, (q, k, v, out, lse)


def _blocked_attention_bwd(residuals, d_out):
    q, k, v, out, lse = residuals
    delta = jnp.sum(d_out * out, axis=-1)  # rowsum(dP * P) = rowsum(dO * O)
    return _blocked(_attention_block_grads, q, k, v, d_out, lse, delta)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, train: bool) -> jax.Array:
    """impl="cpu" attention of float32 (B, T, N, H) arrays by XLA: heads first, q pre-scaled, blocks."""
    b, t, n, _ = q.shape

    def heads_first(x: jax.Array) -> jax.Array:
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(b * n, x.shape[1], x.shape[3])

    attend = _blocked_attention if train else _inference_attention
    out = attend(heads_first(q * q.shape[-1] ** -0.5), heads_first(k), heads_first(v))
    return jnp.transpose(out.reshape(b, n, t, v.shape[-1]), (0, 2, 1, 3))


@jax.custom_jvp
def _kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The fused CPU kernel's attention, differentiable in every mode through ``_xla_attention``."""
    return cpu_kernels.attention_forward(q, k, v)[0]


@_kernel_attention.defjvp
def _kernel_attention_jvp(primals, tangents):
    return jax.jvp(functools.partial(_xla_attention, train=False), primals, tangents)


# The fused CPU kernel's attention with its own backward pass (reverse mode only), which recomputes
# the probabilities from the saved logsumexp; its primal runs only without a backward pass.
_kernel_train_attention = jax.custom_vjp(_kernel_attention)


def _kernel_train_attention_fwd(q, k, v):
    out, lse = cpu_kernels.attention_forward(q, k, v)
    return out, (q, k, v, out, lse)


def _kernel_train_attention_bwd(residuals, d_out):
    return cpu_kernels.attention_backward(*residuals, d_out)


_kernel_train_attention.defvjp(_kernel_train_attention_fwd, _kernel_train_attention_bwd)


def dot_product_attention(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, *, impl: str = "xla", train: bool = False
) -> jax.Array:
    """Multi-head scaled dot-product attention ``softmax(q k^T / sqrt(H)) v``.

    Args:
      q: (B, T, N, H) queries.
      k: (B, S, N, H) keys.
      v: (B, S, N, H) values.
      impl: ``"xla"``: ``jax.nn.dot_product_attention`` (the backend's fused kernel where it has
        one). ``"cpu"``: float32. On the CPU backend, the fused C++ kernel ``cpu_attention.cc``
        (``cpu_kernels``: nothing of the (T, S) scores leaves the cache, the backward recomputes them
        from the saved logsumexp) wherever it builds; ``train=False`` differentiates it through the
        XLA formulation (forward and reverse mode). Elsewhere, or without the kernel, the XLA
        formulation: heads first, q pre-scaled, in blocks of heads whose (T, S) scores fit in cache
        (``ATTENTION_BLOCK_BYTES``), ``exp(s - max s)`` times v divided by the row sums after the PV
        product; with ``train=True`` a custom VJP (reverse mode only) recomputes each block's
        probabilities from the saved logsumexp, and heads of short sequences
        (``INFERENCE_HEAD_BYTES``) go in larger blocks when no backward pass runs; with
        ``train=False`` they always do, and plain autodiff differentiates the blocks in every mode.
        ``"auto"``: ``"cpu"`` on the CPU backend, ``"xla"`` elsewhere.
      train: the form to differentiate in reverse mode only (a train step); ``False`` keeps forward
        mode (the exact likelihood's JVPs).

    Returns:
      (B, T, N, H) array in q's dtype.

    References:
      Vaswani et al., "Attention Is All You Need", 2017, Eq. (1); Dao et al., "FlashAttention", 2022,
      Alg. 1-2 (blockwise forward; backward from the logsumexp with ``D = rowsum(dO * O)``).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if resolve_impl(impl, owner="dot_product_attention") == "xla":
        return jax.nn.dot_product_attention(q, k, v)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    if cpu_kernels.runs():
        out = (_kernel_train_attention if train else _kernel_attention)(q32, k32, v32)
    else:
        out = _xla_attention(q32, k32, v32, train)
    return out.astype(q.dtype)


class Attention(nn.Module):
    """Multi-head self-attention, or cross-attention to ``context`` when it is given.

    Self-attention uses one fused q/k/v projection; cross-attention projects q from x and k/v from
    the context. The output projection maps back to x's width (zero-initialised if asked).
    """

    num_heads: int
    head_dim: int
    impl: str = "xla"
    zero_init_out: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: ArrayLike, context: ArrayLike | None = None, train: bool = False, identity_map: bool = False
    ) -> jax.Array:
        """``identity_map``: self-attention with the identity as its attention map (each position
        attends to itself, the output is v), perturbed-attention guidance's perturbation."""
        x = jnp.asarray(x)
        b, t, c = x.shape
        n, h = self.num_heads, self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if context is None:
            qkv = dense(3 * n * h, ("embed", "heads"), name="qkv", **kw)(x).reshape(b, t, 3, n, h)
            # Split, not indexed: the cotangent of a split is one concatenation, that of three index
            # slices three zero-padded copies summed (attention layer forward+backward at (32, 256, 128)
            # on CPU 130 -> 112 ms; `small` train step 1.011-1.015).
            q, k, v = (a[:, :, 0] for a in jnp.split(qkv, 3, axis=2))
        else:
            context = jnp.asarray(context)
            q = dense(n * h, ("embed", "heads"), name="q", **kw)(x).reshape(b, t, n, h)
            kv = dense(2 * n * h, ("context", "heads"), name="kv", **kw)(context)
            kv = kv.reshape(b, context.shape[1], 2, n, h)
            k, v = (a[:, :, 0] for a in jnp.split(kv, 2, axis=2))
        if identity_map and context is not None:
            raise ValueError("identity_map perturbs self-attention; this call is cross-attention.")
        o = v if identity_map else dot_product_attention(q, k, v, impl=self.impl, train=train)
        o = o.reshape(b, t, n * h)
        out_init = ZEROS if self.zero_init_out else XAVIER
        return dense(c, ("heads", "embed"), kernel_init=out_init, name="out", **kw)(o)


def time_features(
    t: ArrayLike,
    dim: int,
    *,
    kind: str = "sinusoidal",
    time_scale: float = 1000.0,
    fourier_scale: float = 16.0,
    max_period: float = 10000.0,
    sin_first: bool = False,
    freq_shift: float = 0.0,
    time_offset: float = 0.0,
) -> jax.Array:
    """Continuous-time features of t, shape (B, dim) float32, ordered [cos | sin] (or [sin | cos]).

    Args:
      t: (B,) continuous times.
      dim: feature width (even).
      kind: ``"sinusoidal"``: ``cos/sin(t * time_scale * w_i)`` with geometric frequencies
        ``w_i = max_period**(-i / (dim/2))``; ``time_scale=1000`` makes t in [0, 1] look like DDPM's
        integer steps. ``"fourier"``: Gaussian Fourier features ``cos/sin(2 pi t w_i)`` with
        ``w_i ~ N(0, fourier_scale**2)`` drawn once from a fixed seed (a constant, not a parameter).
      time_scale: multiplies t for the sinusoidal kind.
      fourier_scale: standard deviation of the Fourier frequencies.
      max_period: longest period of the sinusoidal kind.
      sin_first: order the features [sin | cos] (DDPM's TensorFlow code; diffusers'
        ``flip_sin_to_cos=False``).
      freq_shift: sinusoidal frequencies ``max_period**(-i / (dim/2 - freq_shift))`` (diffusers'
        ``downscale_freq_shift``; 1 in DDPM's code and in diffusers' DiT).
      time_offset: subtracted from ``t * time_scale``; 1 turns diffax's ``t = (i + 1) / T`` back
        into the integer step i that published discrete-time networks were trained on.

    Returns:
      (B, dim) float32 array.

    References:
      Vaswani et al. 2017, Sec. 3.5 (sinusoidal embedding); Ho et al., "Denoising Diffusion
      Probabilistic Models", 2020, App. B; Tancik et al., "Fourier Features Let Networks Learn High
      Frequency Functions", 2020, Eq. (5); Song et al., "Score-Based Generative Modeling through
      SDEs", 2021, App. H.
    """
    t = jnp.asarray(t, jnp.float32)
    half = dim // 2
    if kind == "sinusoidal":
        freqs = np.exp(-np.log(max_period) * np.arange(half) / (half - freq_shift))
        args = (t * time_scale - time_offset)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
    elif kind == "fourier":
        freqs = 2 * np.pi * fourier_scale * np.random.default_rng(0).standard_normal(half)
        args = t[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
    else:
        raise ValueError(f"time_features: kind={kind!r}; use one of {TIME_EMBEDDINGS}.")
    cos, sin = jnp.cos(args), jnp.sin(args)
    return jnp.concatenate([sin, cos] if sin_first else [cos, sin], axis=-1)


class TimeEmbedding(nn.Module):
    """``Dense(width) -> SiLU -> Dense(width)`` on ``time_features(t, freq_dim)``."""

    width: int
    freq_dim: int
    kind: str = "sinusoidal"
    time_scale: float = 1000.0
    fourier_scale: float = 16.0
    sin_first: bool = False
    freq_shift: float = 0.0
    time_offset: float = 0.0
    kernel_init: Initializer = XAVIER
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: ArrayLike) -> jax.Array:
        f = time_features(
            t,
            self.freq_dim,
            kind=self.kind,
            time_scale=self.time_scale,
            fourier_scale=self.fourier_scale,
            sin_first=self.sin_first,
            freq_shift=self.freq_shift,
            time_offset=self.time_offset,
        )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        h = nn.silu(dense(self.width, ("freq", "embed"), **kw)(f))
        return dense(self.width, ("mlp", "embed"), **kw)(h)


# Random-field width of ``dropout``: each 32-bit random word gives two 16-bit uniform fields.
DROPOUT_FIELD_BITS = 16


def dropout(x: ArrayLike, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout: zeroes each element with probability ``rate``, scales the rest by 1 / keep.

    Each 32-bit random word from ``jax.random.bits`` decides two elements, one per 16-bit half,
    instead of one per word as in ``jax.random.bernoulli``: the random bits, the costly part on CPU
    (Threefry), are halved. The rate is therefore rounded to a multiple of 2^-16 (0.1 becomes
    6554 / 65536 = 0.100006) and the kept elements are scaled by the inverse of that rounded keep
    probability, so ``E[dropout(x)] = x`` exactly. The words are drawn in x's shape with the last
    axis halved, so they shard like x.

    References:
      Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting", 2014,
      Sec. 4 (here scaled at training time, so inference is the identity).
    """
    x = jnp.asarray(x)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate={rate}; use a rate in [0, 1).")
    if x.ndim == 0:
        raise ValueError("dropout: x is a scalar; pass an array with at least one axis.")
    levels = 1 << DROPOUT_FIELD_BITS
    threshold = round(rate * levels)
    if threshold == 0:
        return x
    *lead, channels = x.shape
    words = jax.random.bits(key, (*lead, -(-channels // 2)), jnp.uint32)
    fields = jnp.stack([words >> DROPOUT_FIELD_BITS, words & (levels - 1)], axis=-1)
    keep = fields.reshape(*lead, -1)[..., :channels] >= threshold
    return jnp.where(keep, x * (levels / (levels - threshold)), 0).astype(x.dtype)


class LabelEmbedding(nn.Module):
    """Class-label table with an extra null row (index ``num_classes``) for classifier-free guidance.

    With ``train=True`` each label is replaced by the null label with probability ``dropout``,
    drawn from the ``"dropout"`` rng stream.

    References:
      Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022, Alg. 1.
    """

    num_classes: int
    width: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: ArrayLike, train: bool) -> jax.Array:
        labels = jnp.asarray(labels)
        if train and self.dropout > 0:
            drop = jax.random.bernoulli(self.make_rng("dropout"), self.dropout, labels.shape)
            labels = jnp.where(drop, self.num_classes, labels)
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("classes", "embed"))
        table = nn.Embed(
            self.num_classes + 1,
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=init,
        )
        return table(labels)


def split_cond(
    cond: Any, batch: int, *, num_classes: int | None, context_dim: int | None, owner: str
) -> tuple[jax.Array | None, jax.Array | None]:
    """Splits a model's ``cond`` into (labels, context) and checks their shapes.

    ``cond`` is None, an int label array (B,), or a dict with optional keys ``"label"`` (B,) and
    ``"context"`` (B, L, context_dim). A class-conditional model given no label uses the null label
    ``num_classes`` (the unconditional path).
    """
    if isinstance(cond, dict):
        unknown = set(cond) - {"label", "context"}
        if unknown:
            raise ValueError(f"{owner}: cond has unknown keys {sorted(unknown)}; use 'label', 'context'.")
        labels, context = cond.get("label"), cond.get("context")
    else:
        labels, context = cond, None
    if labels is not None:
        if num_classes is None:
            raise ValueError(f"{owner}: got class labels but num_classes is None; set num_classes.")
        labels = jnp.asarray(labels)
        if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"{owner}: labels must be an int array of shape ({batch},); got {labels.dtype}{labels.shape}."
            )
    elif num_classes is not None:
        labels = jnp.full((batch,), num_classes, jnp.int32)
    if context_dim is None:
        if context is not None:
            raise ValueError(f"{owner}: got cond['context'] but context_dim is None; set context_dim.")
    else:
        if context is None:
            raise ValueError(
                f"{owner}: context_dim={context_dim} needs cond={{'context': (B, L, {context_dim})}}."
            )
        context = jnp.asarray(context)
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != context_dim:
            raise ValueError(
                f"{owner}: cond['context'] must have shape ({batch}, L, {context_dim}); got {context.shape}."
            )
    return labels, context


def check_inputs(owner: str, x: jax.Array, t: jax.Array) -> None:
    """Checks x is (B, H, W, C) float and t is (B,); raises a one-line ValueError otherwise."""
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{owner}: x must be a float NHWC array (B, H, W, C); got {x.dtype}{x.shape}.")
    if t.shape != (x.shape[0],):
        raise ValueError(f"{owner}: t must have shape (batch,) = ({x.shape[0]},); got {t.shape}.")
