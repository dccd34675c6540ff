"""FID against the reference batches of the ADM evaluator (openai/guided-diffusion ``evaluations/``).

The papers' ImageNet numbers (ADM, DiT) are Fréchet distances between Inception pool3 statistics of
a sample batch and of a reference batch, both ``.npz`` files: images in ``arr_0`` (uint8 NHWC), or
precomputed statistics ``mu`` (d,) and ``sigma`` (d, d) (the evaluator's ``read_statistics``; e.g.
``VIRTUAL_imagenet256_labeled.npz``). Files are read with ``allow_pickle=False``.

The evaluator computes features with TensorFlow's Inception graph, which resizes inside the graph;
diffax's ``InceptionV3`` holds the same weights and resizes as pytorch-fid does, so a score read off
precomputed ``mu``/``sigma`` is comparable up to that resize (see ``_inception``); recomputing the
reference statistics from ``arr_0`` with the same extractor removes the difference.
"""

from __future__ import annotations

import os

import numpy as np

from diffax.evaluation._frechet import frechet_distance
from diffax.evaluation._harness import Extractor
from diffax.evaluation._stats import feature_mean_cov, init_feature_stats, update_feature_stats


def read_image_batch(path: str | os.PathLike) -> np.ndarray:
    """The uint8 NHWC images of a sample or reference batch (``arr_0``, or diffax's ``images``)."""
    with np.load(path, allow_pickle=False) as f:
        key = next((k for k in ("arr_0", "images") if k in f.files), None)
        if key is None:
            raise ValueError(f"{path}: no images ('arr_0' or 'images'); found {f.files}.")
        images = f[key]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{path}: {key} must be uint8 (N, H, W, C); got {images.dtype}{images.shape}.")
    return images


def reference_batch_stats(
    path: str | os.PathLike, *, extractor: Extractor | None = None, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of an ADM reference batch: its ``mu``/``sigma``, else features of its ``arr_0`` images.

    Args:
      path: the ``.npz`` file.
      extractor: maps [-1, 1] float image batches to ``(features, logits)``; needed for image files.
      batch_size: images per extractor call.
    """
    with np.load(path, allow_pickle=False) as f:
        if "mu" in f.files and "sigma" in f.files:
            return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    if extractor is None:
        raise ValueError(f"{path} holds images, not mu/sigma; pass an extractor (the InceptionV3 weights).")
    return image_batch_stats(read_image_batch(path), extractor=extractor, batch_size=batch_size)


def image_batch_stats(
    images: np.ndarray, *, extractor: Extractor, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance (ddof 1, as ``np.cov`` in the evaluator) of uint8 NHWC images,
    scaled to [-1, 1] one batch at a time."""
    stats = None
    for start in range(0, images.shape[0], batch_size):
        features, _ = extractor(images[start : start + batch_size].astype(np.float32) / 127.5 - 1.0)
        stats = init_feature_stats(features.shape[1]) if stats is None else stats
        stats = update_feature_stats(stats, features)
    if stats is None:
        raise ValueError("the image batch is empty.")
    return feature_mean_cov(stats, ddof=1)


def fid_against_reference(
    samples: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    extractor: Extractor,
    batch_size: int = 500,
) -> float:
    """FID of a sample batch ``.npz`` (``arr_0``/``images``) against an ADM reference batch ``.npz``.

    References: Heusel et al. 2017, eq. (6); Dhariwal & Nichol 2021, App. (the evaluator).
    """
    mu_s, sigma_s = image_batch_stats(read_image_batch(samples), extractor=extractor, batch_size=batch_size)
    mu_r, sigma_r = reference_batch_stats(reference, extractor=extractor, batch_size=batch_size)
    if mu_r.shape != mu_s.shape:
        raise ValueError(f"{reference}: mu has shape {mu_r.shape}; the extractor gives {mu_s.shape}.")
    return frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
