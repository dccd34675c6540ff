"""``python -m diffax.evaluate`` and the evaluation the training loop runs: digits and Inception runs."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, read_scalars, subprocess_env

from diffax import config as config_lib
from diffax import evaluate as evaluate_lib
from diffax import evaluation
from diffax.evaluation import InceptionV3


def _run(module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_digits_run_is_evaluated_by_the_loop_and_the_command(tmp_path):
    workdir = tmp_path / "digits"
    tiny = [
        "--config.total_steps=2",
        "--config.input.batch_size=8",
        "--config.model.base_channels=8",
        "--config.sampler.steps=3",
        "--config.ckpt.every_steps=2",
        "--config.log.sample_every_steps=0",
        "--config.log.eval_every_steps=2",
        "--config.evals.num_samples=20",
        "--config.model.conv_impl=xla",  # Winograd compiles slowly and has its own tests in tests/perf
    ]
    digits = REPO / "experiments" / "digits.py"
    trained = _run("diffax.main", f"--config={digits}", f"--workdir={workdir}", *tiny)
    assert trained.returncode == 0, trained.stderr[-3000:]
    trained_fd = float(re.search(r"eval at step 2 on 20 samples: FD ([0-9.]+)", trained.stderr).group(1))

    done = _run("diffax.evaluate", f"--workdir={workdir}", "--num_samples=30", "--sampler=ddim", "--steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((workdir / "eval" / "step_00000002.json").read_text())
    assert (record["step"], record["sampler"], record["sampler_steps"], record["ema"]) == (2, "ddim", 2, True)
    metrics = record["metrics"]
    assert metrics["num_samples"] == 30
    assert np.isfinite(metrics["fd"]) and metrics["fd"] > metrics["fd_floor"] > 0
    assert 1.0 <= metrics["is"] <= 10.0
    np.testing.assert_allclose(sum(metrics[f"class_fraction/{c}"] for c in range(10)), 1.0, atol=1e-6)
    assert set(record["targets"]) == {"fd_within_2x_floor", "confident_90pct", "classes_uniform"} | set(
        evaluation.judge_targets(metrics)
    )
    # the independent judge beside the digits classifier, and the held-out digits' own scores
    assert (
        metrics["judge/fd"] > metrics["judge/fd_floor"] > 0 and metrics["judge/real_near_zero_fraction"] > 0.4
    )
    assert 0.5 < metrics["real_confident_fraction"] <= 1.0
    assert read_scalars(workdir / "eval")["eval/fd"] == [(2, pytest.approx(metrics["fd"]))]
    assert read_scalars(workdir)["eval/fd"] == [(2, pytest.approx(trained_fd, abs=1e-3))]  # the loop's
    assert "eval/judge/fd_ratio" in read_scalars(workdir) and "judge: confident" in trained.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == record


def test_evaluate_refuses_a_bad_sample_count(tmp_path):
    done = _run("diffax.evaluate", f"--workdir={tmp_path}", "--num_samples=1")
    assert done.returncode == 1 and "--num_samples=1: must be at least 2" in done.stderr


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random InceptionV3 weights in the file format ``config.evals.inception_weights`` names (drawn in
    numpy: a jitted ``init`` compiles ~100 initialisers for ~15 s)."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == "kernel":  # LeCun normal
            return rng.normal(scale=np.prod(leaf.shape[:-1]) ** -0.5, size=leaf.shape).astype(leaf.dtype)
        return (np.ones if path[-1].key in ("scale", "var") else np.zeros)(leaf.shape, leaf.dtype)

    shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    path = tmp_path_factory.mktemp("inception") / "inception.npz"
    evaluation.save_inception_variables(variables, path)
    return str(path)


@pytest.mark.slow
def test_inception_run_measures_fid_against_its_own_input(squares_dir, inception_file, mixture_config):
    config = mixture_config
    config.input.update(dict(dataset="diffax_test_squares", data_dir=squares_dir, image_size=8, batch_size=8))
    config.evals.update(
        dict(inception_weights=inception_file, inception_size=75, num_reference=16, heldout_split="train")
    )
    config.evals.num_samples = config.evals.batch_size = 16
    config_lib.check_evaluation(config)
    real = evaluate_lib._real_images(config.input, 16, seed=config.seed)
    assert real.shape == (16, 8, 8, 1) and real.min() >= -1.0 and real.max() <= 1.0

    def sample_fn(source):
        return lambda params, key, labels: jnp.asarray(source[: len(labels)])

    same = evaluate_lib.make_evaluation(config, sample_fn(real))(None, step=0)
    noise = np.random.default_rng(0).uniform(-1, 1, real.shape).astype(np.float32)
    other = evaluate_lib.make_evaluation(config, sample_fn(noise))(None, step=0)

    # The reference is those same 16 images and so is the held-out set: both distances are 0.
    assert abs(same["fd"]) < 1e-3 * other["fd"] and abs(same["fd_floor"]) < 1e-3 * other["fd"]
    assert other["fd"] > 0 and "confident_fraction" not in other
    assert same["is"] >= 1.0


def test_periodic_evaluation_of_a_non_digits_run_needs_inception_weights(mixture_config, tmp_path):
    mixture_config.log.eval_every_steps = 4
    with pytest.raises(config_lib.ConfigError, match=r"^config.evals.inception_weights: empty; "):
        config_lib.validate(mixture_config)
    mixture_config.evals.inception_weights = str(tmp_path / "missing.npz")
    with pytest.raises(config_lib.ConfigError, match=r"^config.evals.inception_weights: .*missing.npz is"):
        config_lib.validate(mixture_config)


def test_a_saved_config_without_newer_fields_loads_with_their_defaults(mixture_config, tmp_path):
    saved = mixture_config.to_dict()
    del saved["evals"]["inception_size"], saved["evals"]["heldout_split"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = config_lib.load(str(tmp_path))
    assert loaded.evals.inception_size == 299 and loaded.evals.heldout_split == ""
    assert loaded.model.to_dict() == mixture_config.model.to_dict()
