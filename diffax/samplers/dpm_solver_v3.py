"""DPM-Solver-v3: the exponential integrator re-parameterised by empirical model statistics (EMS).

With N = sigma eps_theta and lambda = log(alpha / sigma), the probability-flow ODE dx/dlambda =
(d log alpha / dlambda) x - N is rewritten with three per-dimension functions of lambda:

  f = (N - l x) / alpha,  g = e^{-S(lambda_s, lambda)} f - B_s(lambda),  B_s(lambda) = int_{lambda_s}^lambda
  e^{-S(lambda_s, r)} b_r dr,  S(a, c) = int_a^c s,  L(a, c) = int_a^c l,

and its exact solution from lambda_s to lambda_t is (eq. 8-10)

  x_t = (alpha_t / alpha_s) e^{-L(lambda_s, lambda_t)} x_s
        - alpha_t int E(lambda) (g(lambda) + B_s(lambda)) dlambda
  with E = e^{-L(lambda, lambda_t) + S(lambda_s, lambda)}.

l minimises the first-order discretisation error (l = E[diag(grad_x N)], eq. 12) and s, b are the least-
squares fit f' ~ s f + b of f's derivative along the ODE (eq. 14), so g is nearly constant. g is expanded
in a Taylor series, its integrals I_k = int E (lambda - lambda_s)^k / k! computed by Gauss-Legendre
quadrature on the EMS (interpolated linearly between the statistics' lambda grid), and its derivatives
estimated from earlier steps exactly as DPM-Solver++(kM) does (``dpm_solver.multistep_sum``). With
l = 1, s = b = 0 (``ModelStatistics.degenerate``), f = -x_0, E = e^{-(lambda_t - lambda)}, the integrals
are DPM-Solver++'s and the predictor *is* DPM-Solver++(kM). A UniC-style corrector (on by default)
redoes each step with the next evaluation added, using Taylor weights from the interpolating polynomial.

``compute_statistics`` estimates l, s, b from a model and data: x_lambda = alpha x_0 + sigma z at every
point of a uniform lambda grid, l by Hutchinson's diagonal estimator E[v * (J v)] (forward-mode JVPs,
Rademacher v), then f' by a JVP along (dx/dlambda, 1), batched over the grid with ``vmap``, chunked with
``lax.map`` and sharded over the devices along the sample axis; the least-squares fit of s is ridge-
regularised towards 0 so that dimensions where f barely varies (constant background pixels) stay finite.
``ModelStatistics.save`` writes them (``.npz``); ``benchmarks/digits_sampling_methods.py --ems_file``
computes and writes them for a digits run.

References: Zheng, Lu, Chen & Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical
Model Statistics" (NeurIPS), eq. 6-16, Alg. 1-2, App. C (EMS estimation), D (multistep predictor-
corrector); Hutchinson 1990 (trace and diagonal estimation); Bekas et al. 2007 (diagonal estimator).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffax.samplers._base import Sampler, half_log_snr, push_history
from diffax.samplers.dpm_solver import multistep_sum
from diffax.schedules import Schedule

__all__ = ["ModelStatistics", "compute_statistics", "dpm_solver_v3"]

_NODES, _WEIGHTS = (np.asarray(v, np.float64) for v in np.polynomial.legendre.leggauss(16))


def _cumulative(grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Cumulative trapezoid integral of ``values`` (N + 1, ...) over ``grid`` (N + 1,), starting at 0."""
    steps = np.diff(grid).reshape((-1,) + (1,) * (values.ndim - 1))
    areas = 0.5 * steps * (values[1:] + values[:-1])
    return np.concatenate([np.zeros_like(values[:1]), np.cumsum(areas, axis=0)])


