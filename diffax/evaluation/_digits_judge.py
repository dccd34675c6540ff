"""An independent judge of generated digits: scikit-learn models fitted only on the real 8×8 digits.

The digits CNN harness (:mod:`diffax.evaluation._digits`) is a neural network trained in JAX, the
same kind of model as the generator, and its confidence and features can share the generator's
blind spots. This judge cannot: it knows only scikit-learn's real digits (the ``train`` split, in
their own 0..16 pixel scale) and is built from models of another family:

- a classifier: an RBF-kernel support vector machine on the 64 raw pixels, its scores calibrated
  to probabilities by Platt's sigmoid on 5-fold cross-validated decisions (Platt 1999), giving the
  confident fraction (top probability above 0.9) and the class histogram with its chi-square test;
- a feature space: the first 20 principal components of the training pixels, in which a Fréchet
  distance to the training split is measured against its real-vs-real floor (the held-out digits
  against the same training split, at the held-out set's size);
- the background statistic: the fraction of pixels below 0.5 on the 0..16 scale (pixels that would
  round to 0, as about half of every real digit's do), which speckled backgrounds lower.

Samples are mean-pooled back to 8×8 and mapped from [-1, 1] onto 0..16, clipped to that range. Every
number comes with the real held-out digits' own score under the same judge (``judge/real_*``): the
ceiling a perfect generator reaches.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
from jax.typing import ArrayLike

from diffax.data.digits import load_digits
from diffax.evaluation._digits import NUM_DIGIT_CLASSES, _to_8x8
from diffax.evaluation._frechet import frechet_distance
from diffax.evaluation._harness import uniform_chi2_pvalue

__all__ = ["DigitsJudge", "digits_judge", "judge_digits", "judge_targets", "to_digit_pixels"]

DIGIT_MAX = 16.0  # scikit-learn's digits take the integer values 0..16
NEAR_ZERO = 0.5  # below it a pixel rounds to 0 on the real digits' integer scale
CONFIDENCE = 0.9
PCA_COMPONENTS = 20


def to_digit_pixels(images: ArrayLike) -> np.ndarray:
    """(N, 8k, 8k[, 1]) images in [-1, 1] → (N, 64) float64 pixels on the real digits' 0..16 scale.

    k×k blocks are averaged back to 8×8; values outside [-1, 1] are clipped.
    """
    pooled = np.asarray(_to_8x8(images), np.float64).reshape(-1, 64)
    return np.clip((pooled + 1.0) * (DIGIT_MAX / 2.0), 0.0, DIGIT_MAX)


class DigitsJudge:
    """The fitted judge: a calibrated RBF support vector machine and a PCA basis of real digits.

    Build it with :func:`digits_judge` (fitted once per process, deterministically).
    """

    def __init__(self, pixels: np.ndarray, labels: np.ndarray):
        """Fits both models on real digits ``pixels`` (N, 64) on the 0..16 scale with ``labels`` (N,)."""
        from sklearn.calibration import CalibratedClassifierCV  # imported on use: slow to import
        from sklearn.decomposition import PCA
        from sklearn.svm import SVC

        self.classifier = CalibratedClassifierCV(SVC(C=1.0, gamma="scale"), method="sigmoid", ensemble=False)
        self.classifier.fit(pixels, labels)
        self.pca = PCA(PCA_COMPONENTS, svd_solver="full").fit(pixels)
        features = self.pca.transform(pixels)
        self.train_mean, self.train_cov = features.mean(axis=0), np.cov(features, rowvar=False)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities (N, 10) of (N, 64) pixels."""
        return self.classifier.predict_proba(pixels)

    def frechet_to_train(self, pixels: np.ndarray) -> float:
        """The Fréchet distance of (N, 64) pixels to the training split in the PCA space."""
        features = self.pca.transform(pixels)
        mean, cov = features.mean(axis=0), np.cov(features, rowvar=False)
        return frechet_distance(mean, cov, self.train_mean, self.train_cov)


@functools.cache
def digits_judge() -> DigitsJudge:
    """The judge fitted on the digits ``train`` split (:func:`diffax.data.digits.load_digits`), once."""
    images, labels = load_digits(split="train")
    return DigitsJudge(images.reshape(len(images), -1).astype(np.float64) * (DIGIT_MAX / 255.0), labels)


