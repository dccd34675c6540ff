"""Input pipelines: digits, the analytic mixture, a locally built tfds dataset, global-array assembly."""

import chex
import jax
import ml_collections
import numpy as np
import pytest

from diffax import data, sharding
from diffax.config import base_config


def test_digits_upsampling_is_exact_and_splits_are_disjoint():
    small, labels = data.load_digits(split="all")
    big, _ = data.load_digits(split="all", upsample=3)
    chex.assert_shape(big, (1797, 24, 24, 1))
    assert big.dtype == np.uint8 and small.max() == 255 and small.min() == 0
    np.testing.assert_array_equal(big.reshape(1797, 8, 3, 8, 3, 1).mean(axis=(2, 4)), small)
    train, train_labels = data.load_digits(split="train")
    test, test_labels = data.load_digits(split="test")
    assert len(train) == 1500 and len(test) == 297 and set(np.unique(test_labels)) == set(range(10))
    # Together the two splits are exactly the whole set (as multisets of (image, label) rows).
    rows = lambda x, y: sorted(a.tobytes() + bytes([b]) for a, b in zip(x, y, strict=True))
    together = rows(np.concatenate([train, test]), np.concatenate([train_labels, test_labels]))
    assert together == rows(small, labels)


def _digits_pipeline(process_index=0, process_count=1, batch=64, flip=False):
    images, labels = data.load_digits(split="train", upsample=2)
    return data.ArrayPipeline(
        images,
        labels,
        global_batch=batch,
        seed=3,
        random_flip=flip,
        process_index=process_index,
        process_count=process_count,
    )


def test_array_pipeline_epochs_and_process_split():
    pipe = _digits_pipeline()
    # One epoch of 1500 images in batches of 64: every image appears once in the first 23 batches.
    seen = np.concatenate([pipe._indices(s) for s in range(23)])
    assert len(np.unique(seen)) == len(seen) == 23 * 64
    batch = pipe.get(5)
    chex.assert_shape(batch["image"], (64, 16, 16, 1))
    assert batch["image"].dtype == np.float32 and -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
    # The batch of a step does not depend on history or on the number of processes.
    np.testing.assert_array_equal(_digits_pipeline().get(5)["image"], batch["image"])
    halves = [_digits_pipeline(i, 2).get(5) for i in range(2)]
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batch[key])


def test_random_flip_mirrors_half_the_images():
    plain, flipped = _digits_pipeline().get(7)["image"], _digits_pipeline(flip=True).get(7)["image"]
    mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
    same = np.all(flipped == plain, axis=(1, 2, 3))
    assert np.all(mirrored | same) and 16 < mirrored.sum() < 48


def test_mixture_pipeline_matches_its_density():
    cfg = base_config().input
    cfg.update(
        dict(dataset="mixture", image_size=4, channels=2, batch_size=4096, labels=True, mixture_std=0.2)
    )
    batch = data.make_pipeline(cfg, seed=1, process_index=0, process_count=1).get(0)
    means = data.mixture_means(num_components=cfg.mixture_components, image_shape=(4, 4, 2), seed=0)
    residual = batch["image"] - means[batch["label"]]
    # Residuals are N(0, std^2): mean within 5 standard errors, variance within 5%.
    assert abs(residual.mean()) < 5 * 0.2 / np.sqrt(residual.size)
    np.testing.assert_allclose(residual.var(), 0.04, rtol=0.05)
    counts = np.bincount(batch["label"], minlength=cfg.mixture_components)
    np.testing.assert_allclose(counts / 4096, 0.25, atol=5 * np.sqrt(0.25 * 0.75 / 4096))


def _tfds_config(data_dir, **overrides):
    cfg = base_config().input
    cfg.update(
        dict(
            dataset="diffax_test_squares",
            data_dir=data_dir,
            image_size=4,
            channels=1,
            labels=True,
            batch_size=8,
            shuffle_buffer=16,
        )
    )
    cfg.update(overrides)
    return cfg


def test_tfds_pipeline_reads_crops_and_splits_processes(squares_dir):
    cfg = _tfds_config(squares_dir)
    first = [data.make_pipeline(cfg, seed=0, process_index=i, process_count=2) for i in range(2)]
    seen = [set(), set()]
    for i, pipe in enumerate(first):
        for step in range(3):  # 3 batches of 4 = 12 of each process's 24 examples
            batch = pipe.get(step)
            chex.assert_shape(batch["image"], (4, 4, 4, 1))
            # Center crop 10×10 then area-resize to 4×4: interior pixels keep the example's value.
            value = np.round((batch["image"][..., 0] + 1) * 127.5).astype(int)
            index = value[:, 0, 1] // 5
            np.testing.assert_array_equal(
                value[:, :, 1:], np.broadcast_to(index[:, None, None] * 5, (4, 4, 3))
            )
            np.testing.assert_array_equal(batch["label"], index % 4)
            seen[i] |= set(index.tolist())
    assert not seen[0] & seen[1]


def test_tfds_position_restores_exactly(squares_dir, tmp_path):
    cfg = _tfds_config(squares_dir, random_flip=True)
    pipe = data.make_pipeline(cfg, seed=5, process_index=0, process_count=1)
    for step in range(4):
        pipe.get(step)
    pipe.save(str(tmp_path), 4, keep=2)
    expected = [pipe.get(step) for step in range(4, 10)]  # crosses an epoch boundary (48 / 8 = 6)
    resumed = data.make_pipeline(cfg, seed=5, process_index=0, process_count=1)
    resumed.restore(str(tmp_path), 4)
    for step, batch in zip(range(4, 10), expected, strict=True):
        chex.assert_trees_all_equal(resumed.get(step), batch)
    with pytest.raises(ValueError, match="positioned at step 10"):
        resumed.get(12)


def test_to_global_assembles_a_batch_sharded_array():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2)))
    local = {"image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2, 1, 1), "label": np.arange(16)}
    batch = data.to_global(local, sharding.batch_sharding(mesh))
    assert batch["image"].sharding.spec == sharding.batch_sharding(mesh).spec
    assert len(batch["image"].addressable_shards) == jax.device_count()
    chex.assert_shape(batch["image"].addressable_shards[0].data, (16 // jax.device_count(), 2, 1, 1))
    chex.assert_trees_all_equal(jax.device_get(batch), local)
