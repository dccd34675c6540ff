"""Exact inversion on the exact-score mixture: edit-friendly DDPM noise maps and BDIA-DDIM reproduce the
data to rounding error in float32 and float64, and editing along the recovered latents with a changed
condition (one mixture component's exact model) moves the data towards that condition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import inversion, samplers, schedules
from diffax.samplers.exact import GaussianMixture

T_END = 1e-3


@pytest.fixture(scope="module")
def data(mixture):
    return jnp.asarray(mixture.sample(np.random.default_rng(0), 64), jnp.float32)


def _round_trip(method, model, schedule, x0, ts):
    if method == "edit_friendly":
        x_T, maps = inversion.edit_friendly_invert(model, schedule, x0, timesteps=ts, key=jax.random.key(1))
        return inversion.edit_friendly_sample(model, schedule, x_T, maps, timesteps=ts)
    z_top, z_next = inversion.bdia_invert(model, schedule, x0, timesteps=ts)
    return inversion.bdia_sample(model, schedule, z_top, z_next, timesteps=ts)


@pytest.mark.parametrize("method", ["edit_friendly", "bdia"])
def test_round_trip_float32(vp, mixture, data, method):
    """Edit-friendly on a trailing discrete grid that ends at the anchor (sigma = 0: the last map is the
    residual itself), BDIA on a 40-step continuous grid."""
    if method == "edit_friendly":
        schedule = schedules.get("linear", num_timesteps=1000)
        ts = samplers.timesteps(schedule, num_steps=20, spacing="trailing")
    else:
        schedule, ts = vp, samplers.timesteps(vp, num_steps=40, t_end=T_END)
    rec = _round_trip(method, mixture.model_fn(schedule), schedule, data, ts)
    assert rec.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(rec - data))) <= 1e-5


def test_round_trip_float64(vp, mixture_model, data):
    with jax.enable_x64(True):
        x0 = jnp.asarray(data, jnp.float64)
        ts = samplers.timesteps(vp, num_steps=20, t_end=T_END)
        for method in ("edit_friendly", "bdia"):
            rec = _round_trip(method, mixture_model, vp, x0, ts)
            assert rec.dtype == jnp.float64
            assert float(jnp.max(jnp.abs(rec - x0))) <= 1e-10, method


def test_bdia_sampler_starts_with_ddim(vp, mixture_model, data):
    """sample(sampler="bdia") from x_T equals bdia_sample from (x_T, DDIM's first step)."""
    ts = samplers.timesteps(vp, num_steps=12, t_end=T_END)
    x_T = jax.random.normal(jax.random.key(5), data.shape)
    ref = samplers.sample(mixture_model, vp, x_T, sampler="bdia", timesteps=ts)
    first = samplers.sample(mixture_model, vp, x_T, sampler="ddim", timesteps=ts[:2])
    again = inversion.bdia_sample(mixture_model, vp, x_T, first, timesteps=ts)
    np.testing.assert_allclose(np.asarray(again), np.asarray(ref), atol=1e-6)


@pytest.mark.parametrize("method", ["edit_friendly", "bdia"])
def test_editing_along_the_latents_moves_towards_the_new_condition(vp, mixture, mixture_model, data, method):
    """Invert under the mixture, sample along the latents with component 0's exact model: the exact
    classifier puts the edits in component 0 (mean posterior 0.30 before, 0.94 after)."""
    k = 0
    component = GaussianMixture(np.ones(1), mixture.means[k : k + 1], mixture.covs[k : k + 1])
    edit_model = component.model_fn(vp)
    ts = samplers.timesteps(vp, num_steps=25, t_end=T_END)
    if method == "edit_friendly":
        key = jax.random.key(1)
        x_T, maps = inversion.edit_friendly_invert(mixture_model, vp, data, timesteps=ts, key=key)
        edit = inversion.edit_friendly_sample(edit_model, vp, x_T, maps, timesteps=ts)
    else:
        z_top, z_next = inversion.bdia_invert(mixture_model, vp, data, timesteps=ts)
        edit = inversion.bdia_sample(edit_model, vp, z_top, z_next, timesteps=ts)
    ones = np.ones(data.shape[0])
    before = mixture.component_log_posterior(np.asarray(data, np.float64), ones, 1e-3 * ones)
    after = mixture.component_log_posterior(np.asarray(edit, np.float64), ones, 1e-3 * ones)
    assert np.mean(np.exp(before[:, k])) < 0.4 and np.mean(np.exp(after[:, k])) > 0.85
