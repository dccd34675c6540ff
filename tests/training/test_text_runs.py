"""Token runs in the training system: bad input in one line, data, and train → evaluate → generate."""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, subprocess_env

from diffax import config as config_lib
from diffax import data
from diffax.data import text
from diffax.discrete import system
from experiments import text_ar, text_d3pm, text_mdlm, text_radd, text_sedd


def test_corpus_is_pinned_split_and_normalised():
    train = text.load_corpus(split="train")
    test = text.load_corpus(split="test")
    assert abs(len(train) - 9 * len(test)) <= 10 and train.max() == 26 and train.min() == 0
    assert text.decode(train[:20]) == "the assert statement"
    assert text.normalize_like_text8("Hello, World 42!\n") == "hello world four two"
    assert 3.2 < text.bigram_entropy_bits(train) < 3.4  # the 3.3 bits/char reference


def test_markov_source_entropy_and_pipeline():
    source = text.markov_from_config(text_mdlm.get_config("markov").input)
    x = source.sample(np.random.default_rng(0), 4000, 32)
    # the empirical mean of -log p(x) is the block entropy
    nll = -source.log_prob(x)
    assert abs(nll.mean() - source.block_entropy(32)) < 4 * nll.std() / np.sqrt(len(x))
    config = text_mdlm.get_config("markov")
    pipe = data.make_pipeline(config.input, seed=1, process_index=1, process_count=2)
    batch = pipe.get(5)["tokens"]
    assert batch.shape == (config.input.batch_size // 2, config.input.seq_len) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, pipe.get(5)["tokens"])


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("input.corpus_sha256", "0" * 64, "config.input.corpus_sha256: the normalised text of"),
        ("model.vocab_size", 30, "config.model.vocab_size: 30 does not match the text input's 27"),
        ("model.seq_len", 128, "config.model.seq_len: 128 does not match config.input.seq_len=64"),
        ("sampler.name", "ddim", "config.sampler.name: 'ddim' is a Gaussian sampler"),
        ("loss.mask_sampling", "tokens", "config.loss.mask_sampling: mask_sampling 'tokens': known"),
        ("model.time_conditioning", True, "config.loss.mask_sampling: 'count' estimates the NELBO of a"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(field, value, match):
    config = text_mdlm.get_config()
    config.loss.mask_sampling = "count"
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=match) as e:
        config_lib.validate(config)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "module, arg",
    [
        (text_ar, None),
        (text_d3pm, "uniform"),
        (text_d3pm, "absorbing"),
        (text_sedd, None),
        (text_radd, None),
        (text_mdlm, "markov"),
    ],
)
def test_experiments_validate(module, arg):
    config_lib.validate(module.get_config(arg))


def test_heldout_bound_uses_count_draws_where_they_estimate_the_nelbo():
    """Time-trained or count-trained, a time-free MDLM is scored by the count estimator (same NELBO, lower
    variance), while training keeps its configured draws; a time-conditioned MDLM keeps time draws."""
    tokens = jnp.asarray(text.load_corpus(split="test")[: 8 * 32].reshape(8, 32))
    keys = jax.random.split(jax.random.key(1), 2)
    bounds, params = {}, None
    for sampling in ("time", "count"):
        config = text_mdlm.get_config("runlocal")
        config.loss.mask_sampling = sampling
        parts = system.build(config)
        if params is None:
            init = jax.jit(functools.partial(parts.module.init, train=False))
            params = init(jax.random.key(0), tokens, jnp.zeros((8,)), None)["params"]
        bound_fn = system.make_bound(config, parts)
        bounds[sampling] = np.stack([np.asarray(bound_fn(params, tokens, k)) for k in keys])
        trained = jax.jit(parts.loss_fn)(params, {"tokens": tokens}, keys[0])[1]["bound"]
        assert (np.asarray(trained) == bounds[sampling][0]).all() == (sampling == "count")
    np.testing.assert_array_equal(bounds["time"], bounds["count"])
    config.model.time_conditioning, config.loss.mask_sampling = True, "time"
    parts = system.build(config)
    params = jax.jit(functools.partial(parts.module.init, train=False))(
        jax.random.key(0), tokens, jnp.zeros((8,)), None
    )["params"]
    trained = jax.jit(parts.loss_fn)(params, {"tokens": tokens}, keys[0])[1]["bound"]
    np.testing.assert_array_equal(system.make_bound(config, parts)(params, tokens, keys[0]), trained)


def _run(module, *args):
    """``python -m <module> <args>`` on one fake device; the finished process (which must succeed)."""
    command = [sys.executable, "-m", module, *args]
    done = subprocess.run(
        command, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_text_run_trains_evaluates_and_generates(tmp_path):
    workdir = tmp_path / "run"
    config = REPO / "experiments" / "text_mdlm.py"
    _run(
        "diffax.main",
        f"--config={config}:runlocal",
        f"--workdir={workdir}",
        "--config.log.eval_every_steps=0",
    )
    _run("diffax.evaluate", f"--workdir={workdir}")
    record = json.loads((workdir / "eval" / "step_00000006.json").read_text())
    assert (
        3.0 < record["bits_per_char"] < 8.0 and record["bits_per_char"] == record["metrics"]["bits_per_char"]
    )
    assert 0 < record["metrics"]["nfe"] <= 8 and record["metrics"]["sample_entropy"] > 0
    out = tmp_path / "samples.txt"
    _run("diffax.generate", f"--workdir={workdir}", "--num_samples=3", f"--out={out}")
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and all(len(line) == 32 and set(line) <= set(text.ALPHABET) for line in lines)
