"""TensorBoard scalars, written by process 0 through tensorboardX, whose event files need no TensorFlow.

A run that reads no tfds dataset never imports TensorFlow (a ~5 s import); ``tensorboard --logdir DIR``
reads the files.
"""

from collections.abc import Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter

FLUSH_SECS = 30  # a background thread writes the events; TensorBoard sees them within this, or at close


def scalar_writer(logdir: str) -> SummaryWriter | None:
    """An event-file writer in ``logdir`` on process 0; ``None`` on the others, which write nothing."""
    return SummaryWriter(logdir, flush_secs=FLUSH_SECS) if jax.process_index() == 0 else None


def write_scalars(writer: SummaryWriter | None, step: int, scalars: Mapping[str, float]) -> None:
    """Queues each of ``scalars`` (tag -> number) at ``step``; ``writer.close()`` writes out the rest."""
    if writer is None:
        return
    for tag, value in scalars.items():
        writer.add_scalar(tag, float(np.asarray(value)), step)
