"""The latent path: the cache job against on-the-fly encoding, resume, the scale, the one-line errors,
and a latent run through diffax.train whose samples decode through the frozen VAE."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import config as config_lib
from diffax import latent, models, train
from experiments import common

TINY_VAE = dict(
    image_channels=1,
    latent_channels=2,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    norm_groups=4,
    mid_attention=False,
    use_quant_conv=True,
    use_post_quant_conv=True,
)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A random tiny AutoencoderKL written as a diffusers folder (the --config.vae.pretrained route)."""
    module = models.AutoencoderKL(**TINY_VAE)
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"])
    folder = str(tmp_path_factory.mktemp("vae"))
    models.to_diffusers(module, params, folder)
    return folder


def _latent_config(vae_folder, cache):
    config = config_lib.base_config()
    config.vae.pretrained = vae_folder
    config.vae.source.upsample = 1  # digits at 8x8 -> 4x4x2 latents
    config.vae.cache_shard_size = 600  # 1500 train digits: 3 shards
    config.input.dataset = "latents"
    config.input.data_dir = str(cache)
    config.input.image_size = 4
    config.input.channels = 2
    config.input.batch_size = 1000
    return config


@functools.cache
def _cached(vae_folder, cache):
    return latent.write_cache(_latent_config(vae_folder, cache))


