"""Digits FD against the post-hoc EMA length σ_rel, for one or more runs that tracked ``ema.std_rels``.

    nice -n 10 python benchmarks/posthoc_ema_digits.py --workdirs=runs/digits_plain,runs/digits_immiscible \
        --out=benchmarks/results/posthoc_ema_digits

For each run (``experiments/digits_immiscible.py``: ``:off`` and ``:on`` give the immiscible-diffusion
comparison at equal steps) it evaluates the raw parameters, the run's classic EMA and the power-function
EMA reconstructed at every ``--std_rels`` value (``diffax.posthoc_ema``) on the digits metrics with the
run's sampler and seed, and writes ``OUT.md`` (a table) and ``OUT.png`` (FD against σ_rel).
"""

import json
import os
import sys
import time

import jax
from absl import app, flags, logging

from diffax import evaluate, generate, posthoc_ema

flags.DEFINE_list("workdirs", None, "Runs to evaluate (each tracked ema.std_rels).", required=True)
flags.DEFINE_list(
    "std_rels", ["0.02", "0.03", "0.05", "0.075", "0.1", "0.15", "0.2", "0.25"], "sigma_rel values."
)
flags.DEFINE_integer("num_samples", 500, "Samples per evaluation.")
flags.DEFINE_integer("step", None, "Snapshot step to compare the runs at (default: each run's newest).")
flags.DEFINE_string("out", "benchmarks/results/posthoc_ema_digits", "Output path without extension.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    std_rels = [float(s) for s in FLAGS.std_rels]
    rows = []
    for workdir in FLAGS.workdirs:
        config, sample_fn, ema_params, step = generate.load_run(workdir)
        run_eval = evaluate.make_evaluation(config, sample_fn, num_samples=FLAGS.num_samples)
        name = os.path.basename(os.path.normpath(workdir))
        candidates = []
        if FLAGS.step is None or FLAGS.step == step:  # the checkpoint's raw and classic-EMA parameters
            raw = generate.load_run(workdir, ema=False)[2]
            candidates = [("raw", None, raw), (f"EMA {config.ema.decays[0]} (warmup)", None, ema_params)]
        step = step if FLAGS.step is None else FLAGS.step
        for std_rel in std_rels:
            params, info = posthoc_ema.reconstruct_from_workdir(
                workdir, config, ema_params, std_rel=std_rel, step=step
            )
            candidates.append((f"post-hoc σ_rel={std_rel}", (std_rel, info["response_l2_error"]), params))
        for label, posthoc, params in candidates:
            tick = time.perf_counter()
            metrics = run_eval(params, step=step)
            rows.append(
                dict(
                    run=name,
                    step=step,
                    params=label,
                    std_rel=posthoc[0] if posthoc else None,
                    response_l2_error=posthoc[1] if posthoc else None,
                    fd=metrics["fd"],
                    fd_floor=metrics["fd_floor"],
                    confident=metrics.get("confident_fraction"),
                    seconds=time.perf_counter() - tick,
                )
            )
            logging.info("%s", rows[-1])
    _write(rows, std_rels)


def _write(rows, std_rels):
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    lines = [
        f"# Digits FD against post-hoc EMA length ({jax.devices()[0].device_kind}, "
        f"{FLAGS.num_samples} samples)",
        "",
        "Command: `" + " ".join(["python", *sys.argv]) + "`",
        "",
        "| run | step | parameters | response L2 error | digits FD | FD floor |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "" if r["response_l2_error"] is None else f"{r['response_l2_error']:.1e}"
        lines.append(
            f"| {r['run']} | {r['step']} | {r['params']} | {err} | {r['fd']:.2f} | {r['fd_floor']:.2f} |"
        )
    with open(FLAGS.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        curve = [r for r in mine if r["std_rel"] is not None]
        xs, ys = [r["std_rel"] for r in curve], [r["fd"] for r in curve]
        line = ax.plot(xs, ys, "o-", label=f"{run}: post-hoc")[0]
        for classic in [r for r in mine if r["params"].startswith("EMA")]:
            label = f"{run}: {classic['params']}"
            ax.axhline(classic["fd"], color=line.get_color(), ls="--", lw=1, label=label)
    ax.axhline(rows[0]["fd_floor"], color="gray", ls=":", lw=1, label="train vs held-out floor")
    ax.set_xlabel("σ_rel (post-hoc EMA length)")
    ax.set_ylabel("digits FD")
    ax.set_xscale("log")
    ax.set_title(f"digits FD against σ_rel at step {rows[0]['step']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FLAGS.out + ".png", dpi=120)
    logging.info("wrote %s.md and %s.png", FLAGS.out, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
