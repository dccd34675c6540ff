"""Checkpoints of the train state (Orbax ``CheckpointManager``, args API) and of the input position.

Layout under the workdir::

    checkpoints/<step>/      the TrainState, written asynchronously by every process (Orbax)
    data_state/process_<i>/  the input pipeline's position at the same steps (tfds runs only)

A save first records the input position (synchronously, small), then starts the Orbax save, so every
complete Orbax step has its input position. Orbax writes into a temporary directory and renames it
when complete, so an interrupted save is never listed and restore takes the newest complete step.
"""

import logging as pylogging
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from diffax.data import Pipeline


def _handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler, writing each replicated array from one replica.

    Orbax's default splits replicated arrays over their replicas ("replica-parallel"), which compiles
    a slicing program per array shape on the first save: seconds for a U-Net's few hundred arrays on a
    CPU. Here every array, sharded (FSDP) or not, is written shard by shard from its first replica.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()),
        (int, ocp.type_handlers.ScalarHandler()),
        (float, ocp.type_handlers.ScalarHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
    """Saves every ``every_steps`` steps (keeping ``keep``) and restores the newest complete one.

    Args:
      workdir: the run directory.
      every_steps: save interval in steps.
      keep: number of checkpoints kept.
      async_save: write in a background thread (training continues meanwhile).
    """

    def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.data_directory = os.path.abspath(os.path.join(workdir, "data_state"))
        self.keep, self.every_steps = keep, every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handler())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether ``step`` falls on the save interval and is not saved yet."""
        return step % self.every_steps == 0 and step not in self._manager.all_steps()

    def save(self, step: int, state: Any, pipeline: Pipeline, *, force: bool = False) -> bool:
        """Saves ``state`` (after ``step`` updates) and the input position, on the interval or when forced.

        Returns:
          Whether a save started.
        """
        if step in self._manager.all_steps() or not (force or self.should_save(step)):
            return False
        pipeline.save(self.data_directory, step, keep=self.keep + 1)
        return self._manager.save(step, args=ocp.args.PyTreeSave(state), force=True)

    def restore(self, step: int, abstract_state: Any, pipeline: Pipeline | None) -> Any:
        """Restores the state of ``step`` into the shardings of ``abstract_state`` and repositions the input.

        Args:
          step: a step from :meth:`latest_step`.
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set.
          pipeline: the input pipeline to reposition, or ``None`` (e.g. for sampling).
        """
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        state = self._manager.restore(
            step, args=ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args)
        )
        if pipeline is not None:
            pipeline.restore(self.data_directory, step)
        return state

    def wait(self) -> None:
        """Blocks until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def restore_latest(workdir: str, config: Any, parts: Any, *, mesh: jax.sharding.Mesh) -> tuple[Any, int]:
    """The newest complete checkpoint of a run as a ``TrainState`` replicated on ``mesh``.

    Args:
      workdir: the run directory.
      config: the run's config (``diffax.config.load(workdir)``).
      parts: ``diffax.train_state.build(config)``.
      mesh: where to put the state (e.g. the local devices, for sampling or evaluation).

    Returns:
      ``(state, step)``.

    Raises:
      FileNotFoundError: when the run has no complete checkpoint.
    """
    from diffax import sharding, train_state

    ckpt = Checkpointer(workdir, every_steps=config.ckpt.every_steps, keep=config.ckpt.keep, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"--workdir={workdir}: no complete checkpoint in {ckpt.directory}.")
    abstract = nn.meta.unbox(jax.eval_shape(train_state.state_initializer(config, parts)))
    target = abstract_with_shardings(abstract, jax.tree.map(lambda _: sharding.replicated(mesh), abstract))
    state = ckpt.restore(step, target, None)
    ckpt.close()
    return state, step


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """Pairs shapes/dtypes with shardings: the restore target for :meth:`Checkpointer.restore`."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree,
        shardings,
    )


class _QuietOrbax(pylogging.Filter):
    """Drops Orbax's INFO records (several per save); its warnings and errors pass."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs() -> None:
    """Keeps Orbax's per-save INFO chatter out of the console of the command-line tools."""
    logging.get_absl_handler().addFilter(_QuietOrbax())
