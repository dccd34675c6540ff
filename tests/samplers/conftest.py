"""Shared problems for the sampler tests: a 2-D Gaussian mixture with an exact score under VP noising."""

import pytest

from diffax import schedules
from diffax.samplers.exact import toy_mixture

MIXTURE = toy_mixture()


@pytest.fixture(scope="session")
def vp():
    return schedules.get("vp_linear", beta_min=0.1, beta_max=20.0)


@pytest.fixture(scope="session")
def mixture():
    return MIXTURE


@pytest.fixture(scope="session")
def mixture_model(vp):
    return MIXTURE.model_fn(vp)
