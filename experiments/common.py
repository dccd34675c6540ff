"""Defaults shared by the experiment files: the schema, CPU-sized networks, tfds image inputs, runlocal."""

import ml_collections

from diffax import models
from diffax.config import base_config


def model(name: str, **overrides) -> ml_collections.ConfigDict:
    """The ``config.model`` section of a ``diffax.models`` preset, its fields spelled out.

    Listing the preset's fields lets ``--config.model.<field>=...`` override any of them;
    ``--config.model.dtype=bfloat16`` computes in bfloat16 with float32 parameters. The network's
    formulation switches (``*_impl``) are ``"auto"``: chosen where the program is lowered (the CPU
    kernels on CPU, fused attention on TPU and GPU; see ``diffax.models.layers``).
    """
    module = models.PRESETS[name][0]
    impls = {field: "auto" for field in module.__dataclass_fields__ if field.endswith("_impl")}
    fields = dict(name=name, dtype="float32") | impls | dict(models.PRESETS[name][1]) | overrides
    return ml_collections.ConfigDict(fields)


def cpu_unet(preset: str = "unet_ddpm_cifar10", **overrides) -> ml_collections.ConfigDict:
    """A small U-Net (a U-Net preset, shrunk) that trains on a laptop CPU.

    Its formulation switches are ``"auto"`` (``model``): the CPU-tuned attention, GroupNorm,
    residual-block and convolution formulations of ``diffax.kernels.cpu`` where the program is lowered
    for the CPU.
    """
    small = dict(
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=1,
        norm_groups=8,
        dropout=0.0,
    )
    return model(preset, **(small | overrides))


def tfds_images(
    config: ml_collections.ConfigDict, name: str, *, image_size: int, channels: int = 3, labels: bool = False
) -> None:
    """Points ``config.input`` at a tfds image dataset (prepared beforehand: nothing downloads at run time)."""
    config.input.dataset = name
    config.input.split = "train"
    config.input.image_size = image_size
    config.input.channels = channels
    config.input.labels = labels
    config.input.random_flip = True


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a paper-sized config to something a laptop CPU runs in minutes (same code paths)."""
    config.total_steps = 20
    config.input.batch_size = 8
    config.input.shuffle_buffer = 64
    config.optim.warmup_steps = 5
    config.ckpt.every_steps = 10
    config.log.every_steps = 5
    config.log.sample_every_steps = 20
    config.log.num_samples = 4
    config.sampler.steps = 10
    return config


__all__ = ["base_config", "cpu_unet", "model", "runlocal", "tfds_images"]
