"""SVDD on the exact-score mixture: one candidate is the ancestral sampler; a reward (the exact
classifier's log-probability of component 0) steers the samples into that component."""

import jax
import jax.numpy as jnp
import numpy as np

from diffax import samplers, svdd


def test_svdd(vp, mixture, mixture_model):
    x_T = jax.random.normal(jax.random.key(0), (256, 2))
    ts = samplers.timesteps(vp, num_steps=20)
    key = jax.random.key(1)

    def reward(x0):
        ones = jnp.ones(x0.shape[0])
        return mixture.component_log_posterior(x0, ones, 1e-3 * ones)[:, 0]

    one = svdd.sample(mixture_model, vp, x_T, reward, timesteps=ts, key=key, num_candidates=1)
    ancestral = samplers.sample(mixture_model, vp, x_T, sampler="ddim", eta=1.0, timesteps=ts, key=key)
    np.testing.assert_allclose(np.asarray(one), np.asarray(ancestral), atol=1e-5)
    steered = svdd.sample(mixture_model, vp, x_T, reward, timesteps=ts, key=key, num_candidates=8)
    in_zero = [float(jnp.mean(reward(x) > np.log(0.5))) for x in (ancestral, steered)]
    assert in_zero[0] < 0.4 and in_zero[1] > 0.8, in_zero
