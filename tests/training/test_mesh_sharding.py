"""Meshes from the config, the batch check, and FSDP shardings from logical axis names."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from conftest import TinyNet
from jax.sharding import PartitionSpec as P

from diffax import sharding
from diffax.models import LOGICAL_AXIS_RULES


def _mesh_config(data, fsdp):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))


@pytest.mark.parametrize(
    ("data", "fsdp", "expected"), [(-1, 1, (8, 1, 1)), (2, -1, (2, 4, 1)), (4, 2, (4, 2, 1))]
)
def test_mesh_shape_fills_the_free_axis(data, fsdp, expected):
    assert sharding.mesh_shape(_mesh_config(data, fsdp), 8) == expected
    mesh = sharding.make_mesh(_mesh_config(data, fsdp))
    assert dict(mesh.shape) == dict(zip(sharding.MESH_AXES, expected, strict=True))


@pytest.mark.parametrize(
    ("data", "fsdp", "field"),
    [
        (3, 2, "config.mesh: data=3 × fsdp=2 × expert=1"),
        (-1, 3, "config.mesh.data=-1"),
        (0, 1, "config.mesh.data=0"),
        (-1, -1, "at most one"),
    ],
)
def test_mesh_shape_errors_name_the_field(data, fsdp, field):
    with pytest.raises(ValueError, match=field):
        sharding.mesh_shape(_mesh_config(data, fsdp), 8)


def test_one_device_mesh_from_a_device_list():
    mesh = sharding.make_mesh(_mesh_config(-1, 1), devices=jax.devices()[:1])
    assert mesh.devices.size == 1


def test_batch_size_check():
    mesh = sharding.make_mesh(_mesh_config(2, 4))
    sharding.check_batch_size(16, mesh, accum_steps=2, process_count=2)
    with pytest.raises(ValueError, match=r"config.input.batch_size=12 .* use a multiple of 8"):
        sharding.check_batch_size(12, mesh)
    with pytest.raises(ValueError, match="multiple of 16"):
        sharding.check_batch_size(8, mesh, accum_steps=2)


def test_fsdp_shards_named_axes_and_replicates_what_does_not_divide():
    mesh = sharding.make_mesh(_mesh_config(2, 4))
    net = TinyNet(features=8)
    abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,))))
    specs = jax.tree.map(lambda s: s.spec, sharding.logical_shardings(abstract, mesh, LOGICAL_AXIS_RULES))
    params = specs["params"]
    assert params["Conv_0"]["kernel"] == P(None, None, None, "fsdp")  # 8 output channels over 4 devices
    assert params["Conv_1"]["kernel"] == P(None, None, "fsdp", None)  # 3 outputs do not divide; 8 inputs do
    assert params["Dense_0"]["kernel"] == P(None, "fsdp")  # embed (1) does not divide, mlp (8) does
    assert params["Conv_0"]["bias"] == P(None)  # no names: replicated
    replicated = sharding.logical_shardings(
        abstract, sharding.make_mesh(_mesh_config(8, 1)), LOGICAL_AXIS_RULES
    )
    assert all(s.is_fully_replicated for s in jax.tree.leaves(replicated))
