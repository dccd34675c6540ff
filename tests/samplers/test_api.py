"""The sampling API: time grids, evaluation counts, parameterizations, errors, sharding, compilation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from diffax import PREDICTIONS, samplers, schedules

# ----------------------------------------------------------------------------------------------
# Time grids.


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine", "ve", "edm", "rectified_flow", "linear"])
def test_continuous_spacings(name):
    sched = schedules.get(name, **({"num_timesteps": 50} if name == "linear" else {}))
    n = 12
    for spacing in samplers.SPACINGS:
        ts = np.asarray(samplers.timesteps(sched, num_steps=n, spacing=spacing), np.float64)
        chex.assert_shape(ts, (n + 1,))
        assert np.all(np.diff(ts) < 0)
        assert ts[0] <= sched.t_max and ts[-1] >= sched.t_min
        assert float(sched.sigma(ts[-1])) > 0 and float(sched.alpha(ts[0])) > 0
    ts = samplers.timesteps(sched, num_steps=n, spacing="uniform_logsnr")
    np.testing.assert_allclose(np.diff(np.asarray(sched.log_snr(ts), np.float64), 2), 0.0, atol=2e-3)
    ts = samplers.timesteps(sched, num_steps=n, spacing="karras", rho=7.0)
    root = np.exp(-np.asarray(sched.log_snr(ts), np.float64) / 14.0)  # (sigma / alpha)^(1 / rho)
    np.testing.assert_allclose(np.diff(root, 2), 0.0, atol=1e-4)
    ts = np.asarray(samplers.timesteps(sched, num_steps=n, spacing="quadratic"), np.float64)
    np.testing.assert_allclose(np.diff(np.sqrt((ts - ts[-1]) / (ts[0] - ts[-1])), 2), 0.0, atol=1e-5)


def test_default_range_avoids_zero_noise():
    vp = schedules.get("vp_linear")
    ts = samplers.timesteps(vp, num_steps=4)
    assert float(ts[0]) == 1.0 and float(ts[-1]) == pytest.approx(1e-3)
    rf = samplers.timesteps(schedules.get("rectified_flow"), num_steps=4)  # alpha(1) = 0
    assert float(rf[0]) == pytest.approx(0.999) and float(rf[-1]) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "spacing, indices",
    # Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2
    # (T = 1000, 10 steps; their 1-based timesteps minus one).
    [
        ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ],
)
def test_integer_spacings_match_diffusers(spacing, indices):
    sched = schedules.get("linear", num_timesteps=1000)
    ts = np.asarray(samplers.timesteps(sched, num_steps=10, spacing=spacing), np.float64)
    np.testing.assert_allclose(ts[:-1], (np.array(indices) + 1) / 1000, rtol=1e-6)
    assert ts[-1] == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 4, "spacing": "cubic"}, "known spacings"),
        ({"num_steps": 4, "spacing": "trailing"}, "DiscreteSchedule"),
        ({"num_steps": 4, "t_start": 0.1, "t_end": 0.5}, "t_start must be > t_end"),
        ({"num_steps": 4, "t_end": 0.0}, "finite log-SNR"),
        ({"num_steps": 4, "t_start": 2.0}, "range"),
    ],
)
def test_timesteps_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        samplers.timesteps(schedules.get("vp_linear"), **kwargs)


def test_integer_spacing_rejects_bad_arguments():
    sched = schedules.get("linear", num_timesteps=10)
    with pytest.raises(ValueError, match="t_start"):
        samplers.timesteps(sched, num_steps=4, spacing="leading", t_start=0.5)
    with pytest.raises(ValueError, match="num_timesteps"):
        samplers.timesteps(sched, num_steps=11, spacing="trailing")


# ----------------------------------------------------------------------------------------------
# Evaluation counts, against a model that counts its own executions.


def _gaussian_eps(x, t):
    """The exact eps of N(0, I) data under a VP schedule: x_t ~ N(0, I), eps = sigma x."""
    return jnp.sqrt(-jnp.expm1(-t * 0.1 - 9.95 * t * t))[:, None] * x  # sigma of vp_linear(0.1, 20)


@pytest.fixture()
def counting_model():
    calls = []

    def model(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return _gaussian_eps(x, t)

    return model, calls


# Samplers whose stages after the first are skipped on an interval that ends at sigma = 0.
_STAGED = ("heun", "dpm_solver_2", "dpm_solver_3", "dpm_solver++_2s")


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_nfe_is_counted_right(counting_model, name):
    """info["nfe"] equals the executed evaluations and the sampler's promise. Fixed-step samplers run on
    a discrete grid that ends at the anchor x_0 (sigma = 0), where they stay finite and multi-stage
    methods finish with the exact first-order step (one evaluation); "ode" needs sigma > 0 at the end."""
    model, calls = counting_model
    if name == "ode":
        sched = schedules.get("vp_linear")
        ts = samplers.timesteps(sched, num_steps=4)
    else:
        sched = schedules.get("linear", num_timesteps=100)
        ts = samplers.timesteps(sched, num_steps=5, spacing="trailing")
    x_T = jax.random.normal(jax.random.key(0), (8, 2))
    x, info = samplers.sample(
        model, sched, x_T, sampler=name, timesteps=ts, key=jax.random.key(1), return_info=True
    )
    jax.block_until_ready(x)
    assert int(info["nfe"]) == len(calls)
    if name == "ode":
        assert len(calls) == 6 * int(info["num_steps"]) + 1
    else:
        sampler = samplers.get(name)
        per_step = sampler.nfe_per_step
        assert len(calls) == 4 * per_step + (1 if name in _STAGED else per_step) + sampler.warmup_nfe
    assert np.all(np.isfinite(np.asarray(x)))


def test_ode_that_runs_out_of_steps_returns_nan(vp, mixture_model):
    ts = samplers.timesteps(vp, num_steps=1)
    x_T = jax.random.normal(jax.random.key(0), (8, 2))
    x, info = samplers.sample(
        mixture_model, vp, x_T, sampler="ode", timesteps=ts, max_steps=3, return_info=True
    )
    assert not bool(info["successful"]) and np.all(np.isnan(np.asarray(x)))


def test_ode_counts_match_for_dopri8_and_final_denoising(counting_model):
    model, calls = counting_model
    sched = schedules.get("vp_linear")
    ts = samplers.timesteps(sched, num_steps=1)
    x_T = jax.random.normal(jax.random.key(0), (8, 2))
    x, info = samplers.sample(
        model, sched, x_T, sampler="ode", timesteps=ts, solver="dopri8", denoise_final=True, return_info=True
    )
    jax.block_until_ready(x)
    assert int(info["nfe"]) == len(calls) == 13 * int(info["num_steps"]) + 2


# ----------------------------------------------------------------------------------------------
# Parameterizations, grids of discrete schedules, thresholding.


def test_prediction_types_give_the_same_trajectory(vp, mixture):
    """Every sampler sees the model through (x0, eps); each exact prediction type gives the same path."""
    name = "dpm_solver++_2m"
    x_T = jax.random.normal(jax.random.key(0), (64, 2))
    ts = samplers.timesteps(vp, num_steps=8)
    outs = {
        p: np.asarray(
            samplers.sample(
                mixture.model_fn(vp, prediction=p), vp, x_T, sampler=name, timesteps=ts, prediction=p
            )
        )
        for p in PREDICTIONS
    }
    for p in PREDICTIONS:
        np.testing.assert_allclose(outs[p], outs["eps"], rtol=1e-4, atol=1e-4, err_msg=p)


def test_ddpm_on_the_grid_of_a_discrete_schedule_is_ddpm():
    """One interval between neighbouring grid points is DDPM's posterior q(x_{i-1} | x_i, x0) (Ho et al.
    2020, eq. 7), evaluated here in float64 from the betas; at index 0 it lands on x0 without noise."""
    sched = schedules.get("linear", num_timesteps=20)
    betas = schedules.linear_betas(20)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    x = jax.random.normal(jax.random.key(0), (16, 2))
    key = jax.random.key(4)
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), x.shape), np.float64)
    for i in (7, 0):
        ts = jnp.array([float(sched.t_from_index(i)), float(sched.t_from_index(i - 1))])
        out = samplers.sample(_gaussian_eps, sched, x, sampler="ddpm", timesteps=ts, key=key)
        x64 = np.asarray(x, np.float64)
        eps = np.asarray(_gaussian_eps(x, jnp.full((16,), ts[0])), np.float64)
        x0 = (x64 - np.sqrt(1.0 - abar[i]) * eps) / np.sqrt(abar[i])
        mean = (betas[i] * np.sqrt(abar_prev[i]) * x0 + (1 - abar_prev[i]) * np.sqrt(1 - betas[i]) * x64) / (
            1.0 - abar[i]
        )
        var = betas[i] * (1.0 - abar_prev[i]) / (1.0 - abar[i])
        np.testing.assert_allclose(out, mean + np.sqrt(var) * noise, rtol=2e-5, atol=2e-5)


def test_dynamic_threshold():
    x0 = jnp.array([[0.2, -0.5, 0.9, 0.1], [3.0, -2.0, 0.5, 1.0]])
    out = np.asarray(samplers.dynamic_threshold(x0, percentile=1.0))
    np.testing.assert_allclose(out[0], np.asarray(x0[0]))  # |x0| <= 1: s = 1, unchanged
    np.testing.assert_allclose(out[1], np.asarray(x0[1]) / 3.0)
    out = np.asarray(samplers.dynamic_threshold(x0, percentile=0.5))
    s = np.quantile(np.abs(np.asarray(x0[1])), 0.5)
    np.testing.assert_allclose(out[1], np.clip(np.asarray(x0[1]), -s, s) / s, rtol=1e-6)


def test_thresholded_sampling_ends_in_the_unit_box():
    """DDIM to the anchor of a discrete schedule returns the (thresholded) data prediction."""
    sched = schedules.get("linear", num_timesteps=100)
    ts = samplers.timesteps(sched, num_steps=5, spacing="trailing")
    x_T = 3.0 * jax.random.normal(jax.random.key(0), (64, 2))
    plain = np.asarray(samplers.sample(_gaussian_eps, sched, x_T, sampler="ddim", timesteps=ts))
    clipped = np.asarray(
        samplers.sample(_gaussian_eps, sched, x_T, sampler="ddim", timesteps=ts, thresholding=0.9)
    )
    assert np.abs(plain).max() > 1.5 and np.abs(clipped).max() <= 1.0 + 1e-6


def test_clip_denoised_cuts_without_rescaling():
    """One DDIM step to the anchor returns the data prediction clipped to [-1, 1], in-range values exact."""
    sched = schedules.get("linear", num_timesteps=100)
    ts = jnp.array([0.5, 0.0])
    x_T = 3.0 * jax.random.normal(jax.random.key(0), (64, 2))
    out = np.asarray(
        samplers.sample(_gaussian_eps, sched, x_T, sampler="ddim", timesteps=ts, clip_denoised=True)
    )
    t = jnp.full((64,), 0.5)
    x0 = np.asarray((x_T - sched.sigma(0.5) * _gaussian_eps(x_T, t)) / sched.alpha(0.5))
    assert np.any(np.abs(x0) > 1.0) and np.any(np.abs(x0) < 1.0)
    np.testing.assert_allclose(out, np.clip(x0, -1.0, 1.0), atol=1e-5)


@pytest.mark.parametrize("name", ["unipc", "dpm_solver++_3m"])
def test_bfloat16_state_keeps_its_dtype(vp, mixture_model, name):
    """float32 schedule coefficients must not promote a bfloat16 state (the scan carry keeps it)."""
    x_T = jax.random.normal(jax.random.key(0), (16, 2))
    ts = samplers.timesteps(vp, num_steps=6)
    run = lambda x: samplers.sample(mixture_model, vp, x, sampler=name, timesteps=ts, key=jax.random.key(1))
    low = run(x_T.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(run(x_T)), atol=0.05)


# ----------------------------------------------------------------------------------------------
# Errors, raised before anything compiles.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "dpm_solver_4"}, "known samplers: ddpm, ddim"),
        ({"sampler": "ddim", "order": 2}, "accepts: eta"),
        ({"sampler": "ddim", "eta": 2.0}, "eta"),
        ({"sampler": "ddim", "timesteps": jnp.array([0.1, 0.5, 1.0])}, "strictly decreasing"),
        ({"sampler": "ddim", "timesteps": jnp.ones((2, 3))}, "1-D"),
        ({"sampler": "ddim", "timesteps": jnp.array([1.0])}, "1-D"),
        ({"sampler": "ddim", "timesteps": jnp.array([1.5, 0.5])}, "range"),
        ({"sampler": "ddim", "x_T": jnp.float32(1.0)}, "shape"),
        ({"sampler": "ddim", "prediction": "noise"}, "known predictions"),
        ({"sampler": "dpm_solver++_3m", "timesteps": jnp.array([1.0, 0.5, 0.1])}, "at least 3"),
        ({"sampler": "unipc", "order": 3, "timesteps": jnp.array([1.0, 0.5, 0.1])}, "at least 3"),
        ({"sampler": "ddpm", "key": None}, "key="),
        ({"sampler": "dpm_solver_2", "thresholding": 0.99}, "data-prediction"),
        ({"sampler": "ddim", "thresholding": 1.5}, "percentile"),
        ({"sampler": "dpm_solver_2", "clip_denoised": True}, "data-prediction"),
        ({"sampler": "ddim", "thresholding": 0.9, "clip_denoised": True}, "choose one"),
        ({"sampler": "ode", "timesteps": jnp.array([1.0, 0.0])}, "sigma = 0"),
        ({"sampler": "ddim", "timesteps": jnp.array([1.0, 0.0]), "denoise_final": True}, "sigma = 0"),
        ({"sampler": "ode", "solver": "rk4"}, "known solvers"),
    ],
)
def test_sample_rejects_bad_arguments(kwargs, match):
    args = {
        "timesteps": jnp.array([1.0, 0.5, 0.1]),
        "x_T": jnp.zeros((4, 2)),
        "key": jax.random.key(0),
    } | kwargs
    x_T = args.pop("x_T")
    with pytest.raises(ValueError, match=match):
        samplers.sample(_gaussian_eps, schedules.get("vp_linear"), x_T, **args)


def test_invert_rejects_stochastic_samplers():
    with pytest.raises(ValueError, match="deterministic"):
        samplers.invert(
            _gaussian_eps, schedules.get("vp_linear"), jnp.zeros((4, 2)), timesteps=jnp.array([1.0, 0.1]),
            sampler="ddpm",
        )  # fmt: skip


def test_get_exposes_the_init_step_pair():
    sampler = samplers.get("unipc")
    assert (sampler.order, sampler.nfe_per_step, sampler.stochastic, sampler.min_steps) == (3, 1, False, 2)
    assert (
        samplers.get("dpm_solver_3").nfe_per_step == 3
        and samplers.get("pc", corrector_steps=2).nfe_per_step == 3
    )
    assert samplers.get("ddim", eta=0.5).stochastic and not samplers.get("ddim").stochastic


# ----------------------------------------------------------------------------------------------
# Sharding and compilation.


@pytest.mark.parametrize(
    "name, axis_type",
    [
        ("pc", AxisType.Explicit),
        ("dpm_solver++_2m", AxisType.Auto),
        ("ode", AxisType.Explicit),
        ("ode", AxisType.Auto),
    ],
)
def test_sharded_batch_equals_single_device(vp, mixture_model, name, axis_type):
    """The batch split over 8 devices gives the single-device result (PRNG draws, PC's batch-mean
    step size and diffrax's step control included)."""
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(axis_type,))
    x_T = jax.random.normal(jax.random.key(0), (64, 2))
    ts = samplers.timesteps(vp, num_steps=1 if name == "ode" else 6)
    run = lambda x: samplers.sample(mixture_model, vp, x, sampler=name, timesteps=ts, key=jax.random.key(1))
    sharded = run(jax.device_put(x_T, NamedSharding(mesh, PartitionSpec("batch"))))
    assert sharded.sharding.spec[0] == "batch" and len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(run(x_T)), rtol=1e-5, atol=1e-6)


