"""Model FLOPs utilization (MFU) of a compiled train step: its FLOPs per device, per-device peaks.

The FLOPs of a step are XLA's cost analysis of the compiled program (``compiled.cost_analysis()``,
the convention of MaxText and maxdiffusion, whose ``calculate_training_tflops`` reads the compiled
program's cost analysis): for a program partitioned over a mesh it counts one device's share, and it
includes everything the step computes (forward, backward, optimizer, EMA; recomputation under remat).
A custom call counts what its kernel declares: diffax's C++ CPU kernels declare nothing, so on CPU the
Winograd convolutions and fused attention are left out and the CPU figure is a lower bound. XLA counts
the body of a loop once: with ``optim.accum_steps > 1`` (a scan over microbatches) or a DiT with
``scan_blocks`` the count is one microbatch's or one block's plus the rest, and the training loop warns.

MFU = achieved FLOP/s per device / the device's peak. Peaks are the vendors' dense bf16 numbers
(``PEAK_BF16_TFLOPS``); on the CPU the peak is measured once per process as the best float32 matmul rate
of the host, shared among its local devices.
"""

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

# Dense (no sparsity) bf16 peak TFLOP/s per chip, by a substring of ``device.device_kind``; the first
# match wins (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v4", 275.0),  # cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16 per chip
    ("TPU v5 lite", 197.0),  # cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16 per chip
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),  # cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16 per chip
    ("TPU v5", 459.0),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918.0),  # cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16 per chip
    ("TPU v6e", 918.0),
    ("A100", 312.0),  # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)
    ("H100 PCIe", 756.0),  # NVIDIA H100 datasheet, PCIe: 1,513 TFLOPS with sparsity
    ("H100", 989.0),  # NVIDIA H100 datasheet, SXM: 1,979 TFLOPS with sparsity
    ("H200", 989.0),  # NVIDIA H200 datasheet, SXM: 1,979 TFLOPS with sparsity
)

MATMUL_SIZE = 1024  # the square float32 matmul that measures a CPU host's peak


def step_flops(compiled: Any) -> float:
    """FLOPs one device executes per call of a compiled program (``jax.stages.Compiled``)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jaxlibs: one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def table_peak_flops(device_kind: str) -> float | None:
    """The bf16 peak FLOP/s of one chip of ``device_kind`` from ``PEAK_BF16_TFLOPS``, or ``None``."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern.lower() in device_kind.lower():
            return tflops * 1e12
    return None


@functools.cache
def measured_cpu_peak_flops(size: int = MATMUL_SIZE, repeats: int = 3) -> float:
    """The host's float32 matmul rate (best of ``repeats`` ``size``-square matmuls on one CPU device,
    2 size^3 FLOPs each), divided among the host's CPU devices (they share its cores)."""
    device = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / len(jax.local_devices(backend="cpu"))


def peak_flops(device: jax.Device) -> float | None:
    """Peak FLOP/s of ``device``: the table's bf16 number for a TPU or GPU, the measured matmul rate on
    CPU, ``None`` for a device the table does not know."""
    if device.platform == "cpu":
        return measured_cpu_peak_flops()
    return table_peak_flops(device.device_kind)


def utilization(flops_per_step: float, steps: int, seconds: float, peak: float | None) -> dict[str, float]:
    """``tflops_per_device`` over ``steps`` steps in ``seconds`` and, with a peak, ``mfu`` (a fraction)."""
    achieved = flops_per_step * steps / max(seconds, 1e-9)
    scalars = {"tflops_per_device": achieved / 1e12}
    if peak:
        scalars["mfu"] = achieved / peak
    return scalars


__all__ = [
    "PEAK_BF16_TFLOPS",
    "measured_cpu_peak_flops",
    "peak_flops",
    "step_flops",
    "table_peak_flops",
    "utilization",
]
