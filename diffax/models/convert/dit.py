"""DiT checkpoints <-> ``diffax.models.DiT``: diffusers' ``DiTTransformer2DModel`` (and the older
``Transformer2DModel`` with adaLN-Zero, the same tensors), and the original release's state dict
(facebookresearch/DiT ``DiT-XL-2-256x256.pt``).

diffusers' DiT differs from the original in three ways, each a ``DiT`` field: its time features
divide the frequencies by ``half - 1`` (``time_freq_shift=1``), its blocks' MLP LayerNorm uses
``norm_eps`` (``mlp_norm_eps``), and every block carries its own copy of the time and label
embedders (``block_embedders``: the published weights hold identical copies, which load into one
shared embedder; a file whose copies differ loads into per-block embedders).
"""

from collections.abc import Container, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from diffax.models.convert.files import read_config
from diffax.models.convert.table import ConversionError, Entry, Source, conv2d, entry, linear
from diffax.models.dit import DiT, sincos_pos_embed

CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")
MODULE = DiT

# diffusers' DiTTransformer2DModel.__init__ defaults (diffusers 0.42, transformers/dit_transformer_2d.py).
DEFAULTS = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=None,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
    norm_eps=1e-5,
)
FIXED = dict(
    dropout=0.0,
    attention_bias=True,
    activation_fn="gelu-approximate",
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
)
# facebook/DiT-XL-2-256's transformer: DiT-XL/2 on 32x32x4 SD-VAE latents, learned sigma, 1000 classes.
DIT_XL_2_256_CONFIG = dict(
    _class_name="DiTTransformer2DModel",
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
)
# Transformer2DModel's fields that a DiT leaves at their defaults.
LEGACY_FIXED = dict(
    cross_attention_dim=None,
    num_vector_embeds=None,
    only_cross_attention=False,
    double_self_attention=False,
    attention_type="default",
    caption_channels=None,
    interpolation_scale=None,
    use_additional_conditions=None,
)
INERT = ("norm_num_groups", "upcast_attention", "use_linear_projection")  # unused by DiT, or fp16 only
# DiT sizes: heads by width (Peebles & Xie 2023, Table 1); the original state dict does not store them.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
# Both layouts feed the integer step i; diffax's t = (i + 1) / T with T = time_scale.
TIME_OFFSET = 1.0


def _block(i: int) -> str:
    return f"transformer_blocks.{i}"


def _embedders(i: int) -> dict[str, str]:
    """Block i's copies of the embedders: diffax sub-path -> diffusers name."""
    emb = f"{_block(i)}.norm1.emb"
    return {
        "Dense_0": f"{emb}.timestep_embedder.linear_1",
        "Dense_1": f"{emb}.timestep_embedder.linear_2",
    }


def _label_table(i: int) -> str:
    return f"{_block(i)}.norm1.emb.class_embedder.embedding_table.weight"


def _embedder_keys(i: int) -> list[str]:
    return [f"{n}.{leaf}" for n in _embedders(i).values() for leaf in ("weight", "bias")] + [_label_table(i)]


def _copies_equal(source: Source, depth: int) -> bool:
    """Whether every block's embedder tensors equal block 0's (read one block at a time)."""
    first = [source[k] for k in _embedder_keys(0)]
    return all(
        np.array_equal(source[k], a)
        for i in range(1, depth)
        for k, a in zip(_embedder_keys(i), first, strict=True)
    )


