"""Shared pieces for the training-system tests: a tiny Flax model with logical axis names, configs, a
locally built tfds dataset, helpers to run the CLI and to interfere with the input pipeline."""

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

REPO = pathlib.Path(__file__).resolve().parents[2]
# Experiment files import `experiments.common`, as under `python -m diffax.main` run from the repo root.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import fault_injection  # noqa: E402
from diffax import checkpoint, data, sharding, train_state  # noqa: E402
from diffax import config as config_lib  # noqa: E402
from experiments import mixture  # noqa: E402


def _init(names):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class TinyNet(nn.Module):
    """Two convolutions and a time projection; every kernel carries logical axis names like diffax.models."""

    features: int = 8

    @nn.compact
    def __call__(self, x, t, cond=None, train=False):
        del cond, train
        h = nn.Conv(self.features, (3, 3), kernel_init=_init((None, None, "conv_in", "conv_out")))(x)
        temb = nn.Dense(self.features, kernel_init=_init(("embed", "mlp")))(t.reshape(-1, 1))
        h = nn.silu(h + temb.reshape(-1, 1, 1, self.features))
        return nn.Conv(x.shape[-1], (3, 3), kernel_init=_init((None, None, "conv_in", "conv_out")))(h)


class DiffaxTestSquares(tfds.core.GeneratorBasedBuilder):
    """A 48-example image dataset built locally: 12×10 grayscale images whose pixels encode their index."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(12, 10, 1)),
                    "label": tfds.features.ClassLabel(num_classes=4),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(48):
            image = np.full((12, 10, 1), i * 5, np.uint8)
            image[:, 0] = 255  # a bright left column shows flips
            yield i, {"image": image, "label": i % 4}


@pytest.fixture(scope="session")
def squares_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    DiffaxTestSquares(data_dir=data_dir).download_and_prepare()
    return data_dir


def patch_pipeline(monkeypatch, hook):
    """Makes every input pipeline pass each local batch through ``hook(step, batch) -> batch``."""
    make_pipeline = data.make_pipeline

    def patched(*args, **kwargs):
        pipeline = make_pipeline(*args, **kwargs)
        get = pipeline.get
        pipeline.get = lambda step: hook(step, get(step))
        return pipeline

    monkeypatch.setattr(data, "make_pipeline", patched)


@pytest.fixture
def tiny_net():
    return TinyNet()


@pytest.fixture
def mixture_config():
    """The tiny analytic-mixture experiment (8×8×1 images, a two-level U-Net)."""
    return mixture.get_config()


def subprocess_env(num_devices: int) -> dict[str, str]:
    """Environment of a child `python -m diffax.main`: ``fault_injection.child_env``'s (fake CPU devices,
    this process's other XLA flags, the repo), with this test session's compile cache."""
    cache = os.environ.get("DIFFAX_TEST_CACHE", os.path.expanduser("~/.cache/diffax-test-jax"))
    return fault_injection.child_env(num_devices) | {"JAX_COMPILATION_CACHE_DIR": cache}


MIXTURE_EXPERIMENT = REPO / "experiments" / "mixture.py"


def main_command(workdir, *overrides: str, config=MIXTURE_EXPERIMENT) -> list[str]:
    """``python -m diffax.main`` on an experiment file (default: the mixture), ``--config.*`` overrides."""
    return [sys.executable, "-m", "diffax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def run_main(
    workdir,
    *overrides: str,
    config=MIXTURE_EXPERIMENT,
    num_devices: int = 8,
    timeout: float = 240,
) -> subprocess.CompletedProcess:
    """Runs the training CLI on an experiment file (the mixture's by default); the finished process."""
    return subprocess.run(
        main_command(workdir, *overrides, config=config),
        cwd=REPO,
        env=subprocess_env(num_devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def restore_run(workdir):
    """The newest checkpoint of a run (its whole TrainState, on the host) and its step."""
    config = config_lib.load(str(workdir))
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    state, step = checkpoint.restore_latest(str(workdir), config, train_state.build(config), mesh=mesh)
    return jax.device_get(state), step


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars of the event files in ``logdir``: tag -> [(step, value), ...], as TensorBoard
    reads them."""
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
