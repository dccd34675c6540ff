"""Winograd F(m x m, 3 x 3) convolution equals the direct convolution: exactly in float64, to a few
rounding errors in float32, in value, reverse- and forward-mode derivatives, jitted or not; the
``lax.conv_general_dilated`` drop-in routes only the convolutions it computes; the U-Net's
``conv_impl="cpu"`` changes inference and leaves the training program alone."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import models
from diffax.models import layers, winograd

NHWC = ("NHWC", "HWIO", "NHWC")


def _direct(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)


def _correlate64(x, kernel):
    """The 3x3 "SAME" correlation in float64 numpy, summed tap by tap."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(
        np.einsum("bhwc,co->bhwo", padded[:, i : i + h, j : j + w], kernel[i, j])
        for i in range(3)
        for j in range(3)
    )


@pytest.mark.parametrize("tile", sorted(winograd.POINTS))
def test_one_dimensional_transforms_compute_the_correlation(tile):
    at, g, bt = winograd.transforms(tile)
    assert at.shape == (tile, tile + 2) and g.shape == (tile + 2, 3) and bt.shape == (tile + 2, tile + 2)
    rng = np.random.default_rng(tile)
    for _ in range(5):
        d, taps = rng.normal(size=tile + 2), rng.normal(size=3)
        expected = [d[i : i + 3] @ taps for i in range(tile)]
        np.testing.assert_allclose(at @ ((g @ taps) * (bt @ d)), expected, rtol=1e-13, atol=1e-13)


def test_unknown_tile_is_refused_by_name():
    with pytest.raises(ValueError, match="tile=3"):
        winograd.transforms(3)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tile", sorted(winograd.POINTS))
def test_equals_the_direct_convolution_in_float64(seed, tile):
    """Random shapes, H and W not multiples of the tile among them; float64 leaves only rounding."""
    rng = np.random.default_rng(seed)
    b, h, w, c, o = (int(n) for n in rng.integers(1, [3, 14, 14, 5, 5], endpoint=True))
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(b, h, w, c)))
        kernel = jnp.asarray(rng.normal(size=(3, 3, c, o)))
        y = jax.jit(winograd.conv3x3, static_argnums=2)(x, kernel, tile)
        chex.assert_shape(y, (b, h, w, o))
        np.testing.assert_allclose(y, _correlate64(x, kernel), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("tile", sorted(winograd.POINTS))
def test_derivatives_equal_the_direct_convolutions_in_float64(tile):
    """Reverse mode (input and kernel) and forward mode, as the exact likelihood and guidance use them."""
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        x, dx = (jnp.asarray(rng.normal(size=(2, 9, 6, 3))) for _ in range(2))
        kernel, dkernel = (jnp.asarray(rng.normal(size=(3, 3, 3, 4))) for _ in range(2))
        dy = jnp.asarray(rng.normal(size=(2, 9, 6, 4)))

        def derivatives(conv):
            vjp = jax.jit(lambda x, k, dy: jax.vjp(conv, x, k)[1](dy))(x, kernel, dy)
            jvp = jax.jit(lambda *a: jax.jvp(conv, a[:2], a[2:]))(x, kernel, dx, dkernel)
            return vjp, jvp

        chex.assert_trees_all_close(
            derivatives(lambda x, k: winograd.conv3x3(x, k, tile)),
            derivatives(_direct),
            rtol=1e-11,
            atol=1e-11,
        )


class TestFloat32(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_error_is_a_few_times_the_direct_convolutions(self):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.normal(size=(2, 20, 20, 32)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(3, 3, 32, 16)) / np.sqrt(9 * 32), jnp.float32)
        truth = _correlate64(x, kernel)

        def rms(y):
            return float(np.sqrt(np.mean((np.asarray(y, np.float64) - truth) ** 2)))

        direct, wino = rms(_direct(x, kernel)), rms(self.variant(winograd.conv3x3)(x, kernel))
        assert wino < 8 * direct, (wino, direct)  # measured: ~4x
        assert wino < 3e-6 * float(np.sqrt(np.mean(truth**2)))


CALL = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)


