"""Checkpoint conversion as data: a table from source tensor names to diffax parameter paths.

Each ``Entry`` names one diffax parameter (a ``/``-joined path in the ``"params"`` tree), the source
tensors that make it, and a layout transform:

- ``"conv"``: PyTorch (O, I, kh, kw) to Flax (kh, kw, I, O);
- ``"dense"``: PyTorch (out, in) to Flax (in, out);
- ``"vector"``: as is (biases, norm weights to scales, embedding tables).

Several sources are joined along the parameter's last axis (``join="concat"``, e.g. separate q, k, v
projections into one fused kernel) or must be equal copies of one parameter (``join="copies"``, e.g.
the per-block copies of DiT's shared embedders in diffusers). A source may have several spellings
(diffusers' old and new attention names); exactly one must be present; the first is written back.
An entry with ``path=None`` consumes a source that must equal a fixed array (a buffer that the
diffax network recomputes).

``load`` checks the table both ways before reading any tensor: every source tensor used once, every
parameter filled once, every shape as the network expects; errors name the key.
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

LAYOUTS = ("conv", "dense", "vector")


class ConversionError(ValueError):
    """A checkpoint does not fit the network: a stray, missing or misshapen tensor, or a bad config."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One diffax parameter and the source tensors it is made of.

    Attributes:
      path: the parameter's ``/``-joined path in the params tree, or None for a checked constant.
      sources: per part, its spellings in the source file (the first is the one written).
      layout: "conv", "dense" or "vector" (see the module docstring).
      join: "concat" (parts joined along the last diffax axis) or "copies" (parts must be equal).
      constant: for ``path=None``, the array (in source layout) the source must equal.
    """

    path: str | None
    sources: tuple[tuple[str, ...], ...]
    layout: str = "vector"
    join: str = "concat"
    constant: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS or self.join not in ("concat", "copies"):
            raise ValueError(f"Entry {self.path}: layout={self.layout!r}, join={self.join!r}.")


def entry(
    path: str | None, *sources: str | Sequence[str], layout: str = "vector", join: str = "concat"
) -> Entry:
    """An ``Entry``; each source is a name or a sequence of spellings."""
    parts = tuple((s,) if isinstance(s, str) else tuple(s) for s in sources)
    return Entry(path, parts, layout, join)


def linear(path: str, source: str, *, kernel: str = "kernel") -> list[Entry]:
    """A PyTorch ``nn.Linear`` (``weight``, ``bias``) as a Flax dense layer (``kernel``, ``bias``)."""
    return [
        entry(f"{path}/{kernel}", f"{source}.weight", layout="dense"),
        entry(f"{path}/bias", f"{source}.bias"),
    ]


def conv2d(path: str, source: str) -> list[Entry]:
    """A PyTorch ``nn.Conv2d`` as a Flax conv."""
    return [
        entry(f"{path}/kernel", f"{source}.weight", layout="conv"),
        entry(f"{path}/bias", f"{source}.bias"),
    ]


def group_norm(path: str, source: str) -> list[Entry]:
    """A PyTorch ``nn.GroupNorm`` (``weight``, ``bias``) as ``layers.GroupNorm`` (``scale``, ``bias``)."""
    return [entry(f"{path}/scale", f"{source}.weight"), entry(f"{path}/bias", f"{source}.bias")]


class Source(Protocol):
    """Read access to a checkpoint's tensors by name (a dict, or a lazy safetensors file)."""

    def keys(self) -> Iterable[str]: ...

    def __getitem__(self, key: str) -> np.ndarray: ...


# Axis orders taking a source-layout array to diffax's layout (``np.argsort`` of one gives the way back).
_TO_DIFFAX = {"conv": (2, 3, 1, 0), "dense": (1, 0)}


def _to_diffax(a: np.ndarray, layout: str) -> np.ndarray:
    return np.transpose(a, _TO_DIFFAX[layout]) if layout in _TO_DIFFAX else a


def _to_source(a: np.ndarray, layout: str) -> np.ndarray:
    return np.transpose(a, np.argsort(_TO_DIFFAX[layout])) if layout in _TO_DIFFAX else a


