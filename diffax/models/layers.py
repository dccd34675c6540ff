"""Building blocks shared by the U-Net and DiT: attention, GroupNorm(+SiLU), time and label embeddings.

Convolution, attention and GroupNorm each live in exactly one function here, behind an ``impl`` switch:
``"xla"`` is the plain formulation (the default); ``"cpu"`` the CPU formulation of ``diffax.kernels.cpu``
(its C++ kernels when traced on the CPU backend, which makes a CPU-only program, else XLA formulations
that XLA's CPU backend fuses better); ``"auto"`` chooses by the platform the program is lowered for
(``jax.lax.platform_dependent``), so one traced program carries the CPU formulation on CPU, the fused
attention of ``diffax.kernels.tpu`` and ``diffax.kernels.gpu`` on TPU and GPU, and plain XLA elsewhere:
it exports for every platform. All forms agree in value and gradient.

Every parameter carries logical axis names (Flax partitioning metadata); ``LOGICAL_AXIS_RULES``
maps them onto a ``("data", "fsdp", "expert")`` device mesh, and ``shard_batch`` holds activations split
on the batch like the input.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffax.kernels.cpu import attention as cpu_attention
from diffax.kernels.cpu import group_norm as cpu_group_norm
from diffax.kernels.cpu import winograd
from diffax.kernels.gpu import attention as gpu_attention
from diffax.kernels.tpu import attention as tpu_attention
from diffax.sharding import BATCH_AXES

Dtype = Any
Initializer = Any

IMPLS = ("xla", "cpu", "auto")  # the values of every ``*_impl`` switch
TIME_EMBEDDINGS = ("sinusoidal", "fourier")

# Logical axis names used on parameters and activations, and the default mapping onto mesh axes. Earlier
# rules win when two dimensions of one parameter would take the same mesh axis (Flax's priority order), so
# a kernel shards its model-width dimension first. Dimensions that may be small or odd (image channels,
# class table rows, head groups, normalisation vectors, frequencies, patch outputs) stay replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", BATCH_AXES),  # the batch of an activation: split as the input batch is
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
    ("layers", None),  # the stacked blocks of a scanned network (DiT ``scan_blocks``)
)

XAVIER = nn.initializers.xavier_uniform()
ZEROS = nn.initializers.zeros_init()


def shard_batch(x: jax.Array) -> jax.Array:
    """``x`` held split on its leading (batch) axis as the input batch is, its other axes whole
    (``nn.with_logical_constraint`` to ``"activation_batch"``), on the mesh in context (``jax.set_mesh``);
    unchanged without one. Under FSDP the compiler then gathers the weights into each layer instead of
    giving the activations the weights' split (MaxText's ``activation_batch``).
    """
    names = ("activation_batch",) + (None,) * (jnp.ndim(x) - 1)
    return nn.with_logical_constraint(x, names, rules=LOGICAL_AXIS_RULES)


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
    ``"cpu"`` where the program is lowered for the CPU, ``"xla"`` elsewhere.
    """
    check_impl(impl, owner="conv")
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, *axes)),
        bias_init=nn.with_logical_partitioning(ZEROS, axes[1:]),
        conv_general_dilated=None if impl == "xla" else functools.partial(_conv_general_dilated, impl, train),
        name=name,
    )


