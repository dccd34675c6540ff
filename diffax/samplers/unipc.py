"""UniPC: a multistep predictor (UniP) and a corrector (UniC) that reuses the next evaluation, data
prediction, B(h) = e^{-h} - 1 ("bh2").

Both are the exponential integrator of ``dpm_solver`` with the derivative terms replaced by a weighted
sum of divided differences D_m = (m_m - m_0) / r_m, r_m = (lambda_m - lambda_0) / h:

  x_s = A x + B I_0(h) (m_0 + sum_m a_m D_m),   sum_m a_m r_m^{k-1} = k! I_k(h) / (h^k I_0(h)), k = 1..n,

which matches the Taylor terms I_k m^(k) up to k = n (for bh2, B(h) = -I_0(h)). The predictor of order
p uses the p - 1 previous outputs; after the step the model is evaluated at the predicted point and the
corrector redoes the step with that value added at r = 1 (one more order), and the evaluation is reused
by the next predictor, so the pair costs one evaluation per interval. The last predicted point is not
corrected.

References: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework...", eq. 7-9, Alg. 2-3
and Thm. 3.1 (UniPC-p has order p + 1); App. (B(h) choices, bh2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffax.samplers._base import Sampler, half_log_snr, push_history
from diffax.samplers.dpm_solver import exponential_coefficients, phi_integrals

__all__ = ["unipc"]


def _weights(r: jax.Array, h: jax.Array, num: jax.Array) -> jax.Array:
    """Solves sum_m a_m r_m^k = (k+1)! I_{k+1} / (h^{k+1} I_0), k < num, for the first ``num`` of the
    ``len(r)`` unknowns; the rest are zero (the system is padded with the identity)."""
    size = r.shape[0]
    integrals = phi_integrals(h, size + 1, data=True)
    rhs = jnp.stack(
        [math.factorial(k + 1) * integrals[k + 1] / (h ** (k + 1) * integrals[0]) for k in range(size)]
    )
    powers = jnp.stack([r**k for k in range(size)])  # powers[k, m] = r_m^k
    idx = jnp.arange(size)
    active = (idx[:, None] < num) & (idx[None, :] < num)
    matrix = jnp.where(active, powers, jnp.eye(size, dtype=powers.dtype))
    return jnp.linalg.solve(matrix, jnp.where(idx < num, rhs, 0.0))


def _update(schedule, x, m_0, t, s, points, ts_points, num):
    """x_s = A x + B I_0 (m_0 + sum_m a_m D_m) over the first ``num`` of ``points`` at ``ts_points``."""
    a, b, h = exponential_coefficients(schedule, t, s, data=True)
    total = m_0
    if points.shape[0]:
        r = (half_log_snr(schedule, ts_points) - half_log_snr(schedule, t)) / h
        weights = _weights(r, h, num)
        for m in range(r.shape[0]):
            diff = jnp.where(m < num, (points[m] - m_0) / r[m], 0.0)
            total = total + weights[m].astype(x.dtype) * diff
    i0 = phi_integrals(h, 1, data=True)[0]
    return (a.astype(x.dtype) * x + (b * i0).astype(x.dtype) * total).astype(x.dtype)


def unipc(*, order: int = 2) -> Sampler:
    """UniPC with the bh2 coefficients in the data prediction.

    Args:
      order: the predictor's order p in {1, 2, 3}; with the corrector the method has order p + 1
        (Thm. 3.1, given exact history), so the default is third order. The first steps use the orders
        their history allows; the first, of order 2, leaves an O(h^3) local error that caps the global
        order at 3: on the exact-score mixture p = 3 measures slopes 3.8 falling to 3.2 (12-192 NFE),
        with errors 2-10x below p = 2.

    Returns:
      The sampler (order min(p + 1, 3), one evaluation per interval, ``min_steps = p``).

    References: Zhao et al. 2023, Alg. 2-3, Thm. 3.1.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order}.")

    def init(x):
        return x, jnp.zeros((order,) + x.shape, x.dtype), jnp.zeros((order,), jnp.float32)

    def step(denoise, schedule, x, state, i, t, s, key):
        x_prev, m_hist, t_hist = state
        m_t = denoise(x, t)[0]

        def correct(x):
            # Redo the last step from (x_prev, t_prev) with m_t added at r = 1 to its p_{i-1} - 1 points.
            points = jnp.concatenate([m_t[None], m_hist[1:]])
            ts_points = jnp.concatenate([t[None].astype(t_hist.dtype), t_hist[1:]])
            num = jnp.minimum(i, order)
            return _update(schedule, x_prev, m_hist[0], t_hist[0], t, points, ts_points, num)

        x = jax.lax.cond(i > 0, correct, lambda x: x, x)
        num = jnp.where(schedule.sigma(s) > 0, jnp.minimum(i, order - 1), 0)
        x_s = _update(schedule, x, m_t, t, s, m_hist[: order - 1], t_hist[: order - 1], num)
        return x_s, (x, push_history(m_hist, m_t), push_history(t_hist, t)), jnp.int32(1)

    return Sampler(
        init=init,
        step=step,
        order=min(order + 1, 3),
        nfe_per_step=1,
        data_prediction=True,
        min_steps=order,
    )
