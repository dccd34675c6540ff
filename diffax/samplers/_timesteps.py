"""Time grids for sampling: decreasing ``ts`` with ``num_steps + 1`` entries."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffax.schedules import DiscreteSchedule, Schedule

__all__ = ["timesteps", "SPACINGS", "INTEGER_SPACINGS"]

SPACINGS = ("uniform_t", "uniform_logsnr", "quadratic", "karras")
INTEGER_SPACINGS = ("leading", "trailing", "linspace")

# Where sigma(t_min) vanishes (or alpha(t_max) does) the default grid stops this fraction of the range short
# of it, the epsilon of Song et al. 2021 (App. C, 1e-3 for VP) and DPM-Solver (Lu et al. 2022, App. D).
# "Vanishes" is below _NOISE_FLOOR: VP schedules at t = 0 have sigma = 0 up to float32 rounding (2e-4 for
# vp_cosine), while VE and EDM keep their sigma_min (>= 2e-3).
_EDGE = 1e-3
_NOISE_FLOOR = 1e-3


def default_range(schedule: Schedule, t_start, t_end) -> tuple[float, float]:
    """(t_start, t_end) with the defaults filled in: t_max and t_min, moved inside by 1e-3 of the range
    where alpha(t_max) or sigma(t_min) vanishes."""
    span = schedule.t_max - schedule.t_min
    if t_start is None:
        t_start = schedule.t_max
        if float(schedule.alpha(t_start)) < _NOISE_FLOOR:
            t_start = schedule.t_max - _EDGE * span
    if t_end is None:
        t_end = schedule.t_min
        if float(schedule.sigma(t_end)) < _NOISE_FLOOR:
            t_end = schedule.t_min + _EDGE * span
    return float(t_start), float(t_end)


def default_edges(schedule: Schedule) -> tuple[jax.Array, jax.Array]:
    """``default_range``'s (t_start, t_end) as arrays, for a schedule whose parameters may be traced."""
    span = schedule.t_max - schedule.t_min
    high = jnp.where(
        schedule.alpha(schedule.t_max) < _NOISE_FLOOR, schedule.t_max - _EDGE * span, schedule.t_max
    )
    low = jnp.where(
        schedule.sigma(schedule.t_min) < _NOISE_FLOOR, schedule.t_min + _EDGE * span, schedule.t_min
    )
    return high, low


def _integer_indices(num_train: int, num_steps: int, spacing: str) -> np.ndarray:
    """diffusers' integer grids, decreasing grid indices 0..T-1."""
    if spacing == "leading":
        return (np.arange(num_steps) * (num_train // num_steps))[::-1]
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / num_steps)).astype(np.int64) - 1
    return np.round(np.linspace(0, num_train - 1, num_steps)).astype(np.int64)[::-1]


