"""diffax.perf settings and the benchmark's contract: the peer's network, the one-line JSON form."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxlib
import pytest

from diffax import models, perf
from diffax.kernels.cpu import attention as cpu_attention

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench"]


def test_configure_cpu_refuses_once_a_backend_runs():
    jnp.zeros(1).block_until_ready()
    with pytest.raises(RuntimeError, match="before any JAX computation"):
        perf.configure_cpu(eigen_conv=True)
    assert perf.configure_cpu() == perf.xla_flags()  # nothing chosen: nothing to refuse


def _fresh_process_record(code: str) -> dict:
    """Runs ``code`` in a new Python without XLA_FLAGS; returns the JSON of its last output line."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_configure_cpu_before_start_sets_a_flag_this_jaxlib_accepts():
    """In a fresh process: the flag lands in XLA_FLAGS, is recorded, and XLA compiles a conv with it
    (an unknown flag would abort the process)."""
    code = (
        "from diffax import perf; import jax, json; perf.configure_cpu(eigen_conv=True);"
        "x = jax.numpy.ones((1, 8, 8, 4));"
        "y = jax.lax.conv_general_dilated(x, jax.numpy.ones((3, 3, 4, 4)), (1, 1), 'SAME',"
        " dimension_numbers=('NHWC', 'HWIO', 'NHWC'));"
        "print(json.dumps({**perf.settings_in_force(), 'centre': float(y[0, 4, 4, 0])}))"
    )
    record = _fresh_process_record(code)
    assert record["cpu_settings"] == ["eigen_conv"]
    assert perf.CPU_SETTINGS["eigen_conv"] in record["xla_flags"]
    assert record["centre"] == 36.0  # 3 x 3 x 4 ones
    assert record["jaxlib"] == jaxlib.__version__


def test_retain_host_memory_is_applied_and_recorded_before_start():
    """In a fresh process: glibc accepts the allocator settings, they are recorded, and XLA still runs.
    (Its effect, ~290k page faults per small train step down to ~0, is measured in benchmarks/.)"""
    code = (
        "from diffax import perf; import jax.numpy as jnp, json;"
        "perf.configure_cpu(retain_host_memory=True);"
        "y = float(jnp.sum(jnp.ones((1024, 1024)) @ jnp.ones((1024, 4))));"
        "print(json.dumps({'sum': y, 'settings': perf.settings_in_force()['cpu_settings']}))"
    )
    record = _fresh_process_record(code)
    assert record == {"sum": 1024.0 * 1024 * 4, "settings": ["retain_host_memory"]}


@pytest.mark.parametrize("config,peer_params", [("small", 6_472_195), ("ddpm-cifar10", 35_746_307)])
def test_bench_network_has_the_peers_parameter_count(bench, config, peer_params):
    """The counts diffusers' UNet2DModel prints for the two configs (shared/peers/diffusers_bench.py)."""
    net = models.get("unet_ddpm_cifar10", **bench.CONFIGS[config], **bench.PEER_LAYOUT)
    assert models.count_params(models.abstract_params(net, (1, 32, 32, 3))) == peer_params


def test_bench_rejects_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--xla-option", "no_equals_sign"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--suite", "--xla-option", "a=b"])
    with pytest.raises(ValueError, match="train only"):
        bench.build_task("small", "forward", 1, steps_per_call=2)


