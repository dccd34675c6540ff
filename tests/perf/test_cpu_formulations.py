"""The CPU formulations (blocked attention, one-pass GroupNorm, custom VJPs) equal the plain ones.

impl="cpu" attention and GroupNorm run the C++ kernels where they are built (``test_cpu_kernels.py``);
the tests here run both paths, or turn the kernels off to test the XLA formulations.

Values and gradients, against the plain ``"xla"`` formulation and float64 numpy references, on shapes
that exercise several attention blocks, cross-attention, bfloat16 inputs and badly centred activations.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import models
from diffax.kernels.cpu import attention as cpu_attention
from diffax.kernels.cpu import ffi as cpu_kernels
from diffax.kernels.cpu import group_norm as cpu_group_norm
from diffax.models import layers


def _attention64(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


def _normal(seed, *shapes, scale=1.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=s) * scale, dtype) for s in shapes)


@pytest.fixture
def kernels_off(monkeypatch):
    """impl="cpu" layers by their XLA formulations, as where the C++ kernels are not built."""
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)


@pytest.fixture(params=["kernels", "xla"])
def cpu_path(request):
    """impl="cpu" layers by the C++ kernels, then by their XLA formulations."""
    if request.param == "xla":
        request.getfixturevalue("kernels_off")


@pytest.fixture
def small_blocks(monkeypatch, kernels_off):
    """The XLA formulation with a 2 KiB block budget: (8, 8) float32 scores take 256 B, so 8 heads fit
    and 12 run as 2 x 6."""
    monkeypatch.setattr(cpu_attention, "ATTENTION_BLOCK_BYTES", 2048)


def test_heads_per_block_is_the_largest_fitting_divisor(small_blocks):
    assert cpu_attention._heads_per_block(6, 8, 8) == 6  # 6 blocks of 256 B fit in 2 KiB
    assert cpu_attention._heads_per_block(12, 8, 8) == 6  # 8 would fit but does not divide 12
    assert cpu_attention._heads_per_block(7, 8, 8) == 7
    assert cpu_attention._heads_per_block(14, 8, 8) == 7
    assert cpu_attention._heads_per_block(5, 32, 32) == 1  # one head is over the budget: still one at a time


def _fake_sysfs(root, *caches):
    for i, (level, size) in enumerate(caches):
        index = root / f"index{i}"
        index.mkdir()
        (index / "level").write_text(f"{level}\n")
        (index / "size").write_text(f"{size}\n")
    return str(root)


@pytest.mark.parametrize(
    "caches,l2",
    [
        ([(1, "48K"), (1, "32K"), (2, "2048K"), (3, "491520K")], 2 << 20),
        ([(1, "32K"), (2, "1M")], 1 << 20),
        ([(2, "524288")], 512 << 10),
        ([(1, "32K"), (3, "32M")], None),  # no level 2 listed
        ([(2, "big")], None),  # an unreadable size
    ],
)
def test_l2_cache_bytes_reads_sysfs(tmp_path, caches, l2):
    assert cpu_attention.l2_cache_bytes(_fake_sysfs(tmp_path, *caches)) == l2


def test_l2_cache_bytes_is_none_without_sysfs(tmp_path):
    assert cpu_attention.l2_cache_bytes(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    "l2,block",
    [(None, 4 << 20), (512 << 10, 4 << 20), (1 << 20, 4 << 20), (2 << 20, 8 << 20), (4 << 20, 8 << 20)],
)
def test_attention_block_bytes_follows_the_l2_cache(l2, block):
    assert cpu_attention.attention_block_bytes(l2) == block


@pytest.mark.parametrize("train", [True, False])  # the custom VJP, and autodiff of the blocks
@pytest.mark.parametrize("t,s", [(8, 8), (9, 5)])  # self- and cross-attention lengths
def test_blocked_attention_values_and_grads_equal_plain(small_blocks, t, s, train):
    b, n, h = 3, 4, 5  # 12 (batch x head) groups in blocks
    q, k, v, w = _normal(0, (b, t, n, h), (b, s, n, h), (b, s, n, h), (b, t, n, h), scale=2.0)
    assert cpu_attention._heads_per_block(b * n, t, s) < b * n

    def loss(impl):
        return lambda q, k, v: jnp.sum(layers.dot_product_attention(q, k, v, impl=impl, train=train) * w)

    out = jax.jit(lambda *a: layers.dot_product_attention(*a, impl="cpu", train=train))(q, k, v)
    np.testing.assert_allclose(out, _attention64(q, k, v), atol=3e-6, rtol=1e-5)
    grads = {impl: jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v) for impl in ("cpu", "xla")}
    chex.assert_trees_all_close(grads["cpu"], grads["xla"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "head_bytes,block_bytes,loops", [(0, 1 << 20, True), (256, 1 << 20, False), (256, 1024, True)]
)
def test_inference_attention_blocks_equal_float64(small_blocks, monkeypatch, head_bytes, block_bytes, loops):
    """Without a backward pass, heads whose (8, 8) scores (256 B) fit ``INFERENCE_HEAD_BYTES`` go in
    ``INFERENCE_BLOCK_BYTES`` blocks (all 12 in one, no loop, or 3 of 4), others in 2 KiB blocks."""
    monkeypatch.setattr(cpu_attention, "INFERENCE_HEAD_BYTES", head_bytes)
    monkeypatch.setattr(cpu_attention, "INFERENCE_BLOCK_BYTES", block_bytes)
    q, k, v = _normal(4, (3, 8, 4, 5), (3, 8, 4, 5), (3, 8, 4, 5), scale=2.0)

    def attend(*a):
        return layers.dot_product_attention(*a, impl="cpu")

    assert ("scan" in str(jax.make_jaxpr(attend)(q, k, v))) == loops
    np.testing.assert_allclose(jax.jit(attend)(q, k, v), _attention64(q, k, v), atol=3e-6, rtol=1e-5)


def test_cpu_attention_grads_match_float64_finite_differences(cpu_path):
    q, k, v = _normal(1, (1, 4, 2, 3), (1, 4, 2, 3), (1, 4, 2, 3))
    w = np.random.default_rng(2).normal(size=(1, 4, 2, 3))

    def loss64(q):
        return np.sum(_attention64(q, k, v) * w)

    g = jax.grad(lambda q: jnp.sum(layers.dot_product_attention(q, k, v, impl="cpu", train=True) * w))(q)
    q64, eps = np.asarray(q, np.float64), 1e-6
    fd = np.zeros(q.shape)
    for idx in np.ndindex(q.shape):
        step = np.zeros(q.shape)
        step[idx] = eps
        fd[idx] = (loss64(q64 + step) - loss64(q64 - step)) / (2 * eps)
    np.testing.assert_allclose(g, fd, atol=2e-5, rtol=1e-4)


def test_attention_bfloat16_inputs_give_bfloat16_close_to_float32(cpu_path):
    q, k, v = _normal(3, (2, 16, 2, 8), (2, 16, 2, 8), (2, 16, 2, 8))
    out = layers.dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), impl="cpu")
    assert out.dtype == jnp.bfloat16
    ref = _attention64(*(a.astype(jnp.bfloat16).astype(jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2)


def _norm_args(seed, mean):
    x, gamma, beta, m_scale, m_shift = _normal(seed, (2, 6, 5, 16), (16,), (16,), (2, 16), (2, 16))
    return x * 0.5 + mean, gamma, beta, m_scale * 0.3, m_shift


@pytest.mark.parametrize("train", [True, False])  # the SiLU's custom VJP, and plain autodiff
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("modulated", [True, False])
def test_group_norm_cpu_values_and_grads_equal_plain(cpu_path, silu, modulated, train):
    x, gamma, beta, m_scale, m_shift = _norm_args(4, mean=1.0)
    w = _normal(5, x.shape)[0]

    def loss(impl):
        def f(x, gamma, beta, m_scale, m_shift):
            mod = (m_scale, m_shift) if modulated else None
            y = layers.group_norm(
                x, gamma, beta, num_groups=4, modulation=mod, silu=silu, impl=impl, train=train
            )
            return jnp.sum(y * w)

        return f

    args = (x, gamma, beta, m_scale, m_shift)
    values = {impl: jax.jit(loss(impl))(*args) for impl in ("cpu", "xla")}
    np.testing.assert_allclose(values["cpu"], values["xla"], rtol=1e-5, atol=1e-4)
    grads = {impl: jax.jit(jax.grad(loss(impl), argnums=range(5)))(*args) for impl in ("cpu", "xla")}
    chex.assert_trees_all_close(grads["cpu"], grads["xla"], atol=5e-5, rtol=1e-4)


def test_group_norm_cpu_survives_a_large_mean(cpu_path):
    """Activations at mean 1e3 with spread 0.5: the variance stays accurate (deviations from the mean)."""
    x, gamma, beta, _, _ = _norm_args(6, mean=1e3)
    x64 = np.asarray(x, np.float64)
    g = x64.reshape(2, 6, 5, 4, 4)
    ref = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-5)
    ref = ref.reshape(x.shape) * np.asarray(gamma) + np.asarray(beta)
    out = layers.group_norm(x, gamma, beta, num_groups=4, silu=False, impl="cpu")
    np.testing.assert_allclose(out, ref, atol=2e-3)  # float32 x itself carries 6e-5 absolute error


@pytest.mark.parametrize("mean", [0.0, 1e3])
def test_group_moments_custom_vjp_matches_float64_autodiff(mean):
    """The train form's backward (one expression in x) against autodiff of the same moments in float64."""
    x, d_mean, d_var = _normal(11, (2, 3, 4, 6), (2, 3), (2, 3))
    x = x + mean
    got_moments, vjp = jax.vjp(lambda y: cpu_group_norm._group_moments_train(y, 3), x)
    with jax.enable_x64():
        x64 = jnp.asarray(np.asarray(x, np.float64))
        want_moments, vjp64 = jax.vjp(lambda y: cpu_group_norm._group_moments(y, 3), x64)
        (want,) = vjp64((jnp.asarray(d_mean, jnp.float64), jnp.asarray(d_var, jnp.float64)))
        g = np.asarray(x64).reshape(2, 3, 4, 3, 2)
        np.testing.assert_allclose(want_moments[0], g.mean((1, 2, 4)), rtol=1e-12)
        np.testing.assert_allclose(want_moments[1], g.var((1, 2, 4)), rtol=1e-12)
    chex.assert_trees_all_close(got_moments, tuple(np.asarray(m) for m in want_moments), atol=1e-4, rtol=1e-5)
    (got,) = vjp((d_mean, d_var))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=1e-4)


