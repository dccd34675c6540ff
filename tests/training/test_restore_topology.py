"""A checkpoint saved on an 8-device data×FSDP mesh restores on 1, 2 and 4 devices and on 2 processes
(127.0.0.1, launch/local_multiprocess.sh), and training continues to the original mesh's result up to
float32 reduction order (maxdiffusion PR #379 asks for the same); the two processes' own checkpoint
restores in one process."""

import shutil
import subprocess
import sys

import chex
import jax
import pytest
from conftest import REPO, restore_run, subprocess_env

from benchmarks import fault_injection
from diffax import train
from experiments import mixture

SAVED_AT, TOTAL = 4, 8
SAVED_MESH = dict(data=4, fsdp=2)  # the DiT's 16-wide kernels split over fsdp
# Sums over 8 batch shards and 2 parameter shards against fewer: float32 reduction order, not more.
TOLERANCE = dict(rtol=2e-5, atol=2e-6)
OVERRIDES = dict(total_steps=TOTAL, ckpt=dict(every_steps=SAVED_AT), log=dict(sample_every_steps=0))


def _config(mesh: dict):
    """The mixture experiment with its one-block DiT (``experiments/mixture.py:dit``) on ``mesh``."""
    config = mixture.get_config("dit")
    config.update(OVERRIDES)
    config.mesh.update(mesh)
    return config


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The run on the 8-device mesh: its workdir (checkpoints at SAVED_AT and TOTAL) and its final state."""
    workdir = tmp_path_factory.mktemp("original")
    final = train.train_and_evaluate(_config(SAVED_MESH), str(workdir))
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(final.params)]
    assert len(jax.devices()) == 8 and any("fsdp" in spec for spec in specs)  # parameters really split
    return workdir, jax.device_get(final)


def _saved_step(original_workdir, workdir):
    """A new run directory holding only the original run's checkpoint at SAVED_AT."""
    shutil.copytree(original_workdir / "checkpoints" / str(SAVED_AT), workdir / "checkpoints" / str(SAVED_AT))
    return workdir


@pytest.mark.parametrize(
    "num_devices, mesh",
    [(1, dict(data=-1, fsdp=1)), (2, dict(data=1, fsdp=2)), (4, dict(data=2, fsdp=2))],
    ids=["1-device", "2-device-fsdp", "4-device-data-fsdp"],
)
def test_restores_on_fewer_devices_and_continues_identically(original, tmp_path, num_devices, mesh):
    original_workdir, reference = original
    workdir = _saved_step(original_workdir, tmp_path)
    final = train.train_and_evaluate(_config(mesh), str(workdir), devices=jax.devices()[:num_devices])
    assert all(len(leaf.sharding.device_set) == num_devices for leaf in jax.tree.leaves(final))
    final = jax.device_get(final)
    assert int(final.step) == TOTAL
    chex.assert_trees_all_close(final, reference, **TOLERANCE)


@pytest.mark.slow
def test_restores_on_two_processes_and_continues_identically(original, tmp_path):
    original_workdir, reference = original
    workdir = _saved_step(original_workdir, tmp_path / "run")
    env = subprocess_env(2) | {
        "DEVICES_PER_PROCESS": "2",
        "PYTHON": sys.executable,
        "PORT": str(fault_injection.free_port()),
    }
    overrides = [
        f"--config.total_steps={TOTAL}",
        f"--config.ckpt.every_steps={SAVED_AT}",
        "--config.log.sample_every_steps=0",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
    ]
    config_file = f"--config={REPO / 'experiments' / 'mixture.py'}:dit"
    cmd = ["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", config_file, f"--workdir={workdir}"]
    done = subprocess.run(cmd + overrides, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    logs = [(workdir / f"process_{i}.log").read_text() for i in range(2)]
    assert done.returncode == 0, "\n".join(log[-2000:] for log in logs)
    assert all(f"restored step {SAVED_AT}" in log for log in logs)
    assert "process 1/2, 2 local / 4 global devices" in logs[1]
    state, step = restore_run(workdir)  # the two processes' own final save, read on 8 devices here
    assert step == TOTAL
    chex.assert_trees_all_close(state, reference, **TOLERANCE)
