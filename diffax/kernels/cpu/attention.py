"""Softmax attention for the CPU: the fused C++ kernel (``cpu_attention.cc`` via ``ffi``) where the
program is traced on the CPU backend and the kernel is built, else an XLA formulation tuned for XLA's CPU
backend (heads first, q pre-scaled, blocks of heads whose scores fit in cache); the two agree in value
and gradient (``tests/perf/test_cpu_formulations.py``, ``test_cpu_kernels.py``).

References:
  Vaswani et al., "Attention Is All You Need", 2017, Eq. (1); Dao et al., "FlashAttention", 2022,
  Alg. 1-2 (blockwise forward; backward from the logsumexp with ``D = rowsum(dO * O)``).
"""

import functools
import pathlib

import jax
import jax.numpy as jnp

from diffax.kernels.cpu import ffi
from diffax.kernels.forms import differentiated_through


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


# The fused CPU kernel's attention, differentiable in every mode through ``_xla_attention``.
_kernel_attention = differentiated_through(
    lambda q, k, v: ffi.attention_forward(q, k, v)[0], functools.partial(_xla_attention, train=False)
)


# The fused CPU kernel's attention with its own backward pass (reverse mode only), which recomputes
# the probabilities from the saved logsumexp; its primal runs only without a backward pass.
_kernel_train_attention = jax.custom_vjp(_kernel_attention)


def _kernel_train_attention_fwd(q, k, v):
    out, lse = ffi.attention_forward(q, k, v)
    return out, (q, k, v, out, lse)


def _kernel_train_attention_bwd(residuals, d_out):
    return ffi.attention_backward(*residuals, d_out)


_kernel_train_attention.defvjp(_kernel_train_attention_fwd, _kernel_train_attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, train: bool = False) -> jax.Array:
    """``softmax(q k^T / sqrt(H)) v`` of (B, T, N, H) queries against (B, S, N, H) keys and values, in
    float32, returned in q's dtype.

    Traced on the CPU backend, the fused kernel wherever it builds (``ffi.runs()``): nothing of the
    (T, S) scores leaves the cache, and with ``train=True`` its backward recomputes them from the
    saved logsumexp; ``train=False`` differentiates it through the XLA formulation (every mode).
    Elsewhere, or without the kernel, the XLA formulation: heads first, q pre-scaled, in blocks of
    heads whose (T, S) scores fit in cache (``ATTENTION_BLOCK_BYTES``), ``exp(s - max s)`` times v
    divided by the row sums after the PV product; with ``train=True`` a custom VJP (reverse mode only)
    recomputes each block's probabilities from the saved logsumexp, and heads of short sequences
    (``INFERENCE_HEAD_BYTES``) go in larger blocks when no backward pass runs; with ``train=False``
    they always do, and plain autodiff differentiates the blocks in every mode.
    """
    q32, k32, v32 = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    if ffi.runs():
        out = (_kernel_train_attention if train else _kernel_attention)(q32, k32, v32)
    else:
        out = _xla_attention(q32, k32, v32, train)
    return out.astype(jnp.result_type(q))
