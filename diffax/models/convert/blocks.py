"""Table entries of the U-Net family's blocks in the diffusers layout (UNet2DModel, AutoencoderKL)."""

from collections.abc import Container

from diffax.models.convert.table import Entry, conv2d, entry, group_norm, linear

# The attention projections' spellings: current diffusers first, then the pre-0.17 ``AttentionBlock``
# names that files written by older versions still carry.
ATTENTION_SPELLINGS = (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn"))


def resnet(path: str, source: str, params: Container[str]) -> list[Entry]:
    """``unet.ResBlock`` at ``path`` from a diffusers ``ResnetBlock2D`` at ``source``; the time projection
    and the 1x1 shortcut are mapped where the network has them (``params``: its parameter paths)."""
    entries = [
        *group_norm(f"{path}/GroupNorm_0", f"{source}.norm1"),
        *conv2d(f"{path}/Conv_0", f"{source}.conv1"),
        *group_norm(f"{path}/GroupNorm_1", f"{source}.norm2"),
        *conv2d(f"{path}/Conv_1", f"{source}.conv2"),
    ]
    if f"{path}/Dense_0/kernel" in params:
        entries += linear(f"{path}/Dense_0", f"{source}.time_emb_proj")
    if f"{path}/Conv_2/kernel" in params:
        entries += conv2d(f"{path}/Conv_2", f"{source}.conv_shortcut")
    return entries


def attention(path: str, source: str) -> list[Entry]:
    """``unet.AttentionBlock`` (self-attention only) from a diffusers ``Attention`` with a GroupNorm."""
    (q, old_q), (k, old_k), (v, old_v), (out, old_out) = ATTENTION_SPELLINGS

    def spell(name: str, old: str, leaf: str) -> tuple[str, str]:
        return f"{source}.{name}.{leaf}", f"{source}.{old}.{leaf}"

    return [
        *group_norm(f"{path}/self_norm", f"{source}.group_norm"),
        entry(
            f"{path}/self_attn/qkv/kernel",
            *(spell(n, o, "weight") for n, o in ((q, old_q), (k, old_k), (v, old_v))),
            layout="dense",
        ),
        entry(
            f"{path}/self_attn/qkv/bias",
            *(spell(n, o, "bias") for n, o in ((q, old_q), (k, old_k), (v, old_v))),
        ),
        entry(f"{path}/self_attn/out/kernel", spell(out, old_out, "weight"), layout="dense"),
        entry(f"{path}/self_attn/out/bias", spell(out, old_out, "bias")),
    ]
