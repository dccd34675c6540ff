"""Token runs in the one training system: what a text config builds, how it samples and how it is scored.

A run is a token run when ``config.input.dataset`` is a text input (``"text"``, ``"markov"``). Then

- ``config.process.name`` is ``"d3pm_uniform"``/``"d3pm_absorbing"`` (``num_steps``), ``"masked"``
  (``eps``) or ``"autoregressive"``;
- ``config.model`` is a ``token_transformer`` (:class:`diffax.discrete.TokenTransformer` fields);
- ``config.loss.name`` is one of ``diffax.discrete.LOSSES``;
- ``config.sampler.name`` is one of ``diffax.discrete.SAMPLERS`` or ``"autoregressive"``, with
  ``cache`` (time-free networks only) as an extra field.

:func:`build` returns the same ``train_state.Parts`` an image run gets, so ``diffax.train`` runs it
unchanged; :func:`make_sampler` and :func:`make_evaluation` are what ``diffax.generate`` and
``diffax.evaluate`` call for token runs. The evaluation reports held-out ``bits_per_char``: the
NELBO bound for diffusion runs, the exact negative log-likelihood for the AR baseline.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffax.data import text as text_data
from diffax.discrete import losses, processes, samplers
from diffax.discrete.model import TokenTransformer

PROCESSES = ("d3pm_uniform", "d3pm_absorbing", "masked", "autoregressive")
MODELS = ("token_transformer",)
AR_SAMPLER = "autoregressive"
_LOSSES_OF = {
    "d3pm_uniform": ("d3pm_hybrid", "d3pm_vlb"),
    "d3pm_absorbing": ("d3pm_hybrid", "d3pm_vlb"),
    "masked": ("mdlm", "sedd", "radd_lambda_dce"),
    "autoregressive": ("autoregressive",),
}
_SAMPLERS_OF = {
    "d3pm_uniform": ("d3pm_ancestral",),
    "d3pm_absorbing": ("d3pm_ancestral",),
    "masked": ("masked_ancestral", "tau_leaping"),
    "autoregressive": (AR_SAMPLER,),
}
# the fields of config.loss a token run reads besides its name
LOSS_OPTIONS = ("hybrid_coeff", "mask_sampling")
# Passes over the held-out split, each with fresh (stratified) times and masks, for the bound.
BOUND_PASSES = 4


def is_token_run(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` trains on tokens (a text input)."""
    return config.input.dataset in text_data.TEXT_DATASETS


def _fields(section: ml_collections.ConfigDict) -> dict[str, Any]:
    return {k: v for k, v in section.to_dict().items() if k != "name"}


def _loss_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``make_loss``'s keywords; the Gaussian loss fields a saved config gets from ``base_config`` are not."""
    return {k: config.loss[k] for k in LOSS_OPTIONS if k in config.loss} | dict(loss=config.loss.name)


def build_process(config: ml_collections.ConfigDict) -> processes.D3PM | processes.MaskedProcess | None:
    """The forward process ``config.process`` names (``None`` for the AR baseline)."""
    name, vocab = config.process.name, text_data.vocab_size(config.input)
    if name not in PROCESSES:
        raise ValueError(f"config.process.name: {name!r} is not a token process; known: {PROCESSES}.")
    kwargs = _fields(config.process)
    if name.startswith("d3pm_"):
        return processes.d3pm(
            name.removeprefix("d3pm_"), vocab_size=vocab, num_steps=kwargs.get("num_steps", 1000)
        )
    if name == "masked":
        return processes.MaskedProcess(vocab_size=vocab, eps=kwargs.get("eps", 0.0))
    return None


def build_module(config: ml_collections.ConfigDict) -> TokenTransformer:
    """The token transformer of ``config.model``."""
    if config.model.name not in MODELS:
        raise ValueError(f"config.model.name: {config.model.name!r} for a token run; use one of {MODELS}.")
    fields = _fields(config.model)
    fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
    return TokenTransformer(**fields)


def _time_input(process, loss: str, t: jax.Array) -> jax.Array:
    """What the network sees as time: D3PM's step / T, MDLM/SEDD's t, nothing (zeros) for RADD and AR."""
    return jnp.zeros_like(t) if loss in ("radd_lambda_dce", "autoregressive") else t