def _source_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The source-layout shape of a diffax-layout shape."""
    if layout not in _TO_DIFFAX:
        return shape
    return tuple(shape[int(i)] for i in np.argsort(_TO_DIFFAX[layout]))


def _part_shape(e: Entry, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The diffax-layout shape of one part of an entry."""
    if e.join == "copies" or len(e.sources) == 1:
        return param_shape
    *lead, last = param_shape
    return (*lead, last // len(e.sources))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_flatten(v, path) if isinstance(v, Mapping) else {path: v})
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _check_params(table: Sequence[Entry], shapes: Mapping[str, tuple[int, ...]], owner: str) -> None:
    paths = [e.path for e in table if e.path is not None]
    doubled = sorted({p for p in paths if paths.count(p) > 1})
    if doubled:
        raise ConversionError(f"{owner}: parameters filled twice: {doubled[:5]}.")
    unfilled = sorted(set(shapes) - set(paths))
    if unfilled:
        raise ConversionError(f"{owner}: {len(unfilled)} parameter(s) no tensor fills, e.g. {unfilled[:5]}.")
    unknown = sorted(set(paths) - set(shapes))
    if unknown:
        raise ConversionError(f"{owner}: the table names parameters the network lacks: {unknown[:5]}.")


def load(
    table: Sequence[Entry],
    source: Source,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    dtype: Any = np.float32,
    owner: str = "convert",
) -> dict[str, Any]:
    """Builds the params tree from ``source`` by ``table``, one tensor at a time.

    Args:
      table: the conversion table.
      source: the checkpoint's tensors (read lazily, each once).
      shapes: every parameter's ``/``-joined path and shape (from ``jax.eval_shape`` of ``init``).
      dtype: parameter dtype.
      owner: names the caller in errors.

    Returns:
      The nested ``"params"`` tree of ``jax.Array``s.

    Raises:
      ConversionError: naming a stray, missing, doubly used or misshapen tensor.
    """
    _check_params(table, shapes, owner)
    present = set(source.keys())
    chosen: dict[tuple[str, int], str] = {}
    for e in table:
        for i, spellings in enumerate(e.sources):
            found = [s for s in spellings if s in present]
            if not found:
                where = e.path or "a fixed buffer"
                raise ConversionError(f"{owner}: missing tensor {spellings[0]!r} (for {where}).")
            if len(found) > 1:
                raise ConversionError(f"{owner}: tensor given under two spellings: {found}.")
            chosen[(e.path or spellings[0], i)] = found[0]
    used = list(chosen.values())
    twice = sorted({k for k in used if used.count(k) > 1})
    if twice:
        raise ConversionError(f"{owner}: tensor(s) {twice[:5]} would be used twice.")
    stray = sorted(present - set(used))
    if stray:
        raise ConversionError(
            f"{owner}: {len(stray)} tensor(s) the network does not use, e.g. {stray[:5]}; "
            "the checkpoint is for a different configuration."
        )

    flat: dict[str, Any] = {}
    for e in table:
        keys = [chosen[(e.path or e.sources[i][0], i)] for i in range(len(e.sources))]
        if e.path is None:
            value = np.asarray(source[keys[0]])
            if value.shape != e.constant.shape or not np.allclose(value, e.constant, rtol=1e-5, atol=1e-5):
                raise ConversionError(
                    f"{owner}: tensor {keys[0]!r} differs from the fixed buffer it must equal."
                )
            continue
        want = _part_shape(e, tuple(shapes[e.path]))
        parts = []
        for key in keys:
            value = np.asarray(source[key])
            if value.shape != _source_shape(want, e.layout):
                raise ConversionError(
                    f"{owner}: tensor {key!r} has shape {value.shape}; {e.path} needs "
                    f"{_source_shape(want, e.layout)} (a different configuration?)."
                )
            parts.append(_to_diffax(value, e.layout))
        if e.join == "copies":
            for key, part in zip(keys[1:], parts[1:], strict=True):
                if not np.array_equal(part, parts[0]):
                    raise ConversionError(f"{owner}: tensor {key!r} is not a copy of {keys[0]!r}.")
            value = parts[0]
        else:
            value = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        flat[e.path] = jax.numpy.asarray(value, dtype)
        del parts, value
    return _unflatten(flat)


def save(
    table: Sequence[Entry], params: Mapping[str, Any], *, owner: str = "convert"
) -> Iterator[tuple[str, np.ndarray]]:
    """The source-layout float32 tensors of ``params`` by ``table`` (the inverse of ``load``), one at a
    time, in the order of ``source_shapes(table, ...)``."""
    flat = _flatten(params)
    _check_params(table, {k: tuple(np.shape(v)) for k, v in flat.items()}, owner)  # before any writing
    return _source_tensors(table, flat)


def _source_tensors(table: Sequence[Entry], flat: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    for e in table:
        if e.path is None:
            yield e.sources[0][0], np.asarray(e.constant, np.float32)
            continue
        value = np.asarray(flat[e.path], np.float32)
        parts = [value] * len(e.sources) if e.join == "copies" else np.split(value, len(e.sources), axis=-1)
        for spellings, part in zip(e.sources, parts, strict=True):
            yield spellings[0], np.ascontiguousarray(_to_source(part, e.layout))


def source_shapes(
    table: Sequence[Entry], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """The source tensors (first spellings) and shapes that ``table`` reads for parameters of ``shapes``."""
    out = {}
    for e in table:
        for spellings in e.sources:
            if e.path is None:
                out[spellings[0]] = tuple(e.constant.shape)
            else:
                out[spellings[0]] = _source_shape(_part_shape(e, tuple(shapes[e.path])), e.layout)
    return out


def shapes_of(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter's ``/``-joined path and shape in a params tree."""
    return {k: tuple(np.shape(v)) for k, v in _flatten(params).items()}


def param_shapes(init: Callable[[], Any]) -> dict[str, tuple[int, ...]]:
    """Every parameter's path and shape from ``init() -> params`` traced abstractly (nothing allocated)."""
    import flax.linen as nn

    tree = nn.meta.unbox(jax.eval_shape(init))
    return {k: tuple(v.shape) for k, v in _flatten(tree).items()}
