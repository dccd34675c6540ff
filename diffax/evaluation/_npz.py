"""Parameter trees stored as flat ``.npz`` files (keys joined by ``/``), written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util


def save_tree_npz(tree: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes a nested dict of arrays to ``path`` as an ``.npz`` of ``a/b/c`` keys.

    The file is written beside its destination and renamed into place, so a reader (or a second
    process writing the same file) never sees half of it.
    """
    flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".npz", delete=False) as f:
        np.savez(f, **{key: np.asarray(value) for key, value in flat.items()})
    os.replace(f.name, path)


def check_tree_shapes(tree: Mapping[str, Any], expected: Mapping[str, Any], *, what: str) -> None:
    """Raises a ValueError naming missing, unexpected and mis-shaped leaves of ``tree``."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    want = traverse_util.flatten_dict(expected, sep="/")
    missing = sorted(set(want) - set(flat))
    unexpected = sorted(set(flat) - set(want))
    wrong = sorted(k for k in set(want) & set(flat) if np.shape(flat[k]) != tuple(want[k].shape))
    if missing or unexpected or wrong:
        details = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise ValueError(f"{what} does not match the architecture: {'; '.join(details)}.")


def load_tree_npz(path: str | os.PathLike, *, expected: Mapping[str, Any], what: str) -> dict:
    """Reads a tree written by :func:`save_tree_npz` and checks it against ``expected`` shapes.

    Args:
      path: the ``.npz`` file.
      expected: a tree of the same structure whose leaves have ``.shape`` (e.g. ``jax.eval_shape``).
      what: how to name the file in errors.

    Returns:
      The nested dict of numpy arrays.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{what} file {str(path)!r} does not exist; check the path.")
    with np.load(path) as data:
        tree = traverse_util.unflatten_dict({k: data[k] for k in data.files}, sep="/")
    check_tree_shapes(tree, expected, what=f"{what} {str(path)!r}")
    return tree
