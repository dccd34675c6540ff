"""MFU in the training log: a step's FLOPs per device from XLA's cost analysis, the peak table, the log."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffax import mfu, train


@pytest.mark.parametrize("batch_axis", ["data", None])
def test_flops_of_a_matmul_step_are_the_analytic_count_per_device(batch_axis):
    """(m, k) @ (k, n) is 2 m k n FLOPs; over 8 devices each computes its batch share, or all of it when
    the batch is replicated."""
    mesh = jax.make_mesh((8,), ("data",))
    m, k, n = 64, 96, 40
    x = jax.ShapeDtypeStruct((m, k), jnp.float32, sharding=NamedSharding(mesh, P(batch_axis)))
    w = jax.ShapeDtypeStruct((k, n), jnp.float32, sharding=NamedSharding(mesh, P()))
    compiled = jax.jit(jnp.matmul).lower(x, w).compile()
    assert mfu.step_flops(compiled) == 2 * m * k * n / (8 if batch_axis else 1)


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("TPU v4", 275.0),
        ("TPU v5 lite", 197.0),
        ("TPU v5", 459.0),
        ("TPU v5p", 459.0),
        ("TPU v6 lite", 918.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("Some future chip", None),
    ],
)
def test_peak_table_matches_device_kinds(kind, tflops):
    assert mfu.table_peak_flops(kind) == (None if tflops is None else tflops * 1e12)


def test_cpu_peak_is_measured_once():
    peak = mfu.peak_flops(jax.devices()[0])
    assert 1e8 < peak < 1e13 and mfu.measured_cpu_peak_flops() == peak  # cached: measured once


def test_log_window_reports_tflops_per_device_and_mfu(caplog):
    stacked = {k: np.array([1.0, 2.0]) for k in ("loss", "grad_norm", "lr")}
    with caplog.at_level(logging.INFO):
        scalars = train._report(stacked, 10, 20, 2, 4.0, batch_size=8, flops_per_step=3e12, peak_flops=1e12)
    assert scalars["tflops_per_device"] == pytest.approx(1.5)  # 2 steps x 3 TFLOP in 4 s
    assert scalars["mfu"] == pytest.approx(1.5)
    assert "1.5 TFLOP/s/device (MFU 150.0%)" in caplog.text
    no_peak = train._report(stacked, 10, 20, 2, 4.0, batch_size=8, flops_per_step=3e12, peak_flops=None)
    assert "mfu" not in no_peak and no_peak["tflops_per_device"] == pytest.approx(1.5)
