"""Non-finite loss or gradient: the run stops naming the step with its last checkpoint intact, or, with
``config.optim.skip_nonfinite``, the update is skipped (state unchanged but the step) and counted."""

import re

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_bitwise_equal, hook_batches, run

from benchmarks import fault_injection
from diffax import integrity, nonfinite


def _poison_at(bad_step):
    def hook(step, batch):
        return dict(batch, image=batch["image"] * np.nan) if step == bad_step else batch

    return hook


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(reference, tmp_path, monkeypatch):
    hook_batches(monkeypatch, _poison_at(4))  # the batch of update 5

    with pytest.raises(FloatingPointError, match=r"^non-finite loss nan at step 5; the last checkpoint"):
        run(tmp_path)  # checked at step 6, before its checkpoint is written

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
    assert integrity.verify(tmp_path / "checkpoints" / "4" / "default") is None
    state, step = fault_injection.final_state(tmp_path)
    assert step == 4
    assert_bitwise_equal(state, reference.at(4, tmp_path))


def test_skip_nonfinite_leaves_the_state_and_counts_the_skip(reference, tmp_path, monkeypatch, caplog):
    hook_batches(monkeypatch, _poison_at(2))  # the batch of update 3
    caplog.set_level("INFO")

    state = run(tmp_path, total_steps=3, optim__skip_nonfinite=True)

    assert int(state.step) == 3
    expected = reference.at(2, tmp_path)  # update 3 was not applied: params, EMA, optimizer as at step 2
    assert_bitwise_equal(state.replace(step=expected.step), expected)
    assert "skipped 1 non-finite updates" in caplog.text


@flax.struct.dataclass
class _State:
    step: jax.Array
    params: jax.Array
    moment: jax.Array


def _sgd_step(state, gradient):
    """A toy update whose loss stays finite while the gradient may not be."""
    new = _State(state.step + 1, state.params - 0.1 * gradient, 0.9 * state.moment + gradient)
    return new, {"loss": jnp.sum(state.params**2), "grad_norm": jnp.linalg.norm(gradient)}


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_skip_wrapper_drops_a_non_finite_gradient(bad, jit):
    step = nonfinite.skip_nonfinite_updates(_sgd_step)
    step = jax.jit(step) if jit else step
    state = _State(jnp.int32(4), jnp.ones(3), jnp.zeros(3))

    good, good_metrics = step(state, jnp.full(3, 2.0))
    skipped, skipped_metrics = step(state, jnp.array([1.0, bad, 1.0]))

    chex.assert_trees_all_equal(good, _sgd_step(state, jnp.full(3, 2.0))[0])
    assert int(good_metrics["skipped"]) == 0
    chex.assert_trees_all_equal(skipped, state.replace(step=jnp.int32(5)))
    assert int(skipped_metrics["skipped"]) == 1 and np.isfinite(skipped_metrics["loss"])


def test_check_names_the_first_bad_step_of_a_window():
    window = {
        "loss": np.array([0.5, 0.4, 0.3, 0.2], np.float32),
        "grad_norm": np.array([1.0, 1.0, np.inf, np.nan], np.float32),
    }
    with pytest.raises(FloatingPointError, match=r"^non-finite gradient \(global norm inf\) at step 13;"):
        nonfinite.check(window, first_step=10)
    nonfinite.check(window | {"skipped": np.array([0, 0, 1, 1])}, first_step=10)  # skipped: no error
    means = nonfinite.window_means(window | {"skipped": np.array([0, 0, 1, 1])})
    assert means["skipped"] == 2 and means["loss"] == pytest.approx(0.45) and means["grad_norm"] == 1.0


def test_the_command_line_stops_on_a_non_finite_loss_with_one_line(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    command = [sys.executable, "-m", "diffax.main", f"--config={REPO / 'experiments' / 'mixture.py'}"]
    command += [f"--workdir={tmp_path}", "--config.optim.lr=1e38", "--config.optim.warmup_steps=0"]
    command += ["--config.optim.grad_clip=0.0", "--config.log.every_steps=1", "--config.ckpt.every_steps=1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)

    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert re.match(r"^diffax: non-finite (loss|gradient) .* at step \d+; the last checkpoint", last), last
