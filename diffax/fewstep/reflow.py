"""Reflow's pair set: the pair job's CLI over a finished flow run, and the input pipeline that trains on it.

    python -m diffax.fewstep.reflow --workdir=RUN --out=PAIRS --num_chunks=N --chunk_size=M \
        [--sampler=heun --steps=K --seed=S]

integrates the run's probability-flow ODE (its sampler, deterministic) from prior noise Z_0 and writes the
pairs (Z_0, Z_1) as ``PAIRS/pairs_<k>.npz`` chunks (``interpolants.write_reflow_pairs``: resumable, one
chunk per key, process p of P writes the chunks k = p mod P). Several processes take ``diffax.main``'s
multi-process flags (``diffax.multiprocess``); on one machine ``MODULE=diffax.fewstep.reflow
launch/local_multiprocess.sh P --workdir=RUN --out=PAIRS ...`` starts P of them, one core each on a CPU.
``config.trainer.pairs_dir=PAIRS`` of the ``rectified_flow`` trainer then trains on them
(:class:`PairPipeline`).

References: Liu, Gong, Liu 2023, "Flow Straight and Fast", Alg. 1.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from diffax import multiprocess
from diffax.data.pipeline import _StepDerived
from diffax.fewstep import interpolants

__all__ = ["PairPipeline", "check_pairs", "pair_files"]


def pair_files(directory: str) -> list[str]:
    """The pair chunks of ``directory`` in order."""
    return sorted(glob.glob(os.path.join(directory, "pairs_[0-9]*[0-9].npz")))


def check_pairs(directory: str, image_shape: tuple[int, ...]) -> None:
    """Raises ``ValueError`` naming ``config.trainer.pairs_dir`` for a missing pair set or one of another
    data shape."""
    files = pair_files(directory)
    if not files:
        raise ValueError(
            f"config.trainer.pairs_dir: {directory} holds no pairs_<k>.npz; write them with python -m "
            "diffax.fewstep.reflow --workdir=RUN --out=DIR (RUN: the flow to straighten)."
        )
    with np.load(files[0]) as chunk:
        shapes = {k: chunk[k].shape[1:] for k in ("noise", "image") if k in chunk}
    if set(shapes) != {"noise", "image"} or any(s != tuple(image_shape) for s in shapes.values()):
        raise ValueError(
            f"config.trainer.pairs_dir: {files[0]} holds arrays {shapes}, not noise and image pairs of this "
            f"run's data shape {tuple(image_shape)}; write pairs of a flow on this data."
        )


class PairPipeline(_StepDerived):
    """The pairs (noise, image) of a pair set, visited in a fresh permutation every epoch (positioned by
    the step, so a resumed run sees the same batches)."""

    def __init__(self, directory: str, **shard: Any):
        super().__init__(**shard)
        chunks = [np.load(f) for f in pair_files(directory)]
        self.noise = np.concatenate([c["noise"] for c in chunks]).astype(np.float32)
        self.image = np.concatenate([c["image"] for c in chunks]).astype(np.float32)

    @classmethod
    def like(cls, pipeline: Any, directory: str) -> PairPipeline:
        """The pairs of ``directory`` with the process share of ``pipeline`` (the config's)."""
        local = pipeline.local_slice.stop - pipeline.local_slice.start
        return cls(
            directory,
            global_batch=pipeline.global_batch,
            seed=pipeline.seed,
            process_index=pipeline.local_slice.start // local,
            process_count=pipeline.global_batch // local,
        )

    def get(self, step: int) -> dict[str, np.ndarray]:
        indices = self.epoch_indices(step, len(self.image))
        return {"image": self.image[indices], "noise": self.noise[indices]}


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string(
        "workdir", None, "The flow run (diffax.main) whose ODE makes the pairs.", required=True
    )
    flags.DEFINE_string("out", None, "Directory of the pair chunks.", required=True)
    flags.DEFINE_integer("num_chunks", 16, "Number of chunks.")
    flags.DEFINE_integer("chunk_size", 256, "Pairs per chunk.")
    flags.DEFINE_string("sampler", "heun", "A deterministic sampler (default heun).")
    flags.DEFINE_integer("steps", 32, "Sampler steps.")
    flags.DEFINE_integer("seed", 0, "Noise seed.")
    multiprocess.define_flags()


def main(argv: list[str]) -> None:
    del argv
    from diffax import data, generate
    from diffax import samplers as samplers_lib

    if samplers_lib.get(FLAGS.sampler).stochastic:
        raise app.UsageError(f"--sampler={FLAGS.sampler}: reflow pairs need a deterministic sampler (heun).")
    multiprocess.initialize()
    config, sample_fn, params, step = generate.load_run(
        FLAGS.workdir, sampler=FLAGS.sampler, steps=FLAGS.steps
    )
    shape = data.image_shape(config.input)
    labels = np.zeros((FLAGS.chunk_size,), np.int32)

    def flow(noise: jax.Array) -> jax.Array:
        return sample_fn(params, jax.random.key(0), labels, x_T=noise)

    paths = interpolants.write_reflow_pairs(
        flow,
        FLAGS.out,
        shape=shape,
        num_chunks=FLAGS.num_chunks,
        chunk_size=FLAGS.chunk_size,
        seed=FLAGS.seed,
    )
    logging.info("%d pair chunks of step %d of %s in %s", len(paths), step, FLAGS.workdir, FLAGS.out)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
