"""The quickstart notebook: generated from its script, and executed top to bottom in a fresh kernel.

The kernel is this interpreter (``sys.executable -m ipykernel_launcher`` from a kernel spec written to a
temporary directory, so no user-level ``python3`` spec can substitute another Python), on one CPU
device (not the 8 fake devices of ``tests/conftest.py``), with strict rank promotion, ``CI=true`` and a
2-step training run.
"""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
STEPS = 2

# Run in the notebook's kernel after its last cell: what each part of the notebook must have produced.
CHECKS = f"""
assert STEPS == {STEPS} and int(final.step) == STEPS and step == STEPS, (STEPS, final.step, step)
assert set(images) == set(SAMPLERS) == {{"ddpm", "ddim", "dpm_solver++_2m"}}
for im in images.values():
    assert im.shape == (36, 16, 16, 1) and im.dtype == np.uint8 and im.std() > 0, (im.shape, im.dtype)
assert not np.array_equal(images["ddpm"], images["ddim"])  # DDPM adds fresh noise at every step
for name, errs in errors.items():
    assert all(np.diff(errs) < 0), (name, errs)  # the error falls as the NFE grows
# at 40 NFE the higher-order solvers are far more accurate than first-order DDIM
assert errors["dpm_solver++_2m"][-1] < errors["ddim"][-1] / 5, errors
assert errors["unipc"][-1] < errors["dpm_solver++_2m"][-1], errors
"""


def _generator():
    spec = importlib.util.spec_from_file_location("make_quickstart", NOTEBOOKS / "make_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel_env() -> dict[str, str]:
    """This process's environment for one real CPU device, a tiny run, and the shared compile cache."""
    env = dict(os.environ)
    # One real device; the other flags as in this process (tests/conftest.py: optimise less, compile faster).
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
    )
    env.pop("MPLBACKEND", None)  # the kernel's inline backend must make the figures
    env |= {
        "CI": "true",
        "DIFFAX_NOTEBOOK_STEPS": str(STEPS),
        "JAX_PLATFORMS": "cpu",
        "JAX_NUMPY_RANK_PROMOTION": "raise",  # strict, as in tests/conftest.py
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
        "JAX_COMPILATION_CACHE_DIR": os.environ.get(
            "DIFFAX_TEST_CACHE", os.path.expanduser("~/.cache/diffax-test-jax")
        ),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
    }
    return env


def test_committed_notebook_is_the_generator_output():
    generator = _generator()
    committed = (NOTEBOOKS / "quickstart.ipynb").read_text()
    assert committed == generator.render(), "run `python notebooks/make_quickstart.py` and commit the result"
    for cell in nbformat.reads(committed, as_version=4).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} has outputs"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    notebook = _generator().build()
    notebook.cells.append(nbformat.v4.new_code_cell(CHECKS, id="test-checks"))

    write_kernel_spec(tmp_path / "kernels" / "python3")  # argv: [sys.executable, -m, ipykernel_launcher, ...]
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    assert specs.get_kernel_spec("python3").argv[0] == sys.executable
    kernel = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs)
    client = NotebookClient(
        notebook,
        km=kernel,
        kernel_name="python3",
        timeout=240,
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute(env=_kernel_env())  # raises CellExecutionError, with the traceback, if a cell fails

    code = {cell.id: cell for cell in notebook.cells if cell.cell_type == "code"}
    for cell in code.values():
        assert cell.execution_count is not None, f"cell {cell.id} did not run"
        assert not [o for o in cell.outputs if o.output_type == "error"], f"cell {cell.id} failed"
    for cell_id in ("samples", "nfe"):
        pngs = [o for o in code[cell_id].outputs if o.output_type == "display_data" and "image/png" in o.data]
        assert len(pngs) == 1, f"cell {cell_id} should show one figure; outputs: {code[cell_id].outputs}"
    devices = "".join(o.get("text", "") for o in code["devices"].outputs if o.output_type == "stream")
    assert "backend 'cpu', 1 device(s)" in devices, devices


def test_a_wheel_alone_holds_what_the_notebook_imports(tmp_path):
    """The notebook's wheel install: the wheel the README's ``python -m build`` makes (the same PEP 517
    build, through pip here) carries diffax, its C++ kernel sources and ``experiments/``, and the
    notebook's imports resolve inside it with no checkout on the path."""
    source = tmp_path / "source"
    for package in ("diffax", "experiments"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("diffax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        names = set(archive.namelist())
    assert {"experiments/digits.py", "experiments/common.py", "diffax/kernels/cpu/cpu_winograd.cc"} <= names

    probe = (
        "import diffax, experiments.cifar10, experiments.dit\n"
        "from experiments import digits\n"
        "digits.get_config()\n"
        "print(diffax.__file__, digits.__file__, experiments.dit.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PYTHONPATH": str(tmp_path / "site"),
        "JAX_PLATFORMS": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    files = done.stdout.split()
    assert len(files) == 3 and all(f.startswith(str(tmp_path / "site")) for f in files), done.stdout
