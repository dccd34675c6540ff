"""Meshes from the config, the batch check, FSDP shardings from logical axis names, and activations held
split on the batch (a DiT step under FSDP needs no more temporaries than data parallel, same result)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import TinyNet
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from benchmarks import accelerator_plan
from diffax import sharding, train_state
from diffax.models import LOGICAL_AXIS_RULES, layers


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


def test_activations_split_on_the_batch_under_a_mesh_only():
    x = jnp.arange(64.0).reshape(8, 4, 2)
    assert layers.shard_batch(x) is x  # no mesh in context: the model runs unchanged
    mesh = sharding.make_mesh(_mesh_config(2, 4))
    with jax.set_mesh(mesh):
        split = jax.jit(layers.shard_batch)(x)
        assert split.sharding.is_equivalent_to(sharding.batch_sharding(mesh), x.ndim)
        # A trainer's slice of the batch (shortcut models' bootstrap examples) need not divide.
        np.testing.assert_array_equal(jax.jit(layers.shard_batch)(x[:6]), x[:6])


def _dit_config(mesh: str, *, scan: bool = False, remat: str = "none") -> ml_collections.ConfigDict:
    """The benchmark's DiT-XL/2 step (``benchmarks/accelerator_plan.py``) at width 64 and depth 2, 2
    examples per device on ``mesh`` ("dp": data=8; "fsdp": fsdp=8)."""
    config = accelerator_plan.plan_config("dit_xl_2", mesh, 2, remat=remat, scan=scan, depth=2)
    config.model.update(hidden_size=64, num_heads=2)
    return config


@pytest.mark.parametrize("remat", ["none", "full"])
def test_fsdp_scanned_dit_step_needs_no_more_temporaries_than_data_parallel(remat):
    """Without the activations' batch constraint GSPMD spreads the weights' fsdp split onto the scanned
    blocks' activations: 84 against 21 MB of temporaries (40 against 8 MB with remat). Unrolled blocks
    partition well either way."""
    dp = accelerator_plan.measure(_dit_config("dp", scan=True, remat=remat))
    fsdp = accelerator_plan.measure(_dit_config("fsdp", scan=True, remat=remat))
    assert fsdp["arguments"] < dp["arguments"] / 4  # the state really is split
    assert fsdp["temporaries"] < 1.1 * dp["temporaries"]


def _dit_train_step(mesh: Mesh, config: ml_collections.ConfigDict, batch: dict) -> tuple:
    """One float32 DiT train step of ``config``'s model on ``mesh``, jitted as ``diffax.train`` does."""
    config.model.dtype = "float32"
    parts = train_state.build(config)
    init = train_state.state_initializer(config, parts)
    shardings = sharding.logical_shardings(jax.eval_shape(init), mesh, LOGICAL_AXIS_RULES)
    state = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()
    rows = sharding.batch_sharding(mesh)
    step = jax.jit(
        train_state.config_train_step(config, parts),
        in_shardings=(shardings, rows),
        out_shardings=(shardings, sharding.replicated(mesh)),
    )
    state, metrics = sharding.under_mesh(mesh, step)(state, jax.device_put(batch, rows))
    return jax.device_get(state.params), float(metrics["loss"])


def test_fsdp_dit_step_equals_one_device():
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((16, 32, 32, 4), np.float32),
        "label": rng.integers(0, 1000, 16, dtype=np.int32),
    }
    one_device = sharding.make_mesh(_mesh_config(1, 1), devices=jax.devices()[:1])
    params_one, loss_one = _dit_train_step(one_device, _dit_config("dp", scan=True), batch)
    params_fsdp, loss_fsdp = _dit_train_step(
        sharding.make_mesh(_mesh_config(1, 8)), _dit_config("fsdp", scan=True), batch
    )
    np.testing.assert_allclose(loss_fsdp, loss_one, rtol=1e-5)
    chex.assert_trees_all_close(params_fsdp, params_one, rtol=2e-5, atol=2e-6)
