"""Schedules: closed forms, monotonicity, inverses, SDE coefficients, discrete/continuous agreement."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import schedules

ALL = schedules.names()
VP = ("linear", "cosine", "scaled_linear", "sigmoid", "vp_linear", "vp_cosine")


def interior_times(schedule, n=257, margin=1e-3):
    """Times strictly inside the range, away from the singular ends."""
    lo, hi = schedule.t_min, schedule.t_max
    span = hi - lo
    return jnp.linspace(lo + margin * span, hi - margin * span, n)


def test_contract_calls_exactly_as_written():
    vp = schedules.get("vp_linear", beta_min=0.1, beta_max=20.0)
    lin = schedules.get("linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    assert isinstance(vp, schedules.VPLinear)
    assert lin.num_timesteps == 1000
    np.testing.assert_allclose(np.asarray(lin.betas)[[0, -1]], [1e-4, 0.02], rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_log_snr_strictly_decreasing_and_inverse_round_trips(name):
    s = schedules.get(name)
    t = interior_times(s)
    lam = s.log_snr(t)
    assert np.all(np.diff(np.asarray(lam)) < 0), "log-SNR must decrease strictly"
    np.testing.assert_allclose(s.t_from_log_snr(lam), t, atol=2e-5 * (s.t_max - s.t_min) + 1e-6, rtol=1e-4)
    # and the other direction: lambda(t(lambda)) = lambda
    np.testing.assert_allclose(s.log_snr(s.t_from_log_snr(lam)), lam, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ALL)
def test_log_snr_is_log_alpha2_over_sigma2(name):
    s = schedules.get(name)
    t = interior_times(s)
    np.testing.assert_allclose(
        s.log_snr(t), 2 * jnp.log(s.alpha(t)) - 2 * jnp.log(s.sigma(t)), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("name", VP)
def test_vp_schedules_preserve_variance(name):
    s = schedules.get(name)
    t = interior_times(s)
    np.testing.assert_allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0, atol=2e-6)


def test_vp_linear_closed_forms():
    s = schedules.get("vp_linear", beta_min=0.1, beta_max=20.0)
    t = np.linspace(0.01, 1.0, 50)
    beta = 0.1 + t * (20.0 - 0.1)
    log_mean_coeff = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1  # Song et al. 2021, eq. 29
    np.testing.assert_allclose(s.alpha(t), np.exp(log_mean_coeff), rtol=1e-6)
    np.testing.assert_allclose(s.sigma(t), np.sqrt(1 - np.exp(2 * log_mean_coeff)), rtol=1e-5)
    np.testing.assert_allclose(s.drift(t), -0.5 * beta, rtol=1e-5)
    np.testing.assert_allclose(s.diffusion_sq(t), beta, rtol=1e-4)


def test_ve_and_edm_closed_forms():
    ve = schedules.get("ve", sigma_min=0.01, sigma_max=50.0)
    t = np.linspace(0.0, 1.0, 11)
    sigma = 0.01 * (50.0 / 0.01) ** t
    np.testing.assert_allclose(ve.sigma(t), sigma, rtol=1e-5)
    np.testing.assert_allclose(ve.drift(t), 0.0, atol=1e-7)
    # g^2 = d sigma^2 / dt = 2 sigma^2 log(sigma_max / sigma_min)  (Song et al. 2021, eq. 30)
    np.testing.assert_allclose(ve.diffusion_sq(t), 2 * sigma**2 * np.log(5000.0), rtol=1e-4)
    edm = schedules.get("edm")
    ts = np.array([0.002, 0.5, 80.0])
    np.testing.assert_allclose(edm.sigma(ts), ts, rtol=1e-6)
    np.testing.assert_allclose(edm.diffusion_sq(ts), 2 * ts, rtol=1e-5)  # d sigma^2 / dt = 2t
    np.testing.assert_allclose(float(edm.prior_std), np.sqrt(1 + 80.0**2), rtol=1e-6)


def test_cosine_betas_match_nichol_dhariwal():
    T, s = 1000, 0.008
    f = lambda i: np.cos((i / T + s) / (1 + s) * np.pi / 2) ** 2
    abar = f(np.arange(1, T + 1)) / f(0)
    betas = np.minimum(1 - abar / np.concatenate([[1.0], abar[:-1]]), 0.999)
    np.testing.assert_allclose(schedules.cosine_betas(T), betas, rtol=1e-10)
    assert schedules.cosine_betas(T).max() == pytest.approx(0.999)


def test_scaled_linear_and_sigmoid_betas():
    b = schedules.scaled_linear_betas(1000)
    np.testing.assert_allclose(np.sqrt(b[[0, -1]]), np.sqrt([0.00085, 0.012]), rtol=1e-12)
    np.testing.assert_allclose(np.diff(np.sqrt(b)), np.diff(np.sqrt(b))[0], rtol=1e-9)
    sig = schedules.sigmoid_betas(1000)
    assert np.all(np.diff(sig) > 0) and 1e-4 < sig[0] < sig[-1] < 0.02


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear", "sigmoid"])
def test_discrete_arrays_equal_continuous_view_at_grid_points(name):
    s = schedules.get(name, num_timesteps=100)
    i = jnp.arange(100)
    t = (i + 1) / 100
    np.testing.assert_allclose(s.alpha(t) ** 2, s.alphas_cumprod, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(s.t_from_index(i), t, rtol=1e-7)
    np.testing.assert_allclose(s.index_from_t(t), i, atol=1e-4)
    np.testing.assert_allclose(
        s.alphas_cumprod, np.cumprod(1 - np.asarray(s.betas, np.float64)), rtol=1e-5, atol=1e-10
    )
    # the anchor: alpha(0) = 1 and log alpha is linear between grid points
    assert float(s.alpha(0.0)) == 1.0
    mid = (t[:-1] + t[1:]) / 2
    np.testing.assert_allclose(
        jnp.log(s.alpha(mid)),
        0.25 * (jnp.log(s.alphas_cumprod[:-1]) + jnp.log(s.alphas_cumprod[1:])),
        rtol=1e-4,
        atol=1e-7,
    )


@pytest.mark.parametrize("name", ALL)
def test_derived_sde_reproduces_the_marginal_variance(name):
    """d/dt Var[x_t | x_0] = 2 f Var + g^2 for the linear SDE (Sarkka & Solin 2019, eq. 5.51)."""
    s = schedules.get(name)
    t = interior_times(s, 33)
    var = lambda t: s.sigma(t) ** 2
    dvar = jax.vmap(jax.grad(var))(t)
    np.testing.assert_allclose(dvar, 2 * s.drift(t) * var(t) + s.diffusion_sq(t), rtol=2e-3, atol=2e-4)


METHODS = ("alpha", "sigma", "log_snr", "drift", "diffusion_sq")


class TransformsTest(chex.TestCase):
    """Every schedule method under jit, vmap and grad, in float32 and bfloat16."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_methods_under_transforms(self):
        for name in ALL:
            s = schedules.get(name)
            t = interior_times(s, 8, margin=1e-2)  # bfloat16 rounds 1 - 1e-3 to 1

            def all_methods(u, s=s):
                values = {m: getattr(s, m)(u) for m in METHODS}
                values["inverse"] = s.t_from_log_snr(values["log_snr"])
                values["dlog_snr"] = jax.vmap(jax.grad(s.log_snr))(u.astype(jnp.float32))
                return values

            for dtype in (jnp.float32, jnp.bfloat16):
                out = self.variant(all_methods)(t.astype(dtype))
                chex.assert_tree_all_finite(out)
                chex.assert_tree_shape_prefix(out, (8,))
                for m in METHODS:
                    assert out[m].dtype == dtype, (name, m, out[m].dtype)
                assert np.all(np.asarray(out["dlog_snr"]) < 0), name


