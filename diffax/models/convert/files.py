"""The diffusers folder layout: ``config.json`` + ``diffusion_pytorch_model.safetensors``, read lazily."""

import json
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from diffax.models.convert.table import ConversionError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class SafetensorsSource:
    """A safetensors file's tensors as numpy arrays, each read from disk only when asked for."""

    def __init__(self, path: str | pathlib.Path):
        from safetensors import safe_open

        self.path = str(path)
        self._file = safe_open(self.path, framework="np")

    def keys(self) -> Iterable[str]:
        return list(self._file.keys())

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._file.get_tensor(key)
        except (TypeError, ValueError) as e:  # e.g. bfloat16, which numpy cannot hold
            raise ConversionError(f"{self.path}: cannot read tensor {key!r} into numpy ({e}).") from e


def read_folder(folder: str | pathlib.Path) -> tuple[dict[str, Any], SafetensorsSource]:
    """A diffusers model folder's config dict and its lazily read weights."""
    folder = pathlib.Path(folder)
    config_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise ConversionError(
            f"from_diffusers: {config_path} not found; pass a folder written by save_pretrained."
        )
    if not weights.is_file():
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {bins}: pickles are not read; re-save with safe_serialization=True)" if bins else ""
        raise ConversionError(f"from_diffusers: {weights} not found{hint}.")
    return json.loads(config_path.read_text()), SafetensorsSource(weights)


def write_folder(
    folder: str | pathlib.Path, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> None:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` into ``folder``."""
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    save_file(dict(tensors), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def read_config(
    config: Mapping[str, Any],
    *,
    owner: str,
    defaults: Mapping[str, Any],
    inert: Iterable[str] = (),
    fixed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A diffusers config with its class defaults filled in, checked field by field.

    Args:
      config: the ``config.json`` dict (keys starting with ``_`` are metadata and skipped).
      owner: the class name, for errors.
      defaults: every field the converter reads, with the diffusers default.
      inert: fields that do not change the network's function (accepted with any value).
      fixed: fields the diffax network supports at one value only.

    Raises:
      ConversionError: an unknown field, or a fixed field at another value, named with its value.
    """
    fixed = dict(fixed or {})
    inert = set(inert)
    out = {**fixed, **defaults}
    for key, value in config.items():
        if key.startswith("_") or key in inert:
            continue
        if key in fixed:
            if value != fixed[key] and not (isinstance(value, list) and tuple(value) == fixed[key]):
                raise ConversionError(
                    f"from_diffusers: {owner} config {key}={value!r} is not supported; "
                    f"diffax builds {fixed[key]!r}."
                )
        elif key not in defaults:
            raise ConversionError(
                f"from_diffusers: {owner} config field {key!r} is unknown to diffax's converter; "
                "it may change the network, so the folder is not loaded."
            )
        out[key] = tuple(value) if isinstance(value, list) else value
    return out
