"""Train a diffusion model: ``python -m diffax.main --config=experiments/<name>.py --workdir=DIR``.

Override any field with ``--config.<section>.<field>=value``; unknown fields are refused. With several
processes (``--num_processes`` or ``JAX_NUM_PROCESSES`` above 1, a SLURM job step with several
tasks, a TPU pod slice when ``--distributed`` is set) it first calls ``jax.distributed.initialize``.
A config error stops the run with one line naming the field, before anything compiles; a checkpoint that
cannot be written and a non-finite loss or gradient also end it with one line (exit status 1).
"""

import re

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from diffax import checkpoint, data, multiprocess, perf, train
from diffax import config as config_lib

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (config, checkpoints, logs, samples).", required=True)
multiprocess.define_flags()
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _no_such_field(argv: list[str], suffix: str, hint: str | None) -> SystemExit:
    """The one-line error for ``--config.<...><suffix>=...`` overrides that name no field."""
    overrides = [a for a in argv if a.startswith("--config.")]
    culprit = [a for a in overrides if a.split("=", 1)[0].endswith(suffix)] or overrides
    message = f"diffax: invalid config override {' '.join(culprit)}: no such field"
    return SystemExit(message + (f" ({hint})" if hint else ""))


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags; a ``--config.<field>`` override naming no field stops with one line."""
    try:
        return FLAGS(argv)
    except flags.Error as e:  # the override flags of a locked config are checked as flags...
        unknown = re.search(r"Unknown command line flag '(config\.[\w.]+)'", str(e))
        if unknown:
            raise _no_such_field(argv, unknown.group(1), None) from None
        raise SystemExit(f"diffax: {e}") from None
    except (AttributeError, KeyError) as e:  # ...or, when absl defers them, while applying them
        hint = re.search(r"Did you mean [^?]*\?", str(e))
        key = re.search(r"\w+", str(e)).group(0)
        raise _no_such_field(argv, f".{key}", hint.group(0) if hint else None) from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    checkpoint.quiet_orbax_logs()
    try:
        cpu_settings = config_lib.cpu_settings(FLAGS.config)
    except config_lib.ConfigError as e:
        raise SystemExit(f"diffax: invalid config: {e}") from None
    perf.configure_cpu(**cpu_settings)  # before anything starts a JAX backend
    multiprocess.initialize()
    if FLAGS.config.input.dataset not in data.BUILTIN_DATASETS:  # tf.data must not take JAX's GPUs
        import tensorflow as tf  # only for tfds datasets: a ~5 s import

        tf.config.set_visible_devices([], "GPU")
    logging.info(
        "process %d/%d, %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except config_lib.ConfigError as e:
        raise SystemExit(f"diffax: invalid config: {e}") from None
    except (checkpoint.CheckpointWriteError, FloatingPointError) as e:  # the message says what to do
        raise SystemExit(f"diffax: {e}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
