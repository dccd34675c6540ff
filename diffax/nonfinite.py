"""Non-finite losses and gradients: stop the run naming the step, or skip the update and count it.

By default a NaN or infinite loss or gradient norm stops training at the next host check (every
``config.log.every_steps`` steps and before every checkpoint, so no non-finite state is ever saved)
with a ``FloatingPointError`` that names the first bad step. With ``config.optim.skip_nonfinite`` the
step is wrapped by :func:`skip_nonfinite_updates`: a bad update leaves parameters, EMA copies and
optimizer state as they were, the step counter still advances (the next step draws a new batch and
key), and the metric ``skipped`` counts it.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Step = Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]


def skip_nonfinite_updates(train_step: Step) -> Step:
    """Wraps ``train_step(state, batch) -> (state, metrics)`` to drop non-finite updates.

    Args:
      train_step: a step whose metrics hold ``loss`` and ``grad_norm`` (the gradient's global norm,
        non-finite as soon as one entry is) and whose state has an integer ``step`` field.

    Returns:
      The same step, returning the input state (with ``step + 1``) when the update is not finite, and
      the metric ``skipped``: 1 for a skipped update, else 0.
    """

    def step(state: Any, batch: Any) -> tuple[Any, dict[str, jax.Array]]:
        new_state, metrics = train_step(state, batch)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return kept.replace(step=new_state.step), metrics | {"skipped": (~finite).astype(jnp.int32)}

    return step


def check(stacked: dict[str, np.ndarray], *, first_step: int) -> None:
    """Raises if a window of per-step metrics holds a non-finite loss or gradient that was applied.

    Args:
      stacked: metrics of consecutive steps stacked on axis 0 (``loss``, ``grad_norm``, optional
        ``skipped``).
      first_step: the number of updates before the window's first row.

    Raises:
      FloatingPointError: naming the first bad step (counted from 1) and the value.
    """
    loss, grad_norm = stacked["loss"], stacked["grad_norm"]
    bad = ~np.isfinite(loss) | ~np.isfinite(grad_norm)
    if "skipped" in stacked:
        bad &= stacked["skipped"] == 0
    if not bad.any():
        return
    row = int(np.argmax(bad))
    what = f"loss {loss[row]}" if not np.isfinite(loss[row]) else f"gradient (global norm {grad_norm[row]})"
    raise FloatingPointError(
        f"non-finite {what} at step {first_step + row + 1}; the last checkpoint before it is intact."
        " Lower config.optim.lr, enable config.optim.grad_clip, or set config.optim.skip_nonfinite=True"
        " to skip such updates."
    )


def window_means(stacked: dict[str, np.ndarray]) -> dict[str, float]:
    """Means of a window's metrics over the updates applied; ``skipped`` is summed instead.

    Args:
      stacked: metrics of consecutive steps stacked on axis 0.

    Returns:
      One float per metric (NaN when every update of the window was skipped).
    """
    applied = stacked["skipped"] == 0 if "skipped" in stacked else np.ones(len(stacked["loss"]), bool)
    means = {k: float(np.mean(v[applied])) if applied.any() else float("nan") for k, v in stacked.items()}
    if "skipped" in stacked:
        means["skipped"] = float(np.sum(stacked["skipped"]))
    return means


__all__ = ["check", "skip_nonfinite_updates", "window_means"]
