"""A checkpoint that cannot be written (disk full, quota) stops the run with one clear line naming the
step, the reason and the checkpoints kept; those stay intact and the rerun continues from them."""

import gc
import logging
import resource
import time

import pytest
from conftest import assert_bitwise_equal, hook_batches, run

from diffax import checkpoint, integrity

QUOTA = 32 * 1024  # bytes a file may reach: less than a checkpoint's array files, more than the logs


# Orbax's failed writes end in a callback to a closed event loop, which pytest reports as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_quota_stops_with_a_clear_error_and_keeps_earlier_checkpoints(reference, tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)

    def quota_after_step_4(step, batch):
        if step == 4:  # update 5 is next; once checkpoint 4 is committed, files may grow no more
            deadline = time.monotonic() + 60
            while not (checkpoints / "4").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, as a full disk fails
            # with ENOSPC.
            resource.setrlimit(resource.RLIMIT_FSIZE, (QUOTA, limits[1]))
        return batch

    hook_batches(monkeypatch, quota_after_step_4)
    # Orbax leaves the failed writes' futures unretrieved; asyncio logs each when it is collected.
    monkeypatch.setattr(logging.getLogger("asyncio"), "disabled", True)
    try:
        with pytest.raises(checkpoint.CheckpointWriteError) as error:
            run(tmp_path, ckpt__keep=2)  # checkpoint 6 would have replaced checkpoint 2
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        gc.collect()

    assert str(error.value) == (
        f"checkpoint of step 6 could not be written to {checkpoints} (File too large); complete checkpoints"
        " kept: [2, 4]. Free space or make the directory writable, then rerun the same command to continue"
        " from step 4."
    )
    for step in ("2", "4"):
        assert integrity.verify(checkpoints / step / "default") is None
    monkeypatch.undo()
    assert_bitwise_equal(run(tmp_path), reference.state)  # the rerun goes on from step 4
