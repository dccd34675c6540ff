"""LPIPS with the VGG16 backbone, the perceptual term of the LDM autoencoder loss, from a local file.

``d(x, y) = Σ_l mean_hw ‖w_l ⊙ (ŷ^l_hw − ŷ'^l_hw)‖²`` over the relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3 activations of VGG16 on the scaled inputs, each unit-normalised over channels
(Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", 2018, Eq. 1;
the ``lpips`` package's ``LPIPS(net="vgg")``, version 0.1, which LDM's ``contperceptual`` loss uses).

The weights do not ship with diffax and nothing downloads at run time: :func:`load` reads the
``lpips`` package's state dict saved where the weights are at hand, e.g.

    import lpips, safetensors.torch
    safetensors.torch.save_file(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.safetensors")

(a ``.pth`` of the same state dict loads too, with ``torch.load(weights_only=True)``).
"""

import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.models.convert import files, table

# VGG16's convolutions per stage (configuration D, Simonyan & Zisserman 2015); LPIPS taps each stage's
# last relu. ``FEATURE_INDEX`` is each convolution's index in torchvision's ``vgg16().features``.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
FEATURE_INDEX = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
# The ``ScalingLayer``: inputs in [-1, 1] shifted and scaled to ImageNet statistics.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
NORM_EPS = 1e-10  # ``lpips.normalize_tensor``


class LPIPS(nn.Module):
    """``LPIPS()(x, y) -> (B,)`` perceptual distances of images in [-1, 1], (B, H, W, 1 or 3); grey
    images are repeated to RGB. H and W must be at least 16 (four poolings before relu5_3)."""

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        batch = x.shape[0]
        h = jnp.concatenate([x, y]).astype(jnp.float32)
        if h.shape[-1] == 1:
            h = jnp.repeat(h, 3, axis=-1)
        h = (h - SHIFT.reshape(1, 1, 1, 3)) / SCALE.reshape(1, 1, 1, 3)
        distance = jnp.zeros((batch,), jnp.float32)
        for stage, widths in enumerate(VGG16_STAGES):
            if stage:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for j, width in enumerate(widths):
                h = nn.relu(nn.Conv(width, (3, 3), padding=1, name=f"stage{stage}_conv{j}")(h))
            unit = h / (jnp.sqrt(jnp.sum(jnp.square(h), axis=-1, keepdims=True)) + NORM_EPS)
            diff = jnp.square(unit[:batch] - unit[batch:])
            head = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{stage}")(diff)
            distance = distance + jnp.mean(head, axis=(1, 2, 3))
        return distance


def conversion_table() -> list[table.Entry]:
    """The ``lpips.LPIPS(net="vgg")`` state dict's tensors as :class:`LPIPS` parameters; the scaling
    buffers are checked against the constants above."""
    entries = []
    for stage, indices in enumerate(FEATURE_INDEX):
        for j, index in enumerate(indices):
            entries += table.conv2d(f"stage{stage}_conv{j}", f"net.slice{stage + 1}.{index}")
        entries.append(
            table.entry(
                f"lin{stage}/kernel",
                (f"lin{stage}.model.1.weight", f"lin{stage}.model.0.weight"),  # with / without dropout
                layout="conv",
            )
        )
    for name, value in (("shift", SHIFT), ("scale", SCALE)):
        entries.append(table.Entry(None, ((f"scaling_layer.{name}",),), constant=value.reshape(1, 3, 1, 1)))
    return entries


def param_shapes() -> dict[str, tuple[int, ...]]:
    """Every :class:`LPIPS` parameter's ``/``-joined path and shape."""
    x = jnp.zeros((1, 16, 16, 3))
    return table.param_shapes(lambda: LPIPS().init(jax.random.key(0), x, x)["params"])


def _torch_file(path: str) -> files.TorchStateDict:
    """A ``torch.save``-d state dict, unpickled with ``weights_only=True`` (tensors and plain containers)."""
    try:
        import torch
    except ImportError as e:
        raise table.ConversionError(
            f"lpips.load({path}): a .pth file needs torch; save the state dict as .safetensors instead."
        ) from e
    return files.TorchStateDict(torch.load(path, map_location="cpu", weights_only=True))


def load(path: str | pathlib.Path) -> dict[str, Any]:
    """The :class:`LPIPS` parameters from a saved ``lpips.LPIPS(net="vgg").state_dict()`` (``.safetensors``
    or ``.pth``).

    Raises:
      diffax.models.ConversionError: naming a missing, stray or misshapen tensor, or an unreadable file.
    """
    path = str(path)
    if not pathlib.Path(path).is_file():
        raise table.ConversionError(f"lpips.load: no file {path!r}.")
    source = files.SafetensorsSource(path) if path.endswith(".safetensors") else _torch_file(path)
    return table.load(conversion_table(), source, param_shapes(), owner=f"lpips.load({path})")


def distance(params: Mapping[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    """``(B,)`` LPIPS distances between image batches in [-1, 1] (see :class:`LPIPS`)."""
    return LPIPS().apply({"params": params}, x, y)


__all__ = ["LPIPS", "conversion_table", "distance", "load", "param_shapes"]
