"""DiT behaviour on tiny configs: shapes, adaLN-Zero init, label dropout, remat, bfloat16, time."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import models

TINY = dict(depth=2, hidden_size=32, num_heads=2, num_classes=10)
SHAPE = (2, 8, 8, 4)


@functools.cache
def _tiny(**overrides):
    return models.get("dit_s_2", **{**TINY, **overrides})


def _inputs(shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    t = jnp.asarray(rng.uniform(size=shape[:1]), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=shape[:1]), jnp.int32)
    return x, t, labels


@pytest.mark.parametrize(
    "shape, patch, learned_variance",
    [
        ((1, 8, 8, 4), 2, True),
        ((3, 16, 16, 4), 4, True),
        ((2, 16, 8, 3), 2, False),
        ((5, 32, 32, 4), 8, True),
    ],
)
def test_output_shapes(shape, patch, learned_variance):
    module = _tiny(patch_size=patch, learned_variance=learned_variance)
    params = models.abstract_params(module, shape)
    x, t = jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    out = jax.eval_shape(lambda p, x, t: module.apply({"params": p}, x, t), params, x, t)
    channels = shape[-1] * (2 if learned_variance else 1)
    assert out.shape == (*shape[:3], channels) and out.dtype == jnp.float32


def test_adaln_zero_output_is_exactly_zero_at_init():
    """Peebles & Xie 2023, Sec. 3.2: zero-initialised modulation and final layer give output 0."""
    module = _tiny()
    x, t, labels = _inputs()
    variables = jax.jit(lambda: module.init(jax.random.key(0), x, t, labels))()
    out = jax.jit(module.apply)(variables, x, t, labels)
    chex.assert_shape(out, (*SHAPE[:3], 8))
    assert np.all(np.asarray(out) == 0.0)
    # ...while the trunk is not trivial: embeddings and attention weights are random.
    assert np.std(np.asarray(variables["params"]["block_0"]["attn"]["qkv"]["kernel"].value)) > 0


class ForwardTest(chex.TestCase):
    @pytest.fixture(autouse=True)
    def _params(self, random_params):
        self.params = random_params(_tiny(depth=1), SHAPE)

    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_under_jit_equals_eager(self):
        module = _tiny(depth=1)
        x, t, labels = _inputs()
        params = self.params
        out = self.variant(lambda p: module.apply({"params": p}, x, t, labels))(params)
        chex.assert_shape(out, (*SHAPE[:3], 8))
        chex.assert_tree_all_finite(out)
        ref = jax.jit(lambda p: module.apply({"params": p}, x, t, labels))(params)
        chex.assert_trees_all_close(out, ref, atol=1e-5)


@pytest.fixture
def params(random_params):
    return random_params(_tiny(), SHAPE)


@functools.cache
def _apply(module, train):
    return jax.jit(lambda p, x, t, c, key: module.apply({"params": p}, x, t, c, train, rngs={"dropout": key}))


def test_label_dropout_takes_the_null_class_path(params):
    x, t, labels = _inputs()
    key = jax.random.key(1)
    null = jnp.full_like(labels, 10)
    explicit_null = _apply(_tiny(), False)(params, x, t, null, key)
    all_dropped = _apply(_tiny(label_dropout=1.0), True)(params, x, t, labels, key)
    chex.assert_trees_all_close(all_dropped, explicit_null, atol=1e-6)
    default = _apply(_tiny(), False)(params, x, t, None, key)
    chex.assert_trees_all_close(default, explicit_null, atol=1e-6)
    conditional = _apply(_tiny(), False)(params, x, t, labels, key)
    assert np.abs(np.asarray(conditional - explicit_null)).max() > 1e-2


def test_label_dropout_is_deterministic_for_a_fixed_rng(params):
    x, t, _ = _inputs(shape=(16, *SHAPE[1:]))
    labels = jnp.arange(16, dtype=jnp.int32) % 10
    f = _apply(_tiny(label_dropout=0.5), True)
    a = f(params, x, t, labels, jax.random.key(3))
    chex.assert_trees_all_equal(a, f(params, x, t, labels, jax.random.key(3)))
    b = f(params, x, t, labels, jax.random.key(4))
    per_example = np.abs(np.asarray(a - b)).reshape(16, -1).max(1)
    assert 0 < np.sum(per_example > 0) < 16  # some labels dropped under one key and not the other


def _loss(module, params, x, t, labels):
    out = module.apply({"params": params}, x, t, labels, train=True, rngs={"dropout": jax.random.key(5)})
    return jnp.mean(out**2)


def test_gradient_matches_finite_difference(params):
    module = _tiny()
    x, t, labels = _inputs()
    loss = jax.jit(functools.partial(_loss, module))
    grads = jax.jit(jax.grad(functools.partial(_loss, module)))(params, x, t, labels)
    chex.assert_tree_all_finite(grads)
    rng = np.random.default_rng(6)
    direction = jax.tree.map(lambda g: rng.normal(size=g.shape), grads)
    norm = np.sqrt(sum(np.sum(d**2) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: jnp.asarray(d / norm, jnp.float32), direction)  # unit length
    eps = 1e-2
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
    fd = (loss(shifted(1.0), x, t, labels) - loss(shifted(-1.0), x, t, labels)) / (2 * eps)
    analytic = sum(jax.tree.leaves(jax.tree.map(jnp.vdot, grads, direction)))
    np.testing.assert_allclose(fd, analytic, rtol=1e-2)


def test_remat_gives_the_same_gradients(params):
    x, t, labels = _inputs()
    grad = lambda m: jax.jit(jax.grad(functools.partial(_loss, m)))(params, x, t, labels)
    chex.assert_trees_all_close(grad(_tiny(remat=True)), grad(_tiny()), atol=1e-6, rtol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(params):
    x, t, labels = _inputs()
    key = jax.random.key(0)
    f32 = _apply(_tiny(), False)(params, x, t, labels, key)
    bf16 = _apply(_tiny(dtype="bfloat16"), False)(params, x, t, labels, key)
    assert bf16.dtype == jnp.float32  # output in x's dtype
    err = np.abs(np.asarray(bf16 - f32)).max() / np.abs(np.asarray(f32)).max()
    assert 0 < err < 3e-2


def test_output_is_continuous_in_time(params):
    """d out / d t exists and matches a central difference (t is not rounded to integer steps)."""
    module = _tiny()
    x, t, labels = _inputs()
    f = jax.jit(lambda t: module.apply({"params": params}, x, t, labels))
    h = 2e-5
    fd = (f(t + h) - f(t - h)) / (2 * h)
    tangent = jax.jit(lambda t: jax.jvp(f, (t,), (jnp.ones_like(t),))[1])(t)
    scale = np.abs(np.asarray(tangent)).max()
    assert scale > 0
    np.testing.assert_allclose(fd, tangent, atol=2e-2 * scale)
