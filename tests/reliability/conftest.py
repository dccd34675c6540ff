"""Shared pieces of the reliability tests: the tiny mixture run they all break, its uninterrupted result,
and a hook into the batches a run reads."""

import dataclasses
import pathlib
import shutil
import sys

import chex
import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # experiments/ and benchmarks/ import from the repository root
    sys.path.insert(0, str(REPO))

from benchmarks import fault_injection  # noqa: E402
from diffax import data, train  # noqa: E402

TOTAL, EVERY = 8, 2
# The mixture experiment (8×8×1 images, a one-level U-Net) with a checkpoint every 2 of 8 steps.
OVERRIDES = {"total_steps": TOTAL, "ckpt.every_steps": EVERY, "ckpt.keep": 3, "log.every_steps": EVERY}


def make_config(**overrides):
    """The run of :data:`OVERRIDES`, with more overrides (``section__field=value``)."""
    extra = {key.replace("__", "."): value for key, value in overrides.items()}
    return fault_injection.mixture_config(OVERRIDES | extra)


def run(workdir, **overrides):
    """Trains (or resumes) in ``workdir`` in this process; the final state on the host."""
    return jax.device_get(train.train_and_evaluate(make_config(**overrides), str(workdir)))


@dataclasses.dataclass(frozen=True)
class Reference:
    """An uninterrupted run of :data:`OVERRIDES` that keeps every checkpoint."""

    workdir: pathlib.Path
    state: object  # the final state, on the host

    def at(self, step, tmp_path):
        """The state saved after ``step`` updates (read from a copy of the run cut back to that step)."""
        copy = tmp_path / f"reference_at_{step}"
        shutil.copytree(self.workdir, copy)
        for path in (copy / "checkpoints").iterdir():
            if int(path.name) > step:
                shutil.rmtree(path)
        state, restored = fault_injection.final_state(copy)
        assert restored == step
        return state


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    return Reference(workdir, run(workdir, ckpt__keep=TOTAL // EVERY))


def hook_batches(monkeypatch, hook):
    """Makes the pipelines of the runs started in this test pass batches through ``hook(step, batch)``."""

    class Hooked:
        def __init__(self, pipeline):
            self.pipeline = pipeline

        def get(self, step):
            return hook(step, self.pipeline.get(step))

        def save(self, directory, step, *, keep):
            self.pipeline.save(directory, step, keep=keep)

        def restore(self, directory, step):
            self.pipeline.restore(directory, step)

    make_pipeline = data.make_pipeline
    monkeypatch.setattr(data, "make_pipeline", lambda *a, **k: Hooked(make_pipeline(*a, **k)))


def assert_bitwise_equal(a, b):
    """Same tree structure and the same bytes in every leaf (stricter than ==: -0.0 differs from 0.0)."""
    chex.assert_trees_all_equal(a, b)  # a readable report of the leaves that differ
    assert fault_injection.bitwise_equal(a, b)
