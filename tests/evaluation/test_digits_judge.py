"""The independent digits judge: its ceilings on real digits, determinism, and corruptions it catches."""

import functools

import numpy as np
import pytest

from diffax.data.digits import load_digits
from diffax.evaluation import (
    digits_judge,
    frechet_distance,
    judge_digits,
    judge_targets,
    load_digits_reference,
    to_digit_pixels,
)
from diffax.evaluation._digits_judge import DigitsJudge


@functools.cache
def _heldout_upsampled() -> np.ndarray:
    """The held-out digits as a 16×16 generator would emit them, in [-1, 1]."""
    images = load_digits_reference("test")[0]
    return np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)


def _box_blur(images: np.ndarray) -> np.ndarray:
    """A 3×3 box blur of (N, H, W, 1) images (edges replicated)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    return sum(padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def test_pixels_return_to_the_real_digits_scale():
    sk_images, _ = load_digits(split="test")  # uint8 0..255 = round(v * 255 / 16) of v in 0..16
    from sklearn import datasets

    raw = datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(raw.target))[1500:]
    pixels = to_digit_pixels(_heldout_upsampled())
    assert pixels.shape == (len(sk_images), 64) and pixels.dtype == np.float64
    np.testing.assert_allclose(pixels, raw.images[order].reshape(-1, 64), atol=16 / 510 + 1e-6)
    out_of_range = to_digit_pixels(np.array([[[-3.0] * 8] * 8, [[3.0] * 8] * 8]))
    np.testing.assert_array_equal(out_of_range, np.repeat([[0.0], [16.0]], 64, axis=1))


def test_real_heldout_digits_reproduce_the_ceiling_and_pass():
    judge = digits_judge()
    metrics = judge_digits(_heldout_upsampled())
    for name in ("confident_fraction", "near_zero_fraction", "class_chi2_pvalue"):
        assert metrics[f"judge/{name}"] == metrics[f"judge/real_{name}"], name
    assert metrics["judge/fd"] == metrics["judge/fd_floor"] and metrics["judge/fd_ratio"] == 1.0
    assert 0.8 < metrics["judge/real_confident_fraction"] < 0.95  # calibrated, not saturated
    assert 0.45 < metrics["judge/real_near_zero_fraction"] < 0.55  # about half of a digit is background
    assert all(judge_targets(metrics).values()), metrics
    _, labels = load_digits(split="test")
    predicted = np.argmax(judge.probabilities(to_digit_pixels(_heldout_upsampled())), axis=1)
    accuracy = np.mean(predicted == labels)
    assert accuracy >= 0.98, accuracy


def test_training_digits_pass_and_the_fd_is_chunk_averaged():
    train = load_digits_reference("train")[0][:600]  # two chunks of the 297-digit floor
    metrics = judge_digits(train)
    assert all(judge_targets(metrics).values()), metrics
    judge = digits_judge()
    pixels = to_digit_pixels(train)
    chunks = [judge.frechet_to_train(pixels[i * 297 : (i + 1) * 297]) for i in range(2)]
    np.testing.assert_allclose(metrics["judge/fd"], np.mean(chunks), rtol=1e-12)


def test_pca_distance_matches_a_float64_svd_reference():
    judge = digits_judge()
    train, _ = load_digits(split="train")
    x = train.reshape(len(train), -1).astype(np.float64) * (16 / 255)
    mean = x.mean(axis=0)
    basis = np.linalg.svd(x - mean, full_matrices=False)[2][: judge.pca.n_components_]
    samples = to_digit_pixels(_heldout_upsampled())
    a, b = (samples - mean) @ basis.T, (x - mean) @ basis.T
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    np.testing.assert_allclose(judge.frechet_to_train(samples), expected, rtol=1e-8)


def test_fitting_is_deterministic():
    train, labels = load_digits(split="train")
    pixels = train.reshape(len(train), -1).astype(np.float64) * (16 / 255)
    refit = DigitsJudge(pixels, labels)
    samples = to_digit_pixels(_heldout_upsampled())
    np.testing.assert_array_equal(refit.probabilities(samples), digits_judge().probabilities(samples))
    assert refit.frechet_to_train(samples) == digits_judge().frechet_to_train(samples)


@pytest.mark.parametrize("corruption", ["speckle", "blur", "noise"])
def test_corruptions_fail_the_targets(corruption):
    clean = _heldout_upsampled()
    rng = np.random.default_rng(0)
    corrupted = {
        # grey speckle on the background: a quarter of the pixels lifted by up to 3 of 16 levels
        "speckle": lambda: np.clip(
            clean + (rng.random(clean.shape) < 0.25) * rng.uniform(0.0, 0.4, clean.shape), -1.0, 1.0
        ),
        "blur": lambda: _box_blur(clean),
        "noise": lambda: rng.uniform(-1.0, 1.0, clean.shape),
    }[corruption]()
    metrics = judge_digits(corrupted.astype(np.float32))
    targets = judge_targets(metrics)
    assert not targets["judge_near_zero_within_5pts"], metrics["judge/near_zero_fraction"]
    if corruption != "speckle":
        assert not targets["judge_fd_within_1.3x_floor"], metrics["judge/fd_ratio"]
    if corruption == "noise":
        assert not any(targets.values()), metrics


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        judge_digits(np.zeros((1, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="8k"):
        judge_digits(np.zeros((4, 12, 12, 1), np.float32))
