"""The consistency-model core: boundary parameterization, grids, curricula, targets, distances, weights.

Everything is written in EDM's scaled variables, y = x / alpha and sigma~ = sigma / alpha (written
``sigma`` here), in which the probability-flow ODE of every schedule is dy / d sigma = eps
(Karras et al. 2022, eq. 4). A network keeps its own schedule, time convention and prediction type:
:func:`scaled_denoiser` turns it into the denoiser D(y, sigma), and :func:`consistency_function` adds
the boundary condition f(y, sigma_min) = y on top of D (Song et al. 2023, App. C).

The loss (Song et al. 2023, eq. 7 and 10) compares the online network at the larger grid level
sigma_{n+1} with the target network at sigma_n, where the target point is one step of a diffax sampler
with the teacher's denoiser (distillation) or x_0 + sigma_n z from the same noise (training, i.e. the
sampler step with D := x_0).

References: Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models" (CM), Sec. 3-5, App. C, Table 3;
Song & Dhariwal 2024, "Improved Techniques for Training Consistency Models" (iCT), Sec. 3.3-3.5;
Karras et al. 2022, eq. 5 (the grid) and Table 1 (preconditioning).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from diffax.parameterization import edm_preconditioning, to_x0_eps
from diffax.process import broadcast_to_data
from diffax.schedules import EDM, Schedule

__all__ = [
    "CURRICULA",
    "DISTANCES",
    "INDEX_DISTRIBUTIONS",
    "WEIGHTINGS",
    "ConsistencySpec",
    "boundary_scalings",
    "cm_num_scales",
    "cm_target_decay",
    "consistency_function",
    "consistency_loss",
    "distance",
    "ect_lower_level",
    "ict_num_scales",
    "karras_sigmas",
    "lognormal_index_probs",
    "pseudo_huber_c",
    "scaled_denoiser",
    "schedule_time",
    "teacher_step",
    "update_target",
]

DISTANCES = ("l2", "l1", "pseudo_huber")
WEIGHTINGS = ("uniform", "inverse_dsigma")
CURRICULA = ("fixed", "cm", "ict", "ect")
INDEX_DISTRIBUTIONS = ("uniform", "lognormal")


def boundary_scalings(
    sigma: ArrayLike, *, sigma_data: float, sigma_min: float
) -> tuple[jax.Array, jax.Array]:
    """(c_skip, c_out) of f = c_skip y + c_out F: c_skip = sd^2 / ((s - eps)^2 + sd^2),
    c_out = sd (s - eps) / sqrt(sd^2 + s^2). At s = eps, c_skip = 1 and c_out = 0 exactly.

    References: CM App. C ("we modify the EDM parameterization"), with eps = sigma_min.
    """
    sigma = jnp.asarray(sigma)
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (jnp.square(shifted) + sigma_data**2)
    c_out = sigma_data * shifted * jax.lax.rsqrt(sigma_data**2 + jnp.square(sigma))
    return c_skip, c_out


def consistency_function(
    denoised: ArrayLike, y: ArrayLike, sigma: ArrayLike, *, sigma_data: float, sigma_min: float
) -> jax.Array:
    """f(y, sigma) = c_skip y + c_out F, with F = (D - c_skip^EDM y) / c_out^EDM the EDM network output
    that the denoiser D implies. With sigma_min = 0 this is D itself; at sigma = sigma_min it is y.

    Args:
      denoised: D(y, sigma), the network's data prediction, y's shape.
      y: scaled states x / alpha, shape (batch, ...).
      sigma: scaled noise levels sigma / alpha, shape (batch,).
      sigma_data, sigma_min: the data scale and the boundary eps.
    """
    y, denoised = jnp.asarray(y), jnp.asarray(denoised)
    c_skip_d, c_out_d, _, _ = edm_preconditioning(sigma, sigma_data=sigma_data)
    c_skip, c_out = boundary_scalings(sigma, sigma_data=sigma_data, sigma_min=sigma_min)
    b = lambda c: broadcast_to_data(c, y).astype(y.dtype)
    raw = (denoised - b(c_skip_d) * y) / b(c_out_d)
    return b(c_skip) * y + b(c_out) * raw


def schedule_time(schedule: Schedule, sigma: ArrayLike) -> jax.Array:
    """The schedule's time t with sigma(t) / alpha(t) = ``sigma`` (t = sigma on the EDM schedule)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    if isinstance(schedule, EDM):
        return sigma
    return schedule.t_from_log_snr(-2.0 * jnp.log(sigma))


