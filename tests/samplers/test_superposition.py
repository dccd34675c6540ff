"""Superposition on the exact-score mixture: a model with itself is that model (OR and AND), and the OR
of two exact components samples their mixture."""

import jax
import numpy as np

from diffax import samplers, superposition
from diffax.samplers.exact import GaussianMixture


def test_superposition_of_a_model_with_itself_is_the_model(vp, mixture_model):
    x_T = jax.random.normal(jax.random.key(0), (64, 2))
    ts = samplers.timesteps(vp, num_steps=30)
    key = jax.random.key(1)
    ref = samplers.sample(mixture_model, vp, x_T, sampler="euler_maruyama", timesteps=ts, key=key)
    for mode in superposition.MODES:
        x, log_q = superposition.sample(
            [mixture_model, mixture_model], vp, x_T, timesteps=ts, key=key, mode=mode
        )
        np.testing.assert_allclose(np.asarray(x), np.asarray(ref), atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(np.asarray(log_q[:, 0]), np.asarray(log_q[:, 1]), atol=1e-5)


def test_or_of_two_components_samples_their_mixture(vp, mixture):
    """Components 0 and 1 (weights 0.3 : 0.5) superposed by OR: the exact classifier of the mixture
    finds 3/8 of the samples in component 0 (and none in component 2)."""
    models = [
        GaussianMixture(np.ones(1), mixture.means[k : k + 1], mixture.covs[k : k + 1]).model_fn(vp)
        for k in (0, 1)
    ]
    x_T = jax.random.normal(jax.random.key(2), (2048, 2))
    ts = samplers.timesteps(vp, num_steps=200)
    x, _ = superposition.sample(
        models, vp, x_T, timesteps=ts, key=jax.random.key(3), mode="or", weights=np.array([0.3, 0.5])
    )
    ones = np.ones(x.shape[0])
    post = np.exp(mixture.component_log_posterior(np.asarray(x, np.float64), ones, 1e-3 * ones))
    fractions = np.bincount(post.argmax(axis=1), minlength=3) / x.shape[0]
    assert abs(fractions[0] - 0.375) < 0.05 and fractions[2] < 0.05, fractions
