"""Opt-in CPU performance settings for XLA and the host allocator, and a record of the settings in force.

XLA reads ``XLA_FLAGS`` once, when JAX initialises its first backend, and XLA's worker threads pick
their malloc arena when they start, so ``configure_cpu`` must run at program start, before any JAX
computation; afterwards it raises instead of silently doing nothing. The XLA settings are
experimental flags tied to one jaxlib: re-measure them at each jaxlib upgrade
(``python benchmarks/bench.py --suite`` records them with every number).
"""

import ctypes
import ctypes.util
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


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_retained_host_memory = False


def configure_cpu(*, eigen_conv: bool = False, retain_host_memory: bool = False) -> tuple[str, ...]:
    """Applies the chosen CPU settings before JAX starts its backends.

    Args:
      eigen_conv: run convolutions through Eigen (``CPU_SETTINGS["eigen_conv"]``).
      retain_host_memory: keep freed host memory in the process for reuse (``retain_host_memory``).

    Returns:
      The flags in ``XLA_FLAGS`` afterwards.

    Raises:
      RuntimeError: if a JAX backend is already initialised (the settings would have no effect).
    """
    chosen = [CPU_SETTINGS["eigen_conv"]] if eigen_conv else []
    if (chosen or retain_host_memory) and xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "configure_cpu: a JAX backend is already initialised, so XLA flags and allocator settings no "
            "longer apply; call it at program start, before any JAX computation."
        )
    if retain_host_memory:
        _retain_host_memory()
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join([*flags, *(f for f in chosen if f not in flags)])
    return xla_flags()


def _retain_host_memory() -> None:
    """Makes glibc malloc keep freed memory: one arena, no mmap'd chunks, no trimming of the heap.

    XLA's CPU client allocates each execution's temporary buffer (1.2 GB for a batch-32 U-Net train
    step) with ``posix_memalign`` from a worker thread's arena, where a block that size is always a
    fresh ``mmap``; every step then page-faults all of it back in (~290k faults, ~0.5 s of system
    time on 2 cores) and ``munmap``s it again. In the main arena with mmap off, the block is reused.
    The resident set then stays at its peak. Raises on a C library without glibc's ``mallopt``.
    """
    global _retained_host_memory
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        raise RuntimeError("configure_cpu: retain_host_memory needs glibc's mallopt; leave it off here.")
    # mallopt takes an int; glibc converts the trim threshold to size_t, so -1 means "never trim".
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)):
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            raise RuntimeError(
                f"configure_cpu: mallopt({param}, {value}) failed; leave retain_host_memory off."
            )
    _retained_host_memory = True


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
        "cpu_settings": sorted(
            [name for name, flag in CPU_SETTINGS.items() if flag in flags]
            + (["retain_host_memory"] if _retained_host_memory else [])
        ),
    }
