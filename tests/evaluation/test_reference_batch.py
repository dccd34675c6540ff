"""FID against ADM-evaluator reference batches (arr_0 images or mu/sigma), on small synthetic files."""

import numpy as np
import pytest
import scipy.linalg

from diffax import evaluation

PROJECTION = np.random.default_rng(0).standard_normal((4 * 4 * 3, 6))


def _extractor(images):
    """A fixed linear feature map of [-1, 1] images (stands in for InceptionV3)."""
    features = np.asarray(images, np.float64).reshape(len(images), -1) @ PROJECTION
    return features.astype(np.float32), np.zeros((len(images), 2), np.float32)


def _images(seed, n, shift):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(128 + shift, 40, (n, 4, 4, 3)), 0, 255).astype(np.uint8)


def _adm_fid(mu1, sigma1, mu2, sigma2):
    """The ADM evaluator's formula (evaluations/evaluator.py::FIDStatistics.frechet_distance)."""
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def test_fid_from_images_and_from_statistics_agree_with_the_evaluator(tmp_path):
    samples, reference = _images(1, 64, 10), _images(2, 80, 0)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref_images.npz", arr_0=reference)
    features = _extractor(reference.astype(np.float32) / 127.5 - 1)[0].astype(np.float64)
    mu, sigma = evaluation.reference_batch_stats(
        tmp_path / "ref_images.npz", extractor=_extractor, batch_size=16
    )
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-4)
    np.savez(tmp_path / "ref_stats.npz", mu=mu, sigma=sigma)
    from_images = evaluation.fid_against_reference(
        tmp_path / "samples.npz", tmp_path / "ref_images.npz", extractor=_extractor, batch_size=16
    )
    from_stats = evaluation.fid_against_reference(
        tmp_path / "samples.npz", tmp_path / "ref_stats.npz", extractor=_extractor
    )
    mu_s, sigma_s = evaluation.image_batch_stats(samples, extractor=_extractor)
    assert from_images == pytest.approx(from_stats, rel=1e-6)  # batches of 16 vs one of 64: rounding
    assert from_images == pytest.approx(_adm_fid(mu_s, sigma_s, mu, sigma), rel=1e-6)
    assert from_images > 1.0  # the shifted samples are far from the reference


def test_bad_batches_are_named(tmp_path):
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="no images"):
        evaluation.read_image_batch(tmp_path / "empty.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        evaluation.read_image_batch(tmp_path / "float.npz")
    np.savez(tmp_path / "pickled.npz", mu=np.array([object()], dtype=object), sigma=np.zeros((1, 1)))
    with pytest.raises(ValueError, match="pickle"):  # never unpickled
        evaluation.reference_batch_stats(tmp_path / "pickled.npz")
    np.savez(tmp_path / "images.npz", arr_0=_images(0, 4, 0))
    with pytest.raises(ValueError, match="pass an extractor"):
        evaluation.reference_batch_stats(tmp_path / "images.npz")
