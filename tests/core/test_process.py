"""Forward process: marginals against simulation, posteriors against Bayes' rule, transitions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import process, schedules


@pytest.mark.parametrize("name", ["vp_linear", "cosine", "ve", "edm", "rectified_flow"])
def test_q_sample_moments_match_closed_form(name):
    """Empirical mean and variance of x_t | x_0 within 5 standard errors of alpha x_0, sigma^2."""
    s = schedules.get(name)
    n, x0_value = 20000, 0.7
    t_value = s.t_min + 0.37 * (s.t_max - s.t_min)
    x0 = jnp.full((n, 1), x0_value)
    t = jnp.full((n,), t_value)
    noise = jax.random.normal(jax.random.key(0), (n, 1))
    x_t = np.asarray(process.q_sample(s, x0, t, noise), np.float64)[:, 0]
    alpha, sigma = float(s.alpha(t_value)), float(s.sigma(t_value))
    se_mean = sigma / np.sqrt(n)
    se_var = sigma**2 * np.sqrt(2.0 / (n - 1))
    assert abs(x_t.mean() - alpha * x0_value) < 5 * se_mean
    assert abs(x_t.var(ddof=1) - sigma**2) < 5 * se_var


def _bayes_posterior_on_grid(x_t, x0, a_s, s_s, a_ts, s_ts):
    """Mean and variance of p(x_s | x_t, x_0) ∝ N(x_t; a_ts x_s, s_ts^2) N(x_s; a_s x_0, s_s^2), by
    quadrature on a fine grid, in float64."""
    grid = np.linspace(a_s * x0 - 12 * s_s, a_s * x0 + 12 * s_s, 200001)
    log_w = -0.5 * ((x_t - a_ts * grid) / s_ts) ** 2 - 0.5 * ((grid - a_s * x0) / s_s) ** 2
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    mean = np.sum(w * grid)
    return mean, np.sum(w * (grid - mean) ** 2)


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine", "ve", "edm", "linear"])
def test_posterior_equals_bayes_rule(name):
    sch = schedules.get(name)
    lo, hi = sch.t_min, sch.t_max
    s, t = lo + 0.3 * (hi - lo), lo + 0.55 * (hi - lo)
    x0, x_t = 0.4, -0.9
    mean, var, log_var = process.q_posterior(sch, jnp.array([[x_t]]), jnp.array([[x0]]), s, t)
    a_s, s_s = float(sch.alpha(s)), float(sch.sigma(s))
    a_ts, var_ts = (float(v) for v in process.q_transition(sch, s, t))
    ref_mean, ref_var = _bayes_posterior_on_grid(x_t, x0, a_s, s_s, a_ts, np.sqrt(var_ts))
    np.testing.assert_allclose(float(mean[0, 0]), ref_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(var), ref_var, rtol=1e-4)
    np.testing.assert_allclose(float(log_var), np.log(ref_var), rtol=1e-4)


def test_transition_composes_to_the_marginal():
    """q(x_t | x_0) = q(x_t | x_s) o q(x_s | x_0):
    alpha_t = alpha_ts alpha_s and sigma_t^2 = alpha_ts^2 sigma_s^2 + var_ts."""
    sch = schedules.get("vp_linear")
    s, t = jnp.array([0.1, 0.4]), jnp.array([0.3, 0.9])
    a_ts, var_ts = process.q_transition(sch, s, t)
    np.testing.assert_allclose(a_ts * sch.alpha(s), sch.alpha(t), rtol=1e-5)
    np.testing.assert_allclose(a_ts**2 * sch.sigma(s) ** 2 + var_ts, sch.sigma(t) ** 2, rtol=1e-5)


def test_discrete_one_step_kernel_is_ddpm():
    """q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t) (Ho et al. 2020, eq. 2)."""
    sch = schedules.get("linear", num_timesteps=1000)
    idx = jnp.array([1, 10, 500, 999])
    x = jnp.ones((4, 2))
    mean, var = process.q_step(sch, x, sch.t_from_index(idx - 1), sch.t_from_index(idx))
    betas = np.asarray(sch.betas)[np.asarray(idx)]
    np.testing.assert_allclose(mean[:, 0], np.sqrt(1 - betas), rtol=1e-5)
    np.testing.assert_allclose(var[:, 0, 0] if var.ndim == 3 else var[:, 0], betas, rtol=2e-3)


def test_discrete_posterior_matches_continuous_posterior_at_grid_points():
    sch = schedules.get("cosine", num_timesteps=200)
    idx = jnp.array([0, 1, 57, 199])
    key1, key2 = jax.random.split(jax.random.key(3))
    x_t, x0 = jax.random.normal(key1, (4, 3)), jax.random.normal(key2, (4, 3))
    mean_d, var_d, log_var_d = process.q_posterior_discrete(sch, x_t, x0, idx)
    t = sch.t_from_index(idx)
    mean_c, var_c, _ = process.q_posterior(sch, x_t, x0, t - 1.0 / 200, t)
    np.testing.assert_allclose(mean_d, mean_c, rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(var_d, var_c, rtol=2e-3, atol=1e-9)
    # index 0 has zero variance; its clipped log-variance is DDPM's (the variance at index 1)
    assert float(var_d[0, 0]) == 0.0
    np.testing.assert_allclose(log_var_d[0, 0], np.log(var_d[1, 0]), rtol=1e-6)


class ProcessTransformsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_q_sample_jit_vmap_grad_float32_bfloat16(self):
        sch = schedules.get("linear", num_timesteps=100)
        for dtype in (jnp.float32, jnp.bfloat16):
            x0 = jnp.ones((3, 4, 4, 2), dtype)
            noise = jnp.full((3, 4, 4, 2), 0.5, dtype)
            t = jnp.array([0.1, 0.5, 0.9])
            out = self.variant(process.q_sample)(sch, x0, t, noise)
            chex.assert_shape(out, x0.shape)
            chex.assert_type(out, dtype)
            per_example = self.variant(jax.vmap(lambda a, b, c: process.q_sample(sch, a[None], c, b[None])))(
                x0, noise, t
            )
            chex.assert_trees_all_close(per_example[:, 0], out, rtol=1e-2)
            grad = self.variant(jax.grad(lambda tt: jnp.sum(process.q_sample(sch, x0, tt, noise))))(t)
            chex.assert_shape(grad, (3,))
            chex.assert_tree_all_finite(grad)

    @chex.variants(with_jit=True, without_jit=True)
    def test_posterior_under_jit_and_grad(self):
        sch = schedules.get("vp_cosine")
        x = jnp.ones((2, 3))
        f = lambda s: jnp.sum(process.q_posterior(sch, x, 0.5 * x, s, jnp.array([0.8, 0.9]))[0])
        chex.assert_tree_all_finite(self.variant(jax.grad(f))(jnp.array([0.2, 0.3])))


def test_bad_shapes_and_times_raise():
    sch = schedules.get("vp_linear")
    with pytest.raises(ValueError, match="shapes must match: x0=.*noise="):
        process.q_sample(sch, jnp.ones((2, 3)), 0.5, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(batch,\)"):
        process.q_sample(sch, jnp.ones((2, 3)), jnp.ones((3,)) * 0.5, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="t must lie in the schedule's range"):
        process.q_sample(sch, jnp.ones((2, 3)), jnp.array([0.5, 2.0]), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="s must lie in the schedule's range"):
        process.q_posterior(sch, jnp.ones((1, 2)), jnp.ones((1, 2)), -0.5, 0.5)