@dataclasses.dataclass(frozen=True, eq=False)
class ModelStatistics:
    """DPM-Solver-v3's empirical model statistics on an increasing half-log-SNR grid (float64 NumPy).

    Attributes:
      lambdas: (N + 1,) increasing lambda = log(alpha / sigma).
      l, s, b: (N + 1,) + the data's shape (without batch).
    """

    lambdas: np.ndarray
    l: np.ndarray  # noqa: E741 - the paper's name
    s: np.ndarray
    b: np.ndarray

    def __post_init__(self):
        arrays = {k: np.asarray(getattr(self, k), np.float64) for k in ("lambdas", "l", "s", "b")}
        lam = arrays["lambdas"]
        if lam.ndim != 1 or lam.shape[0] < 2 or not np.all(np.diff(lam) > 0):
            raise ValueError(f"lambdas must be 1-D, increasing, with >= 2 points; got shape {lam.shape}.")
        for name in ("l", "s", "b"):
            if arrays[name].shape[:1] != lam.shape or arrays[name].shape != arrays["l"].shape:
                raise ValueError(
                    f"{name} must have shape (len(lambdas),) + data shape like l {arrays['l'].shape}; got "
                    f"{arrays[name].shape}."
                )
            if not np.all(np.isfinite(arrays[name])):
                raise ValueError(f"statistic {name} is not finite.")
        for name, value in arrays.items():
            object.__setattr__(self, name, value)
        cum_s = _cumulative(lam, arrays["s"])
        cumulatives = (_cumulative(lam, arrays["l"]), cum_s, _cumulative(lam, np.exp(-cum_s) * arrays["b"]))
        object.__setattr__(self, "_cumulatives", cumulatives)

    @property
    def shape(self) -> tuple[int, ...]:
        """The data shape the statistics are for."""
        return self.l.shape[1:]

    @classmethod
    def degenerate(cls, lambdas: np.ndarray, shape: tuple[int, ...]) -> ModelStatistics:
        """l = 1, s = b = 0: DPM-Solver-v3 is then DPM-Solver++ (data prediction)."""
        lambdas = np.asarray(lambdas, np.float64)
        ones = np.ones((lambdas.shape[0],) + tuple(shape))
        return cls(lambdas, ones, 0 * ones, 0 * ones)

    def save(self, path: str) -> None:
        """Writes an ``.npz`` (no pickle)."""
        with open(path, "wb") as f:
            np.savez(f, lambdas=self.lambdas, l=self.l, s=self.s, b=self.b)

    @classmethod
    def load(cls, path: str) -> ModelStatistics:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["lambdas"], z["l"], z["s"], z["b"])

    def _at(self, lam: jax.Array, like: jax.Array) -> tuple[jax.Array, ...]:
        """(l, L, S, C) at half-log-SNRs ``lam`` (any shape), each lam.shape + (1,) + data shape, by
        linear interpolation (L, S, C: the cumulative integrals of l, s and e^{-S} b from lambdas[0])."""
        if like.shape[1:] != self.shape:
            raise ValueError(
                f"the statistics are for data of shape {self.shape}; got x of shape {like.shape}."
            )
        grid = jnp.asarray(self.lambdas, like.dtype)
        idx = jnp.clip(jnp.searchsorted(grid, lam, side="right") - 1, 0, grid.shape[0] - 2)
        w = ((lam - grid[idx]) / (grid[idx + 1] - grid[idx])).astype(like.dtype)
        w = w.reshape(w.shape + (1,) * like.ndim)
        out = []
        for table in (self.l, *self._cumulatives):
            table = jnp.asarray(table, like.dtype)[:, None]
            out.append((1.0 - w) * table[idx] + w * table[idx + 1])
        return tuple(out)


class _Degenerate:
    """l = 1, s = b = 0 in closed form (L = lambda, S = C = 0): DPM-Solver-v3 without statistics."""

    @staticmethod
    def _at(lam: jax.Array, like: jax.Array) -> tuple[jax.Array, ...]:
        lam = jnp.asarray(lam, like.dtype).reshape(jnp.shape(lam) + (1,) * like.ndim)
        zeros = jnp.zeros_like(lam)
        return jnp.ones_like(lam), lam, zeros, zeros