def test_suite_row_and_table_report_cpu_time_and_cores_busy(bench):
    """A row from each side's (wall, CPU) seconds: speed ratio from wall, CPU ratio from CPU time."""
    timings = {"diffax": [(2.0, 3.0), (4.0, 5.0), (3.0, 4.5)], "peer": [(3.0, 6.0), (3.5, 7.0), (4.0, 7.6)]}
    info = {"compile_s": 10.0, "flops": 3e11}
    row = bench._row("small", "train", 32, info, timings, [1.0, 1.2, 1.1])
    assert (row["diffax_s"], row["diffax_min_s"], row["peer_s"]) == (3.0, 2.0, 3.5)
    assert (row["diffax_cpu_s"], row["peer_cpu_s"]) == (4.5, 7.0)
    assert row["ratio"] == pytest.approx(3.5 / 3.0) and row["cpu_ratio"] == pytest.approx(7.0 / 4.5)
    assert row["diffax_cores_busy"] == pytest.approx(1.5) and row["peer_cores_busy"] == pytest.approx(2.0)
    alone = bench._row("small", "train", 32, info, {"diffax": timings["diffax"], "peer": []}, [1.0])
    assert "ratio" not in alone and "peer_cores_busy" not in alone
    args = bench.parse_args(["--suite"])
    peak = {"numpy_gflops": 150.0, "xla_gflops": 100.0, "peak_gflops": 150.0}
    table = bench._markdown(args, [row, alone], peak, peak, {}).splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("| config |"))
    machine = next(line for line in table if line.startswith("Machine:"))
    assert (
        f"XLA attention blocks {cpu_attention.ATTENTION_BLOCK_BYTES / (1 << 20):g} MiB of scores" in machine
    )
    assert "fused CPU attention kernel built" in machine
    assert "| CPU ratio | cores busy |" in table[header]
    assert table[header + 2].split(" | ")[5:8] == ["1.17×", "1.56×", "1.50 / 2.00"]
    assert table[header + 3].split(" | ")[4:8] == ["-", "-", "-", "1.50"]


def test_baseline_suite_names_the_checkout_it_is_timed_against(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.parse_args(["--suite", "--baseline", str(tmp_path)])  # no benchmarks/bench.py there
    args = bench.parse_args(["--suite", "--baseline", str(ROOT)])
    timings = {"diffax": [(2.0, 3.0)], "peer": [(3.0, 6.0)]}
    row = bench._row("small", "forward", 16, {"compile_s": 1.0, "flops": 1e9}, timings, [1.0])
    peak = {"numpy_gflops": 150.0, "xla_gflops": 100.0, "peak_gflops": 150.0}
    checkout = bench._describe_checkout(ROOT)
    table = bench._markdown(args, [row], peak, peak, {"checkout": checkout}).splitlines()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h"], capture_output=True, text=True
    )
    assert checkout == f"diffax at {ROOT} (commit {commit.stdout.strip()})"
    assert f"Baseline: {checkout}, served with the same flags." in table
    header = next(line for line in table if line.startswith("| config |"))
    assert "| diffax s | baseline s | speed ratio |" in header


