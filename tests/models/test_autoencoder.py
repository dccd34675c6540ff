"""AutoencoderKL: shapes, the posterior draw, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import models
from diffax.models.autoencoder import LOGVAR_RANGE, sample_posterior

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)


def test_shapes_and_reconstruction_path():
    module = models.AutoencoderKL(**TINY)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
    params = jax.jit(module.init)(jax.random.key(1), x)["params"]
    assert set(params) == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
    reconstruct = jax.jit(lambda p, x, *key: module.apply({"params": p}, x, *key))
    mean, logvar = encode(params, x)
    assert mean.shape == logvar.shape == (2, 4, 4, 4)
    assert float(logvar.min()) >= LOGVAR_RANGE[0] and float(logvar.max()) <= LOGVAR_RANGE[1]
    assert decode(params, mean).shape == x.shape
    rec, _, _ = reconstruct(params, x)
    np.testing.assert_allclose(rec, decode(params, mean), atol=1e-6)
    rec_sampled, _, _ = reconstruct(params, x, jax.random.key(2))
    assert not np.allclose(rec_sampled, rec)


def test_posterior_draw_has_the_posterior_moments():
    mean, logvar = jnp.full((20000,), 0.5), jnp.full((20000,), np.log(0.25))
    z = sample_posterior(mean, logvar, jax.random.key(0))
    assert abs(float(z.mean()) - 0.5) < 0.01 and abs(float(z.std()) - 0.5) < 0.01


def test_bad_input_is_named():
    module = models.AutoencoderKL(**TINY)
    with pytest.raises(ValueError, match="divisible by 2"):
        module.init(jax.random.key(0), jnp.zeros((1, 7, 8, 3)))
    with pytest.raises(ValueError, match="norm_groups=3"):
        models.AutoencoderKL(**{**TINY, "norm_groups": 3})
