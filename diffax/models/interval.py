"""Two-time conditioning: networks of an interval [r, t] (MeanFlow's u(z, r, t), a shortcut model's
s(x, t, d)) take t of shape (batch, 2), the time and the interval length t - r, each embedded and summed.

References: Geng et al. 2025, "Mean Flows for One-step Generative Modeling", Sec. 4.3 (the network
conditioned on (t, t - r)); Frans et al. 2024, "One Step Diffusion via Shortcut Models", Sec. 3 (on the
step size d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["split_times"]


def split_times(
    owner: str, x: jax.Array, t: jax.Array, *, enabled: bool
) -> tuple[jax.Array, jax.Array | None]:
    """(t, interval) from ``t``: with ``enabled`` (the module's ``interval_embedding``) t is (B,) or (B, 2)
    and the interval is its second column (zero for (B,)); otherwise t passes unchanged and the interval
    is ``None``."""
    if not enabled:
        return t, None
    if t.ndim == 2:
        if t.shape != (x.shape[0], 2):
            raise ValueError(
                f"{owner}: with interval_embedding, t must have shape (batch,) or (batch, 2) = "
                f"({x.shape[0]}, 2) (time, interval); got {t.shape}."
            )
        return t[:, 0], t[:, 1]
    return t, jnp.zeros_like(t)
