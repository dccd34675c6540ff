"""An analytic Gaussian mixture over images: data whose density and score are known exactly.

Component ``k`` is ``N(mean_k, std² I)`` on ``image_shape``; the means are a fixed function of the seed.
Tests and samplers can compare generated images against this density; the training pipeline draws
from it through the same path as image datasets.
"""

import numpy as np


def mixture_means(*, num_components: int, image_shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Returns the component means, float32 ``(num_components, H, W, C)``, uniform in ``[-0.8, 0.8]``.

    Args:
      num_components: number of equally weighted components, at least 1.
      image_shape: ``(H, W, C)``.
      seed: integer seed; the means depend on nothing else.
    """
    if num_components < 1:
        raise ValueError(f"num_components={num_components} must be at least 1.")
    rng = np.random.default_rng([seed, 0x6D6978])
    return rng.uniform(-0.8, 0.8, size=(num_components, *image_shape)).astype(np.float32)


def mixture_sample(
    means: np.ndarray, *, std: float, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``size`` images from the equally weighted mixture with isotropic ``std``.

    Returns:
      ``(images, labels)``: float32 ``(size, H, W, C)`` and the int32 component of each, ``(size,)``.
    """
    labels = rng.integers(0, len(means), size=size).astype(np.int32)
    noise = rng.standard_normal((size, *means.shape[1:]), dtype=np.float32)
    return means[labels] + np.float32(std) * noise, labels
