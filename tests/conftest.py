"""Test configuration: 8 fake CPU devices, strict rank promotion, a persistent compile cache.

The XLA flag must be set before JAX initialises its backends, so it is set at import time here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Tests are bound by compile time, not run time: LLVM's optimisation level 0 halves XLA's CPU compiles
# (the convolutions, products and reductions are library calls at every level). Child processes inherit it.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("DIFFAX_TEST_CACHE", os.path.expanduser("~/.cache/diffax-test-jax")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_collection_modifyitems(items):
    """Tests marked slow run first (otherwise in collection order), so that under ``pytest -n 2`` no long
    test starts last and runs alone while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