ApplyFn = Callable[[Any, jax.Array, jax.Array, Any, jax.Array | None], jax.Array]


def scaled_denoiser(
    schedule: Schedule, apply_fn: ApplyFn, *, prediction: str, edm_preconditioned: bool = False
) -> Callable[[Any, jax.Array, jax.Array, Any, jax.Array | None], jax.Array]:
    """D(params, y, sigma, cond, key): a network of ``schedule`` as a denoiser in scaled variables.

    The network sees its own time convention: x = alpha(t) y at t = ``schedule_time(sigma)``, and its
    output of type ``prediction`` becomes the data prediction. ``edm_preconditioned`` networks (the
    ``"edm"`` loss) see c_in y and c_noise and return F, with D = c_skip y + c_out F (Karras et al.
    2022, Table 1).
    """

    def denoise(params, y, sigma, cond, key):
        b = lambda c: broadcast_to_data(c, y).astype(y.dtype)
        if edm_preconditioned:
            c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sigma_data=schedule.sigma_data)
            return b(c_skip) * y + b(c_out) * apply_fn(params, b(c_in) * y, c_noise, cond, key)
        t = schedule_time(schedule, sigma)
        x = b(schedule.alpha(t)) * y
        out = apply_fn(params, x, t, cond, key)
        return to_x0_eps(schedule, out[..., : y.shape[-1]], x, t, prediction=prediction)[0]

    return denoise


def teacher_step(
    sampler: Any,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    y: jax.Array,
    sigma_from: jax.Array,
    sigma_to: jax.Array,
    *,
    prediction: str,
) -> jax.Array:
    """One step of a deterministic diffax sampler (``diffax.samplers.get(name)``) per example, from
    scaled level ``sigma_from`` to ``sigma_to`` (both (batch,)), on the teacher's own schedule.

    ``model_fn(x, t)`` is the teacher network at batch size 1 (the step is vmapped over examples,
    because every example has its own interval). Returns the scaled state at ``sigma_to``.
    """
    from diffax.samplers import make_denoiser

    denoise = make_denoiser(model_fn, schedule, prediction=prediction)

    def one(y1, s_from, s_to):
        t, s = schedule_time(schedule, s_from), schedule_time(schedule, s_to)
        x = schedule.alpha(t).astype(y1.dtype) * y1[None]
        x_s, _, _ = sampler.step(denoise, schedule, x, sampler.init(x), 0, t, s, None)
        return x_s[0] / schedule.alpha(s).astype(y1.dtype)

    return jax.vmap(one)(y, sigma_from, sigma_to)


# ----------------------------------------------------------------------------------------------
# Grids and curricula.


def karras_sigmas(
    num_scales: ArrayLike, *, sigma_min: float, sigma_max: float, rho: float = 7.0, size: int | None = None
) -> jax.Array:
    """The increasing grid sigma_i = (eps^(1/rho) + (i-1)/(N-1) (T^(1/rho) - eps^(1/rho)))^rho, i = 1..N.

    ``num_scales`` N may be traced (a curriculum); the array then has ``size`` entries and those past N
    repeat sigma_max. sigma_1 = sigma_min and sigma_N = sigma_max exactly.

    References: Karras et al. 2022, eq. 5; CM Sec. 3 (N-point discretisation).
    """
    size = int(num_scales) if size is None else size
    i = jnp.arange(size, dtype=jnp.float32)
    frac = jnp.minimum(i / (jnp.asarray(num_scales, jnp.float32) - 1.0), 1.0)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (lo + frac * (hi - lo)) ** rho
    return jnp.where(frac >= 1.0, sigma_max, jnp.where(i == 0, sigma_min, sigmas)).astype(jnp.float32)


