"""diffusers ``UNet2DModel`` (DDPM's U-Net, e.g. ``google/ddpm-cifar10-32``) <-> ``diffax.models.UNet``."""

from collections.abc import Container, Mapping
from typing import Any

import jax.numpy as jnp

from diffax.models.convert import blocks
from diffax.models.convert.files import read_config
from diffax.models.convert.table import ConversionError, Entry, Source, conv2d, group_norm, linear
from diffax.models.unet import UNet

CLASS_NAMES = ("UNet2DModel",)
MODULE = UNet

# diffusers' UNet2DModel.__init__ defaults (diffusers 0.42, models/unets/unet_2d.py) of the fields read.
DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896),
    layers_per_block=2,
    downsample_padding=1,
    dropout=0.0,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
)
FIXED = dict(
    center_input_sample=False,
    time_embedding_type="positional",
    time_embedding_dim=None,
    mid_block_type="UNetMidBlock2D",
    mid_block_scale_factor=1,
    downsample_type="conv",
    upsample_type="conv",
    act_fn="silu",
    attn_norm_num_groups=None,
    resnet_time_scale_shift="default",
    add_attention=True,
    class_embed_type=None,
    num_class_embeds=None,
)
INERT = ("sample_size", "num_train_timesteps")  # recorded sizes; no effect on a positional embedding
DOWN = ("DownBlock2D", "AttnDownBlock2D")
UP = ("UpBlock2D", "AttnUpBlock2D")
# diffusers feeds the integer step i; diffax's t = (i + 1) / T with T = time_scale.
TIME_OFFSET = 1.0


def _error(message: str) -> ConversionError:
    return ConversionError(f"from_diffusers: UNet2DModel config {message}")


