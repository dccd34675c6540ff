"""benchmarks/accelerator.py at tiny widths on the CPU: every row compiles, runs and reports."""

import importlib.util
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_device_benchmark_runs_at_tiny_sizes(capsys):
    spec = importlib.util.spec_from_file_location(
        "accelerator_benchmark", ROOT / "benchmarks" / "accelerator.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["accelerator_benchmark"] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        results = module.main(["--tiny", "--steps=1", "--warmup=0", "--fsdp=2"])
    finally:
        del sys.modules["accelerator_benchmark"]
    table = capsys.readouterr().out
    assert len(results) == 4 and table.count("\n| ") == 5  # header and four rows
    for r in results:
        assert r["batch"] == 8 and r["images_per_sec"] > 0 and r["tflops_per_device"] > 0
        assert math.isfinite(r["mfu"]) and r["mfu"] > 0
