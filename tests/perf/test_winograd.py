"""Winograd F(m x m, 3 x 3) convolution equals the direct convolution: exactly in float64, to a few
rounding errors in float32, in value, reverse- and forward-mode derivatives, jitted or not; so do the
F(3 x 3, m x m) kernel gradient and the training form's custom backward pass, to second order; the
``lax.conv_general_dilated`` drop-in routes only the convolutions it computes; the U-Net's
``conv_impl="cpu"`` computes the same network in inference and in training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import models
from diffax.kernels.cpu import winograd
from diffax.models import layers

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


def _kernel_grad64(x, dy):
    """d/dkernel of sum(dy * conv(x, kernel)) in float64 numpy: each tap's window against dy."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.stack(
        [
            np.stack([np.einsum("bhwc,bhwo->co", padded[:, i : i + h, j : j + w], dy) for j in range(3)])
            for i in range(3)
        ]
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tile", sorted(winograd.POINTS))
def test_kernel_grad_equals_the_direct_one_in_float64(seed, tile):
    rng = np.random.default_rng(10 + seed)
    b, h, w, c, o = (int(n) for n in rng.integers(1, [3, 14, 14, 5, 5], endpoint=True))
    with jax.enable_x64(True):
        x, dy = jnp.asarray(rng.normal(size=(b, h, w, c))), jnp.asarray(rng.normal(size=(b, h, w, o)))
        grad = jax.jit(winograd.conv3x3_kernel_grad, static_argnums=2)(x, dy, tile)
        chex.assert_shape(grad, (3, 3, c, o))
        np.testing.assert_allclose(grad, _kernel_grad64(x, dy), rtol=1e-11, atol=1e-11)


def _normal64(seed, *shapes):
    """Standard normal float64 arrays of ``shapes`` (call inside ``jax.enable_x64``)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape)) for shape in shapes)


class TestTrainForm(chex.TestCase):
    """``conv3x3_train``: the same values, a custom backward pass equal to the direct one's."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_value_and_vjp_equal_the_direct_convolutions_in_float64(self):
        with jax.enable_x64(True):
            x, kernel, dy = _normal64(2, (2, 11, 6, 3), (3, 3, 3, 5), (2, 11, 6, 5))

            def value_and_vjp(conv):
                y, vjp = jax.vjp(conv, x, kernel)
                return y, vjp(dy)

            for tile in sorted(winograd.POINTS):
                chex.assert_trees_all_close(
                    self.variant(lambda: value_and_vjp(lambda x, k: winograd.conv3x3_train(x, k, tile)))(),
                    value_and_vjp(_direct),
                    rtol=1e-11,
                    atol=1e-11,
                )

    def test_second_order_reverse_mode_equals_the_direct_convolutions(self):
        """The backward pass is itself differentiable: the gradient of a function of the gradient."""
        with jax.enable_x64(True):
            x, kernel, target = _normal64(5, (2, 9, 7, 3), (3, 3, 3, 4), (2, 9, 7, 4))

            def penalty(conv):
                loss = lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) * target)
                return jax.jit(
                    jax.grad(lambda x, k: jnp.sum(jax.grad(loss, argnums=(0, 1))(x, k)[0] ** 2), (0, 1))
                )

            chex.assert_trees_all_close(
                penalty(winograd.conv3x3_train)(x, kernel),
                penalty(_direct)(x, kernel),
                rtol=1e-10,
                atol=1e-10,
            )

    def test_forward_mode_is_refused(self):
        x, kernel = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.jvp(winograd.conv3x3_train, (x, kernel), (x, kernel))


def _rms_error(got, truth):
    return float(np.sqrt(np.mean((np.asarray(got, np.float64) - truth) ** 2)))


class TestFloat32(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_error_is_a_few_times_the_direct_convolutions(self):
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.normal(size=(2, 20, 20, 32)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(3, 3, 32, 16)) / np.sqrt(9 * 32), jnp.float32)
        truth = _correlate64(x, kernel)
        direct = _rms_error(_direct(x, kernel), truth)
        wino = _rms_error(self.variant(winograd.conv3x3)(x, kernel), truth)
        assert wino < 8 * direct, (wino, direct)  # measured: ~4x
        assert wino < 3e-6 * float(np.sqrt(np.mean(truth**2)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_kernel_grad_error_is_a_few_times_the_direct_ones(self):
        rng = np.random.default_rng(6)
        x = jnp.asarray(rng.normal(size=(4, 20, 20, 16)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=(4, 20, 20, 8)), jnp.float32)
        truth = _kernel_grad64(x, dy)
        direct_grad = jax.vjp(lambda k: _direct(x, k), jnp.zeros((3, 3, 16, 8)))[1](dy)[0]
        direct = _rms_error(direct_grad, truth)
        wino = _rms_error(self.variant(winograd.conv3x3_kernel_grad)(x, dy), truth)
        assert wino < 8 * max(direct, 1e-7 * float(np.sqrt(np.mean(truth**2)))), (wino, direct)
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


@pytest.mark.slow
def test_unet_conv_impl_computes_the_same_network():
    """16x16 maps take Winograd: inference values and forward-mode derivatives, and the training loss's
    parameter gradients agree with the plain network's. One 16x16 level, no attention: every 3x3
    convolution is a Winograd one, and the network compiles in half the time. (Reverse mode through
    the inference form is the float64 tests' above.)"""
    kw = dict(base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), dropout=0.0)
    plain = models.get("unet_ddpm_cifar10", norm_groups=4, head_channels=8, conv_impl="xla", **kw)
    wino = models.get("unet_ddpm_cifar10", norm_groups=4, head_channels=8, conv_impl="cpu", **kw)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    t = jnp.array([0.3, 0.8])
    params = jax.jit(  # jitted: run op by op, the initialisers compile one by one (~20 s)
        lambda: jax.tree.map(
            lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
            plain.init(jax.random.key(0), x, t)["params"],
        )
    )()

    def apply(net, train=False):
        return jax.jit(lambda x, params=params: net.apply({"params": params}, x, t, train=train))

    def close(got, want, rtol):
        chex.assert_trees_all_close(
            got, want, atol=rtol * max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want))
        )

    for train in (False, True):
        jaxprs = [str(jax.make_jaxpr(apply(net, train))(x)) for net in (wino, plain)]
        counts = [jaxpr.count("conv_general_dilated") for jaxpr in jaxprs]
        assert counts[0] < counts[1], counts
        # Training takes the custom-VJP form; inference the plain one, which forward mode needs.
        assert ("conv3x3_train" in jaxprs[0]) == train
    close(apply(wino)(x), apply(plain)(x), 1e-5)
    tangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    jvps = [jax.jvp(apply(net), (x,), (tangent,)) for net in (plain, wino)]
    close(jvps[1], jvps[0], 1e-4)
    loss_grads = [
        jax.grad(lambda p, net=net: jnp.mean((apply(net, train=True)(x, p) - x) ** 2))(params)
        for net in (plain, wino)
    ]
    close(loss_grads[1], loss_grads[0], 1e-4)


def test_conv_rejects_an_unknown_impl():
    with pytest.raises(ValueError, match="impl='fast'"):
        layers.conv(4, 3, dtype=jnp.float32, param_dtype=jnp.float32, impl="fast")
