"""Flow and JVP trainers in the one training loop (rectified flow, reflow on the pair job's pairs,
distillation, stochastic interpolants, MeanFlow, shortcut, sCM): experiment files, one-line bad input,
training, exact resume, sampling through ``diffax.generate`` at K steps."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from diffax import config as config_lib
from diffax import data, generate, sharding, train, train_state
from diffax.fewstep import interpolants

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import (  # noqa: E402
    digits_interpolant,
    digits_meanflow,
    digits_rf,
    digits_scm,
    mixture,
)


def _one_line(config, message):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_experiment_files_validate_and_bad_input_gets_one_line(tmp_path):
    for module in (digits_rf, digits_interpolant, digits_meanflow, digits_scm):
        config_lib.validate(module.get_config())
    config_lib.validate(digits_meanflow.get_config("shortcut"))
    reflow = digits_rf.get_config("reflow")
    reflow.trainer.pairs_dir = str(tmp_path / "none")
    _one_line(reflow, f"config.trainer.pairs_dir: {tmp_path / 'none'} holds no pairs_<k>.npz")
    os.makedirs(tmp_path / "pairs")
    np.savez(
        tmp_path / "pairs" / "pairs_00000.npz", noise=np.zeros((2, 8, 8, 1)), image=np.zeros((2, 8, 8, 1))
    )
    reflow.trainer.pairs_dir = str(tmp_path / "pairs")
    _one_line(reflow, "config.trainer.pairs_dir: ")
    distill = digits_rf.get_config("distill")
    distill.trainer.pairs_dir = ""
    _one_line(distill, "config.trainer.pairs_dir: distillation needs the pairs")
    meanflow = digits_meanflow.get_config()
    meanflow.process = ml_collections.ConfigDict(dict(name="cosine"))
    _one_line(meanflow, "config.process.name: the 'meanflow' trainer works in the 'rectified_flow' time")
    shortcut = digits_meanflow.get_config("shortcut")
    shortcut.model.interval_embedding = False
    _one_line(shortcut, "config.model.interval_embedding: the 'shortcut' network is conditioned on")
    shortcut = digits_meanflow.get_config("shortcut")
    shortcut.trainer.bootstrap_every = 8
    _one_line(shortcut, "config.trainer.bootstrap_every: no such option of 'shortcut'")
    scm = digits_scm.get_config()
    scm.process = ml_collections.ConfigDict(dict(name="rectified_flow"))
    _one_line(scm, "config.process.name: the 'scm' trainer works in the 'trigflow' time convention")
    scm = digits_scm.get_config()
    scm.model.time_scale = 1000.0
    _one_line(scm, "config.model.time_scale: the 'scm' trainer differentiates the network in t")
    meanflow = digits_meanflow.get_config()
    meanflow.model.time_embedding = "fourier"
    _one_line(meanflow, "config.model.time_embedding: the 'meanflow' trainer differentiates the network in t")
    interpolant = digits_interpolant.get_config()
    interpolant.trainer.loss = "score"
    _one_line(interpolant, "config.trainer.loss: unknown 'score'")


def _mixture(
    trainer,
    *,
    process="rectified_flow",
    interval=False,
    sampler="ddim",
    steps=2,
    time_scale=None,
    **process_kw,
):
    config = mixture.get_config("dit")
    if time_scale is not None:  # the JVP trainers' positional embedding of t; else the network's default
        config.model.time_scale = time_scale
    config.process = ml_collections.ConfigDict(dict(name=process, **process_kw))
    config.trainer = ml_collections.ConfigDict(trainer)
    config.model.interval_embedding = interval
    config.sampler.name, config.sampler.steps = sampler, steps
    config.total_steps = 2
    config.ckpt.every_steps = 1
    return config


def _step_and_sample(config, *, steps=2):
    """One jitted step of the config's trainer from a fresh state and samples at ``steps`` steps with its
    own grid and network, as ``diffax.train`` and ``diffax.generate`` build them."""
    config_lib.validate(config)
    parts = train_state.build(config)
    init = train_state.state_initializer(config, parts)
    state = train_state.start(jax.jit(lambda: nn.meta.unbox(init()))(), parts)
    pipeline = parts.trainer.input_pipeline(data.make_pipeline(config.input, seed=0))
    batch = jax.tree.map(jax.numpy.asarray, pipeline.get(0))
    state, metrics = jax.jit(train_state.config_train_step(config, parts))(state, batch)
    assert np.isfinite(float(metrics["loss"])), config.trainer.name
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), devices=jax.devices()[:1])
    return functools.partial(
        generate.make_sampler(config, parts, mesh=mesh, steps=steps), state.sampling_params()
    )


@pytest.mark.slow
def test_flow_trainers_train_resume_and_sample(tmp_path):
    """1-RF; its pairs through the sampler ``diffax.generate`` builds, the noise kept (the pair job's
    writer); one-step distillation on them (reflow is the same step at t ~ U(0, t_max]); the
    interpolant, MeanFlow and shortcut: one step each with finite loss and finite samples at 2 steps (1
    for the distilled flow) with the trainer's own grid and network. sCM (its parameters {"network",
    "logvar"}) in the loop: trained, checkpointed, sampled by ``generate.load_run`` at 2 steps."""
    labels = np.zeros((16,), np.int32)
    rf = _step_and_sample(_mixture(dict(name="rectified_flow"), sampler="heun"))
    pairs = str(tmp_path / "pairs")
    (written,) = interpolants.write_reflow_pairs(
        lambda e: rf(jax.random.key(0), labels, x_T=e),
        pairs,
        shape=(8, 8, 1),
        num_chunks=1,
        chunk_size=16,
        seed=0,
    )
    chunk = np.load(written)
    np.testing.assert_allclose(
        chunk["image"], rf(jax.random.key(5), labels, x_T=chunk["noise"])
    )  # the flow's
    runs = {
        "distill": _mixture(dict(name="rectified_flow", pairs_dir=pairs, distill_steps=1)),
        "interpolant": _mixture(
            dict(name="interpolant", loss="denoiser"),
            process="interpolant",
            sampler="interpolant_sde",
            kind="trig",
            gamma_scale=0.5,
        ),
        "meanflow": _mixture(dict(name="meanflow"), interval=True, time_scale=1.0),
        "shortcut": _mixture(dict(name="shortcut", min_step=0.25, bootstrap_fraction=0.25), interval=True),
    }
    for name, config in runs.items():
        images = _step_and_sample(config, steps=1 if name == "distill" else 2)(jax.random.key(1), labels[:4])
        assert images.shape == (4, 8, 8, 1) and np.all(np.isfinite(np.asarray(images))), name

    scm = _mixture(
        dict(name="scm", warmup_steps=2), process="trigflow", sampler="consistency", time_scale=1.0
    )
    scm.total_steps = 1
    state = train.train_and_evaluate(scm, str(tmp_path / "scm"))
    assert set(state.params) == {"network", "logvar"} and state.target_params == ()
    run, sample_fn, params, step = generate.load_run(str(tmp_path / "scm"), steps=2)
    images = generate.sample_images(sample_fn, params, config=run, seed=0, num_samples=4)[0]
    assert step == 1 and images.shape == (4, 8, 8, 1)


_REFLOW_EXPERIMENT = """
import ml_collections
from experiments import mixture

