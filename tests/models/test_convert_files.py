"""The safetensors reader and writer (plain file reads, no torch) against the safetensors library."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffax.models.convert import files


def test_reader_matches_the_library_for_every_float_width(tmp_path):
    values = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    tensors = {"f32": values, "f16": values.half(), "bf16": values.bfloat16(), "i64": torch.arange(4)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    source = files.SafetensorsSource(tmp_path / "w.safetensors")
    assert sorted(source.keys()) == sorted(tensors)
    for key, tensor in tensors.items():
        np.testing.assert_array_equal(source[key], tensor.float().numpy() if key != "i64" else tensor.numpy())


def test_writer_is_read_by_the_library_and_checks_order(tmp_path):
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(1, np.float32)}
    shapes = {k: v.shape for k, v in arrays.items()}
    files.write_safetensors(tmp_path / "w.safetensors", arrays.items(), shapes)
    back = load_file(str(tmp_path / "w.safetensors"))
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key].numpy(), value)
    with pytest.raises(files.ConversionError, match="expected a.weight"):
        files.write_safetensors(tmp_path / "x.safetensors", reversed(list(arrays.items())), shapes)