def _coefficients(stats, lam_c, lam_n, lams_hist, like):
    """Per-dimension (A, I_0..I_3, B-term) of the step lambda_c -> lambda_n and the maps taking f at
    the history's lambdas to g relative to lambda_c: g = scale * f - offset. Shapes (1,) + data shape
    (or broadcastable), so that they combine with a batch ``like``."""
    h = lam_n - lam_c
    _, cum_l_c, cum_s_c, cum_c_c = stats._at(lam_c, like)
    _, cum_l_n, _, _ = stats._at(lam_n, like)
    u = (0.5 * (jnp.asarray(_NODES, like.dtype) + 1.0)) * h  # Gauss-Legendre nodes on [0, h]
    weights = jnp.asarray(_WEIGHTS, like.dtype) * 0.5 * h
    _, cum_l_q, cum_s_q, cum_c_q = stats._at(lam_c + u, like)
    e = jnp.exp(-(cum_l_n[None] - cum_l_q) + cum_s_q - cum_s_c[None])  # (Q, 1, ...)
    weighted = weights.reshape((-1,) + (1,) * like.ndim) * e
    u_b = u.reshape((-1,) + (1,) * like.ndim)
    integrals = [jnp.sum(weighted * u_b**k / math.factorial(k), axis=0) for k in range(4)]
    b_term = jnp.sum(weighted * jnp.exp(cum_s_c)[None] * (cum_c_q - cum_c_c[None]), axis=0)
    decay = jnp.exp(-(cum_l_n - cum_l_c))
    _, _, cum_s_h, cum_c_h = stats._at(lams_hist, like)
    scale = jnp.exp(-(cum_s_h - cum_s_c[None]))
    offset = jnp.exp(cum_s_c)[None] * (cum_c_h - cum_c_c[None])
    return decay, integrals, b_term, scale, offset


def _taylor_sum(g_0, g_points, offsets, integrals, num):
    """I_0 g_0 + sum_k I_k c_k, c_k the derivatives at 0 of the polynomial through (0, g_0) and the
    first ``num`` (traced) of (offsets_j, g_j); the rest are masked out of the Vandermonde system."""
    size = offsets.shape[0]
    k = jnp.arange(1, size + 1)
    factorials = jnp.asarray([math.factorial(j) for j in range(1, size + 1)], offsets.dtype)
    active = (jnp.arange(size)[:, None] < num) & (k[None, :] <= num)
    vander = jnp.where(
        active, offsets[:, None] ** k[None, :] / factorials[None, :], jnp.eye(size, dtype=offsets.dtype)
    )
    weights = jnp.linalg.inv(vander)  # c = weights @ (g_j - g_0)
    total = integrals[0] * g_0
    for row in range(size):
        c_row = sum(
            jnp.where(col < num, weights[row, col], 0.0).astype(g_0.dtype) * (g_points[col] - g_0)
            for col in range(size)
        )
        total = total + jnp.where(row < num, 1.0, 0.0).astype(g_0.dtype) * integrals[row + 1] * c_row
    return total


