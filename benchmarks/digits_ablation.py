"""Sampling-time ablations of a digits run, scored by the digits classifier and the independent judge.

    python benchmarks/digits_ablation.py --workdir=runs/digits --num_samples=1000 \\
        --variant="" --variant="thresholding=None" --variant="name=ddpm,steps=200"

Each ``--variant`` is a comma-separated list of ``config.sampler`` overrides (``name``, ``steps``,
``spacing``, ``t_end``, ``thresholding``, ``denoise_final``, a sampler's own options; values are
Python literals, ``None`` clears a field); the empty variant is the run's own sampler. Every variant
samples the newest checkpoint's EMA parameters with the same seed through
``diffax.evaluate.make_evaluation`` (what ``python -m diffax.evaluate`` runs) and prints one markdown
row: the digits classifier's metrics, the judge's, and the targets met; the real held-out digits'
row comes first. ``--grid_dir`` also writes each variant's first 100 samples as a PNG grid.
"""

from __future__ import annotations

import ast
import copy
import os
import resource
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

from diffax import evaluate, evaluation, generate, sharding, train_state

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory written by diffax.main.", required=True)
flags.DEFINE_multi_string("variant", [""], "config.sampler overrides, e.g. 'name=ddpm,steps=200'.")
flags.DEFINE_integer("num_samples", 1000, "Samples per variant.")
flags.DEFINE_integer("seed", 0, "Sampling seed (the same for every variant).")
flags.DEFINE_string("grid_dir", None, "Where to write each variant's first 100 samples as a PNG grid.")

COLUMNS = (
    ("judge/confident_fraction", "judge confident", "{:.1%}"),
    ("judge/fd_ratio", "judge FD / floor", "{:.2f}"),
    ("judge/near_zero_fraction", "near-zero pixels", "{:.1%}"),
    ("judge/class_chi2_pvalue", "judge class p", "{:.3f}"),
    ("confident_fraction", "CNN confident", "{:.1%}"),
    ("fd_ratio", "CNN FD / floor", "{:.2f}"),
    ("class_chi2_pvalue", "CNN class p", "{:.3f}"),
)


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a name such as dpm_solver++_2m


def _sampler_config(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    config = copy.deepcopy(config)
    config.unlock()
    for item in filter(str.strip, variant.split(",")):
        key, text = (part.strip() for part in item.split("=", 1))
        config.sampler[key] = _value(text)
    return config


def _row(name: str, metrics: dict, targets: dict | None, extra: str) -> str:
    cells = [fmt.format(metrics[key]) if key in metrics else "—" for key, _, fmt in COLUMNS]
    met = "—" if targets is None else f"{sum(targets.values())}/{len(targets)}"
    return f"| {name} | " + " | ".join(cells) + f" | {met} | {extra} |"


def main(argv: list[str]) -> None:
    del argv
    config, _, params, step = generate.load_run(FLAGS.workdir)
    parts = train_state.build(config)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.local_devices())
    n = FLAGS.num_samples
    print(f"workdir {FLAGS.workdir}, step {step}, {n} samples, seed {FLAGS.seed}")
    header = ["variant (config.sampler overrides)"] + [title for _, title, _ in COLUMNS] + ["targets", "time"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    reference = evaluation.digits_reference(n)
    real = reference["sample_judge"](evaluation.load_digits_reference("test")[0][:n])
    real_row = {k.replace("real_", ""): v for k, v in real.items() if "real_" in k} | {"judge/fd_ratio": 1.0}
    real_row["fd_ratio"] = 1.0
    print(_row("real held-out digits", real_row, None, ""), flush=True)
    for variant in FLAGS.variant:
        cfg = _sampler_config(config, variant)
        sample_fn = generate.make_sampler(cfg, parts, mesh=mesh)
        drawn = []

        def keep(params, key, labels, sample_fn=sample_fn, drawn=drawn):
            images = sample_fn(params, key, labels)
            drawn.append(np.asarray(images))
            return images

        start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        metrics = evaluate.make_evaluation(cfg, keep, num_samples=n)(params, step=step, seed=FLAGS.seed)
        wall = time.perf_counter() - start
        now = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = now.ru_utime + now.ru_stime - cpu.ru_utime - cpu.ru_stime
        targets = evaluation.digits_targets(metrics)
        s = cfg.sampler
        label = variant or f"(the run's: {s.name}, {s.steps} steps)"
        print(_row(label, metrics, targets, f"{wall:.0f} s wall, {cpu_s:.0f} CPU-s"), flush=True)
        if FLAGS.grid_dir:
            os.makedirs(FLAGS.grid_dir, exist_ok=True)
            slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in (variant or "run"))
            images = generate.to_uint8(np.concatenate(drawn)[:100])
            generate.save_png(os.path.join(FLAGS.grid_dir, f"step{step}_{slug}.png"), images, scale=4)


if __name__ == "__main__":
    app.run(main)
