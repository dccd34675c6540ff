"""Evaluating a run: the metrics the training loop logs periodically, and the CLI.

    python -m diffax.evaluate --workdir=DIR [--num_samples=N --sampler=NAME --steps=K --seed=S]

loads the newest checkpoint of ``DIR`` (EMA parameters unless ``--noema``; with ``--ema_std=S`` the
post-hoc EMA of σ_rel ``S`` reconstructed from the run's snapshots, ``diffax.posthoc_ema``), draws
``N`` samples with the run's sampler (or ``NAME``), and writes every metric of ``diffax.evaluation``
to ``DIR/eval/step_<step>.json`` (or ``--out``) and as TensorBoard scalars ``eval/<metric>`` under
``DIR/eval``. Which features a run is measured with follows from its config:

- digits runs: the bundled digits classifier (digits FD next to its train-versus-held-out floor,
  digits IS, the fraction of confident samples, the class histogram), the independent judge
  fitted only on the real digits (``diffax.evaluation.judge_digits``), the held-out digits' own
  scores under both, and the embedded default's targets (``diffax.evaluation.digits_targets``);
- any other run with ``config.evals.inception_weights``, a local InceptionV3 file (see
  ``diffax.evaluation.load_inception_variables``): FID and IS against ``config.evals.num_reference``
  images of the run's own input, and the floor against as many images of
  ``config.evals.heldout_split`` when set.

    python -m diffax.evaluate --samples=FILE.npz --reference=REF.npz --inception_weights=W.npz

scores a sample batch (``arr_0`` as ``diffax.generate --pretrained`` and the ADM evaluator write it,
or ``images``) against an ADM reference batch (``arr_0`` images or ``mu``/``sigma`` statistics):
``diffax.evaluation.fid_against_reference``.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils

from diffax import config as config_lib
from diffax import data, generate, summaries

Evaluate = Callable[..., dict[str, float]]


def _real_images(input_config: ml_collections.ConfigDict, count: int, *, seed: int) -> np.ndarray:
    """The first ``count`` images (all processes' rows, unflipped) of the input ``input_config`` describes."""
    cfg = copy.deepcopy(input_config)
    cfg.random_flip = False
    pipeline = data.make_pipeline(cfg, seed=seed)
    chunks, have, step = [], 0, 0
    while have < count:
        local = pipeline.get(step)["image"]
        chunk = multihost_utils.process_allgather(local, tiled=True) if jax.process_count() > 1 else local
        chunks.append(np.asarray(chunk))
        have, step = have + len(chunk), step + 1
    return np.concatenate(chunks)[:count]


def reference(config: ml_collections.ConfigDict, num_samples: int) -> dict[str, Any]:
    """The extractor, reference statistics and floor for a run, as ``evaluate_samples`` takes them.

    Raises:
      diffax.config.ConfigError: when a non-digits run names no InceptionV3 file (see
        ``diffax.config.check_evaluation``).
    """
    import diffax.evaluation as evaluation

    if config_lib.digits_run(config):  # digits, or latents of digits decoded by the VAE
        return evaluation.digits_reference(num_samples)
    config_lib.check_evaluation(config)
    extractor = functools.partial(
        evaluation.inception_features_and_logits,
        variables=evaluation.load_inception_variables(config.evals.inception_weights),
        size=config.evals.inception_size,
    )
    train = _real_images(config.input, config.evals.num_reference, seed=config.seed)
    stats = evaluation.reference_feature_stats(train, extractor=extractor, batch_size=config.evals.batch_size)
    floor = None
    if config.evals.heldout_split:
        heldout_input = copy.deepcopy(config.input)
        heldout_input.split = config.evals.heldout_split
        heldout = _real_images(heldout_input, num_samples, seed=config.seed)
        floor = evaluation.floor_fd(
            heldout, extractor=extractor, reference_stats=stats, batch_size=config.evals.batch_size
        )
    return dict(extractor=extractor, reference_stats=stats, floor_fd=floor)


def make_evaluation(
    config: ml_collections.ConfigDict, sample_fn: generate.SampleFn, *, num_samples: int | None = None
) -> Evaluate:
    """``evaluate(params, *, step, seed=config.seed) -> metrics`` for a run; training and the CLI share it.

    Samples come from ``sample_fn`` (``generate.make_sampler``) in batches of
    ``config.evals.batch_size``; labelled runs cycle through the classes. The reference statistics
    (see :func:`reference`) are computed on the first call and kept.

    Args:
      config: the run's config.
      sample_fn: ``sample_fn(params, key, labels) -> images``.
      num_samples: samples per evaluation (default ``config.evals.num_samples``).
    """
    import diffax.evaluation as evaluation
    from diffax.discrete import system

    if system.is_token_run(config):  # held-out bits per character (diffax.discrete.system)
        return system.make_evaluation(config, num_samples=num_samples)
    from diffax.autoencoding import system as autoencoder_system

    if autoencoder_system.is_autoencoder_run(config):  # held-out PSNR (diffax.autoencoding.system)
        return autoencoder_system.make_evaluation(config, num_samples=num_samples)
    num = config.evals.num_samples if num_samples is None else num_samples
    batch = min(num, config.evals.batch_size)
    labels = np.arange(batch, dtype=np.int32) % max(config.input.num_classes, 1)
    kept: dict[str, Any] = {}

    def evaluate(params: Any, *, step: int, seed: int | None = None) -> dict[str, float]:
        if not kept:
            kept.update(reference(config, num))
        key = jax.random.fold_in(jax.random.key(config.seed if seed is None else seed), step)
        metrics = evaluation.evaluate_samples(
            lambda k, n: sample_fn(params, k, labels[:n]), num_samples=num, batch_size=batch, key=key, **kept
        )
        logging.info("eval at step %d on %d samples: %s", step, num, _summary(metrics))
        return metrics

    return evaluate


def _summary(metrics: dict[str, float]) -> str:
    """The headline metrics in one line."""
    parts = [f"FD {metrics['fd']:.3f}"]
    if "fd_floor" in metrics:
        parts[0] += f" (floor {metrics['fd_floor']:.3f}, ratio {metrics['fd_ratio']:.2f})"
    parts.append(f"IS {metrics['is']:.2f}")
    if "confident_fraction" in metrics:
        parts.append(f"confident {100 * metrics['confident_fraction']:.1f}%")
        parts.append(f"class chi2 p {metrics['class_chi2_pvalue']:.3f}")
    if "real_confident_fraction" in metrics:
        parts[-2] += f" (real {100 * metrics['real_confident_fraction']:.1f}%)"
    if "judge/fd" in metrics:
        parts.append(
            f"judge: confident {100 * metrics['judge/confident_fraction']:.1f}% "
            f"(real {100 * metrics['judge/real_confident_fraction']:.1f}%), "
            f"FD {metrics['judge/fd']:.2f} (floor {metrics['judge/fd_floor']:.2f}, "
            f"ratio {metrics['judge/fd_ratio']:.2f}), "
            f"near-zero pixels {100 * metrics['judge/near_zero_fraction']:.1f}% "
            f"(real {100 * metrics['judge/real_near_zero_fraction']:.1f}%), "
            f"class chi2 p {metrics['judge/class_chi2_pvalue']:.3f}"
        )
    return " | ".join(parts)


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory written by diffax.main.")
    flags.DEFINE_string("samples", None, "Instead of --workdir: a sample batch .npz (arr_0 or images).")
    flags.DEFINE_string("reference", None, "With --samples: an ADM reference batch .npz (arr_0 or mu/sigma).")
    flags.DEFINE_string("inception_weights", None, "With --samples: the InceptionV3 .npz weights.")
    flags.DEFINE_integer("num_samples", None, "Samples to evaluate (default: config.evals.num_samples).")
    flags.DEFINE_string("sampler", None, "Sampler name (default: the run's config.sampler.name).")
    flags.DEFINE_integer("steps", None, "Sampler steps (default: config.sampler.steps).")
    flags.DEFINE_integer("seed", None, "Sampling seed (default: config.seed, as the training loop uses).")
    flags.DEFINE_bool("ema", True, "Evaluate the EMA parameters (--noema: the raw parameters).")
    flags.DEFINE_float("ema_std", None, "Evaluate the post-hoc EMA of this sigma_rel (diffax.posthoc_ema).")
    flags.DEFINE_string("out", None, "JSON file to write (default: DIR/eval/step_<step>.json).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.num_samples is not None and FLAGS.num_samples < 2:
        raise app.UsageError(f"--num_samples={FLAGS.num_samples}: must be at least 2.")
    if FLAGS.samples is not None:
        return _score_sample_file()
    if FLAGS.workdir is None:
        raise app.UsageError("pass --workdir=DIR (a diffax run) or --samples=FILE --reference=REF.")
    config, sample_fn, params, step = generate.load_run(
        FLAGS.workdir,
        sampler=FLAGS.sampler,
        steps=FLAGS.steps,
        ema=FLAGS.ema,
        ema_std=FLAGS.ema_std,
        check=config_lib.check_evaluation,
    )
    evaluate = make_evaluation(config, sample_fn, num_samples=FLAGS.num_samples)
    metrics = evaluate(params, step=step, seed=FLAGS.seed)

    if jax.process_index() != 0:
        return
    import diffax.evaluation as evaluation

    record = dict(
        step=step,
        sampler=config.sampler.name,
        sampler_steps=config.sampler.steps,
        ema=FLAGS.ema,
        ema_std=FLAGS.ema_std,
        seed=config.seed if FLAGS.seed is None else FLAGS.seed,
        metrics=metrics,
    )
    if config_lib.digits_run(config):
        record["targets"] = evaluation.digits_targets(metrics)
    if "bits_per_char" in metrics:  # token runs: the headline number at the top level
        record["bits_per_char"] = metrics["bits_per_char"]
    eval_dir = os.path.join(FLAGS.workdir, "eval")
    out = FLAGS.out or os.path.join(eval_dir, f"step_{step:08d}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    writer = summaries.scalar_writer(eval_dir)
    summaries.write_scalars(writer, step, {f"eval/{k}": v for k, v in metrics.items()})
    if writer is not None:
        writer.close()
    logging.info("wrote %s", out)
    print(json.dumps(record, sort_keys=True))


def _score_sample_file() -> None:
    """``--samples``: FID of a sample batch against an ADM reference batch."""
    import diffax.evaluation as evaluation

    if FLAGS.reference is None or FLAGS.inception_weights is None:
        raise app.UsageError("--samples needs --reference=REF.npz and --inception_weights=W.npz.")
    extractor = functools.partial(
        evaluation.inception_features_and_logits,
        variables=evaluation.load_inception_variables(FLAGS.inception_weights),
    )
    try:
        fid = evaluation.fid_against_reference(FLAGS.samples, FLAGS.reference, extractor=extractor)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    record = dict(samples=FLAGS.samples, reference=FLAGS.reference, fid=fid)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
    print(json.dumps(record, sort_keys=True))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
