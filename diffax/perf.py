"""Opt-in CPU performance settings for XLA, and a record of the settings in force.

XLA reads ``XLA_FLAGS`` once, when JAX initialises its first backend, so ``configure_cpu`` must run at
program start, before any JAX computation; afterwards it raises instead of silently doing nothing.
The settings are experimental XLA flags tied to one jaxlib: re-measure them at each jaxlib upgrade
(``python benchmarks/bench.py --suite`` records them with every number).
"""

import os

import jax
import jaxlib
from jax._src import xla_bridge  # backends_are_initialized has no public spelling in jax 0.10.

# name -> the XLA flag it sets.
CPU_SETTINGS: dict[str, str] = {
    # Convolutions through Eigen instead of YNNPACK's individual-convolution fusion (jaxlib 0.10.2: a
    # 3x3 64->64 convolution at 32x32 is ~1.6x faster; see benchmarks/README.md).
    "eigen_conv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
}


def configure_cpu(*, eigen_conv: bool = False) -> tuple[str, ...]:
    """Adds the chosen CPU settings to ``XLA_FLAGS`` before JAX starts its backends.

    Args:
      eigen_conv: run convolutions through Eigen (``CPU_SETTINGS["eigen_conv"]``).

    Returns:
      The flags in ``XLA_FLAGS`` afterwards.

    Raises:
      RuntimeError: if a JAX backend is already initialised (the flags would have no effect).
    """
    chosen = [CPU_SETTINGS["eigen_conv"]] if eigen_conv else []
    if chosen and xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "configure_cpu: a JAX backend is already initialised, so XLA flags no longer apply; call it "
            "at program start, before any JAX computation."
        )
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join([*flags, *(f for f in chosen if f not in flags)])
    return xla_flags()


def xla_flags() -> tuple[str, ...]:
    """The flags in ``XLA_FLAGS`` now (the ones in force if nothing changed them after JAX started)."""
    return tuple(os.environ.get("XLA_FLAGS", "").split())


def settings_in_force() -> dict[str, object]:
    """What a benchmark should record: jax/jaxlib versions, the backend, XLA flags, named settings on."""
    flags = xla_flags()
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "xla_flags": list(flags),
        "cpu_settings": sorted(name for name, flag in CPU_SETTINGS.items() if flag in flags),
    }
