"""Likelihood through the probability-flow ODE against the closed form, and inversion round trips.

For Gaussian data N(mu, S) the noised marginals are N(alpha mu, C_t), C_t = alpha^2 S + sigma^2 I, all
sharing S's eigenvectors, so the probability-flow map from t_data to t_prior is affine:
x_prior = alpha_T mu + C_T^{1/2} C_d^{-1/2} (x - alpha_d mu), and the model likelihood is
log N(x_prior; 0, prior_std^2 I) + (log det C_T - log det C_d) / 2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import likelihood, samplers
from diffax.samplers.exact import GaussianMixture

MEAN = np.array([0.3, -0.5])
COV = np.array([[0.5, 0.3], [0.3, 0.4]])  # correlated: Hutchinson's estimate has nonzero variance
T_DATA = 1e-3


@pytest.fixture(scope="module")
def gaussian(vp):
    data = GaussianMixture(np.ones(1), MEAN[None], COV[None])
    x0 = jnp.asarray(data.sample(np.random.default_rng(0), 8), jnp.float32)
    return data.model_fn(vp), x0


def _closed_form(vp, x):
    def marginal(t):
        with jax.enable_x64(True):
            alpha, sigma = float(vp.alpha(np.float64(t))), float(vp.sigma(np.float64(t)))
        return alpha, alpha**2 * COV + sigma**2 * np.eye(2)

    (a_d, c_d), (a_T, c_T) = marginal(np.float32(T_DATA)), marginal(1.0)
    w, v = np.linalg.eigh(COV)  # C_t = V diag(alpha^2 w + sigma^2) V^T
    scale = v @ np.diag(np.sqrt(np.diag(v.T @ c_T @ v) / np.diag(v.T @ c_d @ v))) @ v.T
    x_prior = a_T * MEAN + (np.asarray(x, np.float64) - a_d * MEAN) @ scale.T
    var = float(vp.prior_std) ** 2
    log_prior = -0.5 * np.sum(x_prior**2, axis=1) / var - np.log(2 * np.pi * var)
    return log_prior + 0.5 * (np.linalg.slogdet(c_T)[1] - np.linalg.slogdet(c_d)[1])


def test_exact_trace_equals_the_closed_form(vp, gaussian):
    model, x0 = gaussian
    result = likelihood.log_likelihood(model, vp, x0, trace="exact", t_data=T_DATA)
    np.testing.assert_allclose(result.log_prob, _closed_form(vp, x0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.bits_per_dim, -result.log_prob / (2 * np.log(2.0)), rtol=1e-6)
    assert int(result.nfe) > 10


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(vp, gaussian, noise):
    """256 probes of one point: the mean is within 4 standard errors of the exact value."""
    model, x0 = gaussian
    x = jnp.repeat(x0[:1], 256, axis=0)
    result = likelihood.log_likelihood(model, vp, x, key=jax.random.key(1), noise=noise, t_data=T_DATA)
    estimates = np.asarray(result.log_prob, np.float64)
    stderr = estimates.std(ddof=1) / np.sqrt(estimates.size)
    assert stderr > 1e-3  # the estimator really is random here
    assert abs(estimates.mean() - _closed_form(vp, x0[:1])[0]) < 4 * stderr


def test_dequantization_adds_the_bin_width(vp, gaussian):
    """8-bit data in [-1, 1]: bits/dim gains log2(256 / 2) = 7, and the log-density is taken inside the
    data's bin (the density changes by little over a bin of width 2/256)."""
    model, x0 = gaussian
    levels = jnp.round((jnp.clip(x0, -1, 1) + 1) / 2 * 255)
    quantized = levels / 255 * 2 - 1
    result = likelihood.log_likelihood(
        model, vp, quantized, key=jax.random.key(2), dequantize=8, trace="exact", t_data=T_DATA
    )
    np.testing.assert_allclose(result.bits_per_dim, -result.log_prob / (2 * np.log(2.0)) + 7.0, rtol=1e-6)
    np.testing.assert_allclose(result.log_prob, _closed_form(vp, quantized), atol=0.1)


def test_likelihood_rejects_bad_arguments(vp, gaussian):
    model, x0 = gaussian
    for kwargs, match in [
        ({"trace": "full"}, "trace"),
        ({"noise": "uniform", "key": jax.random.key(0)}, "noise"),
        ({}, "key="),
        ({"trace": "exact", "dequantize": 3.5}, "dequantize"),
        ({"trace": "exact", "t_data": 0.0}, "sigma"),
        ({"trace": "exact", "solver": "euler"}, "known solvers"),
    ]:
        with pytest.raises(ValueError, match=match):
            likelihood.log_likelihood(model, vp, x0, **kwargs)


# ----------------------------------------------------------------------------------------------
# Inversion.


@pytest.fixture(scope="module")
def noisy_data(vp, mixture):
    """Mixture samples noised to t_end = 1e-3, where sampling ends and inversion starts."""
    x0 = mixture.sample(np.random.default_rng(1), 64)
    noise = np.random.default_rng(2).standard_normal(x0.shape)
    return jnp.asarray(float(vp.alpha(T_DATA)) * x0 + float(vp.sigma(T_DATA)) * noise, jnp.float32)


def _round_trip_error(vp, model, x, sampler, num_steps, **options):
    ts = samplers.timesteps(vp, num_steps=num_steps, t_end=T_DATA)
    latent = samplers.invert(model, vp, x, timesteps=ts, sampler=sampler, **options)
    back = samplers.sample(model, vp, latent, timesteps=ts, sampler=sampler, **options)
    return float(jnp.sqrt(jnp.mean(jnp.square(back - x)))), latent


def test_ode_inversion_round_trips(vp, mixture_model, noisy_data):
    error, latent = _round_trip_error(vp, mixture_model, noisy_data, "ode", 1, rtol=1e-6, atol=1e-6)
    assert error < 1e-4
    assert 0.5 < float(jnp.std(latent)) < 1.5  # the latent looks like the N(0, I) prior


def test_ddim_inversion_round_trip_error_falls_at_first_order(vp, mixture_model, noisy_data):
    coarse, _ = _round_trip_error(vp, mixture_model, noisy_data, "ddim", 25)
    fine, _ = _round_trip_error(vp, mixture_model, noisy_data, "ddim", 50)
    assert 1.6 < coarse / fine < 2.6 and fine < 0.1
    assert _round_trip_error(vp, mixture_model, noisy_data, "dpm_solver++_2m", 50)[0] < fine / 5
