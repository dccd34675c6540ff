"""diffax models: the DDPM/ADM U-Net, DiT, the KL autoencoder, presets, abstract parameters, converters.

Every model is called as ``module.apply({"params": p}, x, t, cond=None, train=False,
rngs={"dropout": key})`` with x NHWC, t of shape (batch,) in continuous time, and cond None, int
labels (batch,) (null label = num_classes) or {"label": ..., "context": ...}.
"""

from diffax.models.autoencoder import AutoencoderKL
from diffax.models.convert import ConversionError, from_diffusers, from_dit_checkpoint, to_diffusers
from diffax.models.dit import DiT
from diffax.models.layers import LOGICAL_AXIS_RULES
from diffax.models.registry import PRESETS, abstract_params, count_params, from_config, get
from diffax.models.unet import UNet

__all__ = [
    "LOGICAL_AXIS_RULES",
    "PRESETS",
    "AutoencoderKL",
    "ConversionError",
    "DiT",
    "UNet",
    "abstract_params",
    "count_params",
    "from_config",
    "from_diffusers",
    "from_dit_checkpoint",
    "get",
    "to_diffusers",
]
