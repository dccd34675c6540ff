"""The consistency core against exact answers on the analytic mixture (``diffax.samplers.exact``).

With the exact score the consistency function is the probability-flow map to sigma_min; on an N-point
grid the fixed point of distillation is the N-step teacher chain (Song et al. 2023, Thm. 1), which
converges to that map at the sampler's order.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffax import samplers, schedules
from diffax.fewstep import consistency as cm
from diffax.samplers.exact import reference_flow, toy_mixture

MIXTURE = toy_mixture()
EDM = schedules.get("edm")  # sigma(t) = t, alpha = 1, [0.002, 80]
EPS, T = 0.002, 80.0


def _exact_model(schedule=EDM):
    return MIXTURE.model_fn(schedule, prediction="eps")


@jax.jit
def _chain(y, sigma, grid):
    """The N-step teacher chain from each example's grid level ``sigma`` down to grid[0] = sigma_min,
    with the exact Heun teacher (per-example intervals, as in distillation)."""
    heun = samplers.get("heun")

    def body(k, y):
        j = grid.shape[0] - 1 - k
        ones = jnp.ones_like(sigma)
        stepped = cm.teacher_step(
            heun, _exact_model(), EDM, y, grid[j] * ones, grid[j - 1] * ones, prediction="eps"
        )
        return jnp.where((sigma >= grid[j])[:, None], stepped, y)

    return jax.lax.fori_loop(0, grid.shape[0] - 1, body, y)


def test_boundary_condition_holds_bitwise_in_float32():
    y = jax.random.normal(jax.random.key(0), (16, 8, 8, 1)) * 3.0
    denoised = jax.random.normal(jax.random.key(1), y.shape) * 100.0  # any finite network output
    sigma = jnp.full((16,), EPS, jnp.float32)
    f = cm.consistency_function(denoised, y, sigma, sigma_data=0.5, sigma_min=EPS)
    assert f.dtype == jnp.float32 and np.array_equal(np.asarray(f), np.asarray(y))
    c_skip, c_out = cm.boundary_scalings(sigma, sigma_data=0.5, sigma_min=EPS)
    assert np.all(np.asarray(c_skip) == 1.0) and np.all(np.asarray(c_out) == 0.0)
    # Away from the boundary f blends towards D; with sigma_min = 0 it is D (EDM, Karras et al. Table 1).
    sigma = jnp.full((16,), 3.0)
    assert not np.allclose(cm.consistency_function(denoised, y, sigma, sigma_data=0.5, sigma_min=EPS), y)
    np.testing.assert_allclose(
        cm.consistency_function(denoised, y, sigma, sigma_data=0.5, sigma_min=0.0),
        denoised,
        rtol=1e-5,
        atol=1e-4,
    )


def test_grids_curricula_and_constants():
    grid = np.asarray(cm.karras_sigmas(18, sigma_min=EPS, sigma_max=T))
    assert grid[0] == np.float32(EPS) and grid[-1] == np.float32(T) and np.all(np.diff(grid) > 0)
    ref = (EPS ** (1 / 7) + np.arange(18) / 17 * (T ** (1 / 7) - EPS ** (1 / 7))) ** 7
    np.testing.assert_allclose(grid, ref, rtol=1e-5)
    # CM App. C, CIFAR-10 CT (s0 = 2, s1 = 150, mu0 = 0.9, K = 800k): N(0) = 2, N(K/2) = 107, N(K) = 151.
    k = np.array([0, 400_000, 800_000])
    n = np.asarray(cm.cm_num_scales(k, total_steps=800_000, s0=2, s1=150))
    np.testing.assert_array_equal(n, [2, 107, 151])
    mu = np.asarray(cm.cm_target_decay(k, total_steps=800_000, s0=2, s1=150, mu0=0.9))
    np.testing.assert_allclose(mu, np.exp(2 * np.log(0.9) / (n - 1)), rtol=1e-6)
    # iCT: eight doubling stages 11, 21, ..., 1281 over K = 400k steps.
    steps = np.arange(8) * 50_000
    np.testing.assert_array_equal(
        np.asarray(cm.ict_num_scales(steps, total_steps=400_000)), [11, 21, 41, 81, 161, 321, 641, 1281]
    )
    assert int(cm.ict_num_scales(400_000, total_steps=400_000)) == 1281
    spec = cm.ConsistencySpec(curriculum="ict", total_steps=400_000, index="lognormal")
    sigmas, n = spec.grid(0)
    probs = np.asarray(cm.lognormal_index_probs(sigmas, n))
    assert probs.shape == (1280,) and abs(probs.sum() - 1) < 1e-6 and np.all(probs[10:] == 0)
    assert math.isclose(cm.pseudo_huber_c(16 * 16), 0.00864)  # digits 16x16
    x, y = jnp.zeros((2, 4, 4, 1)), jnp.ones((2, 4, 4, 1)) * jnp.array([1.0, 2.0])[:, None, None, None]
    c = cm.pseudo_huber_c(16)
    np.testing.assert_allclose(
        cm.distance(x, y, kind="pseudo_huber"), np.sqrt([16 + c * c, 64 + c * c]) - c, rtol=1e-6
    )
    np.testing.assert_allclose(cm.distance(x, y, kind="l2"), [1.0, 4.0])
    np.testing.assert_allclose(cm.distance(x, y, kind="l1"), [1.0, 2.0])


def test_ect_levels_halve_their_gap_per_stage_and_stop_at_sigma_min():
    """ECT's r(sigma) (Geng et al. 2024, q = 2, k = 8, b = 1): sigma - r = sigma 2^-(s+1) (1 + 8
    sigmoid(-sigma)) halves every stage, and is clamped at sigma_min, where f is the identity."""
    spec = cm.ConsistencySpec(curriculum="ect", ect_stage_steps=100, sigma_min=EPS)
    sigma = jnp.array([0.01, 0.5, 3.0, 10.0, 40.0])  # the first two below r = 0 at stage 0: clamped
    gaps = [np.asarray(sigma - cm.ect_lower_level(sigma, step, spec)) for step in (0, 99, 100, 300)]
    expected = np.asarray(sigma) * 0.5 * (1 + 8 / (1 + np.exp(np.asarray(sigma))))
    np.testing.assert_allclose(gaps[0][2:], expected[2:], rtol=1e-5)
    np.testing.assert_array_equal(gaps[0], gaps[1])
    np.testing.assert_allclose(gaps[2][2:], gaps[0][2:] / 2, rtol=1e-5)
    np.testing.assert_allclose(gaps[3][2:], gaps[0][2:] / 8, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cm.ect_lower_level(sigma[:2], 0, spec)), np.float32(EPS))
    x0 = jnp.zeros((64, 2))
    identity = lambda y, s, key: y
    _, aux = cm.consistency_loss(spec, identity, identity, x0, jax.random.key(0), 0)
    # f = identity on the same noise: y_hi - y_lo = (sigma - r) z, so l2 / (sigma - r)^2 is mean(z^2).
    gap = aux["sigma"] - cm.ect_lower_level(aux["sigma"], 0, spec)
    assert float(jnp.min(aux["sigma"])) > EPS and float(jnp.min(gap)) > 0
    assert 0.6 < float(jnp.mean(aux["loss_per_example"] / gap**2)) < 1.4


def test_teacher_chain_converges_to_the_float64_ode_map():
    """The consistency function of the exact-score teacher is the ODE map to sigma_min: the Heun chain on
    Karras grids converges to the float64 DOP853 solution at order 2 (measured rms: N=18 0.05, 1280
    7e-6 in float64)."""
    rng = np.random.default_rng(0)
    x_T = MIXTURE.sample(rng, 512) + T * rng.standard_normal((512, 2))
    exact = reference_flow(MIXTURE, x_T, -2 * math.log(T), -2 * math.log(EPS), variance_preserving=False)
    errors = {}
    for n in (18, 80, 640):
        ts = cm.karras_sigmas(n, sigma_min=EPS, sigma_max=T)[::-1]
        y = samplers.sample(_exact_model(), EDM, jnp.asarray(x_T, jnp.float32), sampler="heun", timesteps=ts)
        errors[n] = float(np.sqrt(np.mean(np.sum((np.asarray(y, np.float64) - exact) ** 2, -1))))
    assert errors[640] < 1e-3 < errors[80] < errors[18] < 0.1, errors
    slope = math.log(errors[80] / errors[640]) / math.log(640 / 80)
    assert slope > 1.7, errors


def test_distillation_loss_vanishes_at_the_teacher_chain():
    """The chain student is the fixed point of the CD loss (online at sigma_{n+1} vs target at the teacher's
    Heun step to sigma_n): its loss is round-off; the exact denoiser (a one-step guess) is far from it."""
    spec = cm.ConsistencySpec(num_scales=18, sigma_data=0.87)
    grid = cm.karras_sigmas(18, sigma_min=EPS, sigma_max=T)
    heun = samplers.get("heun")

    def point(y_hi, s_hi, s_lo, x0, z):
        return cm.teacher_step(heun, _exact_model(), EDM, y_hi, s_hi, s_lo, prediction="eps")

    chain = lambda y, s, key: _chain(y, s, grid)
    x0 = jnp.asarray(MIXTURE.sample(np.random.default_rng(1), 512), jnp.float32)
    loss_of = jax.jit(
        lambda f: cm.consistency_loss(spec, f, f, x0, jax.random.key(0), 0, target_point=point),
        static_argnums=0,
    )
    loss, aux = loss_of(chain)
    assert float(loss) < 1e-9 and float(jnp.min(aux["sigma"])) > EPS

    def denoiser(y, s, key):
        eps = _exact_model()(y, s)
        return cm.consistency_function(y - s[:, None] * eps, y, s, sigma_data=0.87, sigma_min=EPS)

    wrong, _ = loss_of(denoiser)
    assert float(wrong) > 1e-4


class _MLP(nn.Module):
    """F(c_in y, c_noise) for 2-D data: Fourier features of c_noise, three SiLU layers."""

    @nn.compact
    def __call__(self, y, c_noise, cond=None, train=False):
        scaled = c_noise[:, None] * (2.0 ** jnp.arange(4))[None]
        emb = jnp.concatenate([c_noise[:, None], jnp.sin(scaled), jnp.cos(scaled)], -1)
        h = jnp.concatenate([y, emb], -1)
        for _ in range(3):
            h = nn.silu(nn.Dense(128)(h))
        return nn.Dense(2)(h)


@pytest.mark.slow
def test_distilled_student_reaches_the_teacher_chain():
    """CD of an MLP from the exact Heun teacher (N = 18, mu = 0, l2, uniform, 3000 Adam steps of batch 128):
    one-step samples from T = 80 get within 0.13 (0.15 data-rms; measured 0.100) of the 18-step chain,
    their limit, where the exact denoiser's one-step guess is 1.0 away. They are not compared with the
    exact map, which the chain misses by 0.05 itself. (4000 steps reach 0.077.)"""
    sigma_data = float(np.sqrt(np.trace(MIXTURE.marginal_moments(1.0, 0.0)[1]) / 2))
    spec = cm.ConsistencySpec(num_scales=18, sigma_data=sigma_data)
    schedule = schedules.EDM(sigma_data=sigma_data)
    module = _MLP()
    denoise = cm.scaled_denoiser(
        schedule,
        lambda p, x, t, c, k: module.apply({"params": p}, x, t),
        prediction="x0",
        edm_preconditioned=True,
    )
    f = lambda p, y, s: cm.consistency_function(
        denoise(p, y, s, None, None), y, s, sigma_data=sigma_data, sigma_min=EPS
    )
    heun = samplers.get("heun")
    point = lambda y_hi, s_hi, s_lo, x0, z: cm.teacher_step(
        heun, _exact_model(), EDM, y_hi, s_hi, s_lo, prediction="eps"
    )
    steps = 3000
    tx = optax.adam(optax.linear_schedule(5e-3, 0.0, steps))
    params = module.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    means, covs = (
        jnp.asarray(MIXTURE.means, jnp.float32),
        jnp.asarray(np.linalg.cholesky(MIXTURE.covs), jnp.float32),
    )
    weights = jnp.log(jnp.asarray(MIXTURE.weights, jnp.float32))

    def train(carry, k):
        params, opt = carry
        key = jax.random.fold_in(jax.random.key(1), k)
        comp = jax.random.categorical(jax.random.fold_in(key, 1), weights, shape=(128,))
        x0 = means[comp] + jnp.einsum(
            "nij,nj->ni", covs[comp], jax.random.normal(jax.random.fold_in(key, 2), (128, 2))
        )
        loss_fn = lambda p: cm.consistency_loss(
            spec, lambda y, s, _: f(p, y, s), lambda y, s, _: f(params, y, s), x0, key, k, target_point=point
        )[0]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt)
        return (optax.apply_updates(params, updates), opt), loss

    (params, _), _ = jax.jit(lambda c: jax.lax.scan(train, c, jnp.arange(steps)))((params, tx.init(params)))
    x_T = jax.random.normal(jax.random.key(7), (512, 2)) * T
    grid = cm.karras_sigmas(18, sigma_min=EPS, sigma_max=T)
    target = samplers.sample(_exact_model(), EDM, x_T, sampler="heun", timesteps=grid[::-1])
    one_step = f(params, x_T, jnp.full((512,), T))
    rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.sum((a - target) ** 2, -1))))
    denoised = x_T - T * _exact_model()(x_T, jnp.full((512,), T))
    error, guess = rms(one_step), rms(denoised)
    assert error < 0.13 and guess > 0.5, (error, guess)


def test_consistency_sampler_is_algorithm_1():
    """With the chain as consistency function, one step from T is the chain; two steps re-noise the first
    output to tau with std sqrt(tau^2 - eps^2) and map it again (Song et al. 2023, Alg. 1)."""
    grid = cm.karras_sigmas(18, sigma_min=EPS, sigma_max=T)  # shapes of the loss test: _chain compiles once
    chain_x0 = lambda x, t: _chain(x, t, grid)
    x_T = jax.random.normal(jax.random.key(3), (512, 2)) * T
    one = samplers.sample(
        chain_x0,
        EDM,
        x_T,
        sampler="consistency",
        timesteps=jnp.array([T, EPS]),
        prediction="x0",
        key=jax.random.key(4),
        sigma_min=EPS,
    )
    np.testing.assert_array_equal(one, _chain(x_T, jnp.full((512,), T), grid))
    tau = float(grid[8])
    key = jax.random.key(5)
    two = samplers.sample(
        chain_x0,
        EDM,
        x_T,
        sampler="consistency",
        timesteps=jnp.array([T, tau, EPS]),
        prediction="x0",
        key=key,
        sigma_min=EPS,
    )
    z = jax.random.normal(jax.random.fold_in(key, 0), x_T.shape)
    first = _chain(x_T, jnp.full((512,), T), grid)
    expected = _chain(first + math.sqrt(tau**2 - EPS**2) * z, jnp.full((512,), tau), grid)
    np.testing.assert_allclose(two, expected, rtol=1e-5, atol=1e-5)