def test_silu_custom_vjp_matches_autodiff_in_float64():
    x, a, shift, dy = _normal(7, (2, 3, 4, 5), (2, 5), (2, 5), (2, 3, 4, 5))
    _, vjp = jax.vjp(cpu_group_norm._scale_shift_silu, x, a, shift)
    x64, a64, s64, dy64 = (np.asarray(v, np.float64) for v in (x, a, shift, dy))
    z = x64 * a64[:, None, None, :] + s64[:, None, None, :]
    sig = 1 / (1 + np.exp(-z))
    dz = dy64 * (sig + z * sig * (1 - sig))
    expected = (dz * a64[:, None, None, :], (dz * x64).sum((1, 2)), dz.sum((1, 2)))
    for got, want in zip(vjp(dy), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_materialized_cotangent_is_the_identity_with_a_barrier_in_its_backward(jit):
    (x,) = _normal(10, (2, 4, 4, 3))

    def f(y):
        return jnp.sum(jnp.sin(y) * y)

    barred = jax.grad(lambda y: f(layers.materialized_cotangent(y)))
    transform = jax.jit if jit else (lambda fn: fn)
    chex.assert_trees_all_equal(transform(layers.materialized_cotangent)(x), x)
    chex.assert_trees_all_close(transform(barred)(x), jax.grad(f)(x), rtol=1e-6)
    assert "optimization_barrier" in str(jax.make_jaxpr(barred)(x))
    assert "optimization_barrier" not in str(jax.make_jaxpr(jax.grad(f))(x))


def test_auto_is_cpu_on_the_cpu_backend():
    assert jax.default_backend() == "cpu"
    q, k, v = _normal(8, (1, 4, 1, 2), (1, 4, 1, 2), (1, 4, 1, 2))
    chex.assert_trees_all_equal(
        layers.dot_product_attention(q, k, v, impl="auto"), layers.dot_product_attention(q, k, v, impl="cpu")
    )
    with pytest.raises(ValueError, match="impl='fast'"):
        layers.dot_product_attention(q, k, v, impl="fast")
    with pytest.raises(ValueError, match="impl='fast'"):
        layers.group_norm(q, jnp.ones(2), jnp.zeros(2), num_groups=1, impl="fast")


def _small_unets() -> tuple[nn.Module, nn.Module, jax.Array, jax.Array, dict]:
    """A small U-Net (attention at 4x4 with 1 and 2 heads) in its plain and CPU formulations, inputs,
    and perturbed parameters (the zero-initialised output convolution would make every output 0)."""
    kw = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0)
    plain = models.get("unet_ddpm_cifar10", norm_groups=4, head_channels=8, **kw)
    fast = plain.clone(attention_impl="cpu", norm_impl="cpu", resblock_impl="cpu")
    x = _normal(9, (2, 8, 8, 3))[0]
    t = jnp.array([0.3, 0.8])
    params = jax.jit(  # jitted: run op by op, the initialisers compile one by one (~20 s)
        lambda: jax.tree.map(
            lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
            plain.init(jax.random.key(0), x, t)["params"],
        )
    )()
    return plain, fast, x, t, params