def cm_num_scales(step: ArrayLike, *, total_steps: int, s0: int, s1: int) -> jax.Array:
    """N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 (CM App. C, eq. in "CT"), int32.

    Pinned to the reference code (openai/consistency_models_cifar10, ``get_ema_scales_fn``), which
    clamps the inner ceil to at least 1.
    """
    k = jnp.asarray(step, jnp.float32)
    inner = jnp.ceil(jnp.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1.0)
    return (jnp.maximum(inner, 1.0) + 1.0).astype(jnp.int32)


def cm_target_decay(step: ArrayLike, *, total_steps: int, s0: int, s1: int, mu0: float) -> jax.Array:
    """mu(k) = exp(s0 log mu0 / (N(k) - 1)): the target-network EMA decay of CT (CM App. C).

    The paper writes N(k) in the denominator; the reference code (``get_ema_scales_fn``: ``exp(-c /
    scales)`` before ``scales += 1``) uses N(k) - 1, which is what this returns.
    """
    scales = cm_num_scales(step, total_steps=total_steps, s0=s0, s1=s1) - 1
    return jnp.exp(s0 * math.log(mu0) / scales.astype(jnp.float32))


def ict_num_scales(step: ArrayLike, *, total_steps: int, s0: int = 10, s1: int = 1280) -> jax.Array:
    """iCT's doubling curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 /
    s0) + 1)): 11, 21, 41, ..., 1281 over eight stages for s0 = 10, s1 = 1280 (iCT Sec. 3.4, eq. 8)."""
    stages = int(math.log2(s1 // s0)) + 1
    stage_steps = max(total_steps // stages, 1)
    k = jnp.asarray(step, jnp.int32)
    doubled = s0 * jnp.left_shift(1, jnp.minimum(k // stage_steps, 30))
    return (jnp.minimum(doubled, s1) + 1).astype(jnp.int32)


def lognormal_index_probs(
    sigmas: ArrayLike, num_scales: ArrayLike, *, p_mean: float = -1.1, p_std: float = 2.0
) -> jax.Array:
    """p(i) over the intervals i = 0..N-2 of an increasing grid, proportional to
    erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std));
    entries past N - 2 (a padded, traced grid) are 0. Sums to 1.

    References: iCT Sec. 3.5, eq. 10.
    """
    sigmas = jnp.asarray(sigmas)
    cdf = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf[1:] - cdf[:-1]
    mass = jnp.where(jnp.arange(mass.shape[0]) < jnp.asarray(num_scales) - 1, mass, 0.0)
    return mass / jnp.sum(mass)


# ----------------------------------------------------------------------------------------------
# Distances and weights.


def pseudo_huber_c(data_dim: int) -> float:
    """iCT's c = 0.00054 sqrt(d) for d data dimensions (iCT Sec. 3.3; 0.03 on CIFAR-10's 3072)."""
    return 0.00054 * math.sqrt(data_dim)


def distance(x: ArrayLike, y: ArrayLike, *, kind: str) -> jax.Array:
    """Per-example d(x, y), shape (batch,).

    ``"l2"``: mean squared error over the sample; ``"l1"``: mean absolute error; ``"pseudo_huber"``:
    sqrt(||x - y||^2 + c^2) - c with the norm over the whole sample and c = 0.00054 sqrt(d).

    References: CM Sec. 5 (l1, l2); iCT Sec. 3.3, eq. 9 (pseudo-Huber).
    """
    diff = (jnp.asarray(x) - jnp.asarray(y)).reshape(jnp.shape(x)[0], -1)
    if kind == "l2":
        return jnp.mean(jnp.square(diff), axis=-1)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff), axis=-1)
    if kind == "pseudo_huber":
        c = pseudo_huber_c(diff.shape[-1])
        return jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1) + c * c) - c
    raise ValueError(f"Unknown distance {kind!r}; known: {', '.join(DISTANCES)}.")


def ect_lower_level(sigma: ArrayLike, step: ArrayLike, spec: ConsistencySpec) -> jax.Array:
    """ECT's smaller level r = sigma (1 - q^-(s+1) (1 + k sigmoid(-b sigma))) at stage s = step //
    ``ect_stage_steps``, clamped to sigma_min (where f is the identity, so the target is the noised data
    itself, as ECT's r = 0 falls back to y). The gap sigma - r halves every stage for q = 2.

    References: Geng et al. 2024, "Consistency Models Made Easy" (ECT), Sec. 3 and ``ECMLoss`` of the
    reference code (q = 2, k = 8, b = 1).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    stage = (jnp.asarray(step, jnp.int32) // spec.ect_stage_steps).astype(jnp.float32)
    ratio = 1.0 - jnp.power(spec.ect_q, -(stage + 1.0)) * (
        1.0 + spec.ect_k * jax.nn.sigmoid(-spec.ect_b * sigma)
    )
    return jnp.maximum(sigma * ratio, spec.sigma_min)


def update_target(target: Any, params: Any, decay: ArrayLike) -> Any:
    """theta^- <- stopgrad(mu theta^- + (1 - mu) theta) (CM Alg. 2/3); mu = 0 gives theta exactly."""
    decay = jnp.asarray(decay, jnp.float32)
    return jax.tree.map(lambda t, p: jax.lax.stop_gradient(decay * t + (1.0 - decay) * p), target, params)


# ----------------------------------------------------------------------------------------------
# The loss.


@dataclasses.dataclass(frozen=True)
class ConsistencySpec:
    """What a consistency objective is: grid, curriculum, index law, target, distance and weight.

    Attributes:
      sigma_min, sigma_max, rho: the Karras grid (scaled noise levels) and its exponent.
      sigma_data: the data scale of the parameterization.
      curriculum: ``"fixed"`` (N = ``num_scales``, mu = ``mu``), ``"cm"`` (N(k), mu(k) of CT from
        ``s0``, ``s1``, ``mu0``), ``"ict"`` (doubling from ``s0`` to ``s1``, mu = 0) or ``"ect"``
        (continuous levels: sigma lognormal, the smaller level r(sigma) of :func:`ect_lower_level`
        with ``ect_q``, ``ect_k``, ``ect_b`` and a stage every ``ect_stage_steps``; mu = 0).
      index: ``"uniform"`` over the N - 1 intervals or ``"lognormal"`` (``p_mean``, ``p_std``).
      distance, weighting: see :func:`distance` and ``WEIGHTINGS``.
      total_steps: K of the curricula.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    curriculum: str = "fixed"
    num_scales: int = 18
    mu: float = 0.0
    s0: int = 10
    s1: int = 1280
    mu0: float = 0.9
    index: str = "uniform"
    p_mean: float = -1.1
    p_std: float = 2.0
    distance: str = "l2"
    weighting: str = "uniform"
    ect_q: float = 2.0
    ect_k: float = 8.0
    ect_b: float = 1.0
    ect_stage_steps: int = 1000
    total_steps: int = 1

    def __post_init__(self):
        for field, value, known in (
            ("curriculum", self.curriculum, CURRICULA),
            ("index", self.index, INDEX_DISTRIBUTIONS),
            ("distance", self.distance, DISTANCES),
            ("weighting", self.weighting, WEIGHTINGS),
        ):
            if value not in known:
                raise ValueError(f"{field}: unknown {value!r}; known: {', '.join(known)}.")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"sigma_min: need 0 < sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}."
            )
        if not 0.0 <= self.mu < 1.0 or not 0.0 < self.mu0 < 1.0:
            raise ValueError(f"mu: the target decays must lie in [0, 1); got mu={self.mu}, mu0={self.mu0}.")
        if self.num_scales < 2 or self.s0 < 1 or self.s1 < self.s0:
            raise ValueError(
                f"num_scales: need N >= 2 and 1 <= s0 <= s1; got {self.num_scales}, {self.s0}, {self.s1}."
            )

    @property
    def max_scales(self) -> int:
        """The largest N the curriculum reaches (the static size of the padded grid)."""
        return {"fixed": self.num_scales, "cm": self.s1 + 1, "ict": self.s1 + 1, "ect": 2}[self.curriculum]

    def scales(self, step: ArrayLike) -> jax.Array:
        """N at training step ``step`` (int32; 0 for ECT's continuous levels)."""
        if self.curriculum == "ect":
            return jnp.int32(0)
        if self.curriculum == "fixed":
            return jnp.int32(self.num_scales)
        if self.curriculum == "cm":
            return cm_num_scales(step, total_steps=self.total_steps, s0=self.s0, s1=self.s1)
        return ict_num_scales(step, total_steps=self.total_steps, s0=self.s0, s1=self.s1)

    def target_decay(self, step: ArrayLike) -> jax.Array:
        """The target-network EMA decay mu at ``step`` (0 for iCT: theta^- = stopgrad(theta))."""
        if self.curriculum == "cm":
            return cm_target_decay(step, total_steps=self.total_steps, s0=self.s0, s1=self.s1, mu0=self.mu0)
        return jnp.float32(self.mu if self.curriculum == "fixed" else 0.0)

    def grid(self, step: ArrayLike) -> tuple[jax.Array, jax.Array]:
        """(sigmas, N): the padded increasing Karras grid at ``step`` and its length."""
        n = self.scales(step)
        sigmas = karras_sigmas(
            n, sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho, size=self.max_scales
        )
        return sigmas, n