def test_cores_pins_this_process_and_the_workers_it_starts(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--cores", str(len(os.sched_getaffinity(0)) + 1)])
    child = "import os; print(sorted(os.sched_getaffinity(0)))"
    script = (  # a thread started before pin_cores (as numpy's BLAS pool is) is pinned too
        f"import os, subprocess, sys, threading; sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
        " import bench; go = threading.Event(); seen = [];"
        " t = threading.Thread(target=lambda: (go.wait(), seen.append(sorted(os.sched_getaffinity(0)))));"
        " t.start(); bench.pin_cores(1); go.set(); t.join(); print(seen[0]);"
        " print(sorted(os.sched_getaffinity(0)));"
        f" subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    first = str(sorted(os.sched_getaffinity(0))[:1])
    assert out.splitlines() == [first, first, first]


def test_compare_impl_times_both_forms_in_one_process(bench, capsys):
    # XLA's convolutions: Winograd's would double the compile time, and norm_impl is what is compared.
    argv = "--config small --what forward --batch 1 --repeats 3 --gap 0 --conv-impl xla".split()
    bench.main([*argv, "--compare-impl", "norm_impl"])
    (line,) = capsys.readouterr().out.strip().splitlines()
    record = json.loads(line)
    assert record["field"] == "norm_impl"
    assert [len(record["times_s"][form]) for form in ("xla", "cpu")] == [3, 3]
    assert record["speedup"] == pytest.approx(record["xla_median_s"] / record["cpu_median_s"], rel=1e-2)
    with pytest.raises(SystemExit):
        bench.parse_args(["--suite", "--compare-impl", "norm_impl"])
    with pytest.raises(SystemExit):
        bench.parse_args([*argv, "--compare-impl", "dtype"])


def test_compare_xla_option_times_the_program_without_and_with_it(bench, capsys):
    argv = "--config small --what forward --batch 1 --repeats 3 --gap 0 --conv-impl xla".split()
    option = "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    bench.main([*argv, "--compare-xla-option", option])
    (line,) = capsys.readouterr().out.strip().splitlines()
    record = json.loads(line)
    assert record["option"] == option
    assert [len(record["times_s"][form]) for form in ("without", "with")] == [3, 3]
    assert record["speedup"] == pytest.approx(record["without_median_s"] / record["with_median_s"], rel=1e-2)
    for bad in (
        ["--compare-xla-option", "no_value"],
        ["--compare-impl", "norm_impl", "--compare-xla-option", option],
        ["--what", "sample-ddim50", "--compare-xla-option", option],
        ["--what", "sample-dpmpp20", "--xla-option", option],
    ):
        with pytest.raises(SystemExit):
            bench.parse_args([*argv, *bad])


def test_single_measurement_prints_one_json_line(bench, capsys):
    bench.main(["--config", "small", "--what", "forward", "--batch", "2", "--repeats", "2", "--gap", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["params"] == 6_472_195
    assert record["images_per_s"] == pytest.approx(2 / record["median_s"], rel=1e-2)
    assert record["cpu_s"] > 0 and record["cores_busy"] > 0
    assert record["gflop"] > 1 and 0 < record["fraction_of_peak"]
    assert {record[field] for field in bench.IMPL_FIELDS} == {"cpu"}  # "auto"
    assert "conv_impl" in bench.IMPL_FIELDS
    # FLOPs are the direct convolutions' and the unblocked attention's, whatever the forward ran.
    impls = {field: "cpu" for field in bench.IMPL_FIELDS} | {"conv_impl": "xla", "attention_impl": "xla"}
    net = models.get("unet_ddpm_cifar10", **bench.CONFIGS["small"], **bench.PEER_LAYOUT, **impls)
    x, t = jnp.zeros((2, 32, 32, 3)), jnp.full((2,), 0.5)
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), x, t)["params"])
    direct = jax.jit(lambda p: net.apply({"params": p}, x, t)).lower(params).cost_analysis()["flops"]
    assert record["gflop"] == pytest.approx(direct / 1e9, rel=2e-3)
    assert record["xla_flags"] == list(perf.xla_flags())
    assert record["attention_block_bytes"] == cpu_attention.ATTENTION_BLOCK_BYTES
    assert record["cpu_attention_kernel"] is True
    assert record["l2_cache_bytes"] == cpu_attention.l2_cache_bytes()


@pytest.mark.skipif(
    not (ROOT.parent / "peer-venv" / "bin" / "python").exists(), reason="the peer's virtualenv is not set up"
)
def test_peer_worker_times_the_peers_own_task_on_request(bench):
    """The suite's peer side: diffusers' runner, same parameter count, one timing per request."""
    cmd = [str(bench.PEER_PYTHON), str(bench.PEER_WORKER), str(bench.PEER_RUNNER)]
    worker = bench.Worker([*cmd, "--config", "small", "--what", "forward", "--batch", "1", "--threads", "1"])
    try:
        assert worker.info["params"] == 6_472_195 and worker.info["threads"] == 1
        for _ in range(2):
            seconds, cpu_seconds = worker.time_once()
            assert seconds > 0 and cpu_seconds > 0
    finally:
        worker.close()


def test_dropout_masks_bench_finds_every_resblock_dropout(bench):
    spec = importlib.util.spec_from_file_location("dropout_masks", ROOT / "benchmarks" / "dropout_masks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = module.dropout_shapes("small", 2)
    # two blocks per level down, three up, two in the middle; 64/128/128 channels at 32/16/8.
    assert len(calls) == 3 * 2 + 3 * 3 + 2 and {rate for _, rate in calls} == {0.1}
    assert sorted({shape for shape, _ in calls}) == [(2, 8, 8, 128), (2, 16, 16, 128), (2, 32, 32, 64)]
    for method in ("bernoulli", "layers.dropout"):
        masks = module.masks_program(calls, method)(jax.random.key(0))
        assert 0.05 < sum(float((m == 0).mean()) for m in masks) / len(masks) < 0.15