def _scores(judge: DigitsJudge, pixels: np.ndarray) -> dict[str, float]:
    """Confident fraction, class histogram, its chi-square p-value, near-zero fraction of (N, 64) pixels."""
    probabilities = judge.probabilities(pixels)
    counts = np.bincount(np.argmax(probabilities, axis=1), minlength=NUM_DIGIT_CLASSES)
    scores = {
        "confident_fraction": float(np.mean(np.max(probabilities, axis=1) > CONFIDENCE)),
        "class_chi2_pvalue": uniform_chi2_pvalue(counts),
        "near_zero_fraction": float(np.mean(pixels < NEAR_ZERO)),
    }
    scores.update({f"class_fraction/{c}": float(v / len(pixels)) for c, v in enumerate(counts)})
    return scores


def judge_digits(
    images: ArrayLike, *, heldout: ArrayLike | None = None, judge: DigitsJudge | None = None
) -> dict[str, float]:
    """The independent judge's scores of generated digits, with the real held-out digits' beside them.

    The Fréchet distance is measured on chunks of the floor's size and averaged: the floor compares
    ``m = min(N, len(heldout))`` held-out digits with the training split, and a Fréchet distance
    estimated from m points is biased upwards by a term that shrinks with m, so the samples are
    measured in ``N // m`` disjoint chunks of m (the first ``m * (N // m)`` samples) and their
    distances averaged, making ``fd_ratio`` 1 in expectation for a perfect generator.

    Args:
      images: generated digits, (N, 8k, 8k) or (N, 8k, 8k, 1) in [-1, 1], N >= 2.
      heldout: real held-out digits in the same form; defaults to the digits ``test`` split
        (297 images).
      judge: defaults to :func:`digits_judge`.

    Returns:
      ``judge/confident_fraction``, ``judge/class_chi2_pvalue``, ``judge/near_zero_fraction``,
      ``judge/class_fraction/0`` … ``/9``, ``judge/fd`` and ``judge/fd_floor``, ``judge/fd_ratio``;
      the held-out digits' own ``judge/real_confident_fraction``, ``judge/real_class_chi2_pvalue``,
      ``judge/real_near_zero_fraction``; and ``judge/confident_ratio``, samples' confident fraction
      over the real one.

    References:
      Platt, "Probabilistic outputs for support vector machines", 1999 (the calibration);
      Heusel et al., NeurIPS 2017, eq. (6) (the Fréchet distance).
    """
    judge = digits_judge() if judge is None else judge
    if heldout is None:
        from diffax.evaluation._digits import load_digits_reference

        heldout = load_digits_reference("test")[0]
    samples = to_digit_pixels(images)
    n = samples.shape[0]
    if n < 2:
        raise ValueError(f"judge_digits needs at least 2 images, got {n}.")
    real = to_digit_pixels(heldout)[:n]
    m = real.shape[0]
    chunks = [samples[i * m : (i + 1) * m] for i in range(n // m)]

    metrics = {f"judge/{k}": v for k, v in _scores(judge, samples).items()}
    metrics.update({f"judge/real_{k}": v for k, v in _scores(judge, real).items() if "/" not in k})
    real_confident = metrics["judge/real_confident_fraction"]
    metrics["judge/confident_ratio"] = metrics["judge/confident_fraction"] / real_confident
    metrics["judge/fd"] = float(np.mean([judge.frechet_to_train(chunk) for chunk in chunks]))
    metrics["judge/fd_floor"] = judge.frechet_to_train(real)
    metrics["judge/fd_ratio"] = metrics["judge/fd"] / metrics["judge/fd_floor"]
    return metrics


def judge_targets(metrics: Mapping[str, float]) -> dict[str, bool]:
    """The targets of the independent judge, checked on :func:`judge_digits` output.

    Returns:
      ``judge_confident_95pct_of_real`` (the samples' confident fraction at least 95% of the real
      digits'), ``judge_fd_within_1.3x_floor``, ``judge_near_zero_within_5pts`` (the near-zero pixel
      fraction within 5 percentage points of the real digits'), ``judge_classes_uniform`` (the
      chi-square test against uniform classes does not reject at the 1% level).
    """
    near_zero_gap = abs(metrics["judge/near_zero_fraction"] - metrics["judge/real_near_zero_fraction"])
    return {
        "judge_confident_95pct_of_real": metrics["judge/confident_ratio"] >= 0.95,
        "judge_fd_within_1.3x_floor": metrics["judge/fd_ratio"] <= 1.3,
        "judge_near_zero_within_5pts": near_zero_gap <= 0.05,
        "judge_classes_uniform": metrics["judge/class_chi2_pvalue"] >= 0.01,
    }
