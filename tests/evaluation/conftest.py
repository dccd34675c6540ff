"""One trained digits classifier per test session, cached in a temporary directory."""

import pytest

from diffax.evaluation import digits_classifier_params


@pytest.fixture(scope="session")
def digits_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("diffax_cache")


@pytest.fixture(scope="session")
def digits_params(digits_cache_dir):
    return digits_classifier_params(cache_dir=digits_cache_dir)