def get_config():
    config = mixture.get_config("dit")
    config.process = ml_collections.ConfigDict(dict(name="rectified_flow"))
    config.trainer = ml_collections.ConfigDict(dict(name="rectified_flow", pairs_dir={pairs!r}))
    config.teacher.workdir = {teacher!r}
    config.model.interval_embedding = False
    config.sampler.name, config.sampler.steps = "heun", 2
    config.total_steps = 1
    return config
"""


def _two_processes(*args: str, module: str, logs: str) -> list[str]:
    """``launch/local_multiprocess.sh 2 ARGS`` with ``MODULE``, one CPU device a process; their logs."""
    from benchmarks import fault_injection

    env = fault_injection.child_env(1) | {
        "MODULE": module,
        "PYTHON": sys.executable,
        "PORT": str(fault_injection.free_port()),
    }
    done = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    texts = [open(os.path.join(logs, f"process_{i}.log")).read() for i in range(2)]
    assert done.returncode == 0, "\n".join(text[-2000:] for text in texts)
    return texts


@pytest.mark.slow
def test_pair_job_and_reflow_on_two_processes(tmp_path):
    """``python -m diffax.fewstep.reflow`` as two processes joined through 127.0.0.1
    (``launch/local_multiprocess.sh``): process p writes the chunks k = p mod 2, and together they are the
    pairs one process writes in-process with the run's own sampler, bit for bit. Reflow on them then
    trains on the same two processes, each placing its shards of the teacher's weights from its own
    restored copy (no array crosses processes: the CPU backend cannot move one)."""
    run = str(tmp_path / "rf")
    config = _mixture(dict(name="rectified_flow"), sampler="heun")
    config.total_steps = 1
    train.train_and_evaluate(config, run)
    out = tmp_path / "pairs"
    pair_flags = ["--num_chunks=3", "--chunk_size=8", "--sampler=heun", "--steps=2", "--seed=3"]
    logs = _two_processes(
        f"--workdir={run}", f"--out={out}", *pair_flags, module="diffax.fewstep.reflow", logs=out
    )
    assert "2 pair chunks of step 1" in logs[0] and "1 pair chunks of step 1" in logs[1]

    _, sample_fn, params, _ = generate.load_run(run, sampler="heun", steps=2)
    labels = np.zeros((8,), np.int32)
    expected = str(tmp_path / "expected")
    interpolants.write_reflow_pairs(
        lambda e: sample_fn(params, jax.random.key(0), labels, x_T=e),
        expected,
        shape=(8, 8, 1),
        num_chunks=3,
        chunk_size=8,
        seed=3,
    )
    for k in range(3):
        written, reference = np.load(out / f"pairs_{k:05d}.npz"), np.load(f"{expected}/pairs_{k:05d}.npz")
        for name in ("noise", "image"):
            np.testing.assert_array_equal(written[name], reference[name], err_msg=f"chunk {k} {name}")

    experiment = tmp_path / "reflow_mixture.py"
    experiment.write_text(_REFLOW_EXPERIMENT.format(pairs=str(out), teacher=run))
    reflow_run = tmp_path / "reflow"
    _two_processes(f"--config={experiment}", f"--workdir={reflow_run}", module="diffax.main", logs=reflow_run)
    assert generate.load_run(str(reflow_run), steps=2)[3] == 1