def module_from_config(
    config: Mapping[str, Any], source: Source, **fields: Any
) -> tuple[UNet, tuple[Any, ...]]:
    """The diffax module of a diffusers ``UNet2DModel`` config, and arguments for its ``init``.

    ``source`` (the file's tensors) is not needed: the config says it all.
    """
    c = read_config(config, owner="UNet2DModel", defaults=DEFAULTS, inert=INERT, fixed=FIXED)
    channels, levels = tuple(c["block_out_channels"]), len(c["block_out_channels"])
    down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
    if len(down) != levels or len(up) != levels or not set(down) <= set(DOWN) or not set(up) <= set(UP):
        raise _error(
            f"down_block_types={list(down)}, up_block_types={list(up)}; "
            f"diffax builds {levels} of {DOWN}, {UP}."
        )
    attention = tuple(level for level, kind in enumerate(down) if kind == "AttnDownBlock2D")
    if attention != tuple(level for level, kind in enumerate(reversed(up)) if kind == "AttnUpBlock2D"):
        raise _error(
            f"attends at different levels down ({list(down)}) and up ({list(up)}); diffax mirrors them."
        )
    if any(ch % channels[0] for ch in channels):
        raise _error(f"block_out_channels={list(channels)} are not multiples of the first (channel_mult).")
    if c["out_channels"] not in (c["in_channels"], 2 * c["in_channels"]):
        raise _error(
            f"out_channels={c['out_channels']}; diffax outputs in_channels or 2 x (learned variance)."
        )
    if c["downsample_padding"] not in (0, 1):
        raise _error(f"downsample_padding={c['downsample_padding']}; diffax supports 0 and 1.")
    head_dim = c["attention_head_dim"]
    module = UNet(
        base_channels=channels[0],
        channel_mult=tuple(ch // channels[0] for ch in channels),
        num_res_blocks=c["layers_per_block"],
        attention_levels=attention,
        num_heads=1,
        head_channels=head_dim,
        dropout=c["dropout"],
        norm_groups=c["norm_num_groups"],
        norm_eps=c["norm_eps"],
        time_sin_first=not c["flip_sin_to_cos"],
        time_freq_shift=float(c["freq_shift"]),
        time_offset=TIME_OFFSET,
        downsample_padding=(0, 1) if c["downsample_padding"] == 0 else (1, 1),
        learned_variance=c["out_channels"] == 2 * c["in_channels"],
        **fields,
    )
    side = 2 ** (levels - 1)
    return module, (jnp.zeros((1, side, side, c["in_channels"])), jnp.zeros((1,)))


def _attends(shapes: Container[str], name: str) -> bool:
    return f"{name}_attn/self_norm/scale" in shapes


def config_from_module(module: UNet, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The diffusers config of a diffax ``UNet`` (``shapes``: its parameter paths and shapes)."""
    unsupported = dict(
        time_embedding=(module.time_embedding, "sinusoidal"),
        time_injection=(module.time_injection, "add"),
        resblock_updown=(module.resblock_updown, False),
        num_classes=(module.num_classes, None),
        context_dim=(module.context_dim, None),
        time_offset=(module.time_offset, TIME_OFFSET),
    )
    for field, (value, needed) in unsupported.items():
        if value != needed:
            raise ConversionError(
                f"to_diffusers: UNet {field}={value!r}; diffusers' UNet2DModel needs {needed!r}."
            )
    if module.head_channels is None and module.num_heads != 1:
        raise ConversionError(
            f"to_diffusers: UNet num_heads={module.num_heads}; UNet2DModel fixes the head width "
            "(set head_channels)."
        )
    pad = tuple(module.downsample_padding)
    if pad not in ((0, 1), (1, 1)):
        raise ConversionError(
            f"to_diffusers: UNet downsample_padding={pad}; diffusers pads (0, 1) or (1, 1)."
        )
    levels = len(module.channel_mult)
    in_channels = shapes["conv_in/kernel"][2]
    return dict(
        _class_name="UNet2DModel",
        in_channels=in_channels,
        out_channels=shapes["conv_out/kernel"][3],
        freq_shift=module.time_freq_shift,
        flip_sin_to_cos=not module.time_sin_first,
        down_block_types=[DOWN[_attends(shapes, f"down{level}_0")] for level in range(levels)],
        up_block_types=[UP[_attends(shapes, f"up{level}_0")] for level in reversed(range(levels))],
        block_out_channels=[module.base_channels * m for m in module.channel_mult],
        layers_per_block=module.num_res_blocks,
        downsample_padding=0 if pad == (0, 1) else 1,
        dropout=module.dropout,
        attention_head_dim=module.head_channels,
        norm_num_groups=module.norm_groups,
        norm_eps=module.norm_eps,
        **FIXED,
    )


def table(module: UNet, shapes: Container[str]) -> list[Entry]:
    """The conversion table of ``module`` (``shapes``: its parameter paths)."""
    levels = len(module.channel_mult)
    entries = [
        *linear("time_embed/Dense_0", "time_embedding.linear_1"),
        *linear("time_embed/Dense_1", "time_embedding.linear_2"),
        *conv2d("conv_in", "conv_in"),
        *blocks.resnet("mid_res0", "mid_block.resnets.0", shapes),
        *blocks.attention("mid_attn", "mid_block.attentions.0"),
        *blocks.resnet("mid_res1", "mid_block.resnets.1", shapes),
        *group_norm("norm_out", "conv_norm_out"),
        *conv2d("conv_out", "conv_out"),
    ]
    for level in range(levels):
        for side, source, count in (
            ("down", f"down_blocks.{level}", module.num_res_blocks),
            ("up", f"up_blocks.{levels - 1 - level}", module.num_res_blocks + 1),  # counted from the bottom
        ):
            for i in range(count):
                entries += blocks.resnet(f"{side}{level}_{i}_res", f"{source}.resnets.{i}", shapes)
                if _attends(shapes, f"{side}{level}_{i}"):
                    entries += blocks.attention(f"{side}{level}_{i}_attn", f"{source}.attentions.{i}")
        if level != levels - 1:
            entries += conv2d(f"down{level}_resample", f"down_blocks.{level}.downsamplers.0.conv")
        if level != 0:
            entries += conv2d(f"up{level}_resample", f"up_blocks.{levels - 1 - level}.upsamplers.0.conv")
    return entries
