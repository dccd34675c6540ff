"""Checkpoint integrity: a SHA-256 digest of every file, sealed into the checkpoint before it is committed.

Orbax commits a checkpoint by renaming its temporary directory (or, on object stores, by writing
``commit_success.txt``), so an interrupted save is never listed. It does not notice a file damaged
after the commit: a truncated metadata file fails to parse, but a flipped byte in an array's data
file restores silently as a wrong number. :class:`DigestingHandler` therefore writes
``diffax_sha256.json`` (path, size and SHA-256 of every file of the item) as the last step of each
save, before Orbax commits, and :func:`verify` checks a checkpoint against it before it is restored.

Nothing here unpickles or executes anything: the digest file is JSON, the arrays are tensorstore
(zarr/OCDBT) data, and the tree structure is Orbax's JSON metadata.
"""

import errno
import hashlib
import json
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

DIGEST_FILE = "diffax_sha256.json"
_CHUNK = 1 << 22  # bytes hashed per read


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: epath.Path) -> list[epath.Path]:
    """Every file below ``directory`` (one listing per directory, which object stores also serve)."""
    found = []
    for path in directory.iterdir():
        found.extend(_files(path) if path.is_dir() else [path])
    return found


def file_digests(directory: epath.PathLike) -> dict[str, dict[str, int | str]]:
    """``{relative path: {"bytes": size, "sha256": hex}}`` of every file under ``directory``.

    The digest file itself is left out.
    """
    root = epath.Path(directory)
    digests = {}
    for path in sorted(_files(root)):
        relative = os.fspath(path.relative_to(root))
        if relative != DIGEST_FILE:
            digests[relative] = {"bytes": path.stat().length, "sha256": _sha256(path)}
    return digests


def seal(directory: epath.PathLike) -> None:
    """Writes ``directory/diffax_sha256.json`` describing every file now in ``directory``."""
    root = epath.Path(directory)
    body = json.dumps({"algorithm": "sha256", "files": file_digests(root)}, indent=1, sort_keys=True)
    partial = root / (DIGEST_FILE + ".partial")
    partial.write_text(body)
    partial.rename(root / DIGEST_FILE)


def verify(directory: epath.PathLike) -> str | None:
    """Checks every file under ``directory`` against its sealed digest.

    Args:
      directory: a directory sealed by :func:`seal` (e.g. ``checkpoints/<step>/default``).

    Returns:
      ``None`` when every recorded file is present with its size and SHA-256, else a short description
      of the first problem (a missing, truncated or changed file, or a missing/unreadable digest file).
    """
    root = epath.Path(directory)
    try:
        recorded = json.loads((root / DIGEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"{DIGEST_FILE} is missing"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{DIGEST_FILE} is unreadable ({type(e).__name__})"
    for relative, expected in sorted(recorded.items()):
        path = root / relative
        if not path.exists():
            return f"{relative} is missing"
        size = path.stat().length
        if size != expected["bytes"]:
            return f"{relative} has {size} bytes, {expected['bytes']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{relative} does not match its SHA-256 (changed after it was written)"
    return None


def set_aside(path: epath.PathLike) -> epath.Path:
    """Renames a damaged checkpoint directory to ``<name>.damaged`` (``.damaged-2``, ... when taken).

    The new name is no step number, so Orbax neither lists nor garbage-collects it; nothing is deleted.

    Returns:
      The new path.
    """
    path = epath.Path(path)
    target, n = path.parent / f"{path.name}.damaged", 1
    while target.exists():
        n += 1
        target = path.parent / f"{path.name}.damaged-{n}"
    path.rename(target)
    return target


# Errors of a write that the person running the job can fix; their text is the reason given.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def describe(error: BaseException) -> str:
    """A one-line reason for a failed read or write: the OS error's text when there is one.

    Orbax and TensorStore wrap OS errors in long messages (``... Failed to write 169 bytes to file 11:
    No space left on device [tensorstore_spec=...]``); this finds ``No space left on device`` in them.
    """
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    for code in _WRITE_ERRNOS:
        if os.strerror(code) in text:
            return os.strerror(code)
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first_line[:200]}" if first_line else type(error).__name__


class DigestingHandler(ocp.PyTreeCheckpointHandler):
    """Orbax's pytree handler that seals each saved item with :func:`seal` before the commit.

    ``finalize`` runs once every process has written its part (and the per-process OCDBT files are
    merged), just before Orbax renames the temporary directory: a listed checkpoint always carries its
    digest file. Process 0 writes it. Save with :class:`SealedSave`, restore with :class:`SealedRestore`.
    """

    def finalize(self, directory: epath.Path) -> None:
        super().finalize(directory)
        if jax.process_index() == 0:
            seal(directory)


@ocp.args.register_with_handler(DigestingHandler, for_save=True)
class SealedSave(ocp.args.PyTreeSave):
    """``ocp.args.PyTreeSave`` for :class:`DigestingHandler`."""


@ocp.args.register_with_handler(DigestingHandler, for_restore=True)
class SealedRestore(ocp.args.PyTreeRestore):
    """``ocp.args.PyTreeRestore`` for :class:`DigestingHandler`."""


__all__ = [
    "DIGEST_FILE",
    "DigestingHandler",
    "SealedRestore",
    "SealedSave",
    "describe",
    "file_digests",
    "seal",
    "set_aside",
    "verify",
]