def module_from_config(
    config: Mapping[str, Any], source: Source, **fields: Any
) -> tuple[DiT, tuple[Any, ...]]:
    """The diffax module of a diffusers DiT config, and arguments for its ``init``.

    Per-block embedders are used only if ``source``'s copies differ.
    """
    owner = config.get("_class_name", "DiTTransformer2DModel")
    fixed = dict(FIXED, **(LEGACY_FIXED if owner == "Transformer2DModel" else {}))
    c = read_config(config, owner=owner, defaults=DEFAULTS, inert=INERT, fixed=fixed)
    if not c["num_embeds_ada_norm"]:
        raise ConversionError(f"from_diffusers: {owner} config num_embeds_ada_norm must be the class count.")
    in_channels = c["in_channels"]
    out_channels = c["out_channels"] or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConversionError(
            f"from_diffusers: {owner} config out_channels={out_channels}; diffax outputs in_channels or 2 x."
        )
    patch, depth = c["patch_size"], c["num_layers"]
    if c["sample_size"] % patch:
        raise ConversionError(
            f"from_diffusers: {owner} config sample_size={c['sample_size']} % patch_size != 0."
        )
    block_embedders = not _copies_equal(source, depth)
    module = DiT(
        patch_size=patch,
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
        depth=depth,
        num_heads=c["num_attention_heads"],
        num_classes=c["num_embeds_ada_norm"],
        learned_variance=out_channels == 2 * in_channels,
        time_freq_shift=1.0,
        time_offset=TIME_OFFSET,
        mlp_norm_eps=c["norm_eps"],
        block_embedders=block_embedders,
        pos_embed_base=c["sample_size"] // patch,
        **fields,
    )
    return module, _init_args(module, in_channels)


def _init_args(module: DiT, channels: int) -> tuple[Any, ...]:
    side = module.patch_size
    return (jnp.zeros((1, side, side, channels)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))


