"""Two CPU processes on 127.0.0.1, started by launch/local_multiprocess.sh, train, checkpoint and
restore; the result equals one process with the same devices and global batch."""

import socket
import subprocess
import sys

import chex
import jax
import pytest
from conftest import REPO, restore_run, subprocess_env

from diffax import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_restore(mixture_config, tmp_path):
    workdir = tmp_path / "run"
    env = subprocess_env(2) | {"DEVICES_PER_PROCESS": "2", "PYTHON": sys.executable}
    config_file = REPO / "experiments" / "mixture.py"

    def launch(total_steps):
        env["PORT"] = str(_free_port())
        cmd = [
            "bash",
            str(REPO / "launch" / "local_multiprocess.sh"),
            "2",
            f"--config={config_file}",
            f"--workdir={workdir}",
            f"--config.total_steps={total_steps}",
        ]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        logs = [(workdir / f"process_{i}.log").read_text() for i in range(2)]
        assert done.returncode == 0, "\n".join(log[-2000:] for log in logs)
        return logs

    first = launch(8)
    assert "process 1/2, 2 local / 4 global devices" in first[1]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "8"]
    second = launch(12)
    assert all("restored step 8" in log for log in second)
    state, step = restore_run(workdir)
    assert step == 12

    mixture_config.total_steps = 12
    reference = train.train_and_evaluate(mixture_config, str(tmp_path / "one"), devices=jax.devices()[:4])
    chex.assert_trees_all_close(state, jax.device_get(reference), rtol=1e-5, atol=1e-6)
