"""Stochastic interpolants and reflow against the analytic mixture: the losses are minimised by the exact
velocity and denoiser, the interpolant's velocity is its schedule's probability flow, the registered SDE
sampler with a tunable diffusion keeps the interpolant's marginals, reflow pairs of the exact flow are
the float64 ODE map, and the pair job resumes chunk by chunk."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import samplers, schedules
from diffax.fewstep import interpolants
from diffax.samplers.exact import reference_flow, toy_mixture

MIXTURE = toy_mixture()


def _exact_fields(interpolant, t, x):
    """(b, eta, score) of x_t = a x_1 + c x_0 + gamma z at scalar t: the marginal is the mixture noised with
    alpha = a, sigma = s = sqrt(c^2 + gamma^2), and E[x_0 | x], E[z | x] split its eps by c / s, gamma / s."""
    a, c, gamma = (np.float64(v) for v in interpolant.coefficients(t))
    da, dc, dgamma = (np.float64(v) for v in interpolant.derivatives(t))
    s = math.sqrt(c * c + gamma * gamma)
    ones = np.ones(x.shape[0])
    eps = MIXTURE.eps(np.asarray(x, np.float64), a * ones, s * ones)
    x1 = (x - s * eps) / a
    return da * x1 + (dc * c + dgamma * gamma) / s * eps, gamma / s * eps, -eps / s


@pytest.mark.parametrize("kind, g", [("linear", 0.0), ("trig", 1.0)])
def test_losses_are_minimised_by_the_exact_velocity_and_denoiser(kind, g):
    interpolant = interpolants.Interpolant(kind, g)
    rng = np.random.default_rng(0)
    n = 200_000
    x1, x0, z = MIXTURE.sample(rng, n), rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    for t in (0.3, 0.8):
        x_t, target = (np.asarray(v, np.float64) for v in interpolant.sample(x0, x1, z, jnp.full((n,), t)))
        b, eta, score = _exact_fields(interpolant, t, x_t)
        _, c, gamma = (float(v) for v in interpolant.coefficients(t))
        s = math.sqrt(c * c + gamma * gamma)
        h = np.sin(3.0 * x_t) + 0.5  # any other direction in function space
        for field, loss, aim in (
            (b, interpolants.velocity_loss, target),
            (eta, interpolants.denoiser_loss, z),
            # the trainer's denoiser: of the whole Gaussian part s eps = c x_0 + gamma z (score -eta / s)
            (-s * score, interpolants.denoiser_loss, (c * x0 + gamma * z) / s),
        ):
            if g == 0.0 and field is eta:
                continue
            # d/d delta of the mean loss at delta = 0 is 2 E[(field - aim) . h]: zero at the minimiser.
            cross = np.sum((field - aim) * h, -1)
            assert abs(cross.mean()) < 4 * cross.std() / math.sqrt(n), (kind, t)
            base = float(np.mean(loss(jnp.asarray(field), jnp.asarray(aim))))
            for delta in (0.1, -0.1):
                moved = float(np.mean(loss(jnp.asarray(field + delta * h), jnp.asarray(aim))))
                assert moved > base
            mean_field = np.broadcast_to(aim.mean(0), aim.shape)  # the best field that ignores x
            assert float(np.mean(loss(jnp.asarray(mean_field), jnp.asarray(aim)))) > base + 0.05


def test_the_interpolant_velocity_is_its_schedules_probability_flow_and_log_snr_inverts():
    """b(t, x) = -(alpha' x_0 + sigma' eps) of the schedule in tau = 1 - t (so every deterministic diffax
    sampler integrates the interpolant's ODE), and t_from_log_snr inverts log_snr (bisection)."""
    schedule = schedules.get("interpolant", kind="trig", gamma_scale=1.0)
    x = np.random.default_rng(3).standard_normal((64, 2))
    for t in (0.2, 0.7):
        b, _, _ = _exact_fields(schedule.interpolant, t, x)
        tau = np.float32(1.0 - t)
        model = MIXTURE.model_fn(schedule, prediction="eps")
        eps = np.asarray(model(jnp.asarray(x, jnp.float32), jnp.full((64,), tau)), np.float64)
        alpha, sigma = float(schedule.alpha(tau)), float(schedule.sigma(tau))
        dalpha, dsigma = (
            float(jax.jvp(f, (tau,), (np.float32(1.0),))[1]) for f in (schedule.alpha, schedule.sigma)
        )
        x0 = (x - sigma * eps) / alpha
        np.testing.assert_allclose(-(dalpha * x0 + dsigma * eps), b, rtol=2e-4, atol=2e-4)
    taus = jnp.linspace(0.05, 0.95, 7)
    np.testing.assert_allclose(schedule.t_from_log_snr(schedule.log_snr(taus)), taus, atol=1e-5)


@pytest.mark.parametrize("diffusion", [0.0, 1.0])
def test_the_interpolant_sde_sampler_keeps_the_marginals(diffusion):
    """``diffax.sample(..., sampler="interpolant_sde", diffusion=eps)`` from the interpolant's marginal at
    t = 0.02 lands on its marginal at t = 0.98, for the ODE (eps = 0) and the SDE."""
    schedule = schedules.get("interpolant", kind="trig", gamma_scale=1.0)
    t0, t1, n = 0.02, 0.98, 3000
    rng = np.random.default_rng(1)
    a, c, gamma = (float(v) for v in schedule.interpolant.coefficients(t0))
    x_start = a * MIXTURE.sample(rng, n) + math.sqrt(c * c + gamma * gamma) * rng.standard_normal((n, 2))
    out = samplers.sample(
        MIXTURE.model_fn(schedule, prediction="eps"),
        schedule,
        jnp.asarray(x_start, jnp.float32),
        sampler="interpolant_sde",
        timesteps=jnp.linspace(1.0 - t0, 1.0 - t1, 201),
        prediction="eps",
        key=jax.random.key(2),
        diffusion=diffusion,
    )
    a, c, gamma = (float(v) for v in schedule.interpolant.coefficients(t1))
    mean, cov = MIXTURE.marginal_moments(a, math.sqrt(c * c + gamma * gamma))
    out = np.asarray(out, np.float64)
    np.testing.assert_allclose(out.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(np.cov(out.T), cov, atol=0.06)


def test_reflow_pairs_of_the_exact_flow_are_the_ode_map_and_the_job_resumes(tmp_path):
    rf = schedules.get("rectified_flow")
    model = MIXTURE.model_fn(rf, prediction="flow")
    ts = samplers.timesteps(rf, num_steps=1)  # from t = 0.999 (noise end) to 0.001 (data end)

    calls = []

    def flow(noise):
        calls.append(1)
        return samplers.sample(
            model, rf, noise, sampler="ode", timesteps=ts, prediction="flow", rtol=1e-7, atol=1e-7
        )

    directory = str(tmp_path / "pairs")
    paths = interpolants.write_reflow_pairs(flow, directory, shape=(2,), num_chunks=3, chunk_size=128, seed=0)
    assert len(calls) == 3 and [os.path.basename(p) for p in paths] == [
        f"pairs_{k:05d}.npz" for k in range(3)
    ]
    chunk = np.load(paths[1])
    noise, image = chunk["noise"].astype(np.float64), chunk["image"].astype(np.float64)
    lsnr = [float(rf.log_snr(float(t))) for t in (ts[0], ts[-1])]
    alpha = [float(rf.alpha(float(t))) for t in (ts[0], ts[-1])]
    # In y = x / alpha and sigma / alpha every schedule's flow is the variance-exploding one.
    exact = alpha[1] * reference_flow(MIXTURE, noise / alpha[0], *lsnr, variance_preserving=False)
    assert float(np.sqrt(np.mean(np.sum((image - exact) ** 2, -1)))) < 1e-4
    os.remove(paths[1])
    interpolants.write_reflow_pairs(flow, directory, shape=(2,), num_chunks=3, chunk_size=128, seed=0)
    assert len(calls) == 4  # only the missing chunk was drawn again, from its own key
    np.testing.assert_array_equal(np.load(paths[1])["noise"], chunk["noise"])
