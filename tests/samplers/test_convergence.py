"""Deterministic samplers against a float64 reference solution of the probability-flow ODE.

The data is a Gaussian mixture, whose noised score is exact; the reference integrates the same ODE with
DOP853 at rtol 1e-11 in float64. Every sampler must converge to it at its stated order: the log-log slope
of the error between two budgets in the asymptotic range.
"""

import functools

import jax
import numpy as np
import pytest

from diffax import samplers
from diffax.samplers.exact import reference_samples

T_END = 1e-3


@pytest.fixture(scope="module")
def problem(vp, mixture, mixture_model):
    x_T = jax.random.normal(jax.random.key(0), (64, 2))
    reference = reference_samples(mixture, vp, x_T, T_END)
    return vp, mixture_model, x_T, reference


@pytest.fixture(scope="module")
def error(problem):
    """RMS error against the reference of ``sampler`` at (about) ``nfe`` evaluations, cached."""
    schedule, model, x_T, reference = problem

    @functools.cache
    def fn(name, nfe, **options):
        sampler = samplers.get(name, **options)
        steps = (nfe - sampler.warmup_nfe) // sampler.nfe_per_step
        ts = samplers.timesteps(schedule, num_steps=steps, spacing="uniform_logsnr", t_end=T_END)
        x, info = samplers.sample(
            model, schedule, x_T, sampler=name, timesteps=ts, return_info=True, **options
        )
        assert int(info["nfe"]) == steps * sampler.nfe_per_step + sampler.warmup_nfe
        return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64) - reference))))

    return fn


def _slope(error, name, budgets):
    (n1, n2), (e1, e2) = budgets, (error(name, budgets[0]), error(name, budgets[1]))
    return np.log(e1 / e2) / np.log(n2 / n1)


@pytest.mark.parametrize(
    "name, budgets",
    [
        ("ddim", (20, 40)),
        ("heun", (40, 80)),
        ("dpm_solver_2", (40, 80)),
        ("dpm_solver_3", (81, 162)),
        ("dpm_solver++_2s", (80, 160)),
        ("dpm_solver++_2m", (20, 40)),
        ("unipc", (20, 40)),
        ("pndm", (80, 160)),
        ("plms", (20, 40)),
        ("bdia", (40, 80)),
    ],
)
def test_empirical_order_matches_the_method(error, name, budgets):
    order = samplers.get(name).order
    slope = _slope(error, name, budgets)
    assert abs(slope - order) < 0.25, f"{name}: slope {slope:.2f}, order {order}"
    assert error(name, budgets[1]) < 0.05


def test_first_order_samplers_are_the_same_map(error, problem):
    """DDIM = Euler in (x / alpha, sigma / alpha) = DPM-Solver-1 = ancestral Euler with eta = 0."""
    schedule, model, x_T, _ = problem
    ts = samplers.timesteps(schedule, num_steps=10, t_end=T_END)
    ref = samplers.sample(model, schedule, x_T, sampler="ddim", timesteps=ts)
    for name, kwargs in [("euler", {}), ("dpm_solver_1", {}), ("euler_ancestral", {"eta": 0.0})]:
        x = samplers.sample(model, schedule, x_T, sampler=name, timesteps=ts, **kwargs)
        np.testing.assert_allclose(np.asarray(x), np.asarray(ref), atol=2e-5, err_msg=name)


def test_dpm_solver_3m_reaches_order_two_and_beats_2m(error):
    """The published ++3M update halves its second-derivative term (see its docstring): its order
    tends to 2, with an error several times below ++2M's at the same NFE."""
    assert 1.8 < _slope(error, "dpm_solver++_3m", (40, 80)) < 2.25
    for nfe in (20, 40):
        assert error("dpm_solver++_3m", nfe) < error("dpm_solver++_2m", nfe) / 2.5


def test_unipc_with_a_third_order_predictor_beats_the_default(error):
    """UniPC-3 (declared order 3: its warm-up caps the order, see ``unipc``) against UniPC-2."""
    for nfe in (20, 40):
        assert error("unipc", nfe, order=3) < error("unipc", nfe) / 2


def test_adaptive_ode_matches_reference_to_tolerance(problem):
    schedule, model, x_T, reference = problem
    ts = samplers.timesteps(schedule, num_steps=1, t_end=T_END)
    x, info = samplers.sample(
        model, schedule, x_T, sampler="ode", timesteps=ts, rtol=1e-6, atol=1e-6, return_info=True
    )
    assert np.sqrt(np.mean(np.square(np.asarray(x, np.float64) - reference))) < 2e-5
    assert int(info["nfe"]) == 6 * int(info["num_steps"]) + 1
