"""Presets at the papers' sizes (by jax.eval_shape), config errors, and logical-axis sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

from diffax import models

LATENT = (1, 32, 32, 4)


def _dit_param_count(depth, d, patch, channels=4, classes=1000, freq=256, experts=0, shared=0):
    """Closed-form DiT parameter count from the architecture (Peebles & Xie 2023, Sec. 3.2); with
    ``experts``, DiT-MoE's router, E bias-free SwiGLU experts of width 4d and a shared one of width
    ``shared * d`` in place of the MLP (Fei et al. 2024, Sec. 2.2)."""
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    if experts:
        mlp = d * experts + experts * 3 * d * 4 * d + 3 * d * shared * d
    block = (d * 6 * d + 6 * d) + (d * 3 * d + 3 * d) + (d * d + d) + mlp
    embed = (patch * patch * channels * d + d) + (freq * d + d) + (d * d + d) + (classes + 1) * d
    out = patch * patch * 2 * channels
    final = (d * 2 * d + 2 * d) + (d * out + out)
    return depth * block + embed + final


@pytest.mark.parametrize("name", [n for n in models.PRESETS if n.startswith("dit")])
def test_dit_param_count_matches_closed_form(name):
    module = models.get(name)
    count = models.count_params(models.abstract_params(module, LATENT))
    moe = dict(experts=module.num_experts, shared=module.num_shared_experts)
    assert count == _dit_param_count(module.depth, module.hidden_size, module.patch_size, **moe)


@pytest.mark.parametrize(
    "name, paper_millions", [("dit_s_2", 33), ("dit_b_2", 130), ("dit_l_2", 458), ("dit_xl_2", 675)]
)
def test_dit_param_count_matches_paper(name, paper_millions):
    """Peebles & Xie 2023, Table 1 / Table 4 parameter counts, within 1%."""
    count = models.count_params(models.abstract_params(models.get(name), LATENT))
    assert abs(count / (paper_millions * 1e6) - 1) < 0.01


def test_dit_xl_2_equals_reference_count_with_frozen_pos_embed():
    """The public DiT-XL/2 counts 675,129,632 including its frozen (256 x 1152) position table."""
    count = models.count_params(models.abstract_params(models.get("dit_xl_2"), LATENT))
    assert count + 256 * 1152 == 675_129_632


def test_ddpm_cifar10_unet_has_35_7m_params():
    """Ho et al. 2020, App. B: 35.7M; the public reference count is 35,746,307."""
    params = models.abstract_params(models.get("unet_ddpm_cifar10"), (1, 32, 32, 3))
    assert models.count_params(params) == 35_746_307


def test_adm_imagenet64_unet_is_expressible_at_its_size():
    """Dhariwal & Nichol 2021 report 296M parameters for the class-conditional 64x64 model."""
    params = models.abstract_params(models.get("unet_adm_imagenet64"), (1, 64, 64, 3))
    assert abs(models.count_params(params) / 296e6 - 1) < 0.01


def test_abstract_params_materialise_nothing():
    params = models.abstract_params(models.get("dit_s_8"), LATENT)
    leaves = jax.tree.leaves(nn.meta.unbox(params))
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}


def test_get_rejects_unknown_name_and_field():
    with pytest.raises(ValueError, match="unknown model 'dit_q_2'.*dit_xl_2.*unet_ddpm_cifar10"):
        models.get("dit_q_2")
    with pytest.raises(ValueError, match=r"no field\(s\) \['hidden'\]"):
        models.get("dit_s_2", hidden=3)


def test_from_config_applies_overrides():
    config = ml_collections.ConfigDict(dict(name="unet_ddpm_cifar10", channel_mult=[1, 2], dropout=0.0))
    module = models.from_config(config)
    assert isinstance(module, models.UNet)
    assert module.channel_mult == (1, 2) and module.dropout == 0.0 and module.base_channels == 128
    with pytest.raises(ValueError, match="no 'name'"):
        models.from_config(ml_collections.ConfigDict(dict(dropout=0.0)))


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("unet_ddpm_cifar10", dict(base_channels=48), r"channels 48 .* norm_groups=32"),
        ("unet_ddpm_cifar10", dict(num_heads=3), r"channels 128 are not divisible by num_heads=3"),
        ("unet_adm_imagenet64", dict(head_channels=100), "head_channels=100"),
        ("unet_ddpm_cifar10", dict(time_injection="film"), "time_injection='film'"),
        ("unet_ddpm_cifar10", dict(norm_impl="fast"), "norm_impl='fast'"),
        ("unet_ddpm_cifar10", dict(resblock_impl="fast"), "resblock_impl='fast'"),
        ("unet_ddpm_cifar10", dict(conv_impl="fast"), "conv_impl='fast'"),
        ("unet_ddpm_cifar10", dict(label_dropout=0.1), "label_dropout=0.1 needs num_classes"),
        ("unet_ddpm_cifar10", dict(dropout=1.0), r"dropout=1.0; use a rate in \[0, 1\)"),
        ("dit_s_2", dict(num_heads=5), "hidden_size=384 is not divisible by num_heads=5"),
        ("dit_s_2", dict(attention_impl="flash"), "attention_impl='flash'"),
        ("dit_s_2", dict(dtype="int8"), "dtype='int8' is not a float dtype"),
        ("dit_s_2", dict(time_embedding="learned"), "time_embedding='learned'"),
    ],
)
def test_inconsistent_config_raises_one_line_error(name, overrides, match):
    with pytest.raises(ValueError, match=match) as info:
        models.get(name, **overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, overrides, shape, cond, match",
    [
        (
            "unet_ddpm_cifar10",
            dict(attention_resolutions=(16, 64)),
            (1, 32, 32, 3),
            None,
            r"attention_resolutions \[64\] are never reached .* \[32, 16, 8, 4\]",
        ),
        ("unet_ddpm_cifar10", {}, (1, 36, 36, 3), None, r"36x36 is not divisible by 2\*\*\(levels-1\) = 8"),
        ("dit_s_4", {}, (1, 30, 30, 4), None, "30x30 is not divisible by patch_size=4"),
        ("unet_ddpm_cifar10", {}, (1, 32, 32, 3), jnp.zeros(1, jnp.int32), "num_classes is None"),
        ("unet_ddpm_cifar10", dict(context_dim=8), (1, 32, 32, 3), None, "context_dim=8 needs"),
        ("dit_s_2", {}, (1, 32, 32, 4), {"context": jnp.zeros((1, 2, 3))}, "context_dim is None"),
    ],
)
def test_inconsistent_inputs_raise_before_compiling(name, overrides, shape, cond, match):
    with pytest.raises(ValueError, match=match):
        models.abstract_params(models.get(name, **overrides), shape, cond=cond)


def test_time_must_have_batch_shape():
    module = models.get("dit_s_8", depth=1)
    x = jnp.zeros((2, 16, 16, 4))
    with pytest.raises(ValueError, match=r"t must have shape \(batch,\) = \(2,\); got \(\)"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), x, jnp.zeros(())))


@pytest.mark.parametrize("name", sorted(n for n in models.PRESETS if not n.startswith("autoencoder")))
def test_every_parameter_is_named_and_large_ones_shard_over_fsdp(name):
    shape = (1, 64, 64, 3) if "imagenet64" in name else (1, 32, 32, 3) if "unet" in name else LATENT
    params = models.abstract_params(models.get(name), shape)
    specs = nn.get_partition_spec(params)
    leaves = jax.tree.leaves(nn.meta.unbox(params))
    names = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert len(names) == len(leaves)
    sharded = 0
    for leaf, spec in zip(leaves, names, strict=True):
        assert len(spec) == leaf.ndim
        mesh_axes = nn.logical_to_mesh_axes(spec, models.LOGICAL_AXIS_RULES)
        for dim, axis in zip(leaf.shape, mesh_axes, strict=True):
            assert axis in (None, "fsdp", "expert")
            assert axis is None or dim % 8 == 0, (name, leaf.shape, spec)
        sharded += int(np.prod(leaf.shape)) if "fsdp" in mesh_axes else 0
    assert sharded / models.count_params(params) > 0.99


def test_params_initialise_sharded_over_an_8_device_mesh():
    module = models.get("dit_s_8", depth=1, hidden_size=64, num_heads=2, num_classes=10)
    x, t = jnp.zeros((8, 16, 16, 4)), jnp.zeros((8,))
    mesh = jax.make_mesh((1, 8), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    specs = nn.get_partition_spec(models.abstract_params(module, x.shape))
    shardings = nn.logical_to_mesh_sharding(specs, mesh, models.LOGICAL_AXIS_RULES)
    init = jax.jit(lambda: module.init(jax.random.key(0), x, t)["params"], out_shardings=shardings)
    params = init()
    kernel = params["block_0"]["mlp_in"]["kernel"].value
    assert isinstance(kernel.sharding, NamedSharding)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (8, 256)
    out = jax.jit(module.apply)({"params": params}, x, t)
    assert out.shape == (8, 16, 16, 8)
