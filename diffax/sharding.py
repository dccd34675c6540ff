"""Device meshes from the config and shardings for batches, parameters and optimizer state.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism whose
devices also split the parameters and optimizer state) and ``expert`` (data parallelism whose
devices also split the experts of mixture-of-experts layers, GShard's expert parallelism). The batch
is split over all of them; parameters are split by the models' logical axis names through rules like
``diffax.models.LOGICAL_AXIS_RULES``, so ``fsdp=1, expert=1`` replicates them; the models hold their
activations split on the batch (``diffax.models.layers.shard_batch``), so FSDP gathers weights, not
activations. No ``pmap``: every array is a global ``jax.Array``.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert")
BATCH_AXES = MESH_AXES  # the batch is split over every mesh axis


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Resolves ``(data, fsdp, expert)`` from ``config.mesh``; one may be ``-1`` (fill the rest).

    A field the section lacks counts as 1.

    Raises:
      ValueError: naming the field, when the sizes do not multiply to ``num_devices``.
    """
    sizes = {name: int(mesh_config.get(name, 1)) for name in MESH_AXES}
    free = [name for name, size in sizes.items() if size == -1]
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"config.mesh.{name}={size}: use a positive size, or -1 for the other devices.")
    if len(free) > 1:
        raise ValueError("config.mesh: at most one of data/fsdp/expert may be -1.")
    if free:
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh.{free[0]}=-1: the other axes ({fixed}) do not divide {num_devices} devices."
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        product = " × ".join(f"{name}={size}" for name, size in sizes.items())
        raise ValueError(
            f"config.mesh: {product} must equal the {num_devices} devices; set one of them to -1."
        )
    return tuple(sizes[name] for name in MESH_AXES)


def make_mesh(mesh_config: ml_collections.ConfigDict, *, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ``("data", "fsdp", "expert")`` mesh of ``devices`` (default: all devices of all
    processes)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) axis over all mesh axes; other axes are whole on each device."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def under_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """``fn`` called with ``mesh`` in context (``jax.set_mesh``): where it is traced, kernels that run
    per device (Pallas attention on TPU, ``diffax.kernels.tpu``) find the mesh to ``shard_map`` over."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call


def check_batch_size(batch_size: int, mesh: Mesh, *, accum_steps: int = 1, process_count: int = 1) -> None:
    """Checks that every (micro)batch splits evenly over the mesh's batch axes and the processes.

    Raises:
      ValueError: naming ``config.input.batch_size`` and the multiple to use.
    """
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    multiple = math.lcm(shards * accum_steps, process_count)
    if batch_size <= 0 or batch_size % multiple:
        raise ValueError(
            f"config.input.batch_size={batch_size} does not divide over {shards} devices × {accum_steps}"
            f" accumulation steps and {process_count} processes; use a multiple of {multiple}."
        )


def _resolve(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> PartitionSpec:
    """Maps one array's logical axis names to mesh axes.

    Rules are tried in order; a rule applies to a dimension with its logical name when its mesh axes
    are still unused in this array and divide the dimension. Other dimensions stay whole, and so do
    those whose mesh axes have size 1.
    """
    assigned: list[Any] = [None] * len(shape)
    used: set[str] = set()
    for logical, axes in rules:
        mesh_axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        for dim, name in enumerate(names):
            if name != logical or assigned[dim] is not None or not mesh_axes or used & set(mesh_axes):
                continue
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if size > 1 and shape[dim] % size == 0:
                assigned[dim] = axes
                used |= set(mesh_axes)
    return PartitionSpec(*assigned)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """Shardings for a pytree whose leaves may carry Flax logical-axis metadata.

    Args:
      abstract_tree: e.g. ``jax.eval_shape`` of a state initialiser, leaves boxed in
        ``nn.LogicallyPartitioned`` where the model named their axes.
      mesh: the device mesh.
      rules: ``(logical name, mesh axis or None)`` pairs, in order of preference.

    Returns:
      A pytree shaped like ``nn.meta.unbox(abstract_tree)`` of ``NamedSharding``s. Leaves without
      names, and dimensions no free mesh axis divides, are replicated.
    """
    names = nn.get_partition_spec(abstract_tree)
    shapes = nn.meta.unbox(abstract_tree)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _resolve(tuple(spec), np.shape(leaf), mesh, rules)),
        names,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
