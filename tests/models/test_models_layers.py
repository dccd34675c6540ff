"""Shared layers against float64 numpy references; the CPU formulations equal the plain ones."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models import layers
from diffax.models.dit import sincos_pos_embed


def _attention_ref(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _group_norm_ref(x, gamma, beta, groups, eps, m_scale, m_shift, silu):
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    y = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + eps)
    y = y.reshape(x.shape) * gamma + beta
    y = y * (1 + m_scale[:, None, None, :]) + m_shift[:, None, None, :]
    return y / (1 + np.exp(-y)) if silu else y


def _qkv(seed, t=7, s=5):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(2, n, 3, 4)) * 2, jnp.float32) for n in (t, s, s))


@pytest.mark.parametrize("impl", layers.IMPLS)
def test_attention_matches_float64_softmax(impl):
    q, k, v = _qkv(0)
    out = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, impl=impl))(q, k, v)
    chex.assert_shape(out, (2, 7, 3, 4))
    np.testing.assert_allclose(out, _attention_ref(q, k, v), atol=2e-5, rtol=1e-5)


def test_attention_cpu_gradients_equal_xla():
    q, k, v = _qkv(1)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, 3, 4)), jnp.float32)

    def grads(impl):
        f = lambda *a: jnp.sum(layers.dot_product_attention(*a, impl=impl, train=True) * w)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    chex.assert_trees_all_close(grads("cpu"), grads("xla"), atol=2e-5, rtol=1e-5)


def _norm_inputs(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 4, 3, 8)) * 3 + 1
    gamma, beta = rng.normal(size=8), rng.normal(size=8)
    m_scale, m_shift = rng.normal(size=(2, 8)) * 0.5, rng.normal(size=(2, 8))
    return x, gamma, beta, m_scale, m_shift


@pytest.mark.parametrize("impl", layers.IMPLS)
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_matches_float64_reference(impl, silu):
    x, gamma, beta, m_scale, m_shift = _norm_inputs(3)
    f = lambda *a: layers.group_norm(
        a[0], a[1], a[2], num_groups=4, epsilon=1e-5, modulation=(a[3], a[4]), silu=silu, impl=impl
    )
    args = [jnp.asarray(a, jnp.float32) for a in (x, gamma, beta, m_scale, m_shift)]
    out = jax.jit(f)(*args)
    ref = _group_norm_ref(x, gamma, beta, 4, 1e-5, m_scale, m_shift, silu)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


def test_group_norm_cpu_gradients_equal_xla():
    x, gamma, beta, m_scale, m_shift = (jnp.asarray(a, jnp.float32) for a in _norm_inputs(4))
    w = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

    def grads(impl):
        def f(x, gamma, beta, m_scale, m_shift):
            mod = (m_scale, m_shift)
            y = layers.group_norm(x, gamma, beta, num_groups=4, modulation=mod, impl=impl, train=True)
            return jnp.sum(y * w)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(x, gamma, beta, m_scale, m_shift)

    chex.assert_trees_all_close(grads("cpu"), grads("xla"), atol=5e-5, rtol=1e-4)


def test_sinusoidal_time_features_closed_form():
    t = np.array([0.0, 0.25, 0.9995])
    out = layers.time_features(jnp.asarray(t, jnp.float32), 8, time_scale=1000.0)
    freqs = 10000.0 ** (-np.arange(4) / 4)
    args = 1000.0 * t[:, None] * freqs[None, :]
    np.testing.assert_allclose(out, np.concatenate([np.cos(args), np.sin(args)], 1), atol=2e-4)


@pytest.mark.parametrize("kind", layers.TIME_EMBEDDINGS)
def test_time_features_are_continuous_in_t(kind):
    """The derivative in t exists and matches a central difference: no rounding to integer steps."""
    f = lambda t: layers.time_features(t, 16, kind=kind, time_scale=1.0, fourier_scale=0.5)
    t = jnp.array([0.3, 0.71])
    h = 1e-3
    fd = (f(t + h) - f(t - h)) / (2 * h)
    tangent = jax.jvp(f, (t,), (jnp.ones_like(t),))[1]
    np.testing.assert_allclose(tangent, fd, atol=1e-3)
    assert np.abs(np.asarray(tangent)).max() > 0.1


def test_pos_embed_inner_products_depend_only_on_offsets():
    """<e(r, c), e(r', c')> is a function of (r - r', c - c'): the sin-cos embedding is relative."""
    e = sincos_pos_embed(4, 5, 16).reshape(4, 5, 16)
    assert np.unique(e.reshape(20, 16), axis=0).shape[0] == 20
    for dr, dc in [(1, 0), (0, 2), (2, 3)]:
        dots = np.einsum("rcd,rcd->rc", e[: 4 - dr, : 5 - dc], e[dr:, dc:])
        np.testing.assert_allclose(dots, dots[0, 0], atol=1e-12)


def test_split_cond_null_label_default_and_errors():
    labels, context = layers.split_cond(None, 3, num_classes=10, context_dim=None, owner="M")
    chex.assert_trees_all_equal(labels, jnp.full((3,), 10, jnp.int32))
    assert context is None
    with pytest.raises(ValueError, match="num_classes is None"):
        layers.split_cond(jnp.zeros(3, jnp.int32), 3, num_classes=None, context_dim=None, owner="M")
    with pytest.raises(ValueError, match=r"int array of shape \(3,\)"):
        layers.split_cond(jnp.zeros(3), 3, num_classes=4, context_dim=None, owner="M")
    with pytest.raises(ValueError, match="unknown keys"):
        layers.split_cond({"labels": 1}, 3, num_classes=4, context_dim=None, owner="M")
    with pytest.raises(ValueError, match="context_dim=6 needs"):
        layers.split_cond(None, 3, num_classes=None, context_dim=6, owner="M")
    with pytest.raises(ValueError, match=r"\(3, L, 6\)"):
        layers.split_cond({"context": jnp.zeros((3, 2, 5))}, 3, num_classes=None, context_dim=6, owner="M")


def _dropout_scale(rate):
    levels = 1 << layers.DROPOUT_FIELD_BITS
    return levels / (levels - round(rate * levels))


@pytest.mark.parametrize("shape", [(20000, 64), (300, 7, 3), (40000, 1)])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.37])
def test_dropout_drops_each_half_word_at_the_rate_independently(shape, rate):
    """Both 16-bit halves of a word (even and odd channels) drop at the rounded rate, independently."""
    out = np.asarray(jax.jit(layers.dropout, static_argnums=1)(jnp.ones(shape), rate, jax.random.key(3)))
    scale = _dropout_scale(rate)
    assert set(np.unique(out)) <= {0.0, np.float32(scale)}
    p = 1 - 1 / scale  # the rounded rate
    dropped = out.reshape(-1, shape[-1]) == 0
    for part in (dropped[:, 0::2], dropped[:, 1::2]):
        if part.size:
            assert abs(part.mean() - p) < 5 * np.sqrt(p * (1 - p) / part.size)
    if shape[-1] > 1:
        both = dropped[:, 0 : shape[-1] - 1 : 2] & dropped[:, 1::2]  # the two halves of one word
        assert abs(both.mean() - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / both.size)


class TestDropout(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_values_and_gradient_are_the_mask_times_the_inverse_keep_rate(self):
        x = jax.random.normal(jax.random.key(0), (4, 6, 6, 5))
        key = jax.random.key(1)
        out = self.variant(lambda x: layers.dropout(x, 0.25, key))(x)
        kept = out != 0
        assert 0.5 < kept.mean() < 0.95
        chex.assert_trees_all_close(out, jnp.where(kept, x * _dropout_scale(0.25), 0.0), rtol=1e-6)
        grad = self.variant(jax.grad(lambda x: jnp.sum(layers.dropout(x, 0.25, key) * 3.0)))(x)
        chex.assert_trees_all_close(grad, jnp.where(kept, 3.0 * _dropout_scale(0.25), 0.0), rtol=1e-6)


def test_dropout_keys_dtypes_and_bad_rates():
    x = jnp.ones((8, 16), jnp.bfloat16)
    a = layers.dropout(x, 0.3, jax.random.key(0))
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, layers.dropout(x, 0.3, jax.random.key(0)))
    assert not np.array_equal(a, layers.dropout(x, 0.3, jax.random.key(1)))
    np.testing.assert_array_equal(layers.dropout(x, 0.0, jax.random.key(0)), x)
    for rate in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"dropout: rate=.*\[0, 1\)"):
            layers.dropout(x, rate, jax.random.key(0))
    with pytest.raises(ValueError, match="scalar"):
        layers.dropout(jnp.ones(()), 0.1, jax.random.key(0))


def test_dropout_shards_like_its_input():
    """Batch-sharded activations get the same mask as unsharded ones, with no collective."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.device_put(jax.random.normal(jax.random.key(0), (jax.device_count() * 2, 4, 4, 6)), sharding)
    fn = jax.jit(lambda x, key: layers.dropout(x, 0.2, key))
    key = jax.random.key(5)
    out = fn(x, key)
    assert out.sharding.is_equivalent_to(sharding, out.ndim)
    np.testing.assert_array_equal(out, fn(np.asarray(x), key))
    hlo = fn.lower(x, key).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"))
