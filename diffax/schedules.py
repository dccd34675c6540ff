"""Noise schedules: the marginal scales alpha(t), sigma(t) of x_t = alpha(t) x_0 + sigma(t) eps.

Every schedule is an immutable pytree with one interface:

- ``alpha(t)``, ``sigma(t)``, ``log_snr(t) = log(alpha^2 / sigma^2)`` and its inverse
  ``t_from_log_snr(lam)``, elementwise on arrays, for continuous ``t`` in ``[t_min, t_max]``;
- ``drift(t)`` and ``diffusion_sq(t)``: the linear SDE dx = f(t) x dt + g(t) dW with these marginals,
  derived once from ``alpha`` and ``log_snr`` (Kingma et al. 2021, eq. 17-18; Song et al. 2021, eq. 5);
- ``prior_std`` and ``t_max``: where sampling starts.

Discrete schedules (``betas``, ``alphas_cumprod`` over T steps) expose the continuous view of
DPM-Solver (Lu et al. 2022, App. D): log alpha is interpolated piecewise-linearly over the grid, grid
index i = 0..T-1 sitting at t = (i + 1) / T.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.typing import ArrayLike

__all__ = [
    "Schedule",
    "DiscreteSchedule",
    "VPLinear",
    "VPCosine",
    "VE",
    "EDM",
    "RectifiedFlow",
    "TrigFlow",
    "get",
    "names",
    "linear_betas",
    "cosine_betas",
    "scaled_linear_betas",
    "sigmoid_betas",
]


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_time_range(t: ArrayLike, t_min: float, t_max: float, *, name: str = "t") -> None:
    """Raises a ValueError if concrete ``t`` leaves [t_min, t_max]; traced values pass unchecked."""
    if not _is_concrete(t):
        return
    t_np = np.asarray(t, dtype=np.float64)
    slack = 1e-6 * max(1.0, abs(t_max))
    if t_np.size and (np.nanmin(t_np) < t_min - slack or np.nanmax(t_np) > t_max + slack):
        raise ValueError(
            f"{name} must lie in the schedule's range [{t_min:g}, {t_max:g}]; got values in "
            f"[{np.nanmin(t_np):g}, {np.nanmax(t_np):g}]."
        )


def _float(t: ArrayLike) -> jax.Array:
    t = jnp.asarray(t)
    return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.float32)


def _in_working_precision(fn: Callable[[jax.Array], jax.Array], t: ArrayLike) -> jax.Array:
    """Evaluates ``fn`` in at least float32 and returns the result in t's floating dtype, so
    bfloat16 inputs get float32 accuracy and keep their dtype."""
    t = _float(t)
    return fn(t.astype(jnp.promote_types(t.dtype, jnp.float32))).astype(t.dtype)


class Schedule(abc.ABC):
    """The interface every noise schedule implements. Subclasses define ``log_alpha`` and
    ``log_snr`` (and the inverse); the rest is derived here."""

    t_min: float
    t_max: float

    # Subclasses implement these three (and may override _log_sigma) on float32-or-wider arrays.
    @abc.abstractmethod
    def _log_alpha(self, t: jax.Array) -> jax.Array: ...

    @abc.abstractmethod
    def _log_snr(self, t: jax.Array) -> jax.Array: ...

    @abc.abstractmethod
    def _t_from_log_snr(self, log_snr: jax.Array) -> jax.Array: ...

    def _log_sigma(self, t: jax.Array) -> jax.Array:
        return self._log_alpha(t) - 0.5 * self._log_snr(t)

    def log_alpha(self, t: ArrayLike) -> jax.Array:
        """log alpha(t)."""
        return _in_working_precision(self._log_alpha, t)

    def log_snr(self, t: ArrayLike) -> jax.Array:
        """lambda(t) = log(alpha(t)^2 / sigma(t)^2), strictly decreasing in t."""
        return _in_working_precision(self._log_snr, t)

    def t_from_log_snr(self, log_snr: ArrayLike) -> jax.Array:
        """The inverse of ``log_snr``."""
        return _in_working_precision(self._t_from_log_snr, log_snr)

    def log_sigma(self, t: ArrayLike) -> jax.Array:
        """log sigma(t) = log alpha(t) - lambda(t) / 2."""
        return _in_working_precision(self._log_sigma, t)

    def alpha(self, t: ArrayLike) -> jax.Array:
        """alpha(t), the scale of x_0 in x_t."""
        return _in_working_precision(lambda u: jnp.exp(self._log_alpha(u)), t)

    def sigma(self, t: ArrayLike) -> jax.Array:
        """sigma(t), the scale of the noise in x_t."""
        return _in_working_precision(lambda u: jnp.exp(self._log_sigma(u)), t)

    def drift(self, t: ArrayLike) -> jax.Array:
        """f(t) = d log alpha / dt, the drift coefficient of dx = f(t) x dt + g(t) dW.

        References: Kingma et al. 2021 (VDM), App. A; Song et al. 2021, eq. 5.
        """
        return _in_working_precision(lambda u: _elementwise_derivative(self._log_alpha, u), t)

    def diffusion_sq(self, t: ArrayLike) -> jax.Array:
        """g(t)^2 = -sigma(t)^2 d lambda / dt, the squared diffusion coefficient.

        References: Kingma et al. 2021 (VDM), eq. 17-18 (g^2 = d sigma^2/dt - 2 f sigma^2).
        """
        return _in_working_precision(
            lambda u: -jnp.exp(2 * self._log_sigma(u)) * _elementwise_derivative(self._log_snr, u), t
        )

    @property
    def prior_std(self) -> jax.Array:
        """Standard deviation of the prior x_T ~ N(0, prior_std^2 I): the marginal std at t_max of
        unit-variance data, sqrt(alpha^2 + sigma^2) (1 for VP schedules, ~sigma_max for VE)."""
        t_max = jnp.float32(self.t_max)
        return jnp.sqrt(jnp.square(self.alpha(t_max)) + jnp.square(self.sigma(t_max)))

    def prior_sample(self, key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        """Draws x_T from the prior N(0, prior_std^2 I)."""
        return self.prior_std * jax.random.normal(key, shape, dtype)

    def prior_log_prob(self, x: ArrayLike) -> jax.Array:
        """log N(x; 0, prior_std^2 I), summed over all but the leading (batch) axis."""
        x = jnp.asarray(x)
        var = jnp.square(self.prior_std)
        logp = -0.5 * (jnp.square(x) / var + jnp.log(2 * math.pi * var))
        return jnp.sum(logp.reshape(x.shape[0], -1), axis=-1)

    def check_t(self, t: ArrayLike, *, name: str = "t") -> None:
        """Raises a ValueError when concrete ``t`` is outside [t_min, t_max]."""
        check_time_range(t, self.t_min, self.t_max, name=name)


def _elementwise_derivative(fn: Callable[[jax.Array], jax.Array], t: jax.Array) -> jax.Array:
    return jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]


def _vp_log_snr(log_alpha: jax.Array) -> jax.Array:
    """lambda for a variance-preserving schedule: sigma^2 = 1 - alpha^2."""
    return 2.0 * log_alpha - jnp.log(-jnp.expm1(2.0 * log_alpha))


def _vp_log_alpha_from_log_snr(log_snr: jax.Array) -> jax.Array:
    """alpha^2 = sigmoid(lambda) for a variance-preserving schedule."""
    return 0.5 * jax.nn.log_sigmoid(log_snr)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}.")


# ----------------------------------------------------------------------------------------------
# Continuous schedules.


@struct.dataclass
class VPLinear(Schedule):
    """Variance-preserving SDE with linear beta(t) = beta_min + t (beta_max - beta_min).

    log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2, t in [0, 1].

    References: Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 11 and 29.
    """

    beta_min: float = struct.field(pytree_node=False, default=0.1)
    beta_max: float = struct.field(pytree_node=False, default=20.0)
    t_min: float = struct.field(pytree_node=False, default=0.0)
    t_max: float = struct.field(pytree_node=False, default=1.0)

    def __post_init__(self):
        _positive("beta_min", self.beta_min)
        _positive("beta_max", self.beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max ({self.beta_max}) must be >= beta_min ({self.beta_min}).")

    def _log_alpha(self, t):
        return -0.25 * jnp.square(t) * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _log_snr(self, t):
        return _vp_log_snr(self._log_alpha(t))

    def _t_from_log_snr(self, log_snr):
        # -log alpha = u solves (db/4) t^2 + (b0/2) t - u = 0; the root in a cancellation-free form.
        u = -_vp_log_alpha_from_log_snr(log_snr)
        db, b0 = self.beta_max - self.beta_min, self.beta_min
        return 2.0 * u / (0.5 * b0 + jnp.sqrt(0.25 * b0**2 + db * u))


@struct.dataclass
class VPCosine(Schedule):
    """Variance-preserving cosine schedule in continuous time.

    alpha(t) = cos(pi/2 (t + s)/(1 + s)) / cos(pi/2 s/(1 + s)). t_max stops short of 1 where alpha
    vanishes (DPM-Solver uses 0.9946).

    References: Nichol & Dhariwal 2021, eq. 17; Lu et al. 2022 (DPM-Solver), App. D.
    """

    s: float = struct.field(pytree_node=False, default=0.008)
    t_min: float = struct.field(pytree_node=False, default=0.0)
    t_max: float = struct.field(pytree_node=False, default=0.9946)

    def __post_init__(self):
        if not 0 < self.t_max < 1:
            raise ValueError(f"t_max must lie in (0, 1) for the cosine schedule; got {self.t_max}.")

    def _angle(self, t):
        return 0.5 * math.pi * (t + self.s) / (1.0 + self.s)

    def _log_alpha(self, t):
        # cos(theta_0 + d) / cos(theta_0) = 1 - 2 sin^2(d / 2) - tan(theta_0) sin(d): log1p of a small
        # number keeps full relative accuracy near t = 0, and alpha(0) = 1, sigma(0) = 0 exactly.
        d = 0.5 * math.pi * t / (1.0 + self.s)
        return jnp.log1p(-2.0 * jnp.sin(0.5 * d) ** 2 - math.tan(self._angle(0.0)) * jnp.sin(d))

    def _log_snr(self, t):
        return _vp_log_snr(self._log_alpha(t))

    def _t_from_log_snr(self, log_snr):
        # cos(angle) = alpha cos(theta_0) with alpha^2 = sigmoid(lambda); arctan2 of sin and cos stays
        # accurate near t = 0, where arccos of a value near 1 loses digits.
        theta_0 = self._angle(0.0)
        alpha_sq = jax.nn.sigmoid(log_snr)
        sin_angle = jnp.sqrt(jax.nn.sigmoid(-log_snr) + alpha_sq * math.sin(theta_0) ** 2)
        angle = jnp.arctan2(sin_angle, jnp.sqrt(alpha_sq) * math.cos(theta_0))
        return 2.0 * (1.0 + self.s) / math.pi * angle - self.s


@struct.dataclass
class VE(Schedule):
    """Variance-exploding SDE: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t, t in [0, 1].

    References: Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 9 and 30.
    """

    sigma_min: float = struct.field(pytree_node=False, default=0.01)
    sigma_max: float = struct.field(pytree_node=False, default=50.0)
    t_min: float = struct.field(pytree_node=False, default=0.0)
    t_max: float = struct.field(pytree_node=False, default=1.0)

    def __post_init__(self):
        _positive("sigma_min", self.sigma_min)
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must be > sigma_min ({self.sigma_min}).")

    def _log_alpha(self, t):
        return jnp.zeros_like(t)

    def _log_snr(self, t):
        return -2.0 * (math.log(self.sigma_min) + t * math.log(self.sigma_max / self.sigma_min))

    def _t_from_log_snr(self, log_snr):
        log_sigma = -0.5 * log_snr
        return (log_sigma - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)


@struct.dataclass
class EDM(Schedule):
    """The EDM parameterisation: alpha = 1, sigma(t) = t, t in [sigma_min, sigma_max].

    References: Karras et al. 2022, "Elucidating the Design Space...", Table 1 (sigma(t) = t, s(t) = 1).
    """

    sigma_min: float = struct.field(pytree_node=False, default=0.002)
    sigma_max: float = struct.field(pytree_node=False, default=80.0)
    sigma_data: float = struct.field(pytree_node=False, default=0.5)

    def __post_init__(self):
        _positive("sigma_min", self.sigma_min)
        _positive("sigma_data", self.sigma_data)
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must be > sigma_min ({self.sigma_min}).")

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def _log_alpha(self, t):
        return jnp.zeros_like(t)

    def _log_snr(self, t):
        return -2.0 * jnp.log(t)

    def _t_from_log_snr(self, log_snr):
        return jnp.exp(-0.5 * log_snr)


@struct.dataclass
class RectifiedFlow(Schedule):
    """The straight-line interpolant x_t = (1 - t) x_0 + t eps of flow matching, t in [0, t_max].

    References: Liu et al. 2023, "Flow Straight and Fast", eq. 1; Lipman et al. 2023, eq. 23.
    """

    t_min: float = struct.field(pytree_node=False, default=0.0)
    t_max: float = struct.field(pytree_node=False, default=1.0)

    def _log_alpha(self, t):
        return jnp.log1p(-t)

    def _log_sigma(self, t):
        return jnp.log(t)

    def _log_snr(self, t):
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def _t_from_log_snr(self, log_snr):
        return jax.nn.sigmoid(-0.5 * log_snr)


@struct.dataclass
class TrigFlow(Schedule):
    """TrigFlow: x_t = cos(t) x_0 + sin(t) sigma_d eps on t in [0, pi/2], so sigma / alpha = sigma_d tan t.

    References: Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
    Models", Sec. 3 (eq. 4-5).
    """

    sigma_data: float = struct.field(pytree_node=False, default=0.5)
    t_min: float = struct.field(pytree_node=False, default=0.0)
    t_max: float = struct.field(pytree_node=False, default=0.5 * math.pi)

    def __post_init__(self):
        _positive("sigma_data", self.sigma_data)

    def _log_alpha(self, t):
        return jnp.log(jnp.sin(0.5 * math.pi - t))  # exactly 0 at the float32 pi / 2, where cos is not

    def _log_sigma(self, t):
        return math.log(self.sigma_data) + jnp.log(jnp.sin(t))

    def _log_snr(self, t):
        return 2.0 * (self._log_alpha(t) - self._log_sigma(t))

    def _t_from_log_snr(self, log_snr):
        return jnp.arctan(jnp.exp(-0.5 * log_snr) / self.sigma_data)


def _interpolant(**kwargs: Any) -> Schedule:
    """A stochastic interpolant as a schedule (``diffax.fewstep.interpolants.InterpolantSchedule``)."""
    from diffax.fewstep.interpolants import InterpolantSchedule  # the family lives beside its losses

    return InterpolantSchedule(**kwargs)


# ----------------------------------------------------------------------------------------------
# Discrete schedules.


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear betas. References: Ho et al. 2020, Sec. 4."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """Latent diffusion's betas, linear in sqrt(beta). References: Rombach et al. 2022, App."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine betas, clipped at ``max_beta``. References: Nichol & Dhariwal 2021, eq. 17."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], max_beta)


