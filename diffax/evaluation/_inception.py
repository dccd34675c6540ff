"""InceptionV3 as used for FID: pool3 features (2048-d) and 1008-class logits, in Flax linen.

The architecture is the one of the TensorFlow FID graph (``pt_inception-2015-12-05``) as ported by
pytorch-fid: torchvision's Inception3 without auxiliary logits, with 1008 classes, average pools
that leave the padding out of the count (``count_include_pad=False``) in blocks A, C and E_1, and a
max pool in the last block (E_2). Input images are NHWC in [-1, 1], resized to 299×299 by
:func:`inception_features_and_logits` (bilinear, half-pixel centres, no antialiasing, as
``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``). Any input of at
least 75×75 runs.

Weights are never downloaded: they are read from a local ``.npz`` (the flattened variable tree,
keys like ``params/Mixed_5b/branch1x1/conv/kernel``) with :func:`load_inception_variables`.

Converting the standard FID weights (once, on a machine with PyTorch)::

    # pt_inception-2015-12-05-6726825d.pth is pytorch-fid's FID_WEIGHTS_URL file.
    import numpy as np, torch
    from diffax.evaluation import inception_variables_from_torch, save_inception_variables

    state_dict = torch.load(
        "pt_inception-2015-12-05-6726825d.pth", map_location="cpu", weights_only=True
    )  # tensors and plain containers only: no arbitrary unpickling
    arrays = {name: tensor.numpy() for name, tensor in state_dict.items()}
    save_inception_variables(inception_variables_from_torch(arrays), "inception_fid.npz")

The names are torchvision's (``Conv2d_1a_3x3.conv.weight``, ``Mixed_7c.branch_pool.bn.running_var``,
``fc.weight``, ...); :func:`inception_variables_from_torch` moves OIHW kernels to Flax's HWIO, maps
batch-norm ``weight``/``bias``/``running_mean``/``running_var`` to ``scale``/``bias``/``mean``/``var``,
transposes ``fc.weight``, and rejects a dict that misses or adds any tensor. The TensorFlow graph
(``classify_image_graph_def.pb``) holds the same weights as constants; pytorch-fid's file was made
from it, so converting the ``.pth`` is the supported route.

References: Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016;
Heusel et al., NeurIPS 2017 (FID); Seitzer, pytorch-fid (the ``FIDInception*`` blocks).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffax.evaluation._npz import check_tree_shapes, load_tree_npz, save_tree_npz

__all__ = [
    "InceptionV3",
    "inception_features_and_logits",
    "inception_variables_from_torch",
    "load_inception_variables",
    "save_inception_variables",
]

INCEPTION_SIZE = 299
MIN_INCEPTION_SIZE = 75
NUM_INCEPTION_CLASSES = 1008


class _BasicConv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, running statistics), ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad_h, pad_w = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=((pad_h, pad_h), (pad_w, pad_w)),
            use_bias=False,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class _InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = _BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = _BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = _BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = _BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = _BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = _BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = _BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = _BasicConv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = _BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = _BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = _BasicConv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class _InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        b1 = _BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = _BasicConv(c, (1, 1), name="branch7x7_1")(x)
        b7 = _BasicConv(c, **row, name="branch7x7_2")(b7)
        b7 = _BasicConv(192, **col, name="branch7x7_3")(b7)
        bd = _BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = _BasicConv(c, **col, name="branch7x7dbl_2")(bd)
        bd = _BasicConv(c, **row, name="branch7x7dbl_3")(bd)
        bd = _BasicConv(c, **col, name="branch7x7dbl_4")(bd)
        bd = _BasicConv(192, **row, name="branch7x7dbl_5")(bd)
        bp = _BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = _BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = _BasicConv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = _BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = _BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = _BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = _BasicConv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class _InceptionE(nn.Module):
    """Block E; the FID graph pools by average in Mixed_7b and by max in Mixed_7c."""

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        b1 = _BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = _BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = [
            _BasicConv(384, **row, name="branch3x3_2a")(b3),
            _BasicConv(384, **col, name="branch3x3_2b")(b3),
        ]
        bd = _BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = _BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = [
            _BasicConv(384, **row, name="branch3x3dbl_3a")(bd),
            _BasicConv(384, **col, name="branch3x3dbl_3b")(bd),
        ]
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = _BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class _Logits(nn.Module):
    """The final linear layer; its bias is kept in the weights but applied only on request."""

    features: int
    use_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jnp.matmul(x, kernel, precision=jax.lax.Precision.HIGHEST)
        return y + bias.reshape(1, -1) if self.use_bias else y


class InceptionV3(nn.Module):
    """The FID InceptionV3: NHWC images in [-1, 1] (≥ 75×75) → (pool3 features, logits).

    Attributes:
      logits_bias: add the fc bias to the logits. False (the default) gives ``pool3 @ W``, the
        logits of the original Inception Score code (which reads the ``softmax/logits/MatMul``
        weight, without bias) and of torch-fidelity's ``logits_unbiased``.
    """

    logits_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = _BasicConv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = _BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = _BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = _BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = _BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = _InceptionA(32, name="Mixed_5b")(x)
        x = _InceptionA(64, name="Mixed_5c")(x)
        x = _InceptionA(64, name="Mixed_5d")(x)
        x = _InceptionB(name="Mixed_6a")(x)
        for name, channels in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = _InceptionC(channels, name=name)(x)
        x = _InceptionD(name="Mixed_7a")(x)
        x = _InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = _InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        return pool3, _Logits(NUM_INCEPTION_CLASSES, self.logits_bias, name="fc")(pool3)


@functools.cache
def _variable_shapes() -> dict:
    """Shapes of every InceptionV3 variable (they do not depend on the input size)."""
    x = jax.ShapeDtypeStruct((1, MIN_INCEPTION_SIZE, MIN_INCEPTION_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.key(0), x)


_TORCH_LEAVES = {
    # (layer, torch name) -> (collection, flax name)
    ("conv", "weight"): ("params", "kernel"),
    ("bn", "weight"): ("params", "scale"),
    ("bn", "bias"): ("params", "bias"),
    ("bn", "running_mean"): ("batch_stats", "mean"),
    ("bn", "running_var"): ("batch_stats", "var"),
    ("fc", "weight"): ("params", "kernel"),
    ("fc", "bias"): ("params", "bias"),
}


def inception_variables_from_torch(state_dict: Mapping[str, ArrayLike]) -> dict:
    """Converts a torchvision-named FID Inception ``state_dict`` (numpy arrays) to Flax variables.

    Args:
      state_dict: tensor name → array, e.g.
        ``{k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}``
        of pytorch-fid's ``pt_inception-2015-12-05`` file. ``num_batches_tracked`` entries are
        ignored.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for :class:`InceptionV3`, as float32 numpy arrays.

    Raises:
      ValueError: if a tensor is missing, unknown, or has the wrong shape.
    """
    variables: dict = {"params": {}, "batch_stats": {}}
    unknown = []
    for name, value in state_dict.items():
        *modules, layer, leaf = name.split(".")
        if leaf == "num_batches_tracked":
            continue
        if (layer, leaf) not in _TORCH_LEAVES:
            unknown.append(name)
            continue
        collection, flax_leaf = _TORCH_LEAVES[(layer, leaf)]
        array = np.asarray(value, np.float32)
        if layer == "conv":
            array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif layer == "fc" and leaf == "weight":
            array = array.T
        node = variables[collection]
        for module in (*modules, layer):
            node = node.setdefault(module, {})
        node[flax_leaf] = array
    if unknown:
        raise ValueError(f"state_dict has tensors with no InceptionV3 counterpart: {unknown[:5]}.")
    check_tree_shapes(variables, _variable_shapes(), what="the converted state_dict")
    return variables


def save_inception_variables(variables: Mapping, path: str | os.PathLike) -> None:
    """Writes InceptionV3 variables to a flat ``.npz`` that :func:`load_inception_variables` reads."""
    check_tree_shapes(variables, _variable_shapes(), what="variables")
    save_tree_npz(variables, path)


def load_inception_variables(path: str | os.PathLike) -> dict:
    """Reads InceptionV3 variables from a local ``.npz`` (see the module docstring to make one).

    Args:
      path: the file, e.g. the ``evals.inception_weights`` entry of a config.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` as numpy arrays.

    Raises:
      ValueError: if the file is missing or its tensors do not match the architecture.
    """
    return load_tree_npz(path, expected=_variable_shapes(), what="InceptionV3 weights")


def _resize(images: jax.Array, size: int) -> jax.Array:
    """3-channel ``size``×``size`` images: bilinear, half-pixel centres, no antialiasing."""
    images = images.astype(jnp.float32)
    if images.shape[-1] == 1:
        images = jnp.tile(images, (1, 1, 1, 3))
    shape = (images.shape[0], size, size, 3)
    return jax.image.resize(images, shape, method="bilinear", antialias=False)


@functools.partial(jax.jit, static_argnames=("size", "logits_bias"))
def _features_and_logits(variables, images, *, size, logits_bias):
    return InceptionV3(logits_bias=logits_bias).apply(variables, _resize(images, size))


def inception_features_and_logits(
    images: ArrayLike,
    *,
    variables: Mapping,
    size: int = INCEPTION_SIZE,
    logits_bias: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Pool3 features and logits of images, resized to ``size``×``size`` inside.

    Args:
      images: NHWC, values in [-1, 1], with 3 channels (or 1, repeated to 3).
      variables: InceptionV3 variables, e.g. from :func:`load_inception_variables`.
      size: the side the images are resized to; 299 for FID. At least 75.
      logits_bias: add the fc bias to the logits (see :class:`InceptionV3`).

    Returns:
      ``(features, logits)`` of shapes (N, 2048) and (N, 1008).
    """
    if jnp.ndim(images) != 4 or jnp.shape(images)[-1] not in (1, 3):
        raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {jnp.shape(images)}.")
    if size < MIN_INCEPTION_SIZE:
        raise ValueError(f"size must be at least {MIN_INCEPTION_SIZE}, got {size}.")
    return _features_and_logits(variables, images, size=size, logits_bias=logits_bias)
