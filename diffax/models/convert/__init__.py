"""Published checkpoints in the diffusers layout <-> diffax networks.

``module, params = from_diffusers(folder)`` reads a folder written by diffusers' ``save_pretrained``
(``config.json`` + ``diffusion_pytorch_model.safetensors``, with numpy: no torch needed) and
``to_diffusers(module, params, folder)`` writes one back that diffusers loads with strict key
checking. Each supported class has a converter module: its config mapping and its conversion table
(``table.Entry`` rows, checked both ways by ``table.load``).
"""

import pathlib
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models.convert import autoencoder_kl, dit, files, table, unet_2d
from diffax.models.convert.table import ConversionError

_CONVERTERS: tuple[ModuleType, ...] = (autoencoder_kl, unet_2d, dit)


def _by_class_name(name: str) -> ModuleType:
    for converter in _CONVERTERS:
        if name in converter.CLASS_NAMES:
            return converter
    known = sorted(n for c in _CONVERTERS for n in c.CLASS_NAMES)
    raise ConversionError(f"from_diffusers: _class_name={name!r} is not supported; diffax reads {known}.")


def _by_module(module: nn.Module) -> ModuleType:
    for converter in _CONVERTERS:
        if isinstance(module, converter.MODULE):
            return converter
    raise ConversionError(f"to_diffusers: no diffusers layout for {type(module).__name__}.")


def _init_shapes(module: nn.Module, init_args: tuple[Any, ...]) -> dict[str, tuple[int, ...]]:
    return table.param_shapes(lambda: module.init(jax.random.key(0), *init_args)["params"])


def from_diffusers(
    folder: str | pathlib.Path, *, dtype: Any = jnp.float32, **fields: Any
) -> tuple[nn.Module, Any]:
    """Loads a diffusers model folder into a diffax network.

    Args:
      folder: written by diffusers' ``save_pretrained`` (``UNet2DModel``, ``DiTTransformer2DModel``,
        ``Transformer2DModel`` with adaLN-Zero (DiT), or ``AutoencoderKL``).
      dtype: parameter dtype.
      **fields: module fields to set besides the checkpoint's (e.g. ``attention_impl="cpu"``).

    Returns:
      ``(module, params)`` with ``module.apply({"params": params}, ...)`` equal to the diffusers model.

    Raises:
      ConversionError: a missing file, an unsupported config field, or a stray, missing or misshapen
        tensor, each named.
    """
    config, source = files.read_folder(folder)
    converter = _by_class_name(config.get("_class_name", ""))
    module, init_args = converter.module_from_config(config, source, param_dtype=dtype, **fields)
    shapes = _init_shapes(module, init_args)
    params = table.load(
        converter.table(module, shapes), source, shapes, dtype=dtype, owner=f"from_diffusers({folder})"
    )
    return module, params


def to_diffusers(module: nn.Module, params: Any, folder: str | pathlib.Path) -> None:
    """Writes ``params`` of ``module`` as a diffusers folder that ``from_pretrained`` loads strictly.

    Raises:
      ConversionError: ``module`` has a setting the diffusers class cannot express, or ``params`` do
        not fit it.
    """
    converter = _by_module(module)
    shapes = table.shapes_of(params)
    config = converter.config_from_module(module, shapes)
    rows = converter.table(module, shapes)
    tensors = table.save(rows, params, owner="to_diffusers")
    files.write_folder(folder, config, tensors, table.source_shapes(rows, shapes))


def from_dit_checkpoint(
    path: str | pathlib.Path, *, dtype: Any = jnp.float32, **fields: Any
) -> tuple[nn.Module, Any]:
    """Loads the original DiT release (facebookresearch/DiT, e.g. ``DiT-XL-2-256x256.pt``) into ``DiT``.

    The file is a PyTorch pickle: it is read with ``torch.load(..., weights_only=True)``, which
    unpickles tensors and plain containers only (the ``torch`` extra: ``pip install diffax[torch]``).
    A training checkpoint's ``"ema"`` weights are taken (the paper's results use them).

    Returns:
      ``(module, params)``; ``module.apply({"params": params}, x, t, labels)`` at ``t = (i + 1) / 1000``
      equals the original ``DiT.forward(x, i, labels)``.
    """
    try:
        import torch
    except ImportError as e:
        raise ConversionError("from_dit_checkpoint: needs torch (pip install 'diffax[torch]').") from e
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "ema" in state:
        state = state["ema"]
    source = files.TorchStateDict(state)
    module, init_args = dit.module_from_original(source, param_dtype=dtype, **fields)
    shapes = _init_shapes(module, init_args)
    params = table.load(
        dit.original_table(module, shapes), source, shapes, dtype=dtype, owner=f"from_dit_checkpoint({path})"
    )
    return module, params


__all__ = ["ConversionError", "from_diffusers", "from_dit_checkpoint", "to_diffusers"]
