"""Damaged, missing and half-written checkpoint files: one error line naming the step and the problem, the
newest intact checkpoint is used, and nothing is deleted (a damaged step is renamed ``<step>.damaged``)."""

import hashlib
import shutil

import pytest
from conftest import assert_bitwise_equal, run

from benchmarks import fault_injection
from diffax import integrity


def _data_file(step_dir):
    """The largest array data file of a checkpoint (zstd-compressed chunks in the OCDBT store)."""
    return max((step_dir / "default").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)


def _damage(path, kind):
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "flip":  # one bit of one byte: Orbax itself restores this as a wrong number
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :])
    else:
        path.unlink()


def _snapshot(directory):
    return {
        p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.rglob("*")
        if p.is_file()
    }


def _damage_messages(caplog):
    return [
        r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "is damaged" in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("target", "kind", "problem"),
    [
        ("data", "flip", "{file} does not match its SHA-256 (changed after it was written)"),
        ("data", "truncate", "{file} has {half} bytes, {size} were written"),
        ("data", "delete", "{file} is missing"),
        ("_METADATA", "truncate", "{file} has {half} bytes, {size} were written"),
        ("diffax_sha256.json", "truncate", "diffax_sha256.json is unreadable (JSONDecodeError)"),
        ("diffax_sha256.json", "delete", "diffax_sha256.json is missing"),
    ],
)
def test_verify_names_the_damaged_file(reference, tmp_path, target, kind, problem):
    step_dir = tmp_path / "8"
    shutil.copytree(reference.workdir / "checkpoints" / "8", step_dir)
    item = step_dir / "default"
    assert integrity.verify(item) is None
    path = _data_file(step_dir) if target == "data" else item / target
    size = path.stat().st_size
    _damage(path, kind)
    expected = problem.format(file=path.relative_to(item), half=size // 2, size=size)
    assert integrity.verify(item) == expected


def test_damaged_and_half_written_checkpoints_are_passed_over_and_kept(reference, tmp_path, caplog):
    run(tmp_path, total_steps=6)  # checkpoints 2, 4, 6
    checkpoints = tmp_path / "checkpoints"
    data_file, metadata = _data_file(checkpoints / "6"), checkpoints / "4" / "default" / "_METADATA"
    size = metadata.stat().st_size
    _damage(data_file, "flip")
    _damage(metadata, "truncate")
    # What a kill during the save of step 8 leaves: Orbax's temporary directory with part of the files.
    partial = checkpoints / "8.orbax-checkpoint-tmp"
    shutil.copytree(checkpoints / "2", partial)
    for i, path in enumerate(sorted(p for p in partial.rglob("*") if p.is_file())):
        if i % 2:
            path.unlink()
    damaged = {step: _snapshot(checkpoints / step) for step in ("4", "6")}

    caplog.set_level("INFO")
    state = run(tmp_path)  # on to step 8

    relative = data_file.relative_to(checkpoints / "6" / "default")
    assert _damage_messages(caplog) == [
        f"checkpoint step 6 at {checkpoints / '6'} is damaged: {relative} does not match its SHA-256 (changed"
        f" after it was written); moved it to {checkpoints / '6.damaged'} (nothing deleted), trying the step"
        " before.",
        f"checkpoint step 4 at {checkpoints / '4'} is damaged: _METADATA has {size // 2} bytes, {size} were"
        f" written; moved it to {checkpoints / '4.damaged'} (nothing deleted), trying the step before.",
    ]
    assert "restored step 2 from" in caplog.text
    assert_bitwise_equal(state, reference.state)
    for step, files in damaged.items():  # every damaged file kept as it was
        assert _snapshot(checkpoints / f"{step}.damaged") == files
    for step in ("4", "6", "8"):  # written again, intact
        assert integrity.verify(checkpoints / step / "default") is None
    assert not partial.exists()


def test_a_reader_skips_a_damaged_checkpoint_and_moves_nothing(reference, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(reference.workdir, workdir)
    _damage(_data_file(workdir / "checkpoints" / "8"), "truncate")

    state, step = fault_injection.final_state(workdir)  # diffax.checkpoint.restore_latest, as generate

    assert step == 6
    [message] = _damage_messages(caplog)
    assert message.startswith("checkpoint step 8 at ") and message.endswith(
        "; skipping it, trying the step before."
    )
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6", "8"]
    assert_bitwise_equal(state, reference.at(6, tmp_path))
