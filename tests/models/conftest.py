"""Helpers for model tests: random parameters without compiling an initialiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from diffax import models


def _random_params(module, shape, *, cond=None, seed=0):
    """Random parameters of ``module`` drawn in numpy, zero-initialised layers included.

    Matrices and kernels get N(0, 1/fan_in) (fan_in: all but the last axis), vectors N(0, 0.25),
    so activations keep their scale through the network.

    ``module.init`` compiles a threefry kernel per parameter (seconds even for tiny nets); filling
    ``abstract_params`` in numpy costs nothing and gives every layer, including the zero-initialised
    output layers, a non-trivial value.
    """
    rng = np.random.default_rng(seed)
    abstract = nn.meta.unbox(models.abstract_params(module, shape, cond=cond))

    def draw(s):
        std = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.5
        return jnp.asarray(rng.normal(size=s.shape) * std, s.dtype)

    return jax.tree.map(draw, abstract)


@pytest.fixture
def random_params():
    return _random_params
