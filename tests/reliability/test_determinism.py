"""The same config and seed give bitwise-identical parameters on CPU: across two runs here, and across
restarts in every other test of this directory (each interrupted run ends bitwise equal to the
uninterrupted reference)."""

from conftest import EVERY, TOTAL, assert_bitwise_equal, run


def test_two_runs_of_one_config_are_bitwise_identical(reference, tmp_path):
    assert_bitwise_equal(run(tmp_path, ckpt__keep=TOTAL // EVERY), reference.state)
