"""Flow and JVP trainers in the one training loop (rectified flow, reflow on the pair job's pairs,
distillation, stochastic interpolants, MeanFlow, shortcut, sCM): experiment files, one-line bad input,
training, exact resume, sampling through ``diffax.generate`` at K steps."""

import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from diffax import config as config_lib
from diffax import generate, train
from diffax.fewstep import interpolants

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import (  # noqa: E402
    digits_interpolant,
    digits_meanflow,
    digits_rf,
    digits_scm,
    digits_shortcut,
    mixture,
)


def _one_line(config, message):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_experiment_files_validate_and_bad_input_gets_one_line(tmp_path):
    for module in (digits_rf, digits_interpolant, digits_meanflow, digits_shortcut, digits_scm):
        config_lib.validate(module.get_config())
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
    shortcut = digits_shortcut.get_config()
    shortcut.model.interval_embedding = False
    _one_line(shortcut, "config.model.interval_embedding: the 'shortcut' network is conditioned on")
    shortcut = digits_shortcut.get_config()
    shortcut.trainer.bootstrap_every = 8
    _one_line(shortcut, "config.trainer.bootstrap_every: no such option of 'shortcut'")
    scm = digits_scm.get_config()
    scm.process = ml_collections.ConfigDict(dict(name="rectified_flow"))
    _one_line(scm, "config.process.name: the 'scm' trainer works in the 'trigflow' time convention")
    interpolant = digits_interpolant.get_config()
    interpolant.trainer.loss = "score"
    _one_line(interpolant, "config.trainer.loss: unknown 'score'")


def _mixture(trainer, *, process="rectified_flow", interval=False, sampler="ddim", steps=2, **process_kw):
    config = mixture.get_config("dit")
    config.process = ml_collections.ConfigDict(dict(name=process, **process_kw))
    config.trainer = ml_collections.ConfigDict(trainer)
    config.model.interval_embedding = interval
    config.sampler.name, config.sampler.steps = sampler, steps
    config.total_steps = 2
    config.ckpt.every_steps = 1
    return config


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_flow_trainers_train_resume_and_sample(tmp_path):
    """1-RF, its pairs by the pair job's writer through ``generate``'s sampler, reflow on them started at
    the 1-RF run and resumed exactly, one-step distillation; the interpolant, MeanFlow, shortcut and sCM
    trainers: each trains, checkpoints and samples finite images at 1 and 2 steps with its own sampler."""
    rf_dir = str(tmp_path / "rf")
    train.train_and_evaluate(_mixture(dict(name="rectified_flow"), sampler="heun"), rf_dir)
    run, sample_fn, params, _ = generate.load_run(rf_dir)
    labels = np.zeros((16,), np.int32)
    pairs = str(tmp_path / "pairs")
    interpolants.write_reflow_pairs(
        lambda e: sample_fn(params, jax.random.key(0), labels, x_T=e),
        pairs,
        shape=(8, 8, 1),
        num_chunks=2,
        chunk_size=16,
        seed=0,
    )
    reflow = _mixture(dict(name="rectified_flow", pairs_dir=pairs), sampler="heun")
    reflow.teacher.workdir = rf_dir
    whole = train.train_and_evaluate(reflow, str(tmp_path / "reflow"))
    reflow.total_steps = 1
    train.train_and_evaluate(reflow, str(tmp_path / "resumed"))
    reflow.total_steps = 2
    _assert_same(train.train_and_evaluate(reflow, str(tmp_path / "resumed")).params, whole.params)

    runs = {
        "distill": _mixture(dict(name="rectified_flow", pairs_dir=pairs, distill_steps=1)),
        "interpolant": _mixture(
            dict(name="interpolant", loss="denoiser"),
            process="interpolant",
            sampler="interpolant_sde",
            kind="trig",
            gamma_scale=0.5,
        ),
        "meanflow": _mixture(dict(name="meanflow"), interval=True),
        "shortcut": _mixture(dict(name="shortcut", min_step=0.25, bootstrap_fraction=0.25), interval=True),
        "scm": _mixture(dict(name="scm", warmup_steps=2), process="trigflow", sampler="consistency"),
    }
    for name, config in runs.items():
        config.total_steps = 1
        train.train_and_evaluate(config, str(tmp_path / name))
        for steps in (1, 2):
            run, sample_fn, params, step = generate.load_run(str(tmp_path / name), steps=steps)
            images = generate.sample_images(sample_fn, params, config=run, seed=0, num_samples=4)[0]
            assert step == 1 and images.shape == (4, 8, 8, 1), name
        raw = sample_fn(params, jax.random.key(1), np.zeros((4,), np.int32))
        assert np.all(np.isfinite(np.asarray(raw))), name
