"""Sampling published checkpoints by their protocols: grids, guidance channels, clipping, pipelines, CLI."""

import json
import subprocess
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffax import guidance, pretrained, samplers, schedules
from experiments import mixture
from tests.models import diffusers_reference as ref


def test_dit_protocol_grid_is_the_respaced_250_steps():
    p = pretrained.DIT
    schedule = schedules.get("linear", num_timesteps=1000, beta_start=p.beta_start, beta_end=p.beta_end)
    ts = np.asarray(samplers.timesteps(schedule, num_steps=p.steps, spacing=p.spacing))
    # DiT's create_diffusion("250"): space_timesteps keeps round(i * 999 / 249), i < 250.
    kept = np.round(np.arange(250) * (999 / 249)).astype(int)
    np.testing.assert_array_equal(np.round(ts[:-1] * 1000 - 1).astype(int), kept[::-1])
    assert ts[-1] == 0.0 and (p.guidance_scale, p.guided_channels, p.variance) == (1.5, 3, "learned")


def test_dit_guidance_mixes_only_the_first_channels():
    cond_out = jnp.arange(16.0).reshape(1, 1, 2, 8)
    uncond_out = -cond_out

    def model_fn(x, t, cond):
        return jnp.where((cond == 0)[:, None, None, None], cond_out, uncond_out)

    guided = guidance.classifier_free(model_fn, 1.5, null_cond=jnp.int32(1), channels=3)
    out = guided(jnp.zeros((1, 1, 2, 8)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32))
    expected = np.concatenate([(uncond_out + 1.5 * (cond_out - uncond_out))[..., :3], cond_out[..., 3:]], -1)
    np.testing.assert_allclose(out, expected)


def _unet_folder(tmp_path):
    config = dict(
        block_out_channels=[16, 32],
        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=8,
        attention_head_dim=None,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    )
    torch.manual_seed(0)
    return ref.save(ref.randomize(diffusers.UNet2DModel.from_config(config), seed=5), tmp_path / "ddpm")


def test_ddpm_protocol_clips_and_samples(tmp_path):
    model = pretrained.load(_unet_folder(tmp_path))
    assert model.protocol == pretrained.DDPM and model.shape == (8, 8, 3) and model.num_classes is None
    images = pretrained.make_sample_fn(model, steps=4)(jax.random.key(0), np.zeros(2, np.int32))
    # The last step returns the clipped x_0 prediction: inside [-1, 1] whatever the random network says.
    assert images.shape == (2, 8, 8, 3) and float(jnp.max(jnp.abs(images))) <= 1.0 + 1e-5


def test_dit_pipeline_decodes_through_the_vae_and_cli_writes_the_adm_layout(tmp_path):
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel.from_config(
        dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=4, out_channels=8)
    )
    vae = diffusers.AutoencoderKL.from_config(
        dict(
            block_out_channels=[8, 16],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            norm_num_groups=8,
            latent_channels=4,
        )
    )
    folder = tmp_path / "dit-pipeline"
    ref.save(ref.randomize(dit, seed=6), folder / "transformer")
    ref.save(ref.randomize(vae, seed=7), folder / "vae")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"))
    )
    with pytest.raises(Exception, match="latent DiT; pass --vae"):
        pretrained.load(folder / "transformer")
    model = pretrained.load(folder)
    assert model.protocol == pretrained.DIT and model.shape == (4, 4, 4) and model.num_classes == 1000
    out = tmp_path / "samples.npz"
    cmd = [sys.executable, "-m", "diffax.generate", f"--pretrained={folder}", "--num_samples=3"]
    cmd += ["--steps=2", "--batch_size=2", f"--out={out}"]
    subprocess.run(cmd, check=True, capture_output=True)
    with np.load(out) as f:
        assert f["arr_0"].shape == (3, 8, 8, 3) and f["arr_0"].dtype == np.uint8  # decoded by the VAE
        assert f["labels"].shape == (3,) and f["labels"].max() < 1000 and len(np.unique(f["arr_0"])) > 1


def test_vae_psnr_on_a_folder_of_images(tmp_path):
    from PIL import Image

    from diffax import models

    model = mixture.get_config("vae").model  # the tests' tiny autoencoder, for RGB
    model.image_channels = 3
    vae = models.from_config(model)
    params = jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(12, 10), (10, 16)]):  # cropped to the centre square, resized to 8x8
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(tmp_path / "images" / f"{i}.png")
    images = pretrained.load_images(tmp_path / "images", 8)
    assert images.shape == (2, 8, 8, 3)
    psnr, per_image = pretrained.reconstruction_psnr(vae, params, images)
    decoded = jax.jit(
        lambda p, x: vae.apply(
            {"params": p}, vae.apply({"params": p}, x, method="encode")[0], method="decode"
        )
    )(params, images / 127.5 - 1.0)
    mse = np.mean(
        (np.clip(np.round((np.asarray(decoded) + 1) * 127.5), 0, 255) - images) ** 2, axis=(1, 2, 3)
    )
    np.testing.assert_allclose(per_image, 10 * np.log10(255**2 / mse), rtol=1e-4)
    assert psnr == pytest.approx(per_image.mean())