def dpm_solver_v3(
    *, statistics: ModelStatistics | None = None, order: int = 3, corrector: bool = True
) -> Sampler:
    """DPM-Solver-v3's multistep predictor (and corrector) with the given model statistics.

    Args:
      statistics: the EMS (``compute_statistics``, ``ModelStatistics.load``); the sampling grid's
        lambdas should lie within ``statistics.lambdas`` (outside, the statistics are extrapolated
        linearly). None: l = 1, s = b = 0 in closed form (DPM-Solver++ with the corrector).
      order: the predictor's order k in {1, 2, 3}; the first steps use what their history allows.
      corrector: redo each step with the next evaluation added at r = 1 (one order more, no extra
        evaluation); the last step is not corrected.

    Returns:
      The sampler (one evaluation per interval, ``min_steps = order``; declared order k, the measured
      order of the DPM-Solver++(kM) predictor it generalises).

    References: Zheng et al. 2023, eq. 8-10, 14 and App. D.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order}.")
    if statistics is not None and not isinstance(statistics, ModelStatistics):
        raise ValueError(
            "statistics must be a diffax.samplers.dpm_solver_v3.ModelStatistics (compute_statistics or "
            f"ModelStatistics.load); got {type(statistics).__name__}."
        )
    num_hist = max(order - 1, 1)
    stats = _Degenerate() if statistics is None else statistics

    def f_of(schedule, x, eps, t, lam):
        l_t = stats._at(lam, x)[0]
        return (schedule.sigma(t).astype(x.dtype) * eps - l_t * x) / schedule.alpha(t).astype(x.dtype)

    def update(schedule, x, t, s, f_0, f_hist, t_hist, used):
        lam_c, lam_n = half_log_snr(schedule, t), half_log_snr(schedule, s)
        lams = jnp.concatenate([lam_c[None], half_log_snr(schedule, t_hist)])
        decay, integrals, b_term, scale, offset = _coefficients(stats, lam_c, lam_n, lams[1:], x)
        g_hist = scale * f_hist - offset
        total = multistep_sum(f_0, g_hist, lams, lam_n - lam_c, integrals[:3], used, order)
        ratio = (schedule.alpha(s) / schedule.alpha(t)).astype(x.dtype)
        return ratio * decay * x - schedule.alpha(s).astype(x.dtype) * (total + b_term)

    def correct(schedule, x_prev, t_prev, t, f_prev, f_new, f_hist, t_hist, num):
        """Redoes the step t_prev -> t from x_prev with f_new at t added (Taylor weights)."""
        lam_c, lam_n = half_log_snr(schedule, t_prev), half_log_snr(schedule, t)
        t_points = jnp.concatenate([t[None], t_hist])
        lams = half_log_snr(schedule, t_points)
        decay, integrals, b_term, scale, offset = _coefficients(stats, lam_c, lam_n, lams, x_prev)
        g_points = scale * jnp.concatenate([f_new[None], f_hist]) - offset
        total = _taylor_sum(f_prev, g_points, lams - lam_c, integrals, num)
        ratio = (schedule.alpha(t) / schedule.alpha(t_prev)).astype(x_prev.dtype)
        return ratio * decay * x_prev - schedule.alpha(t).astype(x_prev.dtype) * (total + b_term)

    def init(x):
        return x, jnp.zeros((num_hist + 1,) + x.shape, x.dtype), jnp.zeros((num_hist + 1,), jnp.float32)

    def step(denoise, schedule, x, state, i, t, s, key):
        x_prev, f_hist, t_hist = state  # f_hist[0] at t_hist[0] is the previous step's start
        # times not reached yet (t = 0 at init, lambda = inf) are masked out; keep them finite
        t_hist = jnp.where(jnp.arange(t_hist.shape[0]) < i, t_hist, t.astype(t_hist.dtype))
        eps = denoise(x, t)[1]
        lam_t = half_log_snr(schedule, t)
        f_t = f_of(schedule, x, eps, t, lam_t)
        if corrector:
            num = jnp.minimum(i, order)  # points beyond the expansion point: f_t and i - 1 older ones
            x = jax.lax.cond(
                i > 0,
                lambda x: correct(
                    schedule, x_prev, t_hist[0], t, f_hist[0], f_t, f_hist[1:order], t_hist[1:order], num
                ),
                lambda x: x,
                x,
            )
        used = jnp.minimum(i, order - 1)
        # an interval onto sigma = 0 (lambda = inf) takes the exact first-order step alpha_s x_0
        reaches_zero = schedule.sigma(s) <= 0
        s_safe = jnp.where(reaches_zero, t, s)
        x_s = update(schedule, x, t, s_safe, f_t, f_hist[:num_hist], t_hist[:num_hist], used)
        x0 = (x - schedule.sigma(t).astype(x.dtype) * eps) / schedule.alpha(t).astype(x.dtype)
        x_s = jnp.where(reaches_zero, schedule.alpha(s).astype(x.dtype) * x0, x_s)
        state = (x, push_history(f_hist, f_t), push_history(t_hist, t))
        return x_s, state, jnp.int32(1)

    return Sampler(init=init, step=step, order=order, nfe_per_step=1, data_prediction=False, min_steps=order)


# ----------------------------------------------------------------------------------------------
# Estimating the statistics


def _log_alpha_slope(schedule: Schedule, lam: jax.Array) -> jax.Array:
    """d log alpha / d lambda at half-log-SNR lam."""
    return jax.grad(lambda v: schedule.log_alpha(schedule.t_from_log_snr(2.0 * v)))(lam)


def _ode_state(schedule, model_eps, x, lam):
    """(N = sigma eps, dx/dlambda = (d log alpha / dlambda) x - N) at (x, lambda)."""
    t = schedule.t_from_log_snr(2.0 * lam)
    n = schedule.sigma(t).astype(x.dtype) * model_eps(x, jnp.full((x.shape[0],), t, jnp.float32))
    return n, _log_alpha_slope(schedule, lam).astype(x.dtype) * x - n


def _diagonal(schedule, model_eps, x0, lam, key):
    """E[v * (J_x N) v] over the batch: Hutchinson's estimate of E[diag grad_x N] (Rademacher v)."""
    k_noise, k_probe = jax.random.split(key)
    t = schedule.t_from_log_snr(2.0 * lam)
    x = schedule.alpha(t) * x0 + schedule.sigma(t) * jax.random.normal(k_noise, x0.shape, x0.dtype)
    v = jax.random.rademacher(k_probe, x0.shape, x0.dtype)
    _, jv = jax.jvp(lambda y: _ode_state(schedule, model_eps, y, lam)[0], (x,), (v,))
    return jnp.mean(v * jv, axis=0)


