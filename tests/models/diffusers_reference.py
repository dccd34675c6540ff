"""Helpers for the conversion tests: diffusers models built from configs with random weights (no download)."""

import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import torch

torch.set_num_threads(1)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (biases and norm weights too, which diffusers initialises to constants)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            scale = p.detach().std().item() if p.ndim > 1 else 0.1
            p.copy_(p + scale * torch.randn(p.shape, generator=generator))
    return model.eval()


def save(model: torch.nn.Module, folder: pathlib.Path) -> pathlib.Path:
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


def assert_close_to_scale(actual, expected: np.ndarray, rtol: float = 1e-4, what: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected| (the output scale)."""
    actual = np.asarray(actual, np.float64)
    scale = float(np.max(np.abs(expected)))
    err = float(np.max(np.abs(actual - expected)))
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x output scale {scale:.3g}"


def highest_precision():
    return jax.default_matmul_precision("highest")


def strict_reload(cls, folder: pathlib.Path) -> torch.nn.Module:
    """The diffusers model built from ``folder``'s config with its weights loaded under ``strict=True``."""
    from safetensors.torch import load_file

    model = cls.from_config(cls.load_config(str(folder)))
    model.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return model.eval()
