"""Sampling a run: labels cycle through the classes, guidance at scale 1 is the conditional model, and a
learned-variance head feeds the ddpm sampler's learned variance."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from diffax import generate, sharding, train_state


def _init_params(config, parts):
    return jax.jit(lambda: nn.meta.unbox(train_state.state_initializer(config, parts)()))().params


def _mesh():
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))


def test_labelled_sampling_and_guidance_scale_one(mixture_config):
    config = mixture_config
    config.input.update(dict(labels=True, num_classes=4))
    config.model.update(dict(num_classes=4, label_dropout=0.1))
    config.sampler.update(dict(name="ddim", steps=3))
    parts = train_state.build(config)
    params = _init_params(config, parts)
    conditional = generate.make_sampler(config, parts, mesh=_mesh())
    images, labels = generate.sample_images(
        conditional, params, config=config, seed=0, num_samples=6, batch_size=4
    )
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 0, 1])

    config.sampler.guidance_scale = 1.0  # uncond + 1 * (cond - uncond) = cond
    guided = generate.make_sampler(config, parts, mesh=_mesh())
    key, batch_labels = jax.random.key(3), np.arange(4, dtype=np.int32)
    np.testing.assert_allclose(
        guided(params, key, batch_labels), conditional(params, key, batch_labels), rtol=1e-4, atol=1e-5
    )


def test_learned_variance_reaches_the_ddpm_sampler(mixture_config):
    config = mixture_config
    config.process.update(dict(name="linear", num_timesteps=100))
    config.model.learned_variance = True
    config.loss.update(dict(name="hybrid", learned_variance=True))
    config.sampler.update(dict(name="ddpm", steps=4, spacing="leading", variance="learned"))
    parts = train_state.build(config)
    params = _init_params(config, parts)
    out = generate.make_sampler(config, parts, mesh=_mesh())(params, jax.random.key(0), np.zeros(2, np.int32))
    assert out.shape == (2, 8, 8, 1) and bool(np.all(np.isfinite(out)))
