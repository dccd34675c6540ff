"""JAX's multi-process runtime for diffax's programs: the shared flags and the one call that starts it.

``python -m diffax.main`` and the reflow pair job (``python -m diffax.fewstep.reflow``) take the same
flags; ``launch/local_multiprocess.sh`` starts N of either on this machine, joined through 127.0.0.1.
"""

import os

import jax
from absl import flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """``--coordinator_address``, ``--num_processes``, ``--process_id`` (defaults from the ``JAX_*``
    environment variables) and ``--distributed`` (cluster auto-detection)."""
    flags.DEFINE_string(
        "coordinator_address",
        os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "host:port of process 0 (multi-process).",
    )
    flags.DEFINE_integer(
        "num_processes",
        int(os.environ.get("JAX_NUM_PROCESSES", "1")),
        "Number of processes (multi-process).",
    )
    flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")), "This process's index.")
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() with cluster auto-detection (TPU pod slices, SLURM, Kubernetes).",
    )


def initialize() -> None:
    """Starts JAX's multi-process runtime when the flags or the environment ask for several processes
    (``--num_processes`` above 1 or a coordinator address, a SLURM job step with several tasks, or
    ``--distributed``); otherwise does nothing."""
    slurm_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
    if FLAGS.num_processes > 1 or FLAGS.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    elif FLAGS.distributed or slurm_tasks > 1:
        jax.distributed.initialize()  # the cluster (TPU metadata, SLURM variables) gives the rest