def build(config: ml_collections.ConfigDict):
    """The ``train_state.Parts`` of a token run: process, transformer, loss and optimizer."""
    from diffax import train_state

    process = build_process(config)
    module = build_module(config)

    def apply_fn(params, tokens, t, key):
        return module.apply({"params": params}, tokens, t, None, train=True, rngs={"dropout": key})

    loss_fn = losses.make_loss(
        process, apply_fn, vocab_size=text_data.vocab_size(config.input), **_loss_kwargs(config)
    )
    tx, lr_schedule = train_state.make_optimizer(config.optim, total_steps=config.total_steps)
    return train_state.Parts(schedule=process, module=module, loss_fn=loss_fn, tx=tx, lr_schedule=lr_schedule)


def check(config: ml_collections.ConfigDict) -> None:
    """Checks the input, process, model, loss and sampler of a token run.

    Raises:
      ValueError: one line starting with the offending ``config.`` field.
    """
    c = config.input
    if c.dataset == "text" and c.split not in text_data.SPLITS:
        raise ValueError(f"config.input.split: {c.split!r}; the text corpus has {text_data.SPLITS}.")
    if c.dataset == "markov" and (c.markov_vocab < 2 or c.markov_order < 1 or c.markov_vocab > 27):
        raise ValueError(
            f"config.input.markov_vocab: {c.markov_vocab} (order {c.markov_order}) must be in [2, 27],"
            " with markov_order >= 1."
        )
    if c.seq_len < 2:
        raise ValueError(f"config.input.seq_len: {c.seq_len} must be at least 2.")
    if c.dataset == "text":  # the pinned digest, checked before anything compiles
        text_data.load_corpus(c.corpus_path, sha256=c.corpus_sha256, split=c.split)
    vocab = text_data.vocab_size(c)
    process = build_process(config)
    try:
        module = build_module(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model: {' '.join(str(e).split())}") from None
    if module.vocab_size != vocab:
        raise ValueError(
            f"config.model.vocab_size: {module.vocab_size} does not match the {c.dataset} input's {vocab}"
            f" tokens; set config.model.vocab_size={vocab}."
        )
    if module.seq_len != c.seq_len:
        raise ValueError(
            f"config.model.seq_len: {module.seq_len} does not match config.input.seq_len={c.seq_len};"
            " set both to the same length."
        )
    name = config.process.name
    wanted = vocab + 1 if name == "d3pm_absorbing" else vocab
    if module.num_outputs != wanted:
        raise ValueError(
            f"config.model.out_dim: {module.out_dim} gives {module.num_outputs} logits;"
            f" {name} needs {wanted}."
        )
    if (name == "autoregressive") != module.causal:
        raise ValueError(
            f"config.model.causal: {module.causal}; set it True for the autoregressive baseline only."
        )
    if config.loss.name not in _LOSSES_OF[name]:
        raise ValueError(
            f"config.loss.name: {config.loss.name!r} does not train process {name!r};"
            f" use one of {_LOSSES_OF[name]}."
        )
    from diffax import config as config_lib

    unknown = sorted(set(config.loss) - {"name", *LOSS_OPTIONS, *config_lib.base_config().loss})
    if unknown:
        raise ValueError(
            f"config.loss.{unknown[0]}: not an option of the token losses; known: {LOSS_OPTIONS}."
        )
    try:
        losses.make_loss(process, lambda *a: None, vocab_size=vocab, **_loss_kwargs(config))
    except ValueError as e:
        field = "mask_sampling" if "mask_sampling" in str(e) else "name"
        raise ValueError(f"config.loss.{field}: {e}") from None
    if config.loss.get("mask_sampling") == "count" and module.time_conditioning:
        raise ValueError(
            "config.loss.mask_sampling: 'count' estimates the NELBO of a time-free network only;"
            " set model.time_conditioning=False or loss.mask_sampling='time'."
        )
    check_sampler(config)


def check_sampler(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.sampler`` of a token run (a Gaussian sampler is refused in one line)."""
    from diffax import config as config_lib

    s, name = config.sampler, config.process.name
    known = _SAMPLERS_OF.get(name, ())
    if s.name not in known:
        import diffax.samplers as gaussian

        kind = "a Gaussian sampler" if s.name in gaussian.SAMPLERS else "not a token sampler"
        raise ValueError(
            f"config.sampler.name: {s.name!r} is {kind}; a {config.input.dataset} run with process {name!r}"
            f" samples with one of {known}."
        )
    if s.steps < 1:
        raise ValueError(f"config.sampler.steps: {s.steps} must be >= 1.")
    extra = config_lib.sampler_kwargs(s)
    if set(extra) - {"cache"}:
        raise ValueError(
            f"config.sampler: unknown token-sampler options {sorted(set(extra) - {'cache'})}; known: cache."
        )
    if extra.get("cache") and (config.model.get("time_conditioning", False) or name != "masked"):
        raise ValueError(
            "config.sampler.cache: caching reuses the network's output while no token changes, which needs a"
            " time-free network of the masked process (model.time_conditioning=False)."
        )
    if name.startswith("d3pm_") and s.steps > config.process.get("num_steps", 1000):
        raise ValueError(f"config.sampler.steps: {s.steps} exceeds the process's num_steps.")


def _network(config: ml_collections.ConfigDict, parts) -> Callable[..., jax.Array]:
    """``network(params, tokens, t) -> logits`` in inference mode, with the time the loss trains with."""
    module, process, loss = parts.module, parts.schedule, config.loss.name

    def network(params, tokens, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), tokens.shape[:1])
        if isinstance(process, processes.D3PM):
            t = t / process.num_steps
        return module.apply({"params": params}, tokens, _time_input(process, loss, t), None, train=False)

    return network


def make_sampler_with_info(
    config: ml_collections.ConfigDict, parts, *, mesh, sampler: str | None = None, steps: int | None = None
) -> Callable[[Any, jax.Array, int], tuple[jax.Array, dict[str, jax.Array]]]:
    """``sample_fn(params, key, num) -> (tokens (num, L) int32, {"nfe": ...})``, compiled once per ``num``."""
    from diffax import config as config_lib
    from diffax import sharding

    s = config.sampler
    name = s.name if sampler is None else sampler
    num_steps = s.steps if steps is None else steps
    cache = bool(config_lib.sampler_kwargs(s).get("cache", False))
    network, process = _network(config, parts), parts.schedule
    vocab, length = text_data.vocab_size(config.input), config.input.seq_len

    @functools.partial(jax.jit, static_argnums=2, out_shardings=sharding.replicated(mesh))
    def sample_fn(params, key, num):
        if process is None:
            return samplers.sample_autoregressive(
                lambda x: network(params, x, 0.0), (num, length), bos=vocab, key=key
            )

        def weights_fn(z, t):
            # for SEDD, exp(output) = s_θ (e^σ − 1): the same clean-token weights up to a factor per position
            return jax.nn.softmax(network(params, z, t))

        return samplers.sample(
            weights_fn, process, (num, length), sampler=name, steps=num_steps, key=key, cache=cache
        )

    return sample_fn


def make_sampler(
    config: ml_collections.ConfigDict, parts, *, mesh, sampler: str | None = None, steps: int | None = None
):
    """``sample_fn(params, key, labels) -> tokens (len(labels), L)``, the interface of ``diffax.generate``."""
    with_info = make_sampler_with_info(config, parts, mesh=mesh, sampler=sampler, steps=steps)
    return lambda params, key, labels: with_info(params, key, len(labels))[0]


def heldout_tokens(config: ml_collections.ConfigDict) -> np.ndarray:
    """The held-out sequences: every window of the corpus's test split, or fixed Markov-source draws."""
    c = config.input
    if c.dataset == "text":
        return text_data.heldout_windows(
            text_data.load_corpus(c.corpus_path, sha256=c.corpus_sha256, split="test"), c.seq_len
        )
    rng = np.random.default_rng([config.seed, 0x68656C64])
    return text_data.markov_from_config(c).sample(rng, config.evals.num_reference, c.seq_len)


def make_bound(config: ml_collections.ConfigDict, parts) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """``bound(params, tokens, key) -> (B,)`` per-sequence bound on ``−log p(x)`` in nats (inference mode).

    Whatever draws the run trained with, the bound of a time-free masked model at ε = 0 is estimated with
    count draws (``losses.make_loss``'s ``mask_sampling="count"``): the same NELBO, a lower variance.
    """
    module = parts.module

    def apply_fn(params, tokens, t, key):
        del key
        return module.apply({"params": params}, tokens, t, None, train=False)

    kwargs = _loss_kwargs(config)
    if losses.counts_estimate_nelbo(parts.schedule, config.loss.name) and not module.time_conditioning:
        kwargs["mask_sampling"] = "count"
    loss_fn = losses.make_loss(
        parts.schedule, apply_fn, vocab_size=text_data.vocab_size(config.input), **kwargs
    )
    return jax.jit(lambda params, tokens, key: loss_fn(params, {"tokens": tokens}, key)[1]["bound"])


def bits_per_char(
    bound_fn, params, tokens: np.ndarray, *, batch_size: int, passes: int, key: jax.Array
) -> tuple[float, float]:
    """Mean per-character bound in bits over ``tokens`` ``(N, L)``, and its standard error over the passes."""
    n, length = tokens.shape
    batch = min(batch_size, n)
    per_pass = []
    for p in range(passes):
        total = 0.0
        for i in range(math.ceil(n / batch)):
            rows = tokens[i * batch : (i + 1) * batch]
            padded = np.concatenate([rows, tokens[: batch - len(rows)]]) if len(rows) < batch else rows
            values = np.asarray(
                bound_fn(params, jnp.asarray(padded), jax.random.fold_in(key, p * 100_003 + i))
            )
            total += float(values[: len(rows)].sum())
        per_pass.append(total / (n * length * math.log(2.0)))
    stderr = float(np.std(per_pass, ddof=1) / math.sqrt(passes)) if passes > 1 else 0.0
    return float(np.mean(per_pass)), stderr


def make_evaluation(config: ml_collections.ConfigDict, *, mesh=None, num_samples: int | None = None):
    """``evaluate(params, *, step, seed=None) -> metrics`` of a token run.

    Metrics: ``bits_per_char`` on the held-out split (the NELBO bound, averaged over
    ``BOUND_PASSES`` passes for diffusion; exact, one pass, for AR) and ``bits_per_char_stderr``;
    for the Markov source also ``entropy_rate_bits`` and ``exact_bits_per_char`` (the bound of the
    exact model, ``H(X_1..X_L)/(L ln 2)``); ``sample_entropy`` (nats, mean over samples of each
    sample's token-histogram entropy) and ``nfe`` (network evaluations per sampler call) of
    ``num_samples`` samples (default ``config.evals.batch_size``, at most 64).
    """
    from diffax import sharding

    parts = build(config)
    mesh = mesh or sharding.make_mesh(
        ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.local_devices()
    )
    bound_fn = make_bound(config, parts)
    sample_fn = make_sampler_with_info(config, parts, mesh=mesh)
    tokens = heldout_tokens(config)
    passes = 1 if parts.schedule is None else BOUND_PASSES
    num = num_samples or min(config.evals.batch_size, 64)
    vocab = text_data.vocab_size(config.input)

    def evaluate(params: Any, *, step: int, seed: int | None = None) -> dict[str, float]:
        key = jax.random.fold_in(jax.random.key(config.seed if seed is None else seed), step)
        bound_key, sample_key = jax.random.split(key)
        bpc, stderr = bits_per_char(
            bound_fn, params, tokens, batch_size=config.evals.batch_size, passes=passes, key=bound_key
        )
        samples, info = sample_fn(params, sample_key, num)
        metrics = dict(
            bits_per_char=bpc,
            bits_per_char_stderr=stderr,
            sample_entropy=float(samplers.sample_entropy(samples, vocab)),
            nfe=float(info["nfe"]),
        )
        if config.input.dataset == "markov":
            source = text_data.markov_from_config(config.input)
            metrics["entropy_rate_bits"] = source.entropy_rate() / math.log(2.0)
            metrics["exact_bits_per_char"] = source.block_entropy(config.input.seq_len) / (
                config.input.seq_len * math.log(2.0)
            )
        logging.info(
            "eval at step %d: %.4f ± %.4f bits/char held-out (%d sequences); samples: entropy %.3f nats,"
            " %.1f NFE; first: %r",
            step,
            bpc,
            stderr,
            len(tokens),
            metrics["sample_entropy"],
            metrics["nfe"],
            text_data.decode(np.asarray(samples[0]))[:80],
        )
        return metrics

    return evaluate


def init_state_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The example input of ``train_state.init_state`` for a token run: ``(seq_len,)`` int32 tokens."""
    return dict(image_shape=(config.input.seq_len,), input_dtype=jnp.int32)


__all__ = [
    "BOUND_PASSES",
    "MODELS",
    "PROCESSES",
    "bits_per_char",
    "build",
    "build_module",
    "build_process",
    "check",
    "check_sampler",
    "heldout_tokens",
    "init_state_kwargs",
    "is_token_run",
    "make_bound",
    "make_evaluation",
    "make_sampler",
    "make_sampler_with_info",
]