def config_from_module(module: DiT, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The ``DiTTransformer2DModel`` config of a diffax ``DiT``."""
    needs = dict(
        time_embedding=(module.time_embedding, "sinusoidal"),
        time_freq_shift=(module.time_freq_shift, 1.0),
        time_offset=(module.time_offset, TIME_OFFSET),
        mlp_ratio=(module.mlp_ratio, 4.0),
        freq_dim=(module.freq_dim, 256),
        num_experts=(module.num_experts, 0),
    )
    for field, (value, needed) in needs.items():
        if value != needed:
            raise ConversionError(
                f"to_diffusers: DiT {field}={value!r}; DiTTransformer2DModel needs {needed!r}."
            )
    if module.num_classes is None or module.pos_embed_base is None:
        raise ConversionError(
            "to_diffusers: DiT needs num_classes and pos_embed_base (latent side / patch_size) for diffusers."
        )
    in_channels = shapes["patch/kernel"][2]
    return dict(
        _class_name="DiTTransformer2DModel",
        num_attention_heads=module.num_heads,
        attention_head_dim=module.hidden_size // module.num_heads,
        in_channels=in_channels,
        out_channels=in_channels * (2 if module.learned_variance else 1),
        num_layers=module.depth,
        sample_size=module.pos_embed_base * module.patch_size,
        patch_size=module.patch_size,
        num_embeds_ada_norm=module.num_classes,
        norm_eps=module.mlp_norm_eps,
        **FIXED,
    )


def _block_entries(path: str, qkv: list[Entry], src: dict[str, str]) -> list[Entry]:
    """One DiT block: ``qkv`` the fused projection's entries, ``src`` the other layers' source names."""
    return [
        *qkv,
        *linear(f"{path}/attn/out", src["out"]),
        *linear(f"{path}/adaln", src["adaln"]),
        *linear(f"{path}/mlp_in", src["mlp_in"]),
        *linear(f"{path}/mlp_out", src["mlp_out"]),
    ]


def table(module: DiT, shapes: Container[str]) -> list[Entry]:
    """The conversion table of ``module`` in diffusers' layout."""
    entries = [
        *conv2d("patch", "pos_embed.proj"),
        *linear("final_adaln", "proj_out_1"),
        *linear("final", "proj_out_2"),
    ]
    blocks = range(module.depth)
    if module.block_embedders:
        for i in blocks:
            for dense, name in _embedders(i).items():
                entries += linear(f"time_embed_{i}/{dense}", name)
            entries.append(entry(f"label_embed_{i}/Embed_0/embedding", _label_table(i)))
    else:
        for dense in ("Dense_0", "Dense_1"):
            for leaf, layout in (("kernel", "dense"), ("bias", "vector")):
                key = "weight" if leaf == "kernel" else "bias"
                copies = [f"{_embedders(i)[dense]}.{key}" for i in blocks]
                entries.append(entry(f"time_embed/{dense}/{leaf}", *copies, layout=layout, join="copies"))
        entries.append(entry("label_embed/Embed_0/embedding", *map(_label_table, blocks), join="copies"))
    for i in blocks:
        attn = f"{_block(i)}.attn1"
        qkv = [
            entry(f"block_{i}/attn/qkv/kernel", *(f"{attn}.to_{n}.weight" for n in "qkv"), layout="dense"),
            entry(f"block_{i}/attn/qkv/bias", *(f"{attn}.to_{n}.bias" for n in "qkv")),
        ]
        src = dict(
            out=f"{attn}.to_out.0",
            adaln=f"{_block(i)}.norm1.linear",
            mlp_in=f"{_block(i)}.ff.net.0.proj",
            mlp_out=f"{_block(i)}.ff.net.2",
        )
        entries += _block_entries(f"block_{i}", qkv, src)
    return entries


def module_from_original(source: Source, **fields: Any) -> tuple[DiT, tuple[Any, ...]]:
    """The diffax module of an original DiT state dict (sizes read from its tensors' shapes)."""
    keys = set(source.keys())
    if "x_embedder.proj.weight" not in keys:
        raise ConversionError(
            "from_dit_checkpoint: no 'x_embedder.proj.weight'; not an original DiT state dict."
        )
    hidden, channels, patch, _ = source["x_embedder.proj.weight"].shape
    if hidden not in HEADS_BY_WIDTH:
        raise ConversionError(
            f"from_dit_checkpoint: width {hidden} is not a DiT size {sorted(HEADS_BY_WIDTH)}."
        )
    depth = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
    tokens = source["pos_embed"].shape[1]
    grid = int(round(tokens**0.5))
    out = source["final_layer.linear.weight"].shape[0] // (patch * patch)
    module = DiT(
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=HEADS_BY_WIDTH[hidden],
        num_classes=source["y_embedder.embedding_table.weight"].shape[0] - 1,
        learned_variance=out == 2 * channels,
        time_offset=TIME_OFFSET,
        pos_embed_base=grid,
        **fields,
    )
    return module, _init_args(module, channels)


def original_table(module: DiT, shapes: Container[str]) -> list[Entry]:
    """The conversion table of ``module`` in the original DiT layout (facebookresearch/DiT ``models.py``)."""
    grid, d = module.pos_embed_base, module.hidden_size
    pos = sincos_pos_embed(grid, grid, d).astype(np.float32)[None]
    entries = [
        *conv2d("patch", "x_embedder.proj"),
        Entry(None, (("pos_embed",),), constant=pos),
        *linear("time_embed/Dense_0", "t_embedder.mlp.0"),
        *linear("time_embed/Dense_1", "t_embedder.mlp.2"),
        entry("label_embed/Embed_0/embedding", "y_embedder.embedding_table.weight"),
        *linear("final_adaln", "final_layer.adaLN_modulation.1"),
        *linear("final", "final_layer.linear"),
    ]
    for i in range(module.depth):
        b = f"blocks.{i}"
        qkv = linear(f"block_{i}/attn/qkv", f"{b}.attn.qkv")  # timm's layout: [q | k | v], heads inside
        src = dict(
            out=f"{b}.attn.proj",
            adaln=f"{b}.adaLN_modulation.1",
            mlp_in=f"{b}.mlp.fc1",
            mlp_out=f"{b}.mlp.fc2",
        )
        entries += _block_entries(f"block_{i}", qkv, src)
    return entries
