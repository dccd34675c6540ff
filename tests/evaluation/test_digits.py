"""The digits classifier, the digits metrics and the streaming harness."""

import functools

import chex
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffax.evaluation import (
    digits_features_and_logits,
    digits_metrics,
    digits_reference,
    digits_targets,
    evaluate_samples,
    kernel_inception_distance,
    load_digits_reference,
    precision_recall,
)
from diffax.evaluation._digits import _RECIPE, _cache_path, _params_at, _train


def test_training_is_deterministic_and_cached(digits_params, digits_cache_dir):
    path = _cache_path(digits_cache_dir)
    assert path.startswith(str(digits_cache_dir)) and path.endswith(".npz")
    from_file = _params_at.__wrapped__(path)  # reads the file the fixture wrote
    retrained = _train(_RECIPE)
    chex.assert_trees_all_equal(from_file, digits_params)
    chex.assert_trees_all_equal(retrained, digits_params)


def test_heldout_accuracy(digits_params):
    images, labels = load_digits_reference("test")
    _, logits = digits_features_and_logits(images, params=digits_params)
    accuracy = np.mean(np.argmax(logits, axis=1) == labels)
    assert accuracy >= 0.95, accuracy


def test_upsampled_and_channelless_inputs_give_the_same_outputs(digits_params):
    images = load_digits_reference("test")[0][:16]
    features, logits = digits_features_and_logits(images, params=digits_params)
    chex.assert_shape((features, logits), [(16, 64), (16, 10)])
    upsampled = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)[..., 0]  # (16, 32, 32)
    chex.assert_trees_all_close(
        digits_features_and_logits(upsampled, params=digits_params), (features, logits), atol=1e-5
    )
    with pytest.raises(ValueError, match="8k"):
        digits_features_and_logits(np.zeros((2, 12, 12, 1)), params=digits_params)


@functools.cache
def _halves():
    heldout = load_digits_reference("test")[0]
    return heldout[: len(heldout) // 2], heldout[len(heldout) // 2 :]


def test_real_heldout_digits_meet_the_targets_and_noise_fails(digits_params):
    samples, floor_set = _halves()
    metrics = digits_metrics(samples, params=digits_params, reference_heldout=floor_set)
    assert metrics["num_samples"] == len(samples)
    assert digits_targets(metrics) == {
        "fd_within_2x_floor": True,
        "confident_90pct": True,
        "classes_uniform": True,
        "judge_confident_95pct_of_real": True,
        "judge_fd_within_1.3x_floor": True,
        "judge_near_zero_within_5pts": True,
        "judge_classes_uniform": True,
    }, metrics
    assert 0.9 <= metrics["real_confident_fraction"] <= 1.0 and metrics["real_is"] > 5.0
    fractions = [metrics[f"class_fraction/{c}"] for c in range(10)]
    np.testing.assert_allclose(sum(fractions), 1.0)
    assert 5.0 < metrics["is"] <= 10.0  # confident and spread over ten classes
    noise = np.random.default_rng(0).uniform(-1, 1, size=samples.shape).astype(np.float32)
    noise_metrics = digits_metrics(noise, params=digits_params, reference_heldout=floor_set)
    assert not any(digits_targets(noise_metrics).values()), noise_metrics
    assert noise_metrics["fd"] > 10 * metrics["fd"]


def test_evaluate_samples_streams_sharded_batches_like_digits_metrics(digits_params):
    # A "sampler" that draws held-out digits at random, returned sharded over 8 devices; 100
    # samples in batches of 24, so the last batch is partly masked.
    samples, floor_set = _halves()
    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))

    def sample_fn(key, n):
        idx = jax.random.choice(key, len(samples), (n,))
        return jax.device_put(samples[np.asarray(idx)], sharding)

    key = jax.random.key(3)
    reference = digits_reference(100, params=digits_params, reference_heldout=floor_set)
    train_features = digits_features_and_logits(load_digits_reference("train")[0], params=digits_params)[0]
    metrics = evaluate_samples(
        sample_fn,
        num_samples=100,
        batch_size=24,
        key=key,
        splits=5,
        reference_features=np.asarray(train_features),
        **reference,
    )
    drawn = np.concatenate([np.asarray(sample_fn(jax.random.fold_in(key, i), 24)) for i in range(5)])[:100]
    expected = digits_metrics(drawn, params=digits_params, reference_heldout=floor_set, splits=5)
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
    features = np.asarray(digits_features_and_logits(drawn, params=digits_params)[0])
    np.testing.assert_allclose(
        (metrics["kid"], metrics["kid_std"]),
        kernel_inception_distance(features, train_features, subset_size=None),
        rtol=1e-4,
    )
    assert (metrics["precision"], metrics["recall"]) == precision_recall(train_features, features)


def test_evaluate_samples_bad_input(digits_params):
    reference = digits_reference(10, params=digits_params)
    sample_fn = lambda key, n: np.zeros((n, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_samples(sample_fn, num_samples=10, batch_size=0, key=jax.random.key(0), **reference)
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_samples(sample_fn, num_samples=1, batch_size=4, key=jax.random.key(0), **reference)
