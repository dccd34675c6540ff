"""diffusers AutoencoderKL (the SD VAE's block structure, narrower) -> diffax AutoencoderKL -> back."""

import json

import diffusers
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from diffax import models
from tests.models import diffusers_reference as ref

# stabilityai/sd-vae-ft-mse's config.json with block_out_channels (128, 256, 512, 512) narrowed.
SD_VAE_CONFIG = dict(
    _class_name="AutoencoderKL",
    _diffusers_version="0.4.2",
    act_fn="silu",
    block_out_channels=[32, 64, 128, 128],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=256,
    up_block_types=["UpDecoderBlock2D"] * 4,
)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = ref.randomize(diffusers.AutoencoderKL.from_config(SD_VAE_CONFIG), seed=1)
    return model, ref.save(model, tmp_path_factory.mktemp("vae"))


def test_encoder_and_decoder_match_diffusers(vae_folder):
    model, folder = vae_folder
    module, params = models.from_diffusers(folder)
    assert isinstance(module, models.AutoencoderKL) and module.scaling_factor == 0.18215
    assert module.channel_mult == (1, 2, 4, 4) and module.downsampling_factor == 8
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(ref.nchw(x)).latent_dist
        mean, logvar = ref.nhwc(posterior.mean), ref.nhwc(posterior.logvar)
        z = np.random.default_rng(1).standard_normal(mean.shape).astype(np.float32)
        decoded = ref.nhwc(model.decode(ref.nchw(z)).sample)
    with ref.highest_precision():
        got_mean, got_logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(
            params, x
        )
        got = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))(params, z)
    ref.assert_close_to_scale(got_mean, mean, what="encoder mean")
    ref.assert_close_to_scale(got_logvar, logvar, what="encoder log-variance")
    ref.assert_close_to_scale(got, decoded, what="decoder output")


def test_round_trip_loads_strictly_and_exactly(vae_folder, tmp_path):
    model, folder = vae_folder
    module, params = models.from_diffusers(folder)
    models.to_diffusers(module, params, tmp_path)
    reloaded = ref.strict_reload(diffusers.AutoencoderKL, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["block_out_channels"] == SD_VAE_CONFIG["block_out_channels"]
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[key].numpy(), value.numpy(), err_msg=key)


def _rewrite(folder, tmp_path, edit):
    tmp_path.mkdir()
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    edit(tensors)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return tmp_path


def test_stray_missing_and_misshapen_tensors_are_named(vae_folder, tmp_path):
    _, folder = vae_folder
    stray = _rewrite(
        folder, tmp_path / "stray", lambda t: t.update({"encoder.extra.weight": np.zeros(3, np.float32)})
    )
    with pytest.raises(models.ConversionError, match=r"encoder\.extra\.weight"):
        models.from_diffusers(stray)
    missing = _rewrite(
        folder, tmp_path / "missing", lambda t: t.pop("decoder.up_blocks.1.resnets.2.conv2.bias")
    )
    with pytest.raises(
        models.ConversionError, match=r"missing tensor 'decoder\.up_blocks\.1\.resnets\.2\.conv2\.bias'"
    ):
        models.from_diffusers(missing)
    key = "encoder.mid_block.attentions.0.to_q.weight"
    bad = _rewrite(folder, tmp_path / "shape", lambda t: t.update({key: t[key][:, :64].copy()}))
    with pytest.raises(models.ConversionError, match=r"to_q\.weight' has shape \(128, 64\)"):
        models.from_diffusers(bad)


def test_old_attention_spelling_loads(vae_folder, tmp_path):
    _, folder = vae_folder
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def respell(tensors):
        for key in list(tensors):
            for new, old in renames.items():
                if new in key:
                    tensors[key.replace(new, old)] = tensors.pop(key)

    _, expected = models.from_diffusers(folder)
    _, params = models.from_diffusers(_rewrite(folder, tmp_path / "old", respell))
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unsupported_config_field_is_named(vae_folder, tmp_path):
    _, folder = vae_folder
    config = dict(SD_VAE_CONFIG, act_fn="gelu")
    (tmp_path / "config.json").write_text(json.dumps(config))  # weights linked, not copied
    (tmp_path / "diffusion_pytorch_model.safetensors").symlink_to(
        folder / "diffusion_pytorch_model.safetensors"
    )
    with pytest.raises(models.ConversionError, match="act_fn='gelu'"):
        models.from_diffusers(tmp_path)
