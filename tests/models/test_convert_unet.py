"""diffusers UNet2DModel (the full google/ddpm-cifar10-32 config, and a small one with the other switches)
-> diffax UNet -> back."""

import diffusers
import flax.linen
import jax
import numpy as np
import pytest
import torch

from diffax import models
from tests.models import diffusers_reference as ref

# google/ddpm-cifar10-32's config.json (the fields it sets; the rest are UNet2DModel's defaults).
DDPM_CIFAR10_CONFIG = dict(
    _class_name="UNet2DModel",
    _diffusers_version="0.0.4",
    act_fn="silu",
    attention_head_dim=None,
    block_out_channels=[128, 256, 256, 256],
    center_input_sample=False,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    in_channels=3,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-06,
    norm_num_groups=32,
    out_channels=3,
    sample_size=32,
    time_embedding_type="positional",
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
)
# The other branches: multi-head attention (8 channels per head), [cos | sin] without shift, symmetric
# downsampling padding, a learned-variance output.
SMALL_CONFIG = dict(
    _class_name="UNet2DModel",
    block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    layers_per_block=1,
    in_channels=3,
    out_channels=6,
    norm_num_groups=8,
)


def _compare(config, tmp_path, steps, size):
    torch.manual_seed(0)
    model = ref.randomize(diffusers.UNet2DModel.from_config(config), seed=2)
    folder = ref.save(model, tmp_path / "unet")
    module, params = models.from_diffusers(folder)
    channels = config["in_channels"]
    x = np.random.default_rng(0).standard_normal((len(steps), size, size, channels)).astype(np.float32)
    with torch.no_grad():
        expected = ref.nhwc(model(ref.nchw(x), torch.tensor(steps)).sample)
    t = (np.asarray(steps, np.float32) + 1) / 1000  # diffusers step i is diffax's t = (i + 1) / T
    with ref.highest_precision():
        got = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))(params, x, t)
    ref.assert_close_to_scale(got, expected, what="UNet output")
    return model, module, params


@pytest.mark.slow
def test_ddpm_cifar10_matches_diffusers_and_round_trips(tmp_path):
    model, module, params = _compare(DDPM_CIFAR10_CONFIG, tmp_path, steps=[0, 617], size=32)
    assert models.count_params(params) == 35_746_307  # Ho et al. 2020, App. B: 35.7M
    assert module.attention_levels == (1,) and module.downsample_padding == (0, 1)
    preset = models.abstract_params(models.get("unet_ddpm_cifar10"), (1, 32, 32, 3))
    assert models.count_params(preset) == models.count_params(params)
    models.to_diffusers(module, params, tmp_path / "back")
    reloaded = ref.strict_reload(diffusers.UNet2DModel, tmp_path / "back")
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[key].numpy(), value.numpy(), err_msg=key)


def test_multi_head_learned_variance_unet_matches_diffusers(tmp_path):
    _, module, params = _compare(SMALL_CONFIG, tmp_path, steps=[999, 3], size=8)
    assert module.learned_variance and module.head_channels == 8 and not module.time_sin_first
    models.to_diffusers(module, params, tmp_path / "back")
    ref.strict_reload(diffusers.UNet2DModel, tmp_path / "back")


def test_diffax_unet_without_step_offset_is_refused(tmp_path):
    module = models.UNet(
        base_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(), norm_groups=8
    )
    params = flax.linen.meta.unbox(models.abstract_params(module, (1, 4, 4, 3)))  # refused before reading
    with pytest.raises(models.ConversionError, match="time_offset=0.0"):
        models.to_diffusers(module, params, tmp_path)