def _scaled_eps(params, x, t):
    return params["scale"] * _gaussian_eps(x, t)


def test_new_parameters_and_inputs_do_not_retrace():
    """The model's arrays are runtime arguments: a second call with new values reuses the program."""
    traced = chex.assert_max_traces(_scaled_eps, n=1)
    sched = schedules.get("vp_linear")
    ts = samplers.timesteps(sched, num_steps=3)
    outs = []
    for i in range(2):
        model = jax.tree_util.Partial(traced, {"scale": jnp.float32(1.0 + i)})
        x_T = jax.random.normal(jax.random.key(i), (8, 2))
        outs.append(samplers.sample(model, sched, x_T, sampler="ddim", timesteps=ts))
    assert not np.allclose(outs[0], outs[1])
    with pytest.raises(AssertionError):  # a new shape does retrace, and the check notices
        samplers.sample(model, sched, jnp.zeros((4, 2)), sampler="ddim", timesteps=ts)


def test_epsilon_scaling_divides_the_noise_prediction(vp, mixture_model):
    """Epsilon Scaling (Ning et al. 2024): b = 1 is the plain sampler; one DDIM step with b sees eps / b."""
    x_T = jax.random.normal(jax.random.key(0), (8, 2))
    ts = jnp.array([1.0, 0.5], jnp.float32) * (1 - 1e-3)
    plain = samplers.sample(mixture_model, vp, x_T, sampler="ddim", timesteps=ts)
    same = samplers.sample(mixture_model, vp, x_T, sampler="ddim", timesteps=ts, epsilon_scale=1.0)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))
    scaled = samplers.sample(mixture_model, vp, x_T, sampler="ddim", timesteps=ts, epsilon_scale=1.02)
    t, s = ts
    eps = mixture_model(x_T, jnp.full((8,), t)) / 1.02
    expected = vp.alpha(s) * (x_T - vp.sigma(t) * eps) / vp.alpha(t) + vp.sigma(s) * eps
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(expected), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="epsilon_scale"):
        samplers.sample(mixture_model, vp, x_T, sampler="ddim", timesteps=ts, epsilon_scale=0.0)


