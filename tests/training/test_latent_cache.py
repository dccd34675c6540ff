"""The latent path: the cache job against on-the-fly encoding, resume, the scale, the one-line errors,
and a latent run through diffax.train whose samples decode through the frozen VAE."""

import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import config as config_lib
from diffax import latent, models, train
from experiments import mixture


def _tiny_vae(image_channels=1):
    """The tests' tiny autoencoder (``experiments/mixture.py:vae``), random weights for 8x8 images."""
    model = mixture.get_config("vae").model
    model.image_channels = image_channels
    module = models.from_config(model)
    x = jnp.zeros((1, 8, 8, image_channels))
    return module, nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), x)["params"])


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A random tiny AutoencoderKL written as a diffusers folder (the --config.vae.pretrained route)."""
    folder = str(tmp_path_factory.mktemp("vae"))
    models.to_diffusers(*_tiny_vae(), folder)
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
    # The pipeline keeps the shards on disk, memory-mapped, and gathers rows across them.
    shards = pipeline.posteriors.shards
    assert all(isinstance(shard[name], np.memmap) for shard in shards for name in latent.ARRAYS)
    indices = pipeline.epoch_indices(3, 1500)
    assert len(np.unique(indices // 600)) == 3
    np.testing.assert_array_equal(pipeline.posteriors.gather(indices, "mean"), mean[indices])


def test_cache_job_resumes_and_bad_caches_are_one_line(vae_folder, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("resume"))
    first = latent.write_cache(_latent_config(vae_folder, cache))
    kept = os.path.getmtime(os.path.join(cache, "shard_00000", "mean.npy"))
    shutil.rmtree(os.path.join(cache, "shard_00002"))
    with pytest.raises(ValueError, match=r"config.input.data_dir: .*shard_00002 is missing"):
        latent.read_shards(cache, 3)
    os.makedirs(os.path.join(cache, "shard_00002.partial"))  # what a killed job leaves
    open(os.path.join(cache, "shard_00002.partial", "mean.npy"), "w").close()
    again = latent.write_cache(_latent_config(vae_folder, cache))
    assert again == first and os.path.getmtime(os.path.join(cache, "shard_00000", "mean.npy")) == kept
    assert sorted(os.listdir(cache)) == ["metadata.json", "shard_00000", "shard_00001", "shard_00002"]
    path = os.path.join(cache, "shard_00001", "logvar.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 16)
    with pytest.raises(ValueError, match=r"config.input.data_dir: .*shard_00001 is damaged"):
        latent.read_shards(cache, 3)
    with pytest.raises(ValueError, match="config.input.data_dir: no latent cache"):
        latent.read_metadata(str(tmp_path_factory.mktemp("empty")))


def test_a_mirrored_cache_holds_the_mirrors_posteriors_and_training_draws_them_half_the_time(
    vae_folder, tmp_path_factory
):
    """With input.random_flip the cache also encodes each mirrored image: not the mirrored posterior
    (the VAE is not mirror-equivariant), and a batch takes it for about half of its examples."""
    cache = str(tmp_path_factory.mktemp("mirrored"))
    config = _latent_config(vae_folder, cache)
    config.input.random_flip = True
    assert latent.write_cache(config)["mirrored"]
    module, params = latent.load_vae(config.vae)
    images, _ = latent.source_images(config.vae)
    shard = latent.open_shard(cache, 1, mirrored=True)
    fly_mean, fly_logvar = latent.encoder(module)(params, images[600:1200, :, ::-1])
    np.testing.assert_allclose(shard["mean_flipped"], fly_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shard["logvar_flipped"], fly_logvar, rtol=1e-5, atol=1e-6)
    assert np.abs(shard["mean_flipped"] - shard["mean"][:, :, ::-1]).max() > 1e-2

    shard_kw = dict(scale=0.0, global_batch=1000, seed=0, process_index=0, process_count=1)
    flipped = latent.LatentPipeline(config.input, **shard_kw)
    config.input.random_flip = False
    plain = latent.LatentPipeline(config.input, **shard_kw)
    z, z_plain = flipped.get(3)["image"], plain.get(3)["image"]
    indices, scale = plain.epoch_indices(3, 1500), float(plain.scale)
    (mean, logvar), (mean_f, logvar_f) = (
        (flipped.posteriors.gather(indices, name) for name in names)
        for names in (("mean", "logvar"), ("mean_flipped", "logvar_flipped"))
    )
    eps = (z_plain / scale - mean) / np.exp(0.5 * logvar)  # the step's noise, the same in both
    mirror = scale * (mean_f + np.exp(0.5 * logvar_f) * eps)
    took_mirror = np.all(np.isclose(z, mirror, rtol=1e-4, atol=1e-4), axis=(1, 2, 3))
    took_plain = np.all(z == z_plain, axis=(1, 2, 3))
    assert np.all(took_mirror != took_plain) and 0.45 < took_mirror.mean() < 0.55


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
    config = _latent_config(vae_folder, cache)
    config.input.random_flip = True
    with pytest.raises(ValueError, match="config.input.random_flip: the cache at .* holds no mirrored"):
        latent.check(config)
    wrong = str(tmp_path_factory.mktemp("unet"))
    with open(os.path.join(wrong, "config.json"), "w") as f:
        json.dump({"_class_name": "UNet2DModel"}, f)
    config = _latent_config(wrong, cache)
    with pytest.raises(
        ValueError, match="config.vae.pretrained: .* holds a UNet2DModel, not an AutoencoderKL"
    ):
        latent.check(config)


@pytest.mark.parametrize("labels", [False, True])
def test_a_latent_run_trains_and_its_samples_decode_to_images(labels, vae_folder, tmp_path_factory):
    """Unconditional, and class-conditional on the cache's labels (``experiments/digits_latent.py:dit``)."""
    cache = str(tmp_path_factory.mktemp("run_cache"))
    _cached(vae_folder, cache)
    config = _latent_config(vae_folder, cache)
    config.model = mixture.get_config("dit").model
    config.model.patch_size = 2
    if labels:
        config.model.num_classes = config.input.num_classes = 10
        config.model.label_dropout = 0.1
        config.input.labels = True
    config.input.batch_size = 8
    # A batch carries the labels of the rows it drew (a missing label would silently take the null class).
    pipeline = latent.LatentPipeline(
        config.input, scale=0.0, global_batch=8, seed=0, process_index=0, process_count=1
    )
    batch = pipeline.get(5)
    assert ("label" in batch) == labels
    if labels:
        _, _, cached_labels = latent.read_shards(cache, 3)
        np.testing.assert_array_equal(batch["label"], cached_labels[pipeline.epoch_indices(5, 1500)])
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
    module, params = _tiny_vae(image_channels=3)
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
