"""Bits per dimension of a test split, by the variational bound or by the probability-flow ODE.

Both stream the split in batches and return the mean and its standard error over images.

References: Ho et al. 2020, eq. 5 and Sec. 4.2 (VLB in bits/dim, all T terms plus the prior);
Song et al. 2021, App. D.2 (probability-flow likelihood with uniform dequantization).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np
from jax.typing import ArrayLike

from diffax.likelihood import log_likelihood
from diffax.losses import vlb_bpd
from diffax.schedules import DiscreteSchedule, Schedule

__all__ = ["BPD_METHODS", "bits_per_dim"]

BPD_METHODS = ("vlb", "ode")


def bits_per_dim(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    images: ArrayLike,
    *,
    method: str,
    key: jax.Array,
    prediction: str = "eps",
    batch_size: int = 256,
    learned_variance: bool = False,
    bits: int = 8,
    **ode_kwargs,
) -> dict[str, float]:
    """Mean bits/dim of ``images`` (b-bit data scaled to [-1, 1]) under the model.

    Args:
      model_fn: ``model_fn(x_t, t) -> output`` with the parameters bound.
      schedule: the model's schedule; ``"vlb"`` needs a discrete one.
      images: shape (N, ...), values k / (2^bits - 1) * 2 - 1.
      method: ``"vlb"``: the full bound (T terms, discretized Gaussian decoder, prior KL; the decoder
        uses 2^bits bins). ``"ode"``: the probability-flow ODE with uniform dequantization
        (Hutchinson trace unless ``trace="exact"`` is passed in ``ode_kwargs``).
      key: PRNG key; each batch folds in its index.
      prediction: what the network predicts.
      batch_size: images per model batch (the last batch may be smaller).
      learned_variance: the network has a learned-variance head (``"vlb"`` only).
      bits: bit depth of the data.
      **ode_kwargs: forwarded to ``diffax.log_likelihood`` (solver, rtol, atol, trace, ...).

    Returns:
      ``{"bpd": mean, "bpd_sem": standard error, "num_images": N}`` (and ``"nfe"`` per image for
      ``"ode"``).
    """
    if method not in BPD_METHODS:
        raise ValueError(f"Unknown bits/dim method {method!r}; known: {', '.join(BPD_METHODS)}.")
    if method == "vlb" and not isinstance(schedule, DiscreteSchedule):
        raise ValueError("method='vlb' needs a discrete schedule (the bound sums its T steps); use 'ode'.")
    if method == "vlb" and bits != 8:
        raise ValueError("method='vlb' uses DDPM's 256-bin decoder: bits must be 8.")
    images = np.asarray(images)
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images must have shape (N, ...) with N > 0; got {images.shape}.")
    if method == "vlb":
        run = jax.jit(
            lambda x, k: vlb_bpd(
                schedule, model_fn, x, k, prediction=prediction, learned_variance=learned_variance
            )[0]
        )
    per_image, nfe = [], []
    for i, start in enumerate(range(0, images.shape[0], batch_size)):
        batch = images[start : start + batch_size].astype(np.float32)
        batch_key = jax.random.fold_in(key, i)
        if method == "vlb":
            per_image.append(np.asarray(run(batch, batch_key), np.float64))
        else:
            result = log_likelihood(
                model_fn, schedule, batch, prediction=prediction, key=batch_key, dequantize=bits, **ode_kwargs
            )
            per_image.append(np.asarray(result.bits_per_dim, np.float64))
            nfe.append(float(result.nfe))
    values = np.concatenate(per_image)
    out = {
        "bpd": float(values.mean()),
        "bpd_sem": float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0,
        "num_images": int(values.size),
    }
    if nfe:
        out["nfe"] = float(np.mean(nfe))
    return out