def sigmoid_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, *, scale: float = 6.0
) -> np.ndarray:
    """Betas along a sigmoid of linspace(-scale, scale). References: Xu et al. 2022 (GeoDiff), App."""
    x = np.linspace(-scale, scale, num_timesteps, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start


@struct.dataclass
class DiscreteSchedule(Schedule):
    """A DDPM-style schedule over T steps with a continuous-time view.

    ``betas[i]`` and ``alphas_cumprod[i]`` belong to grid index i = 0..T-1, sitting at t = (i+1)/T.
    Between grid points, log alpha is interpolated piecewise-linearly in t. The grid is anchored at
    t = 0 with alpha = 1 (x_0 itself, the "alphas_cumprod[-1] = 1" of DDPM's posterior), so t ranges
    over [0, 1] and the last step's posterior q(x_0 | x_{1/T}, x_0) needs no special case.

    References: Ho et al. 2020, eq. 4; Lu et al. 2022 (DPM-Solver), App. D ("discrete-time DPMs").
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    name: str = struct.field(pytree_node=False, default="discrete")

    @classmethod
    def from_betas(cls, betas: ArrayLike, *, name: str = "discrete") -> DiscreteSchedule:
        """Builds the schedule from betas in (0, 1); ``alphas_cumprod`` is computed in float64."""
        betas_np = np.asarray(betas, dtype=np.float64)
        if betas_np.ndim != 1 or betas_np.size < 2:
            raise ValueError(f"betas must be a 1-D array of length >= 2; got shape {betas_np.shape}.")
        if not (np.all(betas_np > 0) and np.all(betas_np < 1)):
            raise ValueError(f"betas must lie in (0, 1); got min {betas_np.min():g}, max {betas_np.max():g}.")
        alphas_cumprod = np.cumprod(1.0 - betas_np)
        return cls(
            betas=jnp.asarray(betas_np, jnp.float32),
            alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
            name=name,
        )

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return 1.0

    @property
    def grid_t(self) -> jax.Array:
        """t of the anchor and of each grid index: 0, 1/T, ..., 1."""
        return jnp.arange(self.num_timesteps + 1, dtype=jnp.float32) / self.num_timesteps

    @property
    def grid_log_alpha(self) -> jax.Array:
        """log alpha at ``grid_t``: 0 at the anchor, then 0.5 log alphas_cumprod."""
        return jnp.concatenate([jnp.zeros((1,)), 0.5 * jnp.log(self.alphas_cumprod)])

    def index_from_t(self, t: ArrayLike) -> jax.Array:
        """The (fractional) grid index i = t T - 1 of continuous time t."""
        return t * self.num_timesteps - 1.0

    def t_from_index(self, index: ArrayLike) -> jax.Array:
        """Continuous time t = (i + 1) / T of grid index i."""
        return (_float(index) + 1.0) / self.num_timesteps

    def _log_alpha(self, t):
        return jnp.interp(t, self.grid_t, self.grid_log_alpha)

    def _log_snr(self, t):
        return _vp_log_snr(self._log_alpha(t))

    def _t_from_log_snr(self, log_snr):
        log_alpha = _vp_log_alpha_from_log_snr(log_snr)
        # log alpha decreases along the grid; interpolate on the reversed (increasing) arrays.
        return jnp.interp(log_alpha, self.grid_log_alpha[::-1], self.grid_t[::-1])


# ----------------------------------------------------------------------------------------------
# Registry.


def _discrete(betas_fn: Callable[..., np.ndarray], name: str) -> Callable[..., DiscreteSchedule]:
    def build(num_timesteps: int = 1000, **kwargs) -> DiscreteSchedule:
        if int(num_timesteps) != num_timesteps or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2; got {num_timesteps}.")
        for key in ("beta_start", "beta_end", "max_beta"):
            if key in kwargs:
                _positive(key, kwargs[key])
        return DiscreteSchedule.from_betas(betas_fn(int(num_timesteps), **kwargs), name=name)

    build.__doc__ = f"The discrete '{name}' schedule; kwargs go to ``{betas_fn.__name__}``."
    return build


_REGISTRY: dict[str, Callable[..., Schedule]] = {
    "linear": _discrete(linear_betas, "linear"),
    "cosine": _discrete(cosine_betas, "cosine"),
    "scaled_linear": _discrete(scaled_linear_betas, "scaled_linear"),
    "sigmoid": _discrete(sigmoid_betas, "sigmoid"),
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "ve": VE,
    "edm": EDM,
    "rectified_flow": RectifiedFlow,
    "trigflow": TrigFlow,
    "interpolant": _interpolant,
}


def names() -> tuple[str, ...]:
    """The names ``get`` knows."""
    return tuple(sorted(_REGISTRY))


def get(name: str, **kwargs: Any) -> Schedule:
    """Builds a schedule by name, e.g. ``get("vp_linear", beta_min=0.1, beta_max=20.0)`` or
    ``get("linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)``.

    Raises:
      ValueError: for an unknown name (listing the known ones) or an invalid keyword.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown schedule {name!r}; known schedules: {', '.join(names())}.")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"Invalid arguments for schedule {name!r}: {e}.") from None
