"""Stochastic samplers reproduce the marginal at ts[-1]: mean and covariance within sampling error.

The target is exact: a Gaussian mixture noised to t_end has mean alpha mu and covariance
sum_k w_k (alpha^2 S_k + sigma^2 I + m_k m_k^T) - m m^T. Samples start from the prior N(0, I).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import samplers

T_END = 1e-3
NUM_SAMPLES = 8000


@pytest.fixture(scope="module")
def x_T():
    return jax.random.normal(jax.random.key(0), (NUM_SAMPLES, 2))


@pytest.mark.parametrize(
    "name, options, num_steps",
    [
        ("ddpm", {}, 200),
        ("ddpm", {"variance": "fixed_large"}, 100),
        ("ddim", {"eta": 1.0}, 200),
        ("dpm_solver++_sde", {}, 50),
        ("euler_maruyama", {}, 200),
        ("pc", {}, 200),
    ],
)
def test_marginal_moments_within_sampling_error(vp, mixture, mixture_model, x_T, name, options, num_steps):
    ts = samplers.timesteps(vp, num_steps=num_steps, t_end=T_END)
    x = samplers.sample(mixture_model, vp, x_T, sampler=name, timesteps=ts, key=jax.random.key(3), **options)
    x = np.asarray(x, np.float64)
    mean, cov = mixture.marginal_moments(float(vp.alpha(T_END)), float(vp.sigma(T_END)))
    se_mean = np.sqrt(np.diag(cov) / NUM_SAMPLES)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / NUM_SAMPLES)  # Gaussian approx.
    z_mean = (x.mean(axis=0) - mean) / se_mean
    z_cov = ((np.cov(x.T) - cov) / se_cov)[np.triu_indices(2)]
    assert np.all(np.abs(z_mean) < 5), z_mean
    assert np.all(np.abs(z_cov) < 5), z_cov


def test_ancestral_steps_are_one_map(vp, mixture_model):
    """DDIM(eta=1), DDPM's small variance, ancestral Euler and SDE-DPM-Solver++(1) all sample the
    posterior q(x_s | x_t, x0_pred): with the same key they agree."""
    x_T = jax.random.normal(jax.random.key(1), (32, 2))
    ts = samplers.timesteps(vp, num_steps=8, t_end=T_END)
    run = lambda name, **kw: np.asarray(
        samplers.sample(mixture_model, vp, x_T, sampler=name, timesteps=ts, key=jax.random.key(5), **kw)
    )
    ref = run("ddpm")
    for name, kw in [("ddim", {"eta": 1.0}), ("euler_ancestral", {}), ("dpm_solver++_sde", {"order": 1})]:
        np.testing.assert_allclose(run(name, **kw), ref, atol=3e-5, err_msg=name)
    assert np.abs(run("ddpm", variance="fixed_large") - ref).max() > 1e-2


def _with_variance(model_fn, v, x, t):
    return jnp.concatenate([model_fn(x, t), jnp.full_like(x, v)], axis=-1)


def test_learned_variance_interpolates_between_the_fixed_ones(vp, mixture_model):
    """v = -1 is the posterior variance, v = +1 the transition variance (Nichol & Dhariwal, eq. 15)."""
    x_T = jax.random.normal(jax.random.key(1), (32, 2))
    ts = samplers.timesteps(vp, num_steps=6, t_end=T_END)
    key = jax.random.key(2)
    run = lambda model, variance: np.asarray(
        samplers.sample(model, vp, x_T, sampler="ddpm", timesteps=ts, key=key, variance=variance)
    )
    for v, fixed in [(-1.0, "fixed_small"), (1.0, "fixed_large")]:
        learned = run(jax.tree_util.Partial(_with_variance, mixture_model, v), "learned")
        np.testing.assert_allclose(learned, run(mixture_model, fixed), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="last axis doubled"):
        run(mixture_model, "learned")