def test_unet_train_gradients_equal_across_formulations(cpu_path):
    """train=True (the custom VJPs): loss and parameter gradients agree with the plain formulation."""
    plain, fast, x, t, params = _small_unets()
    noise = _normal(10, x.shape)[0]

    def loss(net):
        apply = lambda p: net.apply({"params": p}, x, t, train=True)
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean((apply(p) - noise) ** 2)))

    (l_plain, g_plain), (l_fast, g_fast) = loss(plain)(params), loss(fast)(params)
    np.testing.assert_allclose(l_fast, l_plain, rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_plain))
    chex.assert_trees_all_close(g_fast, g_plain, atol=1e-4 * scale)


def test_unet_forward_mode_through_cpu_formulations_with_train_false(cpu_path):
    """train=False keeps the CPU formulations differentiable in forward mode (the exact likelihood's
    JVPs, ``diffax.log_likelihood``) and equal to the plain one; train=True's are reverse mode only."""
    plain, fast, x, t, params = _small_unets()
    direction = _normal(11, x.shape)[0]

    def jvp(net, train=False):
        return jax.jit(
            lambda p: jax.jvp(lambda y: net.apply({"params": p}, y, t, train=train), (x,), (direction,))
        )

    (out_plain, tangent_plain), (out_fast, tangent_fast) = jvp(plain)(params), jvp(fast)(params)
    assert float(jnp.abs(tangent_plain).max()) > 1e-3  # a real directional derivative
    chex.assert_trees_all_close((out_fast, tangent_fast), (out_plain, tangent_plain), atol=2e-5, rtol=1e-4)
    with pytest.raises(TypeError, match="custom_vjp"):
        jvp(fast, train=True)(params)
