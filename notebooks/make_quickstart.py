"""Writes ``notebooks/quickstart.ipynb`` from the cells below, without outputs.

    python notebooks/make_quickstart.py

Edit the cells here and rerun: the notebook is generated so that its source stays reviewable, and
``tests/notebooks/test_quickstart.py`` checks that the committed notebook equals this script's output
and executes it end to end.
"""

import pathlib
import textwrap

import nbformat

PATH = pathlib.Path(__file__).with_name("quickstart.ipynb")

# (cell id, markdown, code, tags): each code cell follows the markdown line that explains it.
CELLS = (
    (
        "title",
        """
        # diffax quickstart

        Train a small diffusion model, sample it with three samplers, and measure the samplers against
        an exact solution. Runs top to bottom on a plain CPU (ten minutes or so on two cores) and on a
        Colab TPU runtime (*Runtime → Change runtime type → TPU*).
        """,
        None,
        (),
    ),
    (
        "install",
        """
        **1. Install.** In a diffax checkout (this notebook sits in its `notebooks/` folder) the cell puts
        the checkout on the path, after `pip install -e` of it if diffax is not installed yet. On Colab,
        either upload a diffax wheel next to the notebook (*Files → Upload*; `python -m build` in a diffax
        checkout writes it to `dist/diffax-*.whl`: no public URL needed, e.g. on a TPU runtime without
        one), or set `REPO_URL` to the git URL of diffax: the cell installs the newest uploaded
        `diffax-*.whl` (or the file `WHEEL` names), or clones `REPO_URL` to `./diffax` and installs it,
        with `jax[tpu]` on a TPU runtime. If pip upgraded a package that Colab had already loaded, use
        *Runtime → Restart session* and run the notebook again; the cell then finds diffax installed
        and does nothing more.
        """,
        """
        REPO_URL = ""  # Colab: the git URL of diffax (e.g. https://github.com/<owner>/diffax), or ...
        WHEEL = ""  # ... an uploaded wheel (default: the newest diffax-*.whl in this folder)

        import glob
        import importlib.metadata
        import os
        import subprocess
        import sys

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet TensorFlow's C++ start-up lines (tf.data)
        candidates = (os.getcwd(), os.path.dirname(os.getcwd()), os.path.abspath("diffax"))  # checkout, clone
        here = [p for p in candidates if os.path.isfile(os.path.join(p, "experiments", "digits.py"))]
        wheels = [WHEEL] if WHEEL else sorted(glob.glob("diffax-*.whl"), key=os.path.getmtime)[-1:]
        tpu = ["jax[tpu]"] if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") else []
        try:
            print("diffax", importlib.metadata.version("diffax"), "installed")
            installed = True
        except importlib.metadata.PackageNotFoundError:
            installed = False


        def pip_install(*args):
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args, *tpu], check=True)


        if not here and not installed and wheels:  # the wheel holds diffax and experiments/
            pip_install(wheels[0])
            print("diffax installed from", wheels[0])
        elif not here and not installed:
            if not REPO_URL:
                raise RuntimeError(
                    "no diffax here: upload a diffax wheel (python -m build in a checkout writes"
                    " dist/diffax-*.whl) or set REPO_URL to the git URL of diffax, and rerun."
                )
            subprocess.run(["git", "clone", "--quiet", "--depth=1", REPO_URL, "diffax"], check=True)
            here = [os.path.abspath("diffax")]
        if here:
            ROOT = here[0]
            if not installed:
                pip_install("-e", ROOT)
            sys.path.insert(0, ROOT)  # diffax, and the experiment files in experiments/
            print("diffax checkout:", ROOT)
        """,
        (),
    ),
    (
        "devices",
        """
        **2. Devices.** JAX uses every accelerator it finds: one CPU device here, eight TPU cores on a
        v2-8, one chip on a v5e-1. Training shards each batch over all of them.
        """,
        """
        import jax

        print(f"JAX {jax.__version__}, backend {jax.default_backend()!r}, {jax.device_count()} device(s)")
        jax.devices()
        """,
        (),
    ),
    (
        "train",
        """
        **3. Train.** The embedded default, `experiments/digits.py`: a small U-Net learns scikit-learn's
        handwritten digits (8×8, upsampled to 16×16; nothing downloads). The notebook runs
        `DIFFAX_NOTEBOOK_STEPS` steps (default 300, a few minutes on two CPU cores: enough for digit-like
        shapes; CI runs 3, with XLA's own convolutions, which compile faster than the default
        Winograd ones) of the same `train.train_and_evaluate` that `python -m diffax.main` calls, into
        a temporary workdir that holds the config, checkpoints and TensorBoard events. The full run is
        `python -m diffax.main --config=experiments/digits.py --workdir=runs/digits`.
        """,
        """
        import tempfile

        from absl import logging

        from diffax import train
        from experiments import digits

        STEPS = int(os.environ.get("DIFFAX_NOTEBOOK_STEPS", 3 if os.environ.get("CI") == "true" else 300))
        WORKDIR = tempfile.mkdtemp(prefix="diffax-digits-")

        config = digits.get_config()
        if os.environ.get("CI") == "true":
            config.model.conv_impl = "xla"
        config.total_steps = STEPS
        config.optim.warmup_steps = STEPS // 10
        config.ckpt.every_steps = STEPS
        config.log.every_steps = max(1, STEPS // 10)
        config.log.sample_every_steps = config.log.eval_every_steps = 0  # sampled below instead
        logging.set_verbosity(logging.INFO)  # progress lines: loss, steps/s, ETA ...
        logging.get_absl_logger().addFilter(lambda record: "orbax" not in record.pathname)  # ... not Orbax's
        final = train.train_and_evaluate(config, WORKDIR)
        print(f"trained {int(final.step)} steps into {WORKDIR}")
        """,
        (),
    ),
    (
        "load",
        """
        **4a. Load the run** the way `python -m diffax.generate` does: the config the run saved, the
        network it describes, and the newest checkpoint, replicated on this machine's devices.
        """,
        """
        import ml_collections

        from diffax import config as config_lib
        from diffax import checkpoint, generate, sharding, train_state

        run_config = config_lib.load(WORKDIR)
        parts = train_state.build(run_config)
        local = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # data parallel over the local devices
        mesh = sharding.make_mesh(local, devices=jax.local_devices())
        run_state, step = checkpoint.restore_latest(WORKDIR, run_config, parts, mesh=mesh)
        print(f"restored step {step}")
        """,
        (),
    ),
    (
        "samples",
        """
        **4b. Sample side by side** from the EMA parameters with DDPM (ancestral, stochastic), DDIM
        (deterministic, first order) and DPM-Solver++(2M) (deterministic, second order), each with
        20 network evaluations and the same starting noise. Each sampler compiles once into one XLA program.
        """,
        """
        import matplotlib.pyplot as plt

        %matplotlib inline

        SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "dpm_solver++_2m": "DPM-Solver++(2M)"}
        images = {}
        for name in SAMPLERS:
            sample_fn = generate.make_sampler(run_config, parts, mesh=mesh, sampler=name, steps=20)
            images[name], _ = generate.sample_images(
                sample_fn, run_state.sampling_params(), config=run_config, seed=0, num_samples=36
            )

        fig, axes = plt.subplots(1, len(SAMPLERS), figsize=(10, 3.8))
        for ax, (name, title) in zip(axes, SAMPLERS.items()):
            ax.imshow(generate.image_grid(images[name])[..., 0], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{title}, 20 steps")
            ax.axis("off")
        plt.show()
        """,
        ("samples",),
    ),
    (
        "reference",
        """
        **5a. An exact reference.** On a 2-D Gaussian mixture the noised score is known in closed form
        (`diffax.samplers.exact`), so a sampler's only error is its own discretisation. The reference is
        the probability-flow ODE from t = 1 to t = 0.001 solved in float64 (scipy's DOP853) from the same
        500 prior draws.
        """,
        """
        import numpy as np

        from diffax import samplers, schedules
        from diffax.samplers.exact import reference_samples, toy_mixture

        mixture = toy_mixture()
        schedule = schedules.get("vp_linear", beta_min=0.1, beta_max=20.0)
        model_fn = mixture.model_fn(schedule)  # the exact eps-prediction, in float32
        T_END = 1e-3
        x_T = jax.random.normal(jax.random.key(0), (500, 2))
        reference = reference_samples(mixture, schedule, x_T, T_END)  # float64, from t_max to T_END
        """,
        (),
    ),
    (
        "nfe",
        """
        **5b. Error versus NFE.** Each deterministic sampler runs on uniform-log-SNR grids with 5 to 40
        network evaluations (NFE); the RMS distance to the reference falls at the sampler's order (DDIM 1,
        DPM-Solver++(2M) 2, UniPC 3). DDPM is stochastic, so it has no single path to compare.
        `benchmarks/sampler_convergence.py` runs every sampler.
        """,
        """
        NFES = (5, 10, 20, 40)
        errors = {}
        for name in ("ddim", "dpm_solver++_2m", "unipc"):
            errors[name] = []
            for nfe in NFES:  # these samplers take one network evaluation per step
                ts = samplers.timesteps(schedule, num_steps=nfe, spacing="uniform_logsnr", t_end=T_END)
                x = samplers.sample(model_fn, schedule, x_T, sampler=name, timesteps=ts)
                errors[name].append(float(np.sqrt(np.mean((np.asarray(x, np.float64) - reference) ** 2))))

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, errs in errors.items():
            ax.loglog(NFES, errs, marker="o", label=f"{name} (order {samplers.get(name).order})")
        ax.set_xticks(NFES, [str(n) for n in NFES])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel("RMS error vs float64 reference")
        ax.set_title("2-D Gaussian mixture, exact score")
        ax.legend()
        plt.show()
        """,
        ("nfe",),
    ),
    (
        "bigger",
        """
        **6. Bigger experiments** are other files in `experiments/`, each a `get_config()` with the paper's
        settings; `:runlocal` shrinks one to a laptop-sized smoke run, and `--config.<field>=value`
        overrides any field. They read tfds datasets prepared beforehand (nothing downloads at run time).
        On a TPU pod slice, `launch/tpu_pod.sh` runs the same command on every worker; `launch/slurm.sh`
        does so on multi-node GPUs. Not run here:
        """,
        """
        from experiments import cifar10, dit

        for module in (cifar10, dit):
            name, c = module.__name__.split(".")[-1], module.get_config()
            print(module.__doc__.splitlines()[0])
            print(f"  model {c.model.name}, {c.process.name} schedule, {c.loss.name} loss")
            print(f"  sampler {c.sampler.name} with {c.sampler.steps} steps")
            print(f"  {c.input.dataset}, batch {c.input.batch_size}, {c.total_steps:,} steps")
            print(f"  python -m diffax.main --config=experiments/{name}.py --workdir=runs/{name}")
            print(f"  python -m diffax.main --config=experiments/{name}.py:runlocal --workdir=/tmp/{name}\\n")
        print("TPU pod: TPU_NAME=... ZONE=... launch/tpu_pod.sh --config=experiments/dit.py --workdir=gs://B/dit")
        """,
        (),
    ),
)


def _source(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def build() -> nbformat.NotebookNode:
    """The notebook: every cell of ``CELLS``, no outputs, metadata for a Python 3 kernel and Colab's TPU."""
    cells = []
    for cell_id, markdown, code, tags in CELLS:
        cells.append(nbformat.v4.new_markdown_cell(_source(markdown), id=f"{cell_id}-md"))
        if code is not None:
            metadata = {"tags": list(tags)} if tags else {}
            cells.append(nbformat.v4.new_code_cell(_source(code), id=cell_id, metadata=metadata))
    notebook = nbformat.v4.new_notebook(
        cells=cells,
        metadata={
            "accelerator": "TPU",
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
    )
    nbformat.validate(notebook)
    return notebook


def render() -> str:
    """The notebook file's exact text."""
    return nbformat.writes(build()) + "\n"


if __name__ == "__main__":
    PATH.write_text(render())
    print(f"wrote {PATH}")
