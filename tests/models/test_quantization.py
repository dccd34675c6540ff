"""Post-training quantization: the quantizers' bounds, the calibration sets, Q-Diffusion's skip split
on the U-Net, the network input kept in float (weight-only first layer), int8 execution equal to fake
quantization (U-Net and DiT), W8A8 near full precision, the temporal layers of TFMQ-DM, and the Orbax
round trip."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import models, quantization
from diffax.quantization import _quantizers as q
from experiments import mixture


def test_weight_codes_are_within_bits_and_half_a_step():
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 5, 7))
    for bits in (4, 8):
        scale = q.weight_scale(kernel, bits)
        codes = q.weight_codes(kernel, scale, bits)
        assert codes.dtype == jnp.int8 and int(jnp.abs(codes).max()) == 2 ** (bits - 1) - 1
        error = jnp.abs(q.fake_quant_weight(kernel, scale, bits) - kernel)
        assert bool(jnp.all(error <= q.channelwise(scale, 4) / 2 + 1e-7))
        assert bool(jnp.all(q.search_weight_scale(kernel, bits) <= scale + 1e-9))


def test_activation_zero_is_exact_and_error_is_half_a_step():
    x = jnp.linspace(-0.3, 2.0, 1001)
    scale, zero = q.activation_params(-0.3, 2.0, 8)
    fq = q.fake_quant_activation(x, scale, zero, 8)
    assert float(q.fake_quant_activation(jnp.zeros(()), scale, zero, 8)) == 0.0
    assert float(jnp.max(jnp.abs(fq - x))) <= float(scale) / 2 + 1e-6
    assert float(jax.grad(lambda v: jnp.sum(q.fake_quant_activation(v, scale, zero, 8)))(x)[3]) == 1.0


def test_calibration_sets_follow_their_step_distributions():
    steps, n = 20, 16
    xs = np.arange(steps * n, dtype=np.float32).reshape(steps, n, 1)
    ts = np.repeat(np.linspace(1.0, 0.0, steps)[:, None], n, axis=1)
    picked = {
        m: quantization.calibration_set(xs, ts, method=m, num_samples=200)[0][:, 0] // n
        for m in ("single", "uniform", "normal")
    }
    assert set(picked["single"]) == {steps // 2}
    assert np.all(np.bincount(picked["uniform"].astype(int), minlength=steps) == 10)
    assert abs(picked["normal"].mean() - 0.5 * steps) < 1.5 and 4 < picked["normal"].std() < 8
    with pytest.raises(ValueError, match="calibration method 'x'"):
        quantization.calibration_set(xs, ts, method="x", num_samples=4)


def _perturbed(params):
    """Zero-initialised output layers made non-zero so every layer shapes the output."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree.unflatten(
        tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )


def _trajectories(shape, steps=4, n=16):
    xs = np.stack([np.asarray(jax.random.normal(jax.random.key(k), (n, *shape))) for k in range(steps)])
    ts = np.repeat(np.linspace(0.9, 0.1, steps, dtype=np.float32)[:, None], n, axis=1)
    return xs, ts


@pytest.fixture(scope="module")
def unet():
    module = models.get(
        "unet_ddpm_cifar10",
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        norm_groups=4,
        dropout=0.0,
    )
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.ones((1,))
    params = _perturbed(nn.meta.unbox(module.init(jax.random.key(1), x, t, train=False)["params"]))
    return module, params


def _relative(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_unet_skip_splits_name_the_concatenated_inputs(unet):
    module, params = unet
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.ones((2,))
    inputs = quantization.capture_inputs(module.apply, {"params": params}, x, t, train=False)
    splits = quantization.unet_skip_splits(module)
    assert set(splits) <= set(inputs)
    # up1_0 reads concat(mid (16), down1_0 (16)); up0_0 concat(upsampled level 1 (16), down0_resample (8)).
    assert (splits["up1_0_res/Conv_0"], inputs["up1_0_res/Conv_0"].shape[-1]) == (16, 32)
    assert (splits["up0_0_res/Conv_2"], inputs["up0_0_res/Conv_2"].shape[-1]) == (16, 24)


def _fake_and_int8(model, params, x, t):
    """The fake-quantized and the int8 network's outputs."""
    return tuple(
        dataclasses.replace(model, mode=mode).apply({"params": params}, x, t, train=False)
        for mode in ("fake", "int8")
    )


class _ThreeLayers(nn.Module):
    @nn.compact
    def __call__(self, x, t, train=False):
        h = nn.Conv(6, (3, 3))(x)
        h = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)))(nn.silu(h))
        return nn.Dense(3)(h)


def test_int8_execution_equals_fake_quantization_layer_for_layer():
    """Same codes, same steps: int8 products with int32 sums and the zero point folded in (SAME and
    explicit padding, stride 2, a split input, a Dense) equal the float32 fake-quantized layers."""
    module = _ThreeLayers()
    x, t = jax.random.normal(jax.random.key(0), (4, 8, 8, 5)) + 0.7, jnp.zeros((4,))
    params = module.init(jax.random.key(1), x, t)["params"]
    xs, ts = np.stack([np.asarray(x)] * 2), np.zeros((2, 4), np.float32)
    kw = dict(method="uniform", weight_bits=8, num_samples=8, batch_size=4, splits={"Conv_0": 2})
    model = quantization.calibrate(module, params, (xs, ts), float_inputs=(), **kw)  # x quantized too
    assert model.spec.groups["Conv_0"] == (0, 2, 5)
    fake, real = _fake_and_int8(model, params, x, t)
    np.testing.assert_allclose(real, fake, atol=1e-6 * float(jnp.abs(fake).max()))


