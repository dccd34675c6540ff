"""Loading a run executes nothing: checkpoints are JSON metadata and TensorStore (OCDBT/zstd) array data,
read without pickle; the run's config is JSON. The only code a run executes is its ``--config`` file."""

import json
import pickle
import sys

from conftest import assert_bitwise_equal

from benchmarks import fault_injection

OCDBT_MAGIC = (b"\x0c\xdb\x3a\x2a", b"\x0c\xdb\x20\xde")  # OCDBT manifest / B-tree node
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame: compressed array chunks
_WATCHED = {"pickle.find_class", "marshal.load", "marshal.loads", "exec", "compile", "import"}
_AUDIT: dict[str, list] = {}  # filled while a test listens; sys.addaudithook cannot be undone


def _audit(event, args):
    if "events" in _AUDIT and (event in _WATCHED or event == "open"):
        _AUDIT["events"].append((event, args))


sys.addaudithook(_audit)


def _kind(path):
    head = path.read_bytes()[:4]
    if head.startswith(b"\x80") or path.suffix in (".pkl", ".pickle", ".npy", ".npz"):
        return "pickle or numpy"
    if head in OCDBT_MAGIC:
        return "ocdbt"
    if head == ZSTD_MAGIC:
        return "zstd"
    if path.name == "commit_success.txt":
        return "text"
    json.loads(path.read_text())
    return "json"


def test_checkpoint_files_are_json_or_tensorstore_data(reference):
    kinds = {p: _kind(p) for p in (reference.workdir / "checkpoints").rglob("*") if p.is_file()}
    assert set(kinds.values()) == {"json", "ocdbt", "zstd", "text"}, kinds
    names = {p.name for p, kind in kinds.items() if kind == "json"}
    assert names == {"_CHECKPOINT_METADATA", "_METADATA", "_sharding", "diffax_sha256.json"}


def test_loading_a_run_unpickles_nothing_and_runs_no_code(reference, monkeypatch):
    fault_injection.final_state(reference.workdir)  # imports and traces everything once

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a run")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    _AUDIT["events"] = []
    try:
        # diffax.config.load (config.json) + diffax.checkpoint.restore_latest, as `diffax.generate` does
        state, _ = fault_injection.final_state(reference.workdir)
    finally:
        events = _AUDIT.pop("events")

    assert_bitwise_equal(state, reference.state)
    assert [e for e in events if e[0] in _WATCHED] == []  # no unpickling, no code compiled, run or imported
    opened = {str(args[0]) for event, args in events if event == "open"}
    assert opened and all(path.startswith(str(reference.workdir)) for path in opened), opened