def test_time_shift_queries_the_time_matching_the_variance(vp):
    """Above the cutoff the model sees, per example, the candidate time whose sigma^2 is closest to the
    example's variance; at or below it, t itself; a cutoff above every time is the plain sampler."""
    from diffax.samplers import make_denoiser

    seen = []

    def model(x, t):
        seen.append(t)
        return jnp.zeros_like(x)

    x = jnp.stack(
        [jnp.full((64,), v) * jnp.tile(jnp.array([1.0, -1.0]), 32) for v in (0.5, 0.9)]
    )  # var .25, .81
    denoise = make_denoiser(model, vp, prediction="eps", time_shift=(0.2, 0.3))
    denoise(x, jnp.float32(0.5))  # eagerly, so the model records concrete times
    candidates = 0.5 + np.linspace(-0.2, 0.2, 9)
    sig2 = np.asarray(vp.sigma(jnp.asarray(candidates))) ** 2
    expected = [candidates[np.argmin(np.abs(sig2 - v))] for v in (0.25, 0.81)]
    np.testing.assert_allclose(np.asarray(seen[-1]), expected, rtol=1e-6)
    denoise(x, jnp.float32(0.25))
    np.testing.assert_allclose(np.asarray(seen[-1]), [0.25, 0.25])
    x_T = jax.random.normal(jax.random.key(0), (8, 2))
    ts = samplers.timesteps(vp, num_steps=4)
    plain = samplers.sample(model, vp, x_T, sampler="ddim", timesteps=ts)
    never = samplers.sample(model, vp, x_T, sampler="ddim", timesteps=ts, time_shift=(0.01, 2.0))
    np.testing.assert_array_equal(np.asarray(never), np.asarray(plain))
    # at the grid's start on a cosine schedule (alpha(t_max) ~ 5e-5) a noisier-than-sigma^2 example
    # is not shifted up to t_max, where x_0 = (x - sigma eps) / alpha blows up
    cosine = schedules.get("cosine")
    t_start = float(samplers.timesteps(cosine, num_steps=1)[0])
    make_denoiser(model, cosine, prediction="eps", time_shift=(0.01, 0.3))(1.5 * x, jnp.float32(t_start))
    assert np.all(np.asarray(seen[-1]) <= t_start), seen[-1]
    ts = samplers.timesteps(cosine, num_steps=2)  # compiled, with the schedule's parameters traced
    shifted = samplers.sample(model, cosine, 1.5 * x, sampler="ddim", timesteps=ts, time_shift=(0.01, 0.3))
    assert np.all(np.isfinite(np.asarray(shifted)))
