"""diffusers ``AutoencoderKL`` (the Stable Diffusion VAE) <-> ``diffax.models.AutoencoderKL``."""

from collections.abc import Container, Mapping
from typing import Any

import jax.numpy as jnp

from diffax.models.autoencoder import AutoencoderKL
from diffax.models.convert import blocks
from diffax.models.convert.files import read_config
from diffax.models.convert.table import ConversionError, Entry, Source, conv2d, group_norm

CLASS_NAMES = ("AutoencoderKL",)
MODULE = AutoencoderKL

# diffusers' AutoencoderKL.__init__ defaults (diffusers 0.42, models/autoencoders/autoencoder_kl.py).
DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)
FIXED = dict(act_fn="silu", shift_factor=None, latents_mean=None, latents_std=None)
INERT = ("sample_size", "force_upcast")  # tiling size and an fp16 switch


def module_from_config(
    config: Mapping[str, Any], source: Source, **fields: Any
) -> tuple[AutoencoderKL, tuple[Any, ...]]:
    """The diffax module of a diffusers ``AutoencoderKL`` config, and arguments for its ``init``.

    ``source`` (the file's tensors) is not needed: the config says it all.
    """
    c = read_config(config, owner="AutoencoderKL", defaults=DEFAULTS, inert=INERT, fixed=FIXED)
    channels = tuple(c["block_out_channels"])
    levels = len(channels)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if tuple(c[key]) != (kind,) * levels:
            raise ConversionError(
                f"from_diffusers: AutoencoderKL config {key}={list(c[key])}; "
                f"diffax builds {levels} x {kind!r}."
            )
    if c["in_channels"] != c["out_channels"]:
        raise ConversionError(
            f"from_diffusers: AutoencoderKL config in_channels={c['in_channels']} != out_channels="
            f"{c['out_channels']}; diffax's AutoencoderKL has one image_channels."
        )
    if any(ch % channels[0] for ch in channels):
        raise ConversionError(
            f"from_diffusers: AutoencoderKL config block_out_channels={list(channels)} are not multiples of "
            "the first; diffax's channel_mult needs them to be."
        )
    module = AutoencoderKL(
        image_channels=c["in_channels"],
        latent_channels=c["latent_channels"],
        base_channels=channels[0],
        channel_mult=tuple(ch // channels[0] for ch in channels),
        num_res_blocks=c["layers_per_block"],
        norm_groups=c["norm_num_groups"],
        mid_attention=c["mid_block_add_attention"],
        use_quant_conv=c["use_quant_conv"],
        use_post_quant_conv=c["use_post_quant_conv"],
        scaling_factor=c["scaling_factor"],
        **fields,
    )
    f = module.downsampling_factor
    return module, (jnp.zeros((1, f, f, module.image_channels), jnp.float32),)


def config_from_module(module: AutoencoderKL, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The diffusers config of a diffax ``AutoencoderKL`` (``shapes`` unused: the fields say it all)."""
    if module.norm_eps != 1e-6:
        raise ConversionError(
            f"to_diffusers: AutoencoderKL norm_eps={module.norm_eps}; diffusers fixes 1e-6."
        )
    levels = len(module.channel_mult)
    return dict(
        _class_name="AutoencoderKL",
        act_fn="silu",
        in_channels=module.image_channels,
        out_channels=module.image_channels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[module.base_channels * m for m in module.channel_mult],
        layers_per_block=module.num_res_blocks,
        latent_channels=module.latent_channels,
        norm_num_groups=module.norm_groups,
        scaling_factor=module.scaling_factor,
        use_quant_conv=module.use_quant_conv,
        use_post_quant_conv=module.use_post_quant_conv,
        mid_block_add_attention=module.mid_attention,
    )


def table(module: AutoencoderKL, params: Container[str]) -> list[Entry]:
    """The conversion table of ``module`` (``params``: its parameter paths)."""

    def mid(path: str, source: str) -> list[Entry]:
        entries = blocks.resnet(f"{path}/mid_res0", f"{source}.mid_block.resnets.0", params)
        if module.mid_attention:
            entries += blocks.attention(f"{path}/mid_attn", f"{source}.mid_block.attentions.0")
        entries += blocks.resnet(f"{path}/mid_res1", f"{source}.mid_block.resnets.1", params)
        return [
            *entries,
            *group_norm(f"{path}/norm_out", f"{source}.conv_norm_out"),
            *conv2d(f"{path}/conv_out", f"{source}.conv_out"),
            *conv2d(f"{path}/conv_in", f"{source}.conv_in"),
        ]

    levels = len(module.channel_mult)
    entries = mid("encoder", "encoder") + mid("decoder", "decoder")
    for level in range(levels):
        down = f"encoder.down_blocks.{level}"
        for i in range(module.num_res_blocks):
            entries += blocks.resnet(f"encoder/down{level}_{i}", f"{down}.resnets.{i}", params)
        up = f"decoder.up_blocks.{levels - 1 - level}"  # diffusers counts the decoder from the bottom
        for i in range(module.num_res_blocks + 1):
            entries += blocks.resnet(f"decoder/up{level}_{i}", f"{up}.resnets.{i}", params)
        if level != levels - 1:
            entries += conv2d(f"encoder/down{level}_resample", f"{down}.downsamplers.0.conv")
        if level != 0:
            entries += conv2d(f"decoder/up{level}_resample", f"{up}.upsamplers.0.conv")
    if module.use_quant_conv:
        entries += conv2d("quant_conv", "quant_conv")
    if module.use_post_quant_conv:
        entries += conv2d("post_quant_conv", "post_quant_conv")
    return entries
