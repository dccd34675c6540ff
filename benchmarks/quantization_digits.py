"""Post-training quantization of the trained digits U-Net: digits FD and per-step ε-MSE against full
precision, for W8A8 and W4A8 under each calibration method of ``diffax.quantization`` (EDA-DM with
its fine-grained block reconstruction), ``--brecq_methods`` again with BRECQ block reconstruction, and
``--uniform_layer_methods`` again with every layer quantized alike: the network's input ``x_t``
quantized too and the first and last layers at ``weight_bits`` (the control for ``calibrate``'s
defaults, a float ``x_t`` and 8-bit first and last layers as in BRECQ/QDrop/PTQ4DM).

    nice -n 10 python benchmarks/quantization_digits.py --workdir=runs/digits \
        --out=benchmarks/results/quantization_digits

Calibration inputs (256) come from ``--trajectories`` runs of the run's own full-precision sampler;
the ε-MSE is measured on as many other trajectories, at every sampler step. It also checks int8 execution
(int8 products, int32 accumulation) against the fake-quantized W8A8 network on those inputs, and a
quantized checkpoint's Orbax round trip.
"""

import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from diffax import evaluate, generate, quantization, sharding, train_state

flags.DEFINE_string("workdir", None, "A trained digits run.", required=True)
flags.DEFINE_list("methods", list(quantization.CALIBRATIONS), "Calibration methods.")
flags.DEFINE_list("weight_bits", ["8", "4"], "Weight bits (activations: 8).")
flags.DEFINE_integer("num_samples", 500, "Samples per digits FD.")
flags.DEFINE_integer("trajectories", 64, "Full-precision trajectories for calibration, and as many held out.")
flags.DEFINE_integer("reconstruction_iters", 100, "Adam steps per block of block reconstruction.")
flags.DEFINE_list("brecq_methods", ["uniform"], "Methods measured again with BRECQ block reconstruction.")
flags.DEFINE_list(
    "uniform_layer_methods", ["uniform"], "Methods measured again with every layer quantized alike."
)
flags.DEFINE_string(
    "full_precision_from",
    None,
    "OUT.json of an earlier run (same workdir, sample count): reuse its first row.",
)
flags.DEFINE_string("out", "benchmarks/results/quantization_digits", "Output path without extension.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config, _, params, step = generate.load_run(FLAGS.workdir)
    parts = train_state.build(config)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.local_devices())
    module = parts.module

    def sampler_for(model):
        return generate.make_sampler(config, dataclasses.replace(parts, module=model), mesh=mesh)

    def trajectories(seed):
        labels = np.zeros(FLAGS.trajectories, np.int32)
        return quantization.record_trajectories(
            lambda model: sampler_for(model)(params, jax.random.key(seed), labels), module
        )

    calib, held_out = trajectories(1), trajectories(2)
    logging.info("trajectories: %s inputs per run", calib[0].shape[:2])

    def net(model):
        return jax.jit(lambda x, t: model.apply({"params": params}, x, t, None, train=False))

    reference = net(module)
    rows = []

    def measure(label, model, bits, method, seconds):
        tick = time.perf_counter()
        metrics = evaluate.make_evaluation(config, sampler_for(model), num_samples=FLAGS.num_samples)(
            params, step=step
        )
        mse = quantization.per_step_mse(reference, net(model), *held_out) if model is not module else None
        rows.append(
            dict(
                label=label,
                weight_bits=bits,
                method=method,
                fd=metrics["fd"],
                fd_floor=metrics["fd_floor"],
                judge_fd=metrics.get("judge/fd"),
                judge_fd_floor=metrics.get("judge/fd_floor"),
                eps_mse_mean=None if mse is None else float(mse.mean()),
                eps_mse_first=None if mse is None else float(mse[0]),
                eps_mse_mid=None if mse is None else float(mse[len(mse) // 2]),
                eps_mse_last=None if mse is None else float(mse[-1]),
                eps_mse=None if mse is None else mse.tolist(),
                calibration_seconds=seconds,
                eval_seconds=time.perf_counter() - tick,
            )
        )
        logging.info("%s", rows[-1])

    splits = quantization.unet_skip_splits(module)
    if FLAGS.full_precision_from:  # evaluation is deterministic: the same run, seed and count
        with open(FLAGS.full_precision_from) as f:
            rows.append(json.load(f)["rows"][0])
    else:
        measure("full precision", module, 32, "-", 0.0)
    int8_check = {}
    # (method, block reconstruction steps, the defaults' float x_t and 8-bit first and last layers):
    # EDA-DM always reconstructs (FBR); the BRECQ rows and the rows with every layer alike on top
    runs = [(m, FLAGS.reconstruction_iters if m == "eda" else 0, True) for m in FLAGS.methods]
    runs += [(m, FLAGS.reconstruction_iters, True) for m in FLAGS.brecq_methods if m != "eda"]
    runs += [(m, 0, False) for m in FLAGS.uniform_layer_methods]
    for bits in (int(b) for b in FLAGS.weight_bits):
        for method, iters, defaults in runs:
            tick = time.perf_counter()
            model = quantization.calibrate(
                module,
                params,
                calib,
                method=method,
                weight_bits=bits,
                act_bits=8,
                splits=splits,
                reconstruction_iters=iters,
                float_inputs=None if defaults else (),
                eight_bit_weights=None if defaults else (),
            )
            label = f"W{bits}A8 {method}" + (" + BRECQ" if iters and method != "eda" else "")
            label += " (TDAC set, no FBR)" if method == "eda" and not iters else ""
            label += "" if defaults else ", every layer alike"
            seconds = time.perf_counter() - tick
            logging.info("calibrated %s in %.0f s", label, seconds)
            if not int8_check and bits == 8:
                int8_check = _int8_and_orbax(model, params, held_out)
                logging.info("%s", int8_check)
            measure(label, model, bits, method, seconds)
            _write(rows, int8_check, step)  # after every row: a partial table survives an interruption


def _int8_and_orbax(model, params, held_out):
    """int8 execution against fake quantization on every held-out step; an Orbax round trip."""
    fake = jax.jit(lambda x, t: model.apply({"params": params}, x, t, None, train=False))
    int8_model = dataclasses.replace(model, mode="int8")
    real = jax.jit(lambda x, t: int8_model.apply({"params": params}, x, t, None, train=False))
    worst, scale = 0.0, 0.0
    for x, t in zip(*held_out, strict=True):
        a, b = np.asarray(fake(x, t)), np.asarray(real(x, t))
        worst, scale = max(worst, float(np.abs(a - b).max())), max(scale, float(np.abs(a).max()))
    path = os.path.join(tempfile.mkdtemp(), "w8a8")
    quantization.save(path, model)
    loaded = quantization.load(path, model.module)
    x, t = held_out[0][0], held_out[1][0]
    same = float(
        np.abs(np.asarray(fake(x, t)) - np.asarray(loaded.apply({"params": params}, x, t, None))).max()
    )
    return dict(int8_vs_fake_max_abs=worst, output_max_abs=scale, orbax_round_trip_max_abs=same)


def _write(rows, int8_check, step):
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump(dict(rows=rows, int8=int8_check, step=step), f, indent=2)
    fp = rows[0]["fd"]
    lines = [
        f"# Post-training quantization of the digits U-Net (step {step}, {FLAGS.num_samples} samples)",
        "",
        "Command: `" + " ".join(["python", *sys.argv]) + "`",
        "",
        "| network | digits FD | FD / FP | judge FD | judge FD / FP | ε-MSE mean | ε-MSE first step | middle "
        "| last | calibration s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mse = [r[k] for k in ("eps_mse_mean", "eps_mse_first", "eps_mse_mid", "eps_mse_last")]
        cells = " | ".join("-" if v is None else f"{v:.2e}" for v in mse)
        lines.append(
            f"| {r['label']} | {r['fd']:.2f} | {r['fd'] / fp:.3f} | {r['judge_fd']:.2f} "
            f"| {r['judge_fd'] / rows[0]['judge_fd']:.3f} | {cells} | {r['calibration_seconds']:.0f} |"
        )
    lines += [
        "",
        f"FD floors (train vs held-out digits): digits CNN {rows[0]['fd_floor']:.2f}, "
        f"judge {rows[0]['judge_fd_floor']:.2f}.",
    ]
    if int8_check:
        lines.append(
            "int8 execution vs fake quantization (W8A8, first method), every held-out step: max |Δε| "
            f"{int8_check['int8_vs_fake_max_abs']:.2e} for outputs up to {int8_check['output_max_abs']:.2f}; "
            f"Orbax save/load round trip max |Δε| {int8_check['orbax_round_trip_max_abs']:.1e}."
        )
    with open(FLAGS.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    logging.info("wrote %s.md", FLAGS.out)


if __name__ == "__main__":
    app.run(main)
