"""InceptionV3: the torch-name conversion covers every tensor; shapes, determinism, layouts."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.evaluation import (
    InceptionV3,
    inception_features_and_logits,
    inception_variables_from_torch,
    load_inception_variables,
    save_inception_variables,
)
from diffax.evaluation._inception import _BasicConv, _resize

# The torchvision Inception3 constructor arguments of the FID network, written out independently
# of the Flax module: (name, in_channels, out_channels, kernel_h, kernel_w) per BasicConv2d.


def _block_a(p, cin, pool):
    return [
        (f"{p}.branch1x1", cin, 64, 1, 1),
        (f"{p}.branch5x5_1", cin, 48, 1, 1),
        (f"{p}.branch5x5_2", 48, 64, 5, 5),
        (f"{p}.branch3x3dbl_1", cin, 64, 1, 1),
        (f"{p}.branch3x3dbl_2", 64, 96, 3, 3),
        (f"{p}.branch3x3dbl_3", 96, 96, 3, 3),
        (f"{p}.branch_pool", cin, pool, 1, 1),
    ]


def _block_b(p, cin):
    return [
        (f"{p}.branch3x3", cin, 384, 3, 3),
        (f"{p}.branch3x3dbl_1", cin, 64, 1, 1),
        (f"{p}.branch3x3dbl_2", 64, 96, 3, 3),
        (f"{p}.branch3x3dbl_3", 96, 96, 3, 3),
    ]


def _block_c(p, cin, c7):
    return [
        (f"{p}.branch1x1", cin, 192, 1, 1),
        (f"{p}.branch7x7_1", cin, c7, 1, 1),
        (f"{p}.branch7x7_2", c7, c7, 1, 7),
        (f"{p}.branch7x7_3", c7, 192, 7, 1),
        (f"{p}.branch7x7dbl_1", cin, c7, 1, 1),
        (f"{p}.branch7x7dbl_2", c7, c7, 7, 1),
        (f"{p}.branch7x7dbl_3", c7, c7, 1, 7),
        (f"{p}.branch7x7dbl_4", c7, c7, 7, 1),
        (f"{p}.branch7x7dbl_5", c7, 192, 1, 7),
        (f"{p}.branch_pool", cin, 192, 1, 1),
    ]


def _block_d(p, cin):
    return [
        (f"{p}.branch3x3_1", cin, 192, 1, 1),
        (f"{p}.branch3x3_2", 192, 320, 3, 3),
        (f"{p}.branch7x7x3_1", cin, 192, 1, 1),
        (f"{p}.branch7x7x3_2", 192, 192, 1, 7),
        (f"{p}.branch7x7x3_3", 192, 192, 7, 1),
        (f"{p}.branch7x7x3_4", 192, 192, 3, 3),
    ]


def _block_e(p, cin):
    return [
        (f"{p}.branch1x1", cin, 320, 1, 1),
        (f"{p}.branch3x3_1", cin, 384, 1, 1),
        (f"{p}.branch3x3_2a", 384, 384, 1, 3),
        (f"{p}.branch3x3_2b", 384, 384, 3, 1),
        (f"{p}.branch3x3dbl_1", cin, 448, 1, 1),
        (f"{p}.branch3x3dbl_2", 448, 384, 3, 3),
        (f"{p}.branch3x3dbl_3a", 384, 384, 1, 3),
        (f"{p}.branch3x3dbl_3b", 384, 384, 3, 1),
        (f"{p}.branch_pool", cin, 192, 1, 1),
    ]


TORCH_CONVS = [
    ("Conv2d_1a_3x3", 3, 32, 3, 3),
    ("Conv2d_2a_3x3", 32, 32, 3, 3),
    ("Conv2d_2b_3x3", 32, 64, 3, 3),
    ("Conv2d_3b_1x1", 64, 80, 1, 1),
    ("Conv2d_4a_3x3", 80, 192, 3, 3),
    *_block_a("Mixed_5b", 192, 32),
    *_block_a("Mixed_5c", 256, 64),
    *_block_a("Mixed_5d", 288, 64),
    *_block_b("Mixed_6a", 288),
    *_block_c("Mixed_6b", 768, 128),
    *_block_c("Mixed_6c", 768, 160),
    *_block_c("Mixed_6d", 768, 160),
    *_block_c("Mixed_6e", 768, 192),
    *_block_d("Mixed_7a", 768),
    *_block_e("Mixed_7b", 1280),
    *_block_e("Mixed_7c", 2048),
]


def _conv_state(rng, name, cin, cout, kh, kw):
    return {
        f"{name}.conv.weight": rng.normal(size=(cout, cin, kh, kw)) * np.sqrt(2.0 / (cin * kh * kw)),
        f"{name}.bn.weight": rng.uniform(0.5, 1.5, size=cout),
        f"{name}.bn.bias": rng.normal(scale=0.1, size=cout),
        f"{name}.bn.running_mean": rng.normal(scale=0.1, size=cout),
        f"{name}.bn.running_var": rng.uniform(0.5, 1.5, size=cout),
        f"{name}.bn.num_batches_tracked": np.array(0),
    }


@functools.cache
def _torch_state_dict():
    rng = np.random.default_rng(0)
    state = {}
    for conv in TORCH_CONVS:
        state.update(_conv_state(rng, *conv))
    state["fc.weight"] = rng.normal(scale=0.05, size=(1008, 2048))
    state["fc.bias"] = rng.normal(size=1008)
    return {k: v.astype(np.float32) for k, v in state.items()}


def test_torch_state_dict_maps_onto_every_variable():
    state = _torch_state_dict()
    # torchvision documents 27,161,264 parameters for inception_v3 (1000 classes, with the
    # auxiliary head of 3,326,696); the FID net drops the head and has 1008 classes.
    trainable = sum(v.size for k, v in state.items() if "running" not in k and "num_batches" not in k)
    assert trainable == 27_161_264 - 3_326_696 + 8 * 2048 + 8
    variables = inception_variables_from_torch(state)  # raises on any missing/extra/mis-shaped leaf
    leaves = jax.tree.leaves(variables)
    assert len(leaves) == len([k for k in state if "num_batches" not in k])
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state["fc.weight"].T)
    np.testing.assert_array_equal(
        variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
        state["Mixed_7c.branch_pool.bn.running_var"],
    )


def test_conversion_rejects_incomplete_or_foreign_tensors():
    state = dict(_torch_state_dict())
    with pytest.raises(ValueError, match="no InceptionV3 counterpart"):
        inception_variables_from_torch({**state, "Conv2d_1a_3x3.conv.bias": np.zeros(32)})
    with pytest.raises(ValueError, match=r"unexpected \(1\): params/AuxLogits/fc/kernel"):
        inception_variables_from_torch({**state, "AuxLogits.fc.weight": np.zeros((1000, 768))})
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    with pytest.raises(ValueError, match=r"missing \(1\): params/Mixed_6b/branch7x7_2/conv/kernel"):
        inception_variables_from_torch(state)
    bad = dict(_torch_state_dict(), **{"fc.bias": np.zeros(1000, np.float32)})
    with pytest.raises(ValueError, match=r"wrong shape \(1\): params/fc/bias"):
        inception_variables_from_torch(bad)


def test_converted_conv_matches_torch_layout_reference():
    # One converted BasicConv2d (a 1x7 kernel with padding (0, 3)) against an NCHW/OIHW
    # convolution of the torch tensors and the batch-norm formula written out.
    state, name = _torch_state_dict(), "Mixed_6b.branch7x7_2"
    variables = inception_variables_from_torch(state)
    layer = {c: variables[c]["Mixed_6b"]["branch7x7_2"] for c in ("params", "batch_stats")}
    t = lambda leaf: state[f"{name}.{leaf}"]
    x = np.random.default_rng(1).normal(size=(2, 128, 5, 9)).astype(np.float32)  # NCHW
    conv = jax.lax.conv_general_dilated(
        x,
        t("conv.weight"),
        (1, 1),
        ((0, 0), (3, 3)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=jax.lax.Precision.HIGHEST,
    )
    c = lambda v: v.reshape(1, -1, 1, 1)
    normed = (conv - c(t("bn.running_mean"))) / np.sqrt(c(t("bn.running_var")) + 1e-3)
    expected = np.maximum(normed * c(t("bn.weight")) + c(t("bn.bias")), 0.0)
    out = _BasicConv(128, (1, 7), padding=(0, 3)).apply(layer, x.transpose(0, 2, 3, 1))
    chex.assert_trees_all_close(out, expected.transpose(0, 2, 3, 1), atol=1e-4)


def test_full_size_shapes():
    images = jax.ShapeDtypeStruct((2, 299, 299, 3), jnp.float32)
    variables = jax.eval_shape(InceptionV3().init, jax.random.key(0), images)
    features, logits = jax.eval_shape(InceptionV3().apply, variables, images)
    chex.assert_shape(features, (2, 2048))
    chex.assert_shape(logits, (2, 1008))


def test_small_input_runs_deterministically_and_logits_are_pool3_times_fc(tmp_path):
    path = tmp_path / "inception.npz"
    save_inception_variables(inception_variables_from_torch(_torch_state_dict()), path)
    variables = load_inception_variables(path)
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1), minval=-1.0, maxval=1.0)
    features, logits = inception_features_and_logits(images, variables=variables, size=75)
    again, _ = inception_features_and_logits(images, variables=variables, size=75)
    chex.assert_shape(features, (2, 2048))
    chex.assert_shape(logits, (2, 1008))
    chex.assert_tree_all_finite((features, logits))
    np.testing.assert_array_equal(features, again)
    assert float(jnp.min(features)) >= 0.0  # an average of ReLU outputs
    assert float(jnp.std(features[0] - features[1])) > 0.0  # the two images differ
    w, b = _torch_state_dict()["fc.weight"], _torch_state_dict()["fc.bias"]
    np.testing.assert_allclose(logits, np.asarray(features, np.float64) @ w.T, rtol=1e-4, atol=1e-4)
    _, biased = inception_features_and_logits(images, variables=variables, size=75, logits_bias=True)
    np.testing.assert_allclose(biased - logits, np.tile(b, (2, 1)), atol=1e-4)


def test_resize_is_half_pixel_bilinear():
    # torch's interpolate(mode="bilinear", align_corners=False) is separable: each output index i
    # reads the input at (i + 0.5) * n_in / n_out - 0.5, clamped to the edges.
    def reference(x, axis, n_out):
        n = x.shape[axis]
        src = np.clip((np.arange(n_out) + 0.5) * n / n_out - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        shape = [1] * x.ndim
        shape[axis] = n_out
        frac = (src - lo).reshape(shape)
        return np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac

    rng = np.random.default_rng(2)
    for n_in, n_out in ((8, 20), (20, 8)):
        x = rng.uniform(-1, 1, size=(2, n_in, n_in, 1))
        expected = np.tile(reference(reference(x, 1, n_out), 2, n_out), (1, 1, 1, 3))
        np.testing.assert_allclose(_resize(jnp.asarray(x), n_out), expected, atol=1e-6)


def test_bad_input_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_inception_variables(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="NHWC"):
        inception_features_and_logits(np.zeros((2, 80, 80)), variables={})
    with pytest.raises(ValueError, match="size must be at least 75"):
        inception_features_and_logits(np.zeros((2, 80, 80, 3)), variables={}, size=64)
