"""Killed anywhere, a run loses at most the steps since a checkpoint and nothing else: each restart takes
the newest complete checkpoint (never a half-written one) and the run ends bit for bit where an
uninterrupted run ends. SIGTERM saves once more and exits cleanly. (A half-written checkpoint left on
disk is also tested deterministically in test_corrupt_checkpoints.py; many more kills:
benchmarks/fault_injection.py.)"""

import pytest
from conftest import EVERY, OVERRIDES, TOTAL, assert_bitwise_equal

from benchmarks import fault_injection


@pytest.mark.slow
def test_sigkill_mid_write_and_sigterm_then_restarts_end_bitwise_equal(reference, tmp_path):
    overrides = OVERRIDES | {"log.every_steps": 1}  # every step done is reported
    kills = fault_injection.run_with_kills(tmp_path, overrides, ["during_save", "sigterm"])

    # SIGKILL as the write of step 4 started, step 2 complete: the half-written directory stayed on
    # disk and the restart took step 2. Asynchronous saves commit while the next interval runs, so
    # a SIGKILL loses at most two intervals.
    killed = kills[0]
    assert killed.mode == "during_save" and killed.exit_code == -9 and killed.interrupted_save, kills
    assert killed.newest_complete == EVERY and killed.restored == EVERY
    assert 0 < killed.steps_lost <= 2 * EVERY
    # SIGTERM 1 to 3 steps after that restart: a final checkpoint of the last step done, exit status 0.
    terminated = kills[1]
    assert terminated.mode == "sigterm" and terminated.exit_code == 0 and terminated.steps_done > EVERY, kills
    assert terminated.restored == terminated.newest_complete == terminated.steps_done

    state, step = fault_injection.final_state(tmp_path)
    assert step == TOTAL
    assert_bitwise_equal(state, reference.state)
    assert not list((tmp_path / "checkpoints").glob("*.damaged*"))


@pytest.mark.slow
def test_synchronous_saves_lose_at_most_one_interval(reference, tmp_path):
    # With --config.ckpt.async_save=False a save finishes before the next step runs, so a SIGKILL, even
    # in the middle of a write, loses at most the save interval.
    overrides = OVERRIDES | {"log.every_steps": 1, "ckpt.async_save": False}
    kills = fault_injection.run_with_kills(tmp_path, overrides, ["during_save", "random"], seed=1)
    assert kills[0].mode == "during_save" and kills[0].interrupted_save, kills
    assert all(k.exit_code == -9 and 0 <= k.steps_lost <= EVERY for k in kills), kills

    state, step = fault_injection.final_state(tmp_path)
    assert step == TOTAL
    assert_bitwise_equal(state, reference.state)
