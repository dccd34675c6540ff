"""Parameterizations: round trips over random shapes, seeds and dtypes; EDM preconditioning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import parameterization as P
from diffax import process, schedules

SCHEDULES = ["vp_linear", "cosine", "ve", "edm", "rectified_flow"]


def _draw(seed, shape, sch):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x0 = jax.random.normal(k1, shape)
    eps = jax.random.normal(k2, shape)
    lo, hi = sch.t_min, sch.t_max
    t = jax.random.uniform(k3, (shape[0],), minval=lo + 0.05 * (hi - lo), maxval=lo + 0.95 * (hi - lo))
    return x0, eps, t


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_conversion_round_trips(name, seed):
    sch = schedules.get(name)
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in rng.integers(1, 5, size=int(rng.integers(1, 4)))) + (3,)
    shape = (int(rng.integers(1, 6)),) + shape
    x0, eps, t = _draw(seed, shape, sch)
    x_t = process.q_sample(sch, x0, t, eps)
    for source in P.PREDICTIONS:
        pred = P.from_x0_eps(sch, x0, eps, t, prediction=source)
        x0_back, eps_back = P.to_x0_eps(sch, pred, x_t, t, prediction=source)
        chex.assert_trees_all_close(x0_back, x0, rtol=2e-3, atol=2e-3)
        chex.assert_trees_all_close(eps_back, eps, rtol=2e-3, atol=2e-3)
        for target in P.PREDICTIONS:
            converted = P.convert(sch, pred, x_t, t, source=source, target=target)
            expected = P.from_x0_eps(sch, x0, eps, t, prediction=target)
            chex.assert_trees_all_close(converted, expected, rtol=5e-3, atol=5e-3)


def test_closed_forms_of_targets():
    sch = schedules.get("vp_linear")
    x0, eps, t = _draw(0, (4, 6), sch)
    a = sch.alpha(t)[:, None]
    s = sch.sigma(t)[:, None]
    chex.assert_trees_all_close(P.from_x0_eps(sch, x0, eps, t, prediction="v"), a * eps - s * x0, rtol=1e-6)
    chex.assert_trees_all_close(P.from_x0_eps(sch, x0, eps, t, prediction="score"), -eps / s, rtol=1e-6)
    rf = schedules.get("rectified_flow")
    chex.assert_trees_all_close(P.from_x0_eps(rf, x0, eps, t, prediction="flow"), eps - x0, rtol=1e-5)


def test_x0_error_scale_closed_forms():
    sch = schedules.get("cosine")
    t = jnp.linspace(0.05, 0.95, 7)
    snr = jnp.exp(sch.log_snr(t))
    chex.assert_trees_all_close(P.x0_error_scale(sch, t, prediction="eps"), snr, rtol=1e-4)
    chex.assert_trees_all_close(P.x0_error_scale(sch, t, prediction="x0"), jnp.ones_like(t))
    chex.assert_trees_all_close(P.x0_error_scale(sch, t, prediction="v"), snr + 1, rtol=1e-4)


def test_score_of_gaussian_data_is_exact():
    """For x0 ~ N(0, I) under VP noising, x_t ~ N(0, I): the score is -x_t and eps = sigma x_t."""
    sch = schedules.get("vp_linear")
    x_t = jnp.linspace(-2, 2, 10).reshape(5, 2)
    t = jnp.full((5,), 0.6)
    x0_post = sch.alpha(0.6) * x_t  # E[x0 | x_t] for unit-variance data
    eps_post = (x_t - sch.alpha(0.6) * x0_post) / sch.sigma(0.6)
    score = P.from_x0_eps(sch, x0_post, eps_post, t, prediction="score")
    chex.assert_trees_all_close(score, -x_t, rtol=1e-5, atol=1e-6)


def test_edm_preconditioning_table_1():
    sigma, sd = jnp.array([0.002, 0.5, 80.0]), 0.5
    c_skip, c_out, c_in, c_noise = P.edm_preconditioning(sigma, sigma_data=sd)
    np.testing.assert_allclose(c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_out, sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-6)
    # unit variance of the network's input and of its training target (Karras et al. 2022, App. B.6)
    np.testing.assert_allclose(c_in**2 * (sd**2 + sigma**2), 1.0, rtol=1e-6)


class ConversionTransformsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_vmap_grad_and_bfloat16(self):
        sch = schedules.get("linear", num_timesteps=50)
        x0, eps, t = _draw(5, (3, 4, 2), sch)
        x_t = process.q_sample(sch, x0, t, eps)

        def all_predictions(x_t, t, dtype):
            """x0 recovered from every prediction type, per batch and per example (vmap), and grads."""
            out = {}
            for prediction in P.PREDICTIONS:
                pred = P.from_x0_eps(sch, x0, eps, t, prediction=prediction)
                out[prediction] = P.to_x0_eps(
                    sch, pred.astype(dtype), x_t.astype(dtype), t, prediction=prediction
                )[0]
                out[prediction + "/vmap"] = jax.vmap(
                    lambda p, x, tt, k=prediction: P.to_x0_eps(sch, p[None], x[None], tt, prediction=k)[0][0]
                )(pred, x_t, t)
                out[prediction + "/grad"] = jax.grad(
                    lambda tt, k=prediction: jnp.sum(P.from_x0_eps(sch, x0, eps, tt, prediction=k))
                )(t)
            return out

        for dtype in (jnp.float32, jnp.bfloat16):
            out = self.variant(all_predictions, static_argnums=2)(x_t, t, dtype)
            chex.assert_tree_all_finite(out)
            for prediction in P.PREDICTIONS:
                chex.assert_type(out[prediction], dtype)
                atol = 0.15 if dtype == jnp.bfloat16 else 1e-3
                chex.assert_trees_all_close(out[prediction].astype(jnp.float32), x0, atol=atol)
                chex.assert_trees_all_close(out[prediction + "/vmap"], x0, atol=1e-3)


def test_bad_prediction_and_shapes_raise():
    sch = schedules.get("vp_linear")
    with pytest.raises(ValueError, match="Unknown prediction 'noise'; known predictions: eps, x0, v, score"):
        P.to_x0_eps(sch, jnp.ones((2, 3)), jnp.ones((2, 3)), 0.5, prediction="noise")
    with pytest.raises(ValueError, match=r"pred must have x_t's shape \(2, 3\)"):
        P.to_x0_eps(sch, jnp.ones((2, 4)), jnp.ones((2, 3)), 0.5, prediction="eps")
