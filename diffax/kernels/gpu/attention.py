"""Softmax attention on NVIDIA GPUs: cuDNN's fused attention where it applies, else XLA's.

``jax.nn.dot_product_attention(implementation="cudnn")`` runs cuDNN's flash attention (forward and
backward custom calls). Whether it applies is decided by cuDNN's own checks when the program is traced:
the installed cuDNN and the GPU's compute capability, bfloat16 or float16 arrays, the head dimension.
They need a CUDA jaxlib and a GPU on the tracing host; without them (a CPU host exporting for
``cuda``) the program carries XLA's attention. That is also the only attention a portable export can
carry: cuDNN's custom call targets (``__cudnn$fmha*``) have no ``jax.export`` compatibility guarantee.
"""

import functools

import jax

from diffax.kernels.forms import differentiated_through

# The exceptions cuDNN's checks raise for a host, shape or dtype it does not take.
_REFUSALS = (RuntimeError, NotImplementedError, ValueError, TypeError)


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


_cudnn_every_mode = differentiated_through(_cudnn, jax.nn.dot_product_attention)


@functools.cache
def _cudnn_traces(shapes: tuple, train: bool) -> bool:
    q, k, v = (jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes)
    try:
        if train:
            jax.eval_shape(
                jax.grad(lambda *a: _cudnn(*a).astype("float32").sum(), argnums=(0, 1, 2)), q, k, v
            )
        else:
            jax.eval_shape(_cudnn, q, k, v)
    except _REFUSALS:
        return False
    return True


def applies(q: jax.Array, k: jax.Array, v: jax.Array, *, train: bool = False) -> bool:
    """Whether cuDNN's attention (with ``train``, its backward pass too) traces for these arrays on
    this host."""
    return _cudnn_traces(tuple((x.shape, x.dtype) for x in (q, k, v)), train)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, train: bool = False) -> jax.Array:
    """``softmax(q k^T / sqrt(H)) v`` of (B, T, N, H) ``q`` against (B, S, N, H) ``k``, ``v``, in q's
    dtype: cuDNN's fused kernel where it ``applies`` (with ``train=True`` its own backward pass; with
    ``False`` differentiated through XLA's attention, every mode), else ``jax.nn.dot_product_attention``."""
    if not applies(q, k, v, train=train):
        return jax.nn.dot_product_attention(q, k, v)
    return (_cudnn if train else _cudnn_every_mode)(q, k, v)