def test_network_input_stays_float_and_head_and_stem_keep_8_bits():
    """By default (BRECQ/QDrop/PTQ4DM) the layer reading ``x`` keeps it unquantized: alone, it is the
    float layer with the dequantized kernel, in fake and int8 execution; the first and last layers
    keep 8-bit weights at W4; ``()`` turns both off; a key that is no layer is refused."""
    module = _ThreeLayers()
    x, t = 3.0 * jax.random.normal(jax.random.key(0), (4, 8, 8, 5)), jnp.zeros((4,))
    params = module.init(jax.random.key(1), x, t)["params"]
    xs, ts = np.stack([np.asarray(x)] * 2), np.zeros((2, 4), np.float32)
    kw = dict(method="uniform", weight_bits=4, num_samples=8, batch_size=4, splits={"Conv_0": 2})
    model = quantization.calibrate(module, params, (xs, ts), **kw)
    assert model.spec.float_inputs == ("Conv_0",) and model.spec.eight_bit_weights == ("Conv_0", "Dense_0")
    assert "a_scale" not in model.state["Conv_0"] and "a_scale" in model.state["Conv_1"]
    top = {k: int(jnp.abs(layer["codes"]).max()) for k, layer in model.state.items()}
    assert top == {"Conv_0": 127, "Conv_1": 7, "Dense_0": 127}
    layer = model.state["Conv_0"]
    w_scale = layer["w_scale"]  # (groups, cout): input channels 0-1 and 2-4
    scales = jnp.concatenate([jnp.broadcast_to(w_scale[0], (2, 6)), jnp.broadcast_to(w_scale[1], (3, 6))])
    dequantized = params | {"Conv_0": params["Conv_0"] | {"kernel": layer["codes"] * scales[None, None]}}
    expected = module.apply({"params": dequantized}, x, t)
    for out in _fake_and_int8(dataclasses.replace(model, state={"Conv_0": layer}), params, x, t):
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))
    fake, real = _fake_and_int8(model, params, x, t)  # the whole network, layer for layer
    np.testing.assert_allclose(real, fake, atol=1e-6 * float(jnp.abs(fake).max()))
    assert _relative(module.apply({"params": params}, x, t), expected) > 1e-4  # the codes are not the kernel
    plain = quantization.calibrate(module, params, (xs, ts), float_inputs=(), eight_bit_weights=(), **kw)
    assert "a_scale" in plain.state["Conv_0"] and all(
        int(jnp.abs(v["codes"]).max()) == 7 for v in plain.state.values()
    )
    with pytest.raises(ValueError, match=r"float_inputs=\['nope'\]"):
        quantization.calibrate(module, params, (xs, ts), float_inputs=("nope",), **kw)


def test_quantized_unet_w8a8_is_near_full_precision_in_int8_too(unet, tmp_path):
    """End to end, a float rounding difference can flip a later layer's input code, so int8 is held to
    less than the quantization error itself."""
    module, params = unet
    xs, ts = _trajectories((8, 8, 1))
    x, t = xs[1], ts[1]
    full = module.apply({"params": params}, x, t, train=False)
    model = quantization.calibrate(
        module,
        params,
        (xs, ts),
        method="uniform",
        weight_bits=8,
        num_samples=32,
        batch_size=16,
        splits=quantization.unet_skip_splits(module),
    )
    assert model.spec.groups["up1_0_res/Conv_0"] == (0, 16, 32) and model.spec.float_inputs == ("conv_in",)
    assert model.spec.eight_bit_weights == ("conv_in", "conv_out")
    fake, real = _fake_and_int8(model, params, x, t)
    assert _relative(fake, full) < 0.06  # random weights: 0.035 measured
    assert _relative(real, fake) < _relative(fake, full)
    quantization.save(str(tmp_path / "q"), model)
    loaded = quantization.load(str(tmp_path / "q"), module)
    assert loaded.spec == model.spec
    np.testing.assert_array_equal(loaded.apply({"params": params}, x, t, train=False), fake)


def test_tfmq_recalibrates_only_the_temporal_layers(unet):
    module, params = unet
    trajectories = _trajectories((8, 8, 1))
    kw = dict(weight_bits=4, num_samples=32, batch_size=16)
    uniform = quantization.calibrate(module, params, trajectories, method="uniform", **kw)
    tfmq = quantization.calibrate(module, params, trajectories, method="tfmq", **kw)
    changed = {
        key
        for key in uniform.state
        if not all(np.array_equal(uniform.state[key][f], tfmq.state[key][f]) for f in uniform.state[key])
    }
    temporal = {key for key in uniform.state if quantization.is_temporal(key)}
    assert "time_embed/Dense_0" in temporal and "up1_0_res/Dense_0" in temporal
    assert changed and changed <= temporal


def test_quantized_dit_w8a8_is_near_full_precision_in_int8_too():
    dit = mixture.get_config("dit").model  # the tests' one-block DiT, two blocks of width 32 here
    dit.update(depth=2, hidden_size=32, patch_size=2, freq_dim=32, attention_impl="xla")
    module = models.from_config(dit)
    x, t = jax.random.normal(jax.random.key(0), (4, 8, 8, 1)), jnp.linspace(0.2, 0.8, 4)
    params = _perturbed(nn.meta.unbox(module.init(jax.random.key(1), x, t, train=False)["params"]))
    xs, ts = _trajectories((8, 8, 1), steps=2, n=8)
    model = quantization.calibrate(module, params, (xs, ts), method="normal", weight_bits=8, num_samples=16)
    assert any(k.endswith("/adaln") for k in model.state) and model.spec.float_inputs == ("patch",)
    assert model.spec.eight_bit_weights == ("patch", "final")
    fake, real = _fake_and_int8(model, params, x, t)
    error = _relative(fake, module.apply({"params": params}, x, t, train=False))
    assert error < 0.05 and _relative(real, fake) < 0.5 * error
