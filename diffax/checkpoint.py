"""Checkpoints of the train state (Orbax ``CheckpointManager``, args API) and of the input position.

Layout under the workdir::

    checkpoints/<step>/      the TrainState, written asynchronously by every process (Orbax)
    data_state/process_<i>/  the input pipeline's position at the same steps (tfds runs only)

A save first records the input position (synchronously, small), then starts the Orbax save, so every
complete Orbax step has its input position. Orbax writes into a temporary directory and renames it
when complete, so an interrupted save is never listed. Just before that rename every file of the step
gets its SHA-256 in ``checkpoints/<step>/default/diffax_sha256.json`` (``diffax.integrity``); restore
takes the newest step whose files still match, and a damaged newer one is reported and renamed to
``<step>.damaged``. A save that cannot be written (disk full, no permission) raises
:class:`CheckpointWriteError` naming the step, the reason and the checkpoints kept.
"""

import logging as pylogging
import os
from collections.abc import Collection
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from diffax import integrity
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
    return integrity.DigestingHandler(type_handler_registry=registry)


class Checkpointer:
    """Saves every ``every_steps`` steps and at each of ``milestones`` (keeping the newest ``keep`` and
    every milestone) and restores the newest complete one.

    Args:
      workdir: the run directory.
      every_steps: save interval in steps.
      keep: number of checkpoints kept besides the milestones.
      async_save: write in a background thread (training continues meanwhile).
      milestones: steps always saved and never deleted (e.g. the end of every progressive stage).
    """

    def __init__(
        self,
        workdir: str,
        *,
        every_steps: int,
        keep: int,
        async_save: bool = True,
        milestones: Collection[int] = (),
    ):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.data_directory = os.path.abspath(os.path.join(workdir, "data_state"))
        self.keep, self.every_steps, self.milestones = keep, every_steps, frozenset(milestones)
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            create=True,
            preservation_policy=policies.AnyPreservationPolicy(
                [policies.LatestN(n=keep), policies.CustomSteps(sorted(self.milestones))]
            ),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handler())
        self._in_flight: int | None = None  # the step of a background save not yet waited for

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether ``step`` falls on the save interval or is a milestone, and is not saved yet."""
        due = step % self.every_steps == 0 or step in self.milestones
        return due and step not in self._manager.all_steps()

    def save(self, step: int, state: Any, pipeline: Pipeline, *, force: bool = False) -> bool:
        """Saves ``state`` (after ``step`` updates) and the input position, on the interval or when forced.

        Returns:
          Whether a save started.
        """
        if step in self._manager.all_steps() or not (force or self.should_save(step)):
            return False
        self.wait()  # a background save that failed is reported before the next one starts
        try:
            pipeline.save(self.data_directory, step, keep=self.keep + 1)
            started = self._manager.save(step, args=integrity.SealedSave(state), force=True)
        except Exception as e:  # Orbax/TensorStore wrap OS errors in several types
            raise self._write_error(step, e) from e
        self._in_flight = step
        return started

    def restore(self, step: int, abstract_state: Any, pipeline: Pipeline | None) -> Any:
        """Restores the state of ``step`` into the shardings of ``abstract_state`` and repositions the input.

        Args:
          step: a step from :meth:`latest_step`.
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set.
          pipeline: the input pipeline to reposition, or ``None`` (e.g. for sampling).
        """
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        state = self._manager.restore(
            step, args=integrity.SealedRestore(abstract_state, restore_args=restore_args)
        )
        if pipeline is not None:
            pipeline.restore(self.data_directory, step)
        return state

    def restore_latest_intact(
        self,
        abstract_state: Any,
        pipeline: Pipeline | None,
        *,
        set_aside: bool = True,
        at_most: int | None = None,
    ) -> tuple[Any, int | None]:
        """Restores the newest checkpoint whose files match their digests (see ``diffax.integrity``).

        A damaged newer checkpoint (a file truncated, changed or missing, or its input position
        unreadable) gets one error line naming the step and the problem and, with ``set_aside``, is
        renamed to ``<step>.damaged`` (nothing is deleted) so that the run saves that step again.

        Args:
          abstract_state: the restore target, as for :meth:`restore`.
          pipeline: the input pipeline to reposition, or ``None``.
          set_aside: rename damaged checkpoints; ``False`` for readers of a run that may be training.
          at_most: only checkpoints of this step or earlier (``None``: any).

        Returns:
          ``(state, step)``, or ``(None, None)`` when no intact checkpoint exists.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            if at_most is not None and step > at_most:
                continue
            item = os.path.join(self.directory, str(step), ocp.checkpoint_manager.DEFAULT_ITEM_NAME)
            problem = _any_process(integrity.verify(item) if jax.process_index() == 0 else None)
            if problem is None:
                state = self.restore(step, abstract_state, None)
                problem = _any_process(self._restore_input(step, pipeline))
                if problem is None:
                    return state, step
            self._report_damage(step, problem, set_aside=set_aside)
        return None, None

    def _restore_input(self, step: int, pipeline: Pipeline | None) -> str | None:
        """Repositions ``pipeline`` at ``step``; the problem when its saved position is unreadable."""
        if pipeline is None:
            return None
        try:
            pipeline.restore(self.data_directory, step)
        except Exception as e:  # tf.errors.*, FileNotFoundError, ...
            return f"its input position in {self.data_directory} is unreadable ({integrity.describe(e)})"
        return None

    def _report_damage(self, step: int, problem: str, *, set_aside: bool) -> None:
        path = os.path.join(self.directory, str(step))
        action = "skipping it"
        if set_aside:
            if jax.process_index() == 0:
                action = f"moved it to {integrity.set_aside(path)} (nothing deleted)"
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices(f"diffax_set_aside_{step}")
            self._manager.reload()
        if jax.process_index() == 0:
            logging.error(
                "checkpoint step %d at %s is damaged: %s; %s, trying the step before.",
                step,
                path,
                problem,
                action,
            )

    def _write_error(self, step: int | None, error: Exception) -> "CheckpointWriteError":
        self._manager.reload()  # the disk's steps: a failed save has not dropped the ones it would replace
        kept = [s for s in self._manager.all_steps() if s != step]
        resume = "rerun the same command" + (f" to continue from step {max(kept)}" if kept else "")
        return CheckpointWriteError(
            f"checkpoint of step {step} could not be written to {self.directory}"
            f" ({integrity.describe(error)}); complete checkpoints kept: {kept or 'none'}."
            f" Free space or make the directory writable, then {resume}."
        )

    def wait(self) -> None:
        """Blocks until background saves are on disk.

        Raises:
          CheckpointWriteError: when the background save failed (disk full, directory not writable).
        """
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(step, e) from e

    def close(self) -> None:
        """Waits for saves (raising like :meth:`wait`) and releases the manager."""
        try:
            self.wait()
        finally:
            self._manager.close()


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the step, the reason and what is kept."""


def _any_process(problem: str | None) -> str | None:
    """``problem`` on this process, or a note when another process found one (all processes agree)."""
    if jax.process_count() == 1:
        return problem
    flags = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None)))
    return problem or (f"a problem found by process {int(np.argmax(flags))}" if flags.any() else None)


def restore_latest(
    workdir: str, config: Any, parts: Any, *, mesh: jax.sharding.Mesh, at_most: int | None = None
) -> tuple[Any, int]:
    """The newest complete, intact checkpoint of a run (of step ``at_most`` or earlier, when given) as a
    ``TrainState`` replicated on ``mesh``.

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
    abstract = nn.meta.unbox(jax.eval_shape(train_state.state_initializer(config, parts)))
    target = abstract_with_shardings(abstract, jax.tree.map(lambda _: sharding.replicated(mesh), abstract))
    # set_aside=False: the run may be training
    state, step = ckpt.restore_latest_intact(target, None, set_aside=False, at_most=at_most)
    ckpt.close()
    if step is None:
        upto = "" if at_most is None else f" of step {at_most} or earlier"
        raise FileNotFoundError(
            f"--workdir={workdir}: no complete, intact checkpoint{upto} in {ckpt.directory}."
        )
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
