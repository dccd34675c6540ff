"""Interrupted runs continue to exactly the parameters of an uninterrupted run: SIGTERM (a final save,
clean exit) and SIGKILL between saves (back to the newest complete checkpoint); plus sampling a run."""

import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from conftest import REPO, main_command, patch_pipeline, read_scalars, restore_run, subprocess_env

from diffax import train
from experiments import mixture

TOTAL = 160  # long enough that a kill after the first checkpoint lands mid-run
EVERY = 40  # checkpoint interval


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final state."""
    config = mixture.get_config()
    config.total_steps = TOTAL
    config.ckpt.every_steps = config.log.every_steps = EVERY
    return jax.device_get(train.train_and_evaluate(config, str(tmp_path_factory.mktemp("reference"))))


def test_sigterm_saves_stops_and_resumes_identically(mixture_config, reference, tmp_path, monkeypatch):
    mixture_config.total_steps = TOTAL
    mixture_config.ckpt.every_steps = mixture_config.log.every_steps = EVERY

    def signal_at_step_5(step, batch):
        if step == 5:  # SIGTERM arrives while step 5 runs: it completes, is saved, the run stops
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    workdir = str(tmp_path / "interrupted")
    patch_pipeline(monkeypatch, signal_at_step_5)
    stopped = train.train_and_evaluate(mixture_config, workdir)
    assert int(stopped.step) == 6
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["6"]
    monkeypatch.undo()
    resumed = jax.device_get(train.train_and_evaluate(mixture_config, workdir))
    assert int(resumed.step) == TOTAL
    chex.assert_trees_all_equal(resumed, reference)
    scalars = read_scalars(workdir)  # TensorBoard's view: the resumed run logged every EVERY steps
    assert [step for step, _ in scalars["loss"]] == list(range(EVERY, TOTAL + 1, EVERY))
    assert {"grad_norm", "lr", "tflops_per_device", "mfu"} <= set(scalars)
    assert all(np.isfinite(v) for _, v in scalars["loss"]) and all(v > 0 for _, v in scalars["mfu"])


def test_tfds_run_resumes_with_its_input_position(mixture_config, squares_dir, tmp_path):
    mixture_config.input.update(
        dict(
            dataset="diffax_test_squares",
            data_dir=squares_dir,
            image_size=8,
            channels=1,
            shuffle_buffer=16,
            random_flip=True,
        )
    )
    mixture_config.total_steps = 9  # 6 batches per epoch: the resumed part crosses an epoch
    uninterrupted = jax.device_get(train.train_and_evaluate(mixture_config, str(tmp_path / "whole")))
    workdir = str(tmp_path / "split")
    mixture_config.total_steps = 4
    train.train_and_evaluate(mixture_config, workdir)
    assert os.path.exists(os.path.join(workdir, "data_state", "process_0", "step_4.index"))
    mixture_config.total_steps = 9
    resumed = jax.device_get(train.train_and_evaluate(mixture_config, workdir))
    chex.assert_trees_all_equal(resumed, uninterrupted)


def test_non_finite_loss_stops_naming_the_step(mixture_config, tmp_path, monkeypatch):
    patch_pipeline(
        monkeypatch, lambda step, batch: dict(batch, image=batch["image"] * np.nan) if step == 2 else batch
    )
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 3;"):
        train.train_and_evaluate(mixture_config, str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "4"))  # nothing non-finite is saved


@pytest.mark.slow
def test_sigkill_between_saves_then_restart_equals_uninterrupted(reference, tmp_path):
    total = TOTAL
    overrides = [
        f"--config.total_steps={total}",
        f"--config.ckpt.every_steps={EVERY}",
        f"--config.log.every_steps={EVERY}",
        f"--config.log.sample_every_steps={total}",
    ]
    workdir = tmp_path / "killed"
    cmd = main_command(workdir)
    env = subprocess_env(8)
    proc = subprocess.Popen(
        cmd + overrides, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 180
    while not (
        workdir / "checkpoints" / str(EVERY)
    ).exists():  # complete checkpoints appear by an atomic rename
        assert proc.poll() is None and time.time() < deadline, (
            proc.stderr.read()[-2000:] if proc.poll() else "timeout"
        )
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    restart = subprocess.run(cmd + overrides, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert restart.returncode == 0, restart.stderr[-3000:]
    restored = int(re.search(r"restored step (\d+)", restart.stderr).group(1))
    assert EVERY <= restored < total

    state, step = restore_run(workdir)
    assert step == total
    chex.assert_trees_all_equal(state, reference)

    # The final grid was written, and the sampling command reads the run back.
    assert (workdir / "samples" / f"step_{total:08d}.png").exists()
    out = tmp_path / "samples.npz"
    generate = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffax.generate",
            f"--workdir={workdir}",
            "--num_samples=6",
            "--steps=3",
            f"--out={out}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert generate.returncode == 0, generate.stderr[-3000:]
    images = np.load(out)["images"]
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