def consistency_loss(
    spec: ConsistencySpec,
    student: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    target: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    key: jax.Array,
    step: ArrayLike,
    *,
    target_point: Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The discrete consistency loss E[lambda d(f_theta(y_{n+1}, sigma_{n+1}), f_theta-(y^_n, sigma_n))].

    Args:
      spec: the objective.
      student: ``student(y, sigma, key) -> f`` with the online parameters (differentiated).
      target: ``target(y, sigma, key) -> f`` with the target parameters (stop-gradient applied here).
        Both receive the same key, so dropout masks agree (iCT Sec. 3.1; CM reference code).
      x0: a batch of data, shape (batch, ...).
      key: randomness for the interval, the noise and the networks.
      step: the training step (the curriculum's k).
      target_point: ``target_point(y_{n+1}, sigma_{n+1}, sigma_n, x0, z) -> y^_n``; ``None`` is
        consistency *training*, y^_n = x0 + sigma_n z (the Euler step with D = x0, CM Thm. 2);
        distillation passes one teacher sampler step (:func:`teacher_step`).

    Returns:
      ``(loss, aux)``: the batch mean, and per-example ``loss_per_example`` and ``sigma`` (sigma_{n+1}).

    References: CM eq. 7 (CD) and eq. 10 (CT), Alg. 2-3; iCT eq. 9-10.
    """
    index_key, noise_key, net_key = jax.random.split(key, 3)
    batch = x0.shape[0]
    if spec.curriculum == "ect":
        sigma_hi = jnp.clip(
            jnp.exp(spec.p_mean + spec.p_std * jax.random.normal(index_key, (batch,))),
            spec.sigma_min * 1.001,
            spec.sigma_max,
        )
        sigma_lo = ect_lower_level(sigma_hi, step, spec)
        return _pair_loss(spec, student, target, x0, noise_key, net_key, sigma_lo, sigma_hi, target_point)
    sigmas, n = spec.grid(step)
    if spec.index == "uniform":
        i = jax.random.randint(index_key, (batch,), 0, n - 1)
    else:
        probs = lognormal_index_probs(sigmas, n, p_mean=spec.p_mean, p_std=spec.p_std)
        i = jax.random.choice(index_key, probs.shape[0], (batch,), p=probs)
    return _pair_loss(spec, student, target, x0, noise_key, net_key, sigmas[i], sigmas[i + 1], target_point)


def _pair_loss(spec, student, target, x0, noise_key, net_key, sigma_lo, sigma_hi, target_point):
    """The weighted distance of the online network at sigma_hi and the target network at sigma_lo."""
    batch = x0.shape[0]
    z = jax.random.normal(noise_key, x0.shape, x0.dtype)
    b = lambda c: broadcast_to_data(c, x0).astype(x0.dtype)
    y_hi = x0 + b(sigma_hi) * z
    if target_point is None:
        y_lo = x0 + b(sigma_lo) * z
    else:
        y_lo = jax.lax.stop_gradient(target_point(y_hi, sigma_hi, sigma_lo, x0, z))
    online = student(y_hi, sigma_hi, net_key)
    reference = jax.lax.stop_gradient(target(y_lo, sigma_lo, net_key))
    weight = 1.0 / (sigma_hi - sigma_lo) if spec.weighting == "inverse_dsigma" else jnp.ones((batch,))
    per_example = weight * distance(online, reference, kind=spec.distance)
    return jnp.mean(per_example), {"loss_per_example": per_example, "sigma": sigma_hi}
