"""The diffusers folder layout: ``config.json`` + ``diffusion_pytorch_model.safetensors``, read lazily."""

import json
import pathlib
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from diffax.models.convert.table import ConversionError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


# safetensors dtype names -> numpy (BF16 is widened to float32 on reading: numpy has no bfloat16).
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsSource:
    """A safetensors file's tensors as numpy arrays, each read from disk only when asked for.

    The format (an 8-byte little-endian header length, a JSON header of dtypes, shapes and byte
    offsets, then the raw little-endian data) is read with plain file reads, no memory map, so
    reading a checkpoint tensor by tensor holds one tensor at a time.
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        self._header, self._start = header, 8 + length

    def keys(self) -> Iterable[str]:
        return list(self._header)

    def __getitem__(self, key: str) -> np.ndarray:
        info = self._header[key]
        if info["dtype"] not in _DTYPES:
            raise ConversionError(
                f"{self.path}: tensor {key!r} has dtype {info['dtype']}, which diffax cannot read."
            )
        begin, end = info["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            data = np.frombuffer(
                f.read(end - begin), dtype=np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            )
        if info["dtype"] == "BF16":  # the high half of a float32
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data.reshape(info["shape"])


class TorchStateDict:
    """A PyTorch state dict's tensors as float32 numpy arrays, converted one at a time when read."""

    def __init__(self, state: Mapping[str, Any]):
        self._state = state

    def keys(self) -> list[str]:
        return list(self._state)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._state[key].float().numpy()


def write_safetensors(
    path: str | pathlib.Path, tensors: Iterable[tuple[str, np.ndarray]], shapes: Mapping[str, Any]
) -> None:
    """Writes float32 ``tensors`` (name, array) pairs as a safetensors file, one tensor at a time.

    ``shapes`` gives every name's shape in the order the pairs come, so the header is written first.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for (name, array), expected in zip(tensors, shapes, strict=True):
            if name != expected or tuple(array.shape) != tuple(shapes[name]):
                raise ConversionError(f"write_safetensors: got {name} {array.shape}, expected {expected}.")
            f.write(np.ascontiguousarray(array, "<f4").tobytes())


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
    folder: str | pathlib.Path,
    config: Mapping[str, Any],
    tensors: Iterable[tuple[str, np.ndarray]],
    shapes: Mapping[str, Any],
) -> None:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors`` (streamed) into ``folder``."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    write_safetensors(folder / WEIGHTS_NAME, tensors, shapes)


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