def test_cache_equals_on_the_fly_encoding_and_scaled_latents_have_unit_std(vae_folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    metadata = _cached(vae_folder, str(cache))
    assert metadata["num_shards"] == 3 and metadata["latent_shape"] == [4, 4, 2]
    config = _latent_config(vae_folder, cache)
    mean, logvar, _ = latent.read_shards(str(cache), 3)
    module, params = latent.load_vae(config.vae)
    images, _ = latent.source_images(config.vae)
    fly_mean, fly_logvar = latent.encoder(module)(params, images)
    np.testing.assert_allclose(mean, fly_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logvar, fly_logvar, rtol=1e-5, atol=1e-6)
    pipeline = latent.LatentPipeline(
        config.input, scale=0.0, global_batch=1000, seed=0, process_index=0, process_count=1
    )
    batch = pipeline.get(3)["image"]
    assert batch.shape == (1000, 4, 4, 2)
    assert abs(float(batch.std()) - 1.0) < 0.05  # fresh posterior draws, scaled by the cached 1/std
    assert not np.array_equal(batch, pipeline.get(4)["image"])


def test_cache_job_resumes_and_bad_caches_are_one_line(vae_folder, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("resume"))
    first = latent.write_cache(_latent_config(vae_folder, cache))
    kept = os.path.getmtime(os.path.join(cache, "shard_00000.npz"))
    os.remove(os.path.join(cache, "shard_00002.npz"))
    with pytest.raises(ValueError, match=r"config.input.data_dir: .*shard_00002.npz is missing"):
        latent.read_shards(cache, 3)
    again = latent.write_cache(_latent_config(vae_folder, cache))
    assert again == first and os.path.getmtime(os.path.join(cache, "shard_00000.npz")) == kept
    with open(os.path.join(cache, "shard_00001.npz"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"config.input.data_dir: .*shard_00001.npz is damaged"):
        latent.read_shards(cache, 3)
    with pytest.raises(ValueError, match="config.input.data_dir: no latent cache"):
        latent.read_metadata(str(tmp_path_factory.mktemp("empty")))


def test_bad_latent_configs_are_one_line(vae_folder, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("check"))
    _cached(vae_folder, cache)
    config = _latent_config(vae_folder, cache)
    config.input.channels = 4
    with pytest.raises(ValueError, match="config.input.channels: 4 but the VAE's latents have 2 channels"):
        latent.check(config)
    config = _latent_config(vae_folder, cache)
    config.input.image_size = 8
    with pytest.raises(ValueError, match="config.input.image_size: 8 but the cached latents are 4x4"):
        latent.check(config)
    wrong = str(tmp_path_factory.mktemp("unet"))
    with open(os.path.join(wrong, "config.json"), "w") as f:
        json.dump({"_class_name": "UNet2DModel"}, f)
    config = _latent_config(wrong, cache)
    with pytest.raises(
        ValueError, match="config.vae.pretrained: .* holds a UNet2DModel, not an AutoencoderKL"
    ):
        latent.check(config)


def test_a_latent_run_trains_and_its_samples_decode_to_images(vae_folder, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("run_cache"))
    _cached(vae_folder, cache)
    config = _latent_config(vae_folder, cache)
    config.model = common.model(
        "dit_s_2",
        depth=1,
        hidden_size=16,
        num_heads=2,
        num_classes=None,
        label_dropout=0.0,
        learned_variance=False,
    )
    config.input.batch_size = 8
    config.total_steps = 2
    config.ema.decays = ()
    config.sampler.steps = 2
    config.log.every_steps = 1
    config.log.sample_every_steps = 2
    config.log.num_samples = 4
    workdir = tmp_path_factory.mktemp("latent_run")
    train.train_and_evaluate(config, str(workdir))
    saved = config_lib.load(str(workdir))
    assert saved.vae.scale == pytest.approx(_cached(vae_folder, cache)["scale"])  # recorded in the run
    assert (workdir / "samples" / "step_00000002.png").exists()


def test_center_crop_is_adms_box_halving_bicubic_resize_and_centre_cut():
    """24x16 at size 8: one box halving (a 2x2 block mean) to 12x8, no resize (short side already 8), the
    middle 8 columns; a constant non-square grey image stays constant through the bicubic resize."""
    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), np.uint8)
    want = image.reshape(8, 2, 12, 2, 3).mean(axis=(1, 3))[:, 2:10]
    got = latent.center_crop(image, 8)
    assert got.shape == (8, 8, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(got, want, atol=1.0)  # PIL filters in 8-bit fixed point: within one level
    grey = latent.center_crop(np.full((10, 13, 1), 77, np.uint8), 8)
    assert grey.shape == (8, 8, 3) and np.all(grey == 77)


def test_a_tfds_source_is_read_and_cached_one_shard_at_a_time(squares_dir, tmp_path_factory, monkeypatch):
    """The 48 local 12x10 grey squares (pixel value 5 i encodes example i): each shard reads only its
    slice of the split, center-cropped to 8x8 RGB, and the cache equals encoding the whole split."""
    module = models.AutoencoderKL(**(TINY_VAE | dict(image_channels=3)))
    params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"])
    folder = str(tmp_path_factory.mktemp("rgb_vae"))
    models.to_diffusers(module, params, folder)
    cache = str(tmp_path_factory.mktemp("tfds_cache"))
    config = _latent_config(folder, cache)
    config.vae.source.update(dict(dataset="diffax_test_squares", data_dir=squares_dir, image_size=8))
    config.vae.cache_shard_size = 20  # 48 images: shards of 20, 20 and 8
    images, labels = latent.source_images(config.vae)
    assert images.shape == (48, 8, 8, 3)
    index = np.rint((images[:, 4, 4, 0] + 1.0) * 127.5 / 5.0).astype(int)
    assert sorted(index) == list(range(48)) and np.array_equal(labels, index % 4)
    assert np.all(images[:, :, 0, 0] > images[:, :, 4, 0])  # the bright left column survives the crop
    np.testing.assert_array_equal(latent.source_images(config.vae, 20, 40)[0], images[20:40])
    reads = []
    read = latent.source_images
    monkeypatch.setattr(
        latent, "source_images", lambda v, start, stop: reads.append((start, stop)) or read(v, start, stop)
    )
    metadata = latent.write_cache(config)
    assert reads == [(0, 20), (20, 40), (40, 48)] and metadata["num_images"] == 48
    mean, logvar, cached_labels = latent.read_shards(cache, metadata["num_shards"])
    fly_mean, fly_logvar = latent.encoder(module)(params, images)
    np.testing.assert_allclose(mean, fly_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logvar, fly_logvar, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cached_labels, labels)
