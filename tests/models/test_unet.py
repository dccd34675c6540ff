"""U-Net on tiny configs: shapes, gradients, remat, dropout rng, bfloat16, CPU impls, conditioning."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import models

TINY = dict(
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_heads=2,
    norm_groups=4,
    dropout=0.0,
)
SHAPE = (2, 16, 16, 3)


@functools.cache
def _tiny(**overrides):
    return models.get("unet_ddpm_cifar10", **{**TINY, **overrides})


def _inputs(shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    t = jnp.asarray(rng.uniform(size=shape[:1]), jnp.float32)
    return x, t


@functools.cache
def _apply(module, train=False):
    return jax.jit(lambda p, x, t, c, key: module.apply({"params": p}, x, t, c, train, rngs={"dropout": key}))


@pytest.mark.parametrize(
    "shape, overrides",
    [
        ((1, 16, 16, 3), dict()),
        ((3, 32, 32, 3), dict(attention_resolutions=(16,), learned_variance=True)),
        ((2, 16, 32, 1), dict(channel_mult=(1, 2, 2), attention_resolutions=(4, 8))),
        ((4, 8, 8, 4), dict(time_injection="scale_shift", resblock_updown=True, learned_variance=True)),
    ],
)
def test_output_shapes(shape, overrides):
    module = _tiny(**overrides)
    params = models.abstract_params(module, shape)
    x, t = jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    out = jax.eval_shape(lambda p, x, t: module.apply({"params": p}, x, t), params, x, t)
    channels = shape[-1] * (2 if module.learned_variance else 1)
    assert out.shape == (*shape[:3], channels) and out.dtype == jnp.float32


@functools.cache
def _grad_fn(module):
    loss = lambda p, x, t, key: jnp.mean(_apply(module, train=True)(p, x, t, None, key) ** 2)
    return jax.jit(jax.grad(loss))


def test_gradient_matches_finite_difference(random_params):
    module = _tiny(dropout=0.2)
    params = random_params(module, SHAPE)
    x, t = _inputs()
    key = jax.random.key(0)
    grads = _grad_fn(module)(params, x, t, key)
    chex.assert_tree_all_finite(grads)
    rng = np.random.default_rng(1)
    direction = jax.tree.map(lambda g: rng.normal(size=g.shape), grads)
    norm = np.sqrt(sum(np.sum(d**2) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: jnp.asarray(d / norm, jnp.float32), direction)  # unit length
    eps = 1e-2
    loss = lambda s: jnp.mean(
        _apply(module, train=True)(
            jax.tree.map(lambda p, d: p + s * eps * d, params, direction), x, t, None, key
        )
        ** 2
    )
    fd = (loss(1.0) - loss(-1.0)) / (2 * eps)
    analytic = sum(jax.tree.leaves(jax.tree.map(jnp.vdot, grads, direction)))
    np.testing.assert_allclose(fd, analytic, rtol=1e-2)


def test_remat_gives_the_same_gradients_with_dropout(random_params):
    module = _tiny(dropout=0.2)
    params = random_params(module, SHAPE)
    x, t = _inputs()
    key = jax.random.key(0)
    plain = _grad_fn(module)(params, x, t, key)
    remat = _grad_fn(_tiny(dropout=0.2, remat=True))(params, x, t, key)
    chex.assert_trees_all_close(remat, plain, atol=1e-6, rtol=1e-5)


def test_dropout_is_deterministic_for_a_fixed_rng(random_params):
    module = _tiny(dropout=0.2)
    params = random_params(module, SHAPE)
    x, t = _inputs()
    f = _apply(module, train=True)
    a = f(params, x, t, None, jax.random.key(3))
    chex.assert_trees_all_equal(a, f(params, x, t, None, jax.random.key(3)))
    assert np.abs(np.asarray(a - f(params, x, t, None, jax.random.key(4)))).max() > 1e-3
    evals = [_apply(module)(params, x, t, None, jax.random.key(k)) for k in (3, 4)]
    chex.assert_trees_all_equal(*evals)


def test_cpu_formulations_equal_the_default(random_params):
    params = random_params(_tiny(dropout=0.2), SHAPE)
    x, t = _inputs()
    key = jax.random.key(0)
    plain = _apply(_tiny(dropout=0.2))(params, x, t, None, key)
    cpu = _apply(_tiny(dropout=0.2, attention_impl="cpu", norm_impl="cpu"))(params, x, t, None, key)
    chex.assert_trees_all_close(cpu, plain, atol=1e-4 * np.abs(np.asarray(plain)).max())


def test_bfloat16_compute_stays_close_to_float32(random_params):
    params = random_params(_tiny(dropout=0.2), SHAPE)
    x, t = _inputs()
    key = jax.random.key(0)
    f32 = _apply(_tiny(dropout=0.2))(params, x, t, None, key)
    bf16 = _apply(_tiny(dropout=0.2, dtype="bfloat16"))(params, x, t, None, key)
    assert bf16.dtype == jnp.float32  # output in x's dtype
    err = np.abs(np.asarray(bf16 - f32)).max() / np.abs(np.asarray(f32)).max()
    assert 0 < err < 3e-2


def test_adm_configuration_with_class_labels(random_params):
    """Scale-shift norm, BigGAN resampling, learned variance, class labels (null label = 5)."""
    module = _tiny(
        time_injection="scale_shift",
        resblock_updown=True,
        learned_variance=True,
        head_channels=4,
        num_classes=5,
    )
    params = random_params(module, SHAPE)
    x, t = _inputs()
    f = _apply(module)
    key = jax.random.key(0)
    null = f(params, x, t, jnp.full((2,), 5, jnp.int32), key)
    chex.assert_shape(null, (*SHAPE[:3], 6))
    labelled = f(params, x, t, jnp.array([0, 3], jnp.int32), key)
    assert np.abs(np.asarray(labelled - null)).max() > 1e-3


def test_cross_attention_reads_the_context(random_params):
    module = _tiny(context_dim=6)
    rng = np.random.default_rng(2)
    contexts = [jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32) for _ in range(2)]
    params = random_params(module, SHAPE, cond={"context": contexts[0]})
    x, t = _inputs()
    f = _apply(module)
    key = jax.random.key(0)
    a, b = (f(params, x, t, {"context": c}, key) for c in contexts)
    chex.assert_shape(a, SHAPE)
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    # Permuting the context tokens changes nothing: cross-attention is a set operation.
    permuted = f(params, x, t, {"context": contexts[0][:, ::-1]}, key)
    chex.assert_trees_all_close(permuted, a, atol=1e-5)