def timesteps(
    schedule: Schedule,
    *,
    num_steps: int,
    spacing: str = "uniform_logsnr",
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float = 7.0,
    path: str | None = None,
) -> jax.Array:
    """A decreasing time grid t_0 = t_start > ... > t_N = t_end for sampling.

    Spacings:
      - ``"uniform_t"``: uniform in t;
      - ``"uniform_logsnr"``: uniform in log-SNR (Lu et al. 2022, Sec. 3.3);
      - ``"quadratic"``: t - t_end grows quadratically with the step index (Song et al. 2021, DDIM,
        App. D.2);
      - ``"karras"``: sigma~ = sigma / alpha uniform in sigma~^(1/rho) (Karras et al. 2022, eq. 5);
      - for ``DiscreteSchedule`` also diffusers' integer grids ``"leading"`` (i = k floor(T / N)),
        ``"trailing"`` (i = round(T - k T / N) - 1) and ``"linspace"`` (round(linspace(0, T-1, N))),
        mapped to t = (i + 1) / T and followed by t_end (default 0, the anchor x_0);
      - ``"file"``: the grid stored at ``path`` by ``diffax.schedule_search.save`` (a searched grid).

    Args:
      schedule: the noise schedule.
      num_steps: N, the number of intervals (>= 1).
      spacing: one of the spacings above.
      t_start: the first time; default ``t_max`` (or just below it where alpha(t_max) = 0). Not
        accepted by the integer spacings.
      t_end: the last time; default ``t_min`` (or 1e-3 of the range above it where sigma(t_min) = 0;
        0 for the integer spacings).
      rho: the exponent of the ``"karras"`` spacing.
      path: the ``.npz`` of the ``"file"`` spacing.

    Returns:
      ``ts``, float32 of shape (num_steps + 1,), strictly decreasing.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps}.")
    num_steps = int(num_steps)
    if spacing == "file":
        return _file_timesteps(schedule, num_steps, path)
    if spacing in INTEGER_SPACINGS:
        return _integer_timesteps(schedule, num_steps, spacing, t_start, t_end)
    if spacing not in SPACINGS:
        known = SPACINGS + (INTEGER_SPACINGS if isinstance(schedule, DiscreteSchedule) else ()) + ("file",)
        raise ValueError(f"Unknown spacing {spacing!r}; known spacings: {', '.join(known)}.")
    t_start, t_end = default_range(schedule, t_start, t_end)
    schedule.check_t(np.array([t_start, t_end]), name="t_start/t_end")
    if not t_start > t_end:
        raise ValueError(f"t_start must be > t_end; got t_start={t_start:g}, t_end={t_end:g}.")
    if spacing == "karras" and not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho}.")
    ts, lam_ends = _continuous_grid(
        schedule, jnp.float32(t_start), jnp.float32(t_end), spacing=spacing, num_steps=num_steps, rho=rho
    )
    if spacing in ("uniform_logsnr", "karras") and not np.all(np.isfinite(np.asarray(lam_ends))):
        raise ValueError(
            f"spacing {spacing!r} needs a finite log-SNR at t_start and t_end (alpha > 0, sigma > 0); "
            f"got t_start={t_start:g}, t_end={t_end:g}: move them inside the schedule's range."
        )
    if not np.all(np.diff(np.asarray(ts)) < 0):
        raise ValueError(
            f"num_steps={num_steps} is too fine for float32 times between {t_start:g} and {t_end:g}: "
            "the grid is not strictly decreasing."
        )
    return ts


@functools.partial(jax.jit, static_argnames=("spacing", "num_steps", "rho"))
def _continuous_grid(schedule, t_start, t_end, *, spacing, num_steps, rho):
    """The grid of a continuous spacing (one compiled program) and the log-SNR at both ends."""
    u = jnp.linspace(0.0, 1.0, num_steps + 1)
    lam_start, lam_end = schedule.log_snr(t_start), schedule.log_snr(t_end)
    if spacing == "uniform_t":
        ts = t_start + u * (t_end - t_start)
    elif spacing == "quadratic":
        ts = t_end + (t_start - t_end) * jnp.square(1.0 - u)
    elif spacing == "uniform_logsnr":
        ts = schedule.t_from_log_snr(lam_start + u * (lam_end - lam_start))
    else:  # karras: sigma~ = exp(-lambda / 2) uniform in sigma~^(1 / rho)
        root_start, root_end = jnp.exp(-lam_start / (2 * rho)), jnp.exp(-lam_end / (2 * rho))
        ts = schedule.t_from_log_snr(-2.0 * rho * jnp.log(root_start + u * (root_end - root_start)))
    ts = ts.astype(jnp.float32).at[0].set(t_start).at[-1].set(t_end)
    return ts, jnp.stack([lam_start, lam_end])


def _integer_timesteps(schedule, num_steps, spacing, t_start, t_end) -> jax.Array:
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError(
            f"spacing {spacing!r} needs a DiscreteSchedule; got {type(schedule).__name__}: use one of "
            f"{', '.join(SPACINGS)}."
        )
    if t_start is not None:
        raise ValueError(f"spacing {spacing!r} fixes t_start by the grid; leave t_start=None.")
    num_train = schedule.num_timesteps
    if num_steps > num_train:
        raise ValueError(f"num_steps must be <= num_timesteps ({num_train}); got {num_steps}.")
    indices = _integer_indices(num_train, num_steps, spacing)
    grid = (indices.astype(np.float64) + 1.0) / num_train
    t_end = 0.0 if t_end is None else float(t_end)
    if not 0.0 <= t_end < grid[-1]:
        raise ValueError(f"t_end must lie in [0, {grid[-1]:g}) for this grid; got {t_end:g}.")
    return jnp.asarray(np.append(grid, t_end), jnp.float32)


def _file_timesteps(schedule: Schedule, num_steps: int, path: str | None) -> jax.Array:
    """A stored grid (``schedule_search.save``), checked against num_steps and the schedule."""
    if path is None:
        raise ValueError('spacing="file" needs path=<.npz written by diffax.schedule_search.save>.')
    with np.load(path, allow_pickle=False) as z:
        if "timesteps" not in z:
            raise ValueError(f"{path}: no 'timesteps' array (write it with diffax.schedule_search.save).")
        ts = np.asarray(z["timesteps"], np.float32)
    if ts.shape != (num_steps + 1,):
        raise ValueError(f"{path} holds a {ts.shape[0] - 1}-step grid; num_steps={num_steps}.")
    if not np.all(np.diff(ts) < 0):
        raise ValueError(f"{path}: the grid is not strictly decreasing.")
    schedule.check_t(ts, name="timesteps")
    return jnp.asarray(ts)
