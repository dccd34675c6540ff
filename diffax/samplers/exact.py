"""Gaussian mixtures: data whose noised score is exact, and float64 reference solutions of its flow.

Under x_t = alpha x_0 + sigma eps the marginal of a mixture sum_k w_k N(mu_k, S_k) is the mixture
sum_k w_k N(alpha mu_k, alpha^2 S_k + sigma^2 I), so eps(x, t) = -sigma grad log p_t(x) is available in
closed form. This gives samplers a ground truth: ``reference_flow`` integrates the probability-flow ODE
in float64 (scipy, DOP853) in EDM's scaled variables, independently of the schedule code, and
``GaussianMixture.marginal_moments`` gives the mean and covariance any correct sampler must reproduce.

References: Karras et al. 2022, eq. 4 (dy / d sigma~ = eps with y = x / alpha, sigma~ = sigma / alpha);
Song et al. 2021, eq. 13.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from scipy import integrate

from diffax.parameterization import from_x0_eps
from diffax.schedules import Schedule

__all__ = ["GaussianMixture", "reference_flow", "toy_mixture"]


def _marginal_terms(xp, x, alpha, sigma, weights, means, eigvals, eigvecs):
    """Component log-densities log w_k N(x; alpha mu_k, C_k) and the solves C_k^{-1}(x - alpha mu_k).

    C_k = alpha^2 S_k + sigma^2 I shares the eigenvectors V_k of S_k, with eigenvalues
    alpha^2 l_k + sigma^2, so no factorisation is traced.
    x: (B, D); alpha, sigma: (B,); weights (K,), means (K, D), eigvals (K, D), eigvecs (K, D, D).
    Returns (log_joint (B, K), solved (B, K, D)).
    """
    dim = means.shape[1]
    diff = x[:, None, :] - alpha.reshape(-1, 1, 1) * means[None]  # (B, K, D)
    variances = alpha.reshape(-1, 1, 1) ** 2 * eigvals[None] + sigma.reshape(-1, 1, 1) ** 2  # (B, K, D)
    proj = xp.einsum("kij,bki->bkj", eigvecs, diff)  # V_k^T (x - alpha mu_k)
    solved = xp.einsum("kij,bkj->bki", eigvecs, proj / variances)
    quad = xp.sum(proj * proj / variances, axis=-1)
    logdet = xp.sum(xp.log(variances), axis=-1)
    log_joint = xp.log(weights)[None] - 0.5 * (quad + logdet + dim * math.log(2 * math.pi))
    return log_joint, solved


def _logsumexp(xp, v):
    top = xp.max(v, axis=-1, keepdims=True)
    return (top + xp.log(xp.sum(xp.exp(v - top), axis=-1, keepdims=True)))[..., 0]


def _eps(xp, log_joint, solved, sigma):
    """eps = sigma sum_k gamma_k C_k^{-1} (x - alpha mu_k), gamma the component posteriors."""
    gamma = xp.exp(log_joint - _logsumexp(xp, log_joint)[:, None])
    return sigma[:, None] * xp.sum(gamma[..., None] * solved, axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """A mixture sum_k w_k N(mu_k, S_k) in D dimensions (float64 parameters).

    Attributes:
      weights: (K,), positive, summing to 1.
      means: (K, D).
      covs: (K, D, D), symmetric positive definite.
    """

    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray

    def __post_init__(self):
        w, m, c = (np.asarray(v, np.float64) for v in (self.weights, self.means, self.covs))
        if w.ndim != 1 or m.shape != (w.shape[0], m.shape[-1]) or c.shape != m.shape + (m.shape[-1],):
            raise ValueError(
                f"need weights (K,), means (K, D), covs (K, D, D); got {w.shape}, {m.shape}, {c.shape}."
            )
        if not (np.all(w > 0) and abs(w.sum() - 1.0) < 1e-9):
            raise ValueError(f"weights must be positive and sum to 1; got {w}.")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "covs", c)
        eigvals, eigvecs = np.linalg.eigh(c)
        if not np.all(eigvals > 0):
            raise ValueError("covs must be positive definite.")
        object.__setattr__(self, "_eig", (eigvals, eigvecs))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _params(self, xp, dtype):
        """(weights, means, eigvals, eigvecs) as ``xp`` arrays of ``dtype``."""
        return tuple(xp.asarray(v, dtype) for v in (self.weights, self.means, *self._eig))

    def _terms(self, x, alpha, sigma):
        """(log_joint, solved) of ``_marginal_terms`` in NumPy float64 or, for JAX x, in JAX."""
        xp = jnp if isinstance(x, jax.Array) else np
        x = xp.asarray(x) if xp is jnp else np.asarray(x, np.float64)
        alpha, sigma = xp.asarray(alpha, x.dtype), xp.asarray(sigma, x.dtype)
        return xp, _marginal_terms(xp, x, alpha, sigma, *self._params(xp, x.dtype))

    def eps(self, x: ArrayLike, alpha: ArrayLike, sigma: ArrayLike):
        """The exact eps(x) = sigma sum_k gamma_k(x) C_k^{-1} (x - alpha mu_k) of the noised mixture.

        Args:
          x: (B, D); NumPy input gives a float64 NumPy result, JAX input a JAX result in x's dtype.
          alpha, sigma: (B,).
        """
        xp, (log_joint, solved) = self._terms(x, alpha, sigma)
        return _eps(xp, log_joint, solved, xp.asarray(sigma, solved.dtype))

    def log_prob(self, x: ArrayLike, alpha: ArrayLike, sigma: ArrayLike):
        """log p_t(x) of the noised mixture, shape (B,) (NumPy float64 or JAX, as ``eps``)."""
        xp, (log_joint, _) = self._terms(x, alpha, sigma)
        return _logsumexp(xp, log_joint)

    def component_log_posterior(self, x: ArrayLike, alpha: ArrayLike, sigma: ArrayLike):
        """log p(k | x_t), shape (B, K): the exact classifier of the components."""
        xp, (log_joint, _) = self._terms(x, alpha, sigma)
        return log_joint - _logsumexp(xp, log_joint)[:, None]

    def marginal_moments(self, alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and covariance (D, D) of x_t, float64."""
        means = alpha * self.means
        covs = alpha**2 * self.covs + sigma**2 * np.eye(self.dim)
        mean = self.weights @ means
        second = np.einsum("k,kij->ij", self.weights, covs + np.einsum("ki,kj->kij", means, means))
        return mean, second - np.outer(mean, mean)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n float64 draws from the mixture."""
        comp = rng.choice(self.weights.shape[0], size=n, p=self.weights)
        chol = np.linalg.cholesky(self.covs)[comp]
        return self.means[comp] + np.einsum("nij,nj->ni", chol, rng.standard_normal((n, self.dim)))

    def model_fn(self, schedule: Schedule, *, prediction: str = "eps") -> Callable:
        """The exact network ``(x, t) -> prediction`` in float32, as a ``jax.tree_util.Partial`` (its
        arrays are runtime arguments of ``diffax.sample``, so rebuilding it does not recompile)."""
        params = self._params(np, np.float32)
        return jax.tree_util.Partial(_exact_prediction, schedule, *params, prediction=prediction)


def _exact_prediction(schedule, weights, means, eigvals, eigvecs, x, t, *, prediction):
    alpha, sigma = schedule.alpha(t).astype(x.dtype), schedule.sigma(t).astype(x.dtype)
    log_joint, solved = _marginal_terms(jnp, x, alpha, sigma, weights, means, eigvals, eigvecs)
    eps = _eps(jnp, log_joint, solved, sigma)
    x0 = (x - sigma[:, None] * eps) / alpha[:, None]
    return from_x0_eps(schedule, x0, eps, t, prediction=prediction)


def toy_mixture() -> GaussianMixture:
    """The 2-D problem of the sampler tests and benchmark: three anisotropic, partly correlated
    components, so that probability-flow trajectories bend and solver errors show."""
    return GaussianMixture(
        weights=np.array([0.3, 0.5, 0.2]),
        means=np.array([[-1.0, 0.5], [1.0, -0.3], [0.2, 1.2]]),
        covs=np.array([[[0.36, 0.0], [0.0, 0.16]], [[0.25, 0.1], [0.1, 0.2]], [[0.1, 0.0], [0.0, 0.1]]]),
    )


def reference_flow(
    mixture: GaussianMixture,
    x: np.ndarray,
    log_snr_start: float,
    log_snr_end: float,
    *,
    variance_preserving: bool = True,
    rtol: float = 1e-11,
    atol: float = 1e-12,
) -> np.ndarray:
    """Solves the probability-flow ODE of the noised mixture in float64 from log-SNR ``log_snr_start``
    to ``log_snr_end``.

    In y = x / alpha and l = log sigma~ = -lambda / 2 the ODE is dy / dl = sigma~ eps(alpha y), the same
    for every schedule of a family: alpha = (1 + sigma~^2)^{-1/2} (variance preserving) or alpha = 1
    (variance exploding, EDM).

    Args:
      mixture: the data distribution.
      x: (B, D) states at the start.
      log_snr_start, log_snr_end: log(alpha^2 / sigma^2) at both ends (either direction).
      variance_preserving: the schedule family.
      rtol, atol: DOP853 tolerances.

    Returns:
      (B, D) float64 states at the end.
    """
    x = np.asarray(x, np.float64)
    shape = x.shape

    def alpha_sigma(ell):
        scaled = np.exp(ell)
        alpha = 1.0 / np.sqrt(1.0 + scaled**2) if variance_preserving else 1.0
        return alpha, alpha * scaled

    def rhs(ell, y):
        alpha, sigma = alpha_sigma(ell)
        ones = np.ones(shape[0])
        eps = mixture.eps(alpha * y.reshape(shape), alpha * ones, sigma * ones)
        return (np.exp(ell) * eps).ravel()

    ell0, ell1 = -0.5 * log_snr_start, -0.5 * log_snr_end
    alpha0, _ = alpha_sigma(ell0)
    sol = integrate.solve_ivp(rhs, (ell0, ell1), (x / alpha0).ravel(), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    alpha1, _ = alpha_sigma(ell1)
    return alpha1 * sol.y[:, -1].reshape(shape)


def reference_samples(
    mixture: GaussianMixture,
    schedule: Schedule,
    x_T: ArrayLike,
    t_end: float,
    *,
    variance_preserving: bool = True,
) -> np.ndarray:
    """``reference_flow`` over a sampler's grid: from ``schedule.t_max`` to ``t_end``, both log-SNRs taken
    in float64 at the float32 times a float32 sampler really uses. (B, D) float64 end states."""
    with jax.enable_x64(True):
        ends = [float(schedule.log_snr(np.float64(np.float32(t)))) for t in (schedule.t_max, t_end)]
    return reference_flow(mixture, np.asarray(x_T), *ends, variance_preserving=variance_preserving)
