"""Softmax attention on TPU: the Pallas flash attention kernel where its blocks tile the sequences.

``jax.experimental.pallas.ops.tpu.flash_attention`` computes attention block by block in VMEM with an
online softmax and has a backward pass of its own (Pallas kernels for dK, dV and dQ from the saved
logsumexp). It lowers to a ``tpu_custom_call``, which ``jax.export`` accepts on any host, so a program
traced on a CPU carries it. Its key blocks are multiples of 128 and divide the key length; other shapes
(the U-Net's 8 x 8 and 4 x 4 attention) use XLA's attention, which XLA's TPU compiler fuses itself.

References:
  Dao et al., "FlashAttention", 2022, Alg. 1-2; Dao, "FlashAttention-2", 2023.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
from jax.sharding import PartitionSpec as P

from diffax.kernels.forms import differentiated_through

BLOCK = pallas_flash.MIN_BLOCK_SIZE  # 128: the kernel's key blocks are multiples of it


def applies(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether the flash kernel takes (B, T, N, H) ``q`` against (B, S, N, H) ``k``, ``v``: with its
    default 128 x 128 blocks, T and S multiples of 128 and one head dimension at most 128 or a
    multiple of it; and placeable: a Pallas kernel is not partitioned automatically, so on several
    devices it runs per batch shard (``jax.shard_map``) over the mesh in context (``jax.set_mesh``),
    whose size must divide B. Without a mesh in context it runs only where there is one device."""
    t, s, h = q.shape[1], k.shape[1], q.shape[-1]
    mesh = jax.sharding.get_abstract_mesh()
    placeable = q.shape[0] % mesh.size == 0 if not mesh.empty else jax.device_count() == 1
    return (
        t % BLOCK == 0
        and s % BLOCK == 0
        and v.shape[-1] == h
        and (h <= BLOCK or h % BLOCK == 0)
        and placeable
    )


def _flash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The Pallas kernel on (B, T, N, H) arrays (it takes heads first)."""
    out = pallas_flash.flash_attention(
        *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), sm_scale=q.shape[-1] ** -0.5
    )
    return jnp.swapaxes(out, 1, 2)


# The kernel's values, differentiable in every mode through XLA's attention (forward mode included).
_flash_every_mode = differentiated_through(_flash, jax.nn.dot_product_attention)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, train: bool = False) -> jax.Array:
    """``softmax(q k^T / sqrt(H)) v`` of (B, T, N, H) ``q`` against (B, S, N, H) ``k``, ``v``, in q's
    dtype: the flash kernel where it ``applies`` (with ``train=True`` its own backward pass, reverse
    mode only; with ``False`` differentiated through XLA's attention), else
    ``jax.nn.dot_product_attention``."""
    if not applies(q, k, v):
        return jax.nn.dot_product_attention(q, k, v)
    kernel = _flash if train else _flash_every_mode
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v)
    batch = P(mesh.axis_names)  # the batch over every mesh axis, as diffax.sharding splits it
    return jax.shard_map(kernel, mesh=mesh, in_specs=(batch,) * 3, out_specs=batch, check_vma=False)(q, k, v)