def _conv_general_dilated(
    impl: str, train: bool, lhs: jax.Array, rhs: jax.Array, *args, **kwargs
) -> jax.Array:
    """``winograd.conv_general_dilated`` (``impl="cpu"``), or with ``"auto"`` where the program is
    lowered for the CPU and ``lax.conv_general_dilated`` elsewhere."""

    def cpu(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return winograd.conv_general_dilated(lhs, rhs, *args, **kwargs, train=train)

    if impl == "cpu":
        return cpu(lhs, rhs)
    return jax.lax.platform_dependent(
        lhs, rhs, cpu=cpu, default=lambda lhs, rhs: jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
    )


def remat_policy(name: str | None, *, owner: str) -> Any:
    """The ``jax.checkpoint_policies`` member ``name`` (None: save nothing, recompute all); raises a
    ValueError naming ``owner`` for an unknown name."""
    if name is None:
        return None
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith("_"):
        raise ValueError(
            f"{owner}: remat_policy={name!r} is not in jax.checkpoint_policies; use e.g. 'dots_saveable'."
        )
    return policy


def check_impl(impl: str, owner: str) -> None:
    """Raises a ValueError naming ``owner`` for an ``impl`` outside ``IMPLS``."""
    if impl not in IMPLS:
        raise ValueError(f"{owner}: impl={impl!r}; use one of {IMPLS}.")


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
      impl: ``"xla"``: mean and variance over a (B, *spatial, G, C/G) view. ``"cpu"``:
        ``diffax.kernels.cpu.group_norm`` (the C++ kernel when traced on the CPU backend, else
        per-channel sums folded into one scale and shift). ``"auto"``: ``"cpu"`` where the program is
        lowered for the CPU, ``"xla"`` elsewhere.
      train: the form to differentiate in reverse mode only (a train step). With ``False`` every
        form is differentiable in every mode, forward mode included (the exact likelihood's JVPs).

    Returns:
      float32 array of x's shape.

    References:
      Wu & He, "Group Normalization", 2018, Eq. (1)-(3); Dhariwal & Nichol, "Diffusion Models Beat
      GANs on Image Synthesis", 2021, Sec. 3 (AdaGN: ``y_s * GroupNorm(h) + y_b``).
    """
    check_impl(impl, owner="group_norm")
    xf = jnp.asarray(x, jnp.float32)
    c, nd = xf.shape[-1], xf.ndim
    gamma = jnp.asarray(scale, jnp.float32).reshape(1, c)
    beta = jnp.asarray(bias, jnp.float32).reshape(1, c)
    cpu = functools.partial(
        cpu_group_norm.group_norm, num_groups=num_groups, epsilon=epsilon, silu=silu, train=train
    )
    if impl == "cpu":
        return cpu(xf, gamma, beta, modulation)

    def xla(xf: jax.Array, gamma: jax.Array, beta: jax.Array, *mod: jax.Array) -> jax.Array:
        grouped = xf.reshape(*xf.shape[:-1], num_groups, c // num_groups)
        axes = (*range(1, nd - 1), nd)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        var = jnp.var(grouped, axis=axes, keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + epsilon)).reshape(xf.shape)
        a, shift = cpu_group_norm.modulated(gamma, beta, mod or None)
        y = y * cpu_group_norm.channelwise(a, nd) + cpu_group_norm.channelwise(shift, nd)
        return nn.silu(y) if silu else y

    mod = () if modulation is None else tuple(jnp.asarray(m, jnp.float32) for m in modulation)
    if impl == "xla":
        return xla(xf, gamma, beta, *mod)
    return jax.lax.platform_dependent(
        xf, gamma, beta, *mod, cpu=lambda *a: cpu(*a[:3], a[3:] or None), default=xla
    )


@jax.custom_vjp
def materialized_cotangent(x: jax.Array) -> jax.Array:
    """The identity, whose backward pass materialises the incoming cotangent behind an optimization barrier.

    Placed on a residual block's input, whose cotangent sums the skip path's gradient and the residual
    branch's: without the barrier XLA's CPU fusion recomputes that sum, and the sums it is built from
    block after block, inside each consumer (the convolution weight gradients' operand transposes).
    The barrier is there where the program is lowered for the CPU; elsewhere the backward pass is the
    identity too.
    """
    return x


def _materialized_cotangent_fwd(x):
    return x, None


def _materialized_cotangent_bwd(_, g):
    return (jax.lax.platform_dependent(g, cpu=jax.lax.optimization_barrier, default=lambda g: g),)


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


def dot_product_attention(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, *, impl: str = "xla", train: bool = False
) -> jax.Array:
    """Multi-head scaled dot-product attention ``softmax(q k^T / sqrt(H)) v``.

    Args:
      q: (B, T, N, H) queries.
      k: (B, S, N, H) keys.
      v: (B, S, N, H) values.
      impl: ``"xla"``: ``jax.nn.dot_product_attention``. ``"cpu"``: float32,
        ``diffax.kernels.cpu.attention`` (the fused C++ kernel when traced on the CPU backend, else a
        cache-blocked XLA formulation). ``"auto"``: chosen where the program is
        lowered: ``"cpu"`` on CPU, Pallas flash attention on TPU (``diffax.kernels.tpu.attention``),
        cuDNN's on NVIDIA GPUs (``diffax.kernels.gpu.attention``), each where the shapes allow, and
        ``jax.nn.dot_product_attention`` otherwise.
      train: the form to differentiate in reverse mode only (a train step); ``False`` keeps forward
        mode (the exact likelihood's JVPs).

    Returns:
      (B, T, N, H) array in q's dtype.

    References:
      Vaswani et al., "Attention Is All You Need", 2017, Eq. (1); Dao et al., "FlashAttention", 2022,
      Alg. 1-2 (blockwise forward; backward from the logsumexp with ``D = rowsum(dO * O)``).
    """
    check_impl(impl, owner="dot_product_attention")
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    cpu = functools.partial(cpu_attention.attention, train=train)
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v)
    if impl == "cpu":
        return cpu(q, k, v)
    return jax.lax.platform_dependent(
        q,
        k,
        v,
        cpu=cpu,
        tpu=functools.partial(tpu_attention.attention, train=train),
        cuda=functools.partial(gpu_attention.attention, train=train),
        default=jax.nn.dot_product_attention,
    )


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