@pytest.mark.parametrize(
    "shape,kernel_shape,call",
    [
        ((2, 16, 16, 4), (3, 3, 4, 5), CALL),
        ((2, 16, 20, 4), (3, 3, 4, 5), CALL | dict(padding=((1, 1), (1, 1)))),
    ],
)
def test_drop_in_uses_winograd_where_it_applies(shape, kernel_shape, call):
    x, kernel = (
        jnp.asarray(np.random.default_rng(0).normal(size=s), jnp.float32) for s in (shape, kernel_shape)
    )
    jaxpr = str(jax.make_jaxpr(lambda x, k: winograd.conv_general_dilated(x, k, **call))(x, kernel))
    assert "conv_general_dilated" not in jaxpr
    y = winograd.conv_general_dilated(x, kernel, **call)
    np.testing.assert_allclose(y, jax.lax.conv_general_dilated(x, kernel, **call), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shape,kernel_shape,call,dtype",
    [
        ((2, 8, 8, 4), (3, 3, 4, 5), CALL, jnp.float32),  # below MIN_SPATIAL
        ((2, 16, 16, 4), (3, 3, 4, 5), CALL, jnp.bfloat16),  # Winograd's rounding is for float32/64
        ((2, 16, 16, 4), (1, 1, 4, 5), CALL, jnp.float32),
        ((2, 16, 16, 4), (3, 3, 4, 5), CALL | dict(window_strides=(2, 2)), jnp.float32),
        ((2, 16, 16, 4), (3, 3, 4, 5), CALL | dict(padding="VALID"), jnp.float32),
        ((2, 16, 16, 4), (3, 3, 4, 5), CALL | dict(rhs_dilation=(2, 2)), jnp.float32),
        ((2, 16, 16, 4), (3, 3, 2, 6), CALL | dict(feature_group_count=2), jnp.float32),
        ((2, 4, 16, 16), (5, 4, 3, 3), CALL | dict(dimension_numbers=("NCHW", "OIHW", "NCHW")), jnp.float32),
    ],
)
def test_drop_in_leaves_every_other_convolution_to_lax(shape, kernel_shape, call, dtype):
    x, kernel = (jnp.asarray(np.random.default_rng(1).normal(size=s), dtype) for s in (shape, kernel_shape))
    chex.assert_trees_all_equal(
        winograd.conv_general_dilated(x, kernel, **call), jax.lax.conv_general_dilated(x, kernel, **call)
    )


def test_unet_conv_impl_changes_inference_only():
    """16x16 maps take Winograd at inference (values and input gradients agree); training is untouched."""
    kw = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), dropout=0.0)
    plain = models.get("unet_ddpm_cifar10", norm_groups=4, head_channels=8, conv_impl="xla", **kw)
    wino = models.get("unet_ddpm_cifar10", norm_groups=4, head_channels=8, conv_impl="cpu", **kw)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    t = jnp.array([0.3, 0.8])
    params = plain.init(jax.random.key(0), x, t)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)

    def apply(net, train=False):
        return jax.jit(lambda x: net.apply({"params": params}, x, t, train=train))

    infer = str(jax.make_jaxpr(apply(wino))(x))
    assert infer.count("conv_general_dilated") < str(jax.make_jaxpr(apply(plain))(x)).count(
        "conv_general_dilated"
    )
    out_plain, out_wino = apply(plain)(x), apply(wino)(x)
    scale = float(jnp.abs(out_plain).max())
    np.testing.assert_allclose(out_wino, out_plain, atol=1e-5 * scale)
    grads = [jax.grad(lambda x, net=net: jnp.sum(apply(net)(x) ** 2))(x) for net in (plain, wino)]
    chex.assert_trees_all_close(grads[1], grads[0], atol=1e-4 * float(jnp.abs(grads[0]).max()))
    chex.assert_trees_all_equal(apply(wino, train=True)(x), apply(plain, train=True)(x))


def test_conv_rejects_an_unknown_impl():
    with pytest.raises(ValueError, match="impl='fast'"):
        layers.conv(4, 3, dtype=jnp.float32, param_dtype=jnp.float32, impl="fast")
