"""The ``impl="auto"`` layers choose their kernels where the program is lowered, not where it is traced.

One traced function lowers to the C++ CPU kernels for CPU, to Pallas flash attention for TPU (checked
against XLA's attention in Pallas' TPU interpreter, forward) and to XLA's attention for CUDA from this host,
where cuDNN's checks refuse (no CUDA jaxlib, no GPU). That cuDNN is selected on a GPU host is not
checked here: it needs a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from diffax.kernels.cpu import ffi
from diffax.kernels.gpu import attention as gpu_attention
from diffax.kernels.tpu import attention as tpu_attention
from diffax.models import layers


def _qkv(t: int, heads: int = 2, head_dim: int = 8, seed: int = 0, batch: int = 1) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(batch, t, heads, head_dim)), jnp.float32) for _ in range(3))


def _mesh() -> jax.sharding.Mesh:
    """All (8 fake) devices on one batch axis, as diffax.sharding makes it (Auto): the flash kernel runs
    per batch shard (``shard_map``)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _loss(impl: str, train: bool):
    def loss(q, k, v):
        return jnp.sum(jnp.sin(layers.dot_product_attention(q, k, v, impl=impl, train=train)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _exported(fn, args, platform: str) -> str:
    return jax.export.export(fn, platforms=[platform])(*args).mlir_module()


@pytest.mark.parametrize("train", [False, True])
def test_one_trace_lowers_to_each_platforms_kernel(train):
    if not ffi.available():
        pytest.skip("no C++ compiler: the CPU kernels are not built")
    grad = _loss("auto", train)
    args = _qkv(128, batch=jax.device_count())
    cpu = grad.lower(*args).compile().as_text()
    assert "conditional" not in cpu
    # train=False differentiates XLA's formulation (its JVP computes the primal too).
    assert ("diffax_attention_fwd" in cpu) == ("diffax_attention_bwd" in cpu) == train
    with jax.set_mesh(_mesh()):
        tpu = _exported(grad, args, "tpu")
        forward = jax.jit(lambda *a: layers.dot_product_attention(*a, impl="auto", train=train))
        assert "tpu_custom_call" in _exported(forward, args, "tpu")
    assert ("tpu_custom_call" in tpu) == train and "diffax_" not in tpu  # as on CPU
    # Several devices and no mesh in context: the kernel cannot be placed, XLA's attention runs.
    assert "tpu_custom_call" not in _exported(forward, args, "tpu")
    cuda = _exported(grad, args, "cuda")
    assert "tpu_custom_call" not in cuda and "cudnn" not in cuda and "diffax_" not in cuda
    np.testing.assert_allclose(
        np.concatenate([np.ravel(g) for g in grad(*args)]),
        np.concatenate([np.ravel(g) for g in _loss("xla", False)(*args)]),
        atol=2e-5,
    )


def test_short_sequences_take_xla_attention_on_tpu():
    assert not tpu_attention.applies(*_qkv(64))  # the kernel's key blocks are 128 long
    with jax.set_mesh(_mesh()):
        assert "tpu_custom_call" not in _exported(
            _loss("auto", True), _qkv(64, batch=jax.device_count()), "tpu"
        )


def test_cudnn_refuses_on_this_host():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(128))
    assert not gpu_attention.applies(q, k, v, train=True)


def test_flash_kernel_equals_xla_in_the_tpu_interpreter():
    """The layout and scale around the kernel (its backward kernels are JAX's, and slow to interpret)."""
    q, k, v = _qkv(128, heads=1)
    with pltpu.force_tpu_interpret_mode():
        out = tpu_attention.attention(q, k, v, train=True)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=1e-6)


def test_flash_inference_form_is_differentiable_in_forward_mode():
    q, k, v = _qkv(128)
    tangents = _qkv(128, seed=1)
    # Forward mode runs XLA's attention's JVP (the kernel's own derivative is reverse mode only).
    _, got = jax.jvp(lambda *a: tpu_attention.attention(*a, train=False), (q, k, v), tangents)
    _, want = jax.jvp(jax.nn.dot_product_attention, (q, k, v), tangents)
    np.testing.assert_allclose(got, want, atol=1e-6)
