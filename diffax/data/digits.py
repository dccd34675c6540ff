"""scikit-learn's bundled 8×8 handwritten digits as a uint8 image set: no download, any integer upsampling.

The 1,797 images ship inside scikit-learn. Pixel values 0..16 map linearly onto 0..255, and an
integer factor ``u`` repeats every pixel into a ``u``×``u`` block, so averaging ``u``×``u`` blocks of
an upsampled image recovers the original exactly (what a digits metric at 8×8 relies on).
"""

import numpy as np

SPLITS = ("train", "test", "all")
NUM_CLASSES = 10
_NUM_TRAIN = 1500  # of 1797; the remaining 297 images form the held-out "test" split


def load_digits(*, split: str = "train", upsample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Returns the digits images and labels.

    Args:
      split: ``"train"`` (first 1,500 images of a fixed shuffle), ``"test"`` (the other 297), or ``"all"``.
      upsample: positive integer; each pixel becomes an ``upsample``×``upsample`` block.

    Returns:
      ``(images, labels)``: uint8 ``(N, 8·upsample, 8·upsample, 1)`` and int32 ``(N,)`` in 0..9.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a digits split; use one of {SPLITS}.")
    if int(upsample) != upsample or upsample < 1:
        raise ValueError(f"upsample={upsample!r} must be a positive integer.")
    from sklearn import datasets as sk_datasets  # imported on use: scikit-learn is slow to import

    bunch = sk_datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    order = {"train": order[:_NUM_TRAIN], "test": order[_NUM_TRAIN:], "all": np.arange(len(order))}[split]
    images = np.round(bunch.images[order] * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(np.repeat(images, upsample, axis=1), upsample, axis=2)[..., None]
    return images, bunch.target[order].astype(np.int32)