def _f_moments(schedule, model_eps, x0, lam, l_t, l_slope, key):
    """Batch means of f, f', f^2 and f f' at lambda (f' the derivative along the ODE)."""
    k_noise, _ = jax.random.split(key)
    t = schedule.t_from_log_snr(2.0 * lam)
    alpha = schedule.alpha(t)
    x = alpha * x0 + schedule.sigma(t) * jax.random.normal(k_noise, x0.shape, x0.dtype)

    def n_over_alpha(y, v):
        return _ode_state(schedule, model_eps, y, v)[0] / jnp.exp(
            schedule.log_alpha(schedule.t_from_log_snr(2 * v))
        )

    n, velocity = _ode_state(schedule, model_eps, x, lam)
    ratio, ratio_dot = jax.jvp(n_over_alpha, (x, lam), (velocity, jnp.ones_like(lam)))
    slope = _log_alpha_slope(schedule, lam).astype(x.dtype)
    # f = N / alpha - l x / alpha;  d(l x / alpha) = (l' x + l dx - l x dlog(alpha)) / alpha
    l_t, l_slope = l_t[None], l_slope[None]
    f = ratio - l_t * x / alpha
    f_dot = ratio_dot - (l_slope * x + l_t * velocity - l_t * x * slope) / alpha
    return jnp.stack([jnp.mean(v, axis=0) for v in (f, f_dot, f * f, f * f_dot)])