def test_schedules_are_pytrees_that_pass_through_jit():
    s = schedules.get("cosine", num_timesteps=50)
    f = jax.jit(lambda sched, t: sched.alpha(t))
    np.testing.assert_allclose(f(s, jnp.array([0.5])), s.alpha(jnp.array([0.5])))
    leaves = jax.tree_util.tree_leaves(s)
    assert len(leaves) == 2  # betas and alphas_cumprod


def test_prior_sample_and_log_prob():
    s = schedules.get("ve", sigma_max=10.0)
    x = s.prior_sample(jax.random.key(0), (4000, 2))
    np.testing.assert_allclose(np.std(np.asarray(x)), float(s.prior_std), rtol=0.03)
    z = np.zeros((1, 3))
    std = float(s.prior_std)
    np.testing.assert_allclose(s.prior_log_prob(z), [-1.5 * np.log(2 * np.pi * std**2)], rtol=1e-6)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("nope", {}, "known schedules: cosine, edm, interpolant, linear"),
        ("vp_linear", {"beta_min": -0.1}, "beta_min must be > 0"),
        ("vp_linear", {"beta_min": 1.0, "beta_max": 0.5}, "beta_max"),
        ("linear", {"beta_start": 0.0}, "beta_start must be > 0"),
        ("linear", {"beta_end": 1.5}, r"betas must lie in \(0, 1\)"),
        ("linear", {"num_timesteps": 1}, "num_timesteps"),
        ("ve", {"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_max"),
        ("vp_linear", {"bogus": 1}, "Invalid arguments for schedule 'vp_linear'"),
    ],
)
def test_bad_arguments_raise_clear_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.get(name, **kwargs)


def test_time_outside_range_raises():
    s = schedules.get("vp_linear")
    with pytest.raises(ValueError, match=r"t must lie in the schedule's range \[0, 1\]"):
        s.check_t(jnp.array([0.5, 1.5]))
    s.check_t(jnp.array([0.0, 1.0]))


def test_vp_cosine_is_accurate_near_t_zero_in_float32():
    s = schedules.get("vp_cosine")
    assert float(s.sigma(0.0)) == 0.0 and float(s.alpha(0.0)) == 1.0
    t = jnp.array([1e-4, 1e-3, 1e-2])
    np.testing.assert_allclose(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-4)
