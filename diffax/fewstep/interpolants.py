"""Stochastic interpolants and reflow: x_t = a(t) x_1 + c(t) x_0 + gamma(t) z between noise x_0 ~ N(0, I)
and data x_1, their velocity and denoiser losses, ODE/SDE samplers with a tunable diffusion, and reflow
pairs of a flow written as resumable array chunks.

Interpolants (Albergo, Boffi & Vanden-Eijnden 2023, Sec. 2-3): ``"linear"`` a = t, c = 1 - t;
``"trig"`` a = sin(pi t / 2), c = cos(pi t / 2); either with the latent term gamma(t) = sqrt(g t (1 - t)).
The velocity b(t, x) = E[a' x_1 + c' x_0 + gamma' z | x_t = x] minimises
L_b = E[|b^|^2 - 2 (a' x_1 + c' x_0 + gamma' z) . b^] (eq. 2.13), the denoiser eta(t, x) = E[z | x_t = x]
minimises L_eta = E[|eta^|^2 - 2 z . eta^] (eq. 2.15), and s = -eta / gamma is the score of the
gamma-part. The generative SDE dX = (b + eps s) dt + sqrt(2 eps) dW has the interpolant's marginals for
every eps >= 0 (Thm. 2.21 / eq. 2.32); eps = 0 is the probability-flow ODE.

As a diffax schedule (:class:`InterpolantSchedule`, ``schedules.get("interpolant", kind=...,
gamma_scale=...)``) the interpolant runs in tau = 1 - t with alpha = a and sigma = sqrt(c^2 + gamma^2):
c x_0 + gamma z is one Gaussian of that std and E[c' x_0 + gamma' z | x] = sigma' E[eps | x], so b is the
schedule's probability-flow velocity and every deterministic diffax sampler integrates it; the SDE with
its tunable eps is the ``"interpolant_sde"`` sampler (``diffax.samplers.interpolant``).

Rectified flow is the linear interpolant with g = 0 (Liu et al. 2023); reflow retrains it on pairs
(x_0, ODE(x_0)) of the previous flow (Sec. 2.3), which :func:`write_reflow_pairs` generates.

References: Albergo, Boffi, Vanden-Eijnden 2023, "Stochastic Interpolants: A Unifying Framework for
Flows and Diffusions"; Liu, Gong, Liu 2023, "Flow Straight and Fast", eq. 1 and Alg. 1.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.typing import ArrayLike

from diffax.schedules import Schedule

__all__ = [
    "INTERPOLANTS",
    "Interpolant",
    "InterpolantSchedule",
    "denoiser_loss",
    "velocity_loss",
    "write_reflow_pairs",
]

INTERPOLANTS = ("linear", "trig")


@dataclasses.dataclass(frozen=True)
class Interpolant:
    """x_t = a(t) x_1 + c(t) x_0 + gamma(t) z on t in [0, 1] (t = 0 noise, t = 1 data).

    Attributes:
      kind: ``"linear"`` or ``"trig"``.
      gamma_scale: g in gamma(t) = sqrt(g t (1 - t)); 0 is a deterministic interpolant.
    """

    kind: str = "linear"
    gamma_scale: float = 0.0

    def __post_init__(self):
        if self.kind not in INTERPOLANTS:
            raise ValueError(f"kind: unknown interpolant {self.kind!r}; known: {', '.join(INTERPOLANTS)}.")
        if self.gamma_scale < 0:
            raise ValueError(f"gamma_scale: {self.gamma_scale} must be >= 0.")

    def coefficients(self, t: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(a, c, gamma) at t (in float32 or wider)."""
        t = jnp.asarray(t)
        t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
        if self.kind == "linear":
            a, c = t, 1.0 - t
        else:
            a, c = jnp.sin(0.5 * math.pi * t), jnp.cos(0.5 * math.pi * t)
        if self.gamma_scale == 0.0:  # not sqrt(0), whose derivative is not finite
            return a, c, jnp.zeros_like(t)
        return a, c, jnp.sqrt(self.gamma_scale * t * (1.0 - t))

    def derivatives(self, t: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(a', c', gamma') at t (forward-mode derivatives of :meth:`coefficients`)."""
        t = jnp.asarray(t)
        t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
        return jax.jvp(self.coefficients, (t,), (jnp.ones_like(t),))[1]

    def sample(self, x0: jax.Array, x1: jax.Array, z: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x_t, the velocity target a' x_1 + c' x_0 + gamma' z) for per-example t (batch,)."""
        b = lambda v: v.reshape((-1,) + (1,) * (x1.ndim - 1)).astype(x1.dtype)
        a, c, gamma = (b(v) for v in self.coefficients(t))
        da, dc, dgamma = (b(v) for v in self.derivatives(t))
        return a * x1 + c * x0 + gamma * z, da * x1 + dc * x0 + dgamma * z


def _flat_dot(u: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.sum((u * v).reshape(u.shape[0], -1), axis=-1)


def velocity_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example |b^|^2 - 2 target . b^ (eq. 2.13); minimised by b = E[target | x_t]."""
    return _flat_dot(prediction, prediction) - 2.0 * _flat_dot(target, prediction)


def denoiser_loss(prediction: jax.Array, z: jax.Array) -> jax.Array:
    """Per-example |eta^|^2 - 2 z . eta^ (eq. 2.15); minimised by eta = E[z | x_t]."""
    return velocity_loss(prediction, z)


@struct.dataclass
class InterpolantSchedule(Schedule):
    """An :class:`Interpolant` as a diffax schedule in tau = 1 - t (tau = 0 data, 1 noise): alpha(tau) =
    a(1 - tau), sigma(tau) = sqrt(c^2 + gamma^2)(1 - tau)."""

    kind: str = struct.field(pytree_node=False, default="linear")
    gamma_scale: float = struct.field(pytree_node=False, default=0.0)
    t_min: float = struct.field(pytree_node=False, default=0.0)
    t_max: float = struct.field(pytree_node=False, default=1.0)

    def __post_init__(self):
        Interpolant(self.kind, self.gamma_scale)  # checks kind and gamma_scale

    @property
    def interpolant(self) -> Interpolant:
        return Interpolant(self.kind, self.gamma_scale)

    def _log_alpha(self, t):
        return jnp.log(self.interpolant.coefficients(1.0 - t)[0])

    def _log_sigma(self, t):
        _, c, gamma = self.interpolant.coefficients(1.0 - t)
        return 0.5 * jnp.log(jnp.square(c) + jnp.square(gamma))

    def _log_snr(self, t):
        return 2.0 * (self._log_alpha(t) - self._log_sigma(t))

    def _t_from_log_snr(self, log_snr):
        """Bisection: the log-SNR falls monotonically in tau."""

        def halve(_, bounds):
            low, high = bounds
            mid = 0.5 * (low + high)
            above = self._log_snr(mid) > log_snr
            return jnp.where(above, mid, low), jnp.where(above, high, mid)

        low, high = jnp.zeros_like(log_snr), jnp.ones_like(log_snr)
        low, high = jax.lax.fori_loop(0, 60, halve, (low, high))
        return 0.5 * (low + high)


def write_reflow_pairs(
    flow: Callable[[jax.Array], jax.Array],
    directory: str,
    *,
    shape: tuple[int, ...],
    num_chunks: int,
    chunk_size: int,
    seed: int,
) -> list[str]:
    """Writes reflow pairs (x_0, flow(x_0)) as ``pairs_<k>.npz`` chunks (arrays ``noise``, ``image``).

    Resumable and sharded: chunk k draws its noise from ``fold_in(key(seed), k)`` alone, a chunk already on
    disk is skipped, and process p of P writes the chunks k = p mod P. Each file is written beside and
    renamed into place, so an interrupted job never leaves a partial chunk.

    Args:
      flow: maps noise (chunk_size, *shape) to its end point (e.g. a jitted ``diffax.sample`` of the
        1-rectified flow with a deterministic sampler).
      directory: where the chunks go.
      shape: one example's shape.
      num_chunks, chunk_size: how many pairs, in chunks.
      seed: the noise seed.

    Returns:
      The paths of this process's chunks.

    References: Liu et al. 2023, Alg. 1 (reflow: "(Z_0, Z_1) = (X_0, ODE_1(X_0))").
    """
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k in range(jax.process_index(), num_chunks, jax.process_count()):
        path = os.path.join(directory, f"pairs_{k:05d}.npz")
        paths.append(path)
        if os.path.exists(path):
            continue
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), k), (chunk_size, *shape))
        image = flow(noise)
        partial = path + ".partial.npz"
        np.savez(partial, noise=np.asarray(noise), image=np.asarray(image))
        os.replace(partial, path)
    return paths