def compute_statistics(
    model_eps: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    data: np.ndarray,
    *,
    lambda_min: float,
    lambda_max: float,
    num_points: int = 200,
    key: jax.Array,
    chunk: int = 8,
    ridge: float = 1e-3,
) -> ModelStatistics:
    """DPM-Solver-v3's l, s, b of a noise-prediction model from data samples.

    At each of ``num_points + 1`` uniformly spaced lambdas the data is noised afresh (x = alpha x_0 +
    sigma z), l is the Hutchinson estimate of E[diag grad_x (sigma eps)] (one Rademacher probe per
    sample), and (s, b) the per-dimension least-squares fit of f' on f with f = (sigma eps - l x) /
    alpha; l' comes from finite differences of l on the grid. The fit is ridge-regularised towards
    s = 0: s = Cov(f', f) / (Var(f) + delta), b = E[f'] - s E[f], delta = ``ridge`` times the mean
    over dimensions of E[f^2] at that lambda. Where f barely varies over the data (a pixel that is
    background in every image: f = -x_0 is nearly constant) the plain ratio is estimation noise
    over almost nothing, its integral S overflows e^S and the solver diverges; the ridge sends s to
    0 there (an exact choice when f is constant: then f' = b for every s) and changes s by a factor
    Var / (Var + delta) elsewhere. The grid is ``vmap``-batched in chunks of
    ``chunk`` lambdas (``lax.map``) and the samples are sharded over all devices where they divide.

    Args:
      model_eps: ``model_eps(x, t) -> eps`` (convert other predictions first).
      schedule: the model's schedule.
      data: (K, ...) samples of the data (the more, the less noise in l, s, b).
      lambda_min, lambda_max: the lambda range; it must cover the sampling grids (t_start to t_end).
      num_points: grid intervals.
      key: noise and probes.
      chunk: lambdas per ``vmap`` batch.
      ridge: delta relative to the mean second moment of f (0: the plain least-squares fit).

    Returns:
      The statistics.
    """
    data = jnp.asarray(data, jnp.float32)
    if data.shape[0] < 2:
        raise ValueError(f"data must hold at least 2 samples (K, ...); got shape {data.shape}.")
    if not lambda_max > lambda_min:
        raise ValueError(f"need lambda_max > lambda_min; got {lambda_min}, {lambda_max}.")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0 (a fraction of the mean E[f^2]); got {ridge}.")
    devices = jax.devices()
    if data.shape[0] % len(devices) == 0:
        data = jax.device_put(data, NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data")))
    lambdas = np.linspace(lambda_min, lambda_max, num_points + 1)
    keys = jax.random.split(key, 2 * lambdas.shape[0]).reshape(2, lambdas.shape[0])
    pad = (-lambdas.shape[0]) % chunk

    def chunked(fn, *per_lambda):
        padded = [jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]) for a in per_lambda]
        grouped = [a.reshape((-1, chunk) + a.shape[1:]) for a in padded]
        out = jax.lax.map(lambda args: jax.vmap(fn)(*args), tuple(grouped))
        return out.reshape((-1,) + out.shape[2:])[: lambdas.shape[0]]

    lam = jnp.asarray(lambdas, jnp.float32)
    diag = jax.jit(
        lambda lam, keys: chunked(lambda v, k: _diagonal(schedule, model_eps, data, v, k), lam, keys)
    )
    l_values = np.asarray(diag(lam, keys[0]), np.float64)
    l_slope = np.gradient(l_values, lambdas, axis=0)
    moments = jax.jit(
        lambda lam, l_t, l_s, keys: chunked(
            lambda v, a, b, k: _f_moments(schedule, model_eps, data, v, a, b, k), lam, l_t, l_s, keys
        )
    )
    m = np.asarray(
        moments(lam, jnp.asarray(l_values, jnp.float32), jnp.asarray(l_slope, jnp.float32), keys[1])
    )
    mean_f, mean_df, mean_ff, mean_fdf = (m[:, j].astype(np.float64) for j in range(4))
    dims = tuple(range(1, mean_ff.ndim))
    delta = ridge * np.mean(mean_ff, axis=dims, keepdims=True)
    var_f = np.maximum(mean_ff - mean_f**2, 0.0) + np.maximum(delta, 1e-12)
    s = (mean_fdf - mean_f * mean_df) / var_f
    b = mean_df - s * mean_f
    return ModelStatistics(lambdas, l_values, s, b)
