"""Digits FD of the sampling-time methods at 5, 10 and 20 NFE on a trained digits run, under both judges.

Samplers (every one on the same 1000 prior draws, seed 1; uniform-log-SNR grids): DPM-Solver++ 2M,
UniPC (p = 2), PNDM/PLMS (PLMS where PNDM's 9 warm-up evaluations leave fewer than 4 multistep
intervals), DPM-Solver-v3 with statistics estimated from the digits data (``compute_statistics``:
``--ems_samples`` training images, ``--ems_points`` lambda intervals; written to and reused from
``--ems_file``), and DPM-Solver++ 2M on a searched grid (``schedule_search``: teacher UniPC-3 at 100
NFE on ``--search_seeds`` seeds, scored against the same teacher on ``--heldout_seeds`` other seeds,
written with ``schedule_search.save`` under ``--schedule_dir`` and read back with
``diffax.timesteps(spacing="file")``). No clipping in this table (the common footing: PNDM and v3
have no data prediction to clip). Then exposure bias on DPM-Solver++ 2M at 10 NFE: epsilon scaling
over b and the time shift over its window; last, the digits default's sampler (every x0 clipped to
[-1, 1], ``clip_denoised``) on the uniform and the searched grids, with the time shift at 10 NFE.

Each cell prints one markdown row as it finishes (digits CNN FD / floor and confident fraction; the
independent judge ``diffax.evaluation.judge_digits``' FD / floor, confident fraction and near-zero
pixels), after the real held-out digits' own row; ``--out`` collects every cell's metrics as JSON.

Run (read-only on the run directory):
  nice -n 10 python benchmarks/digits_sampling_methods.py --workdir=/work/runs/digits \\
      --num_samples=1000 --ems_file=ems.npz --schedule_dir=grids --out=table.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import jax
import ml_collections
import numpy as np

from diffax import checkpoint, evaluation, samplers, schedule_search, sharding, train_state
from diffax import config as config_lib
from diffax import data as data_lib
from diffax.evaluate import _real_images
from diffax.generate import _prediction
from diffax.parameterization import to_x0_eps
from diffax.samplers.dpm_solver_v3 import ModelStatistics, compute_statistics

BUDGETS = (5, 10, 20)
COLUMNS = (
    ("fd", "CNN FD", "{:.3f}"),
    ("fd_ratio", "CNN FD / floor", "{:.2f}"),
    ("confident_fraction", "CNN confident", "{:.1%}"),
    ("judge/fd_ratio", "judge FD / floor", "{:.2f}"),
    ("judge/confident_fraction", "judge confident", "{:.1%}"),
    ("judge/near_zero_fraction", "near-zero pixels", "{:.1%}"),
)


def _cells(metrics: dict) -> str:
    return " | ".join(fmt.format(metrics[key]) if key in metrics else "—" for key, _, fmt in COLUMNS)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--ems_samples", type=int, default=256)
    parser.add_argument("--ems_points", type=int, default=48)
    parser.add_argument("--ems_ridge", type=float, default=1e-3)
    parser.add_argument("--ems_file", default=None, help="reuse the statistics stored here, or write them")
    parser.add_argument("--search_seeds", type=int, default=32)
    parser.add_argument("--heldout_seeds", type=int, default=64)
    parser.add_argument("--schedule_dir", default=None, help="where the searched grids are written")
    parser.add_argument("--out", default=None, help="write every cell's metrics as JSON here")
    args = parser.parse_args()

    checkpoint.quiet_orbax_logs()
    config = config_lib.load(args.workdir)
    parts = train_state.build(config)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.local_devices())
    state, step = checkpoint.restore_latest(args.workdir, config, parts, mesh=mesh)
    params = state.sampling_params()
    schedule, module, prediction = parts.schedule, parts.module, _prediction(config)
    shape = data_lib.image_shape(config.input)

    def network(params, x, t):
        return module.apply({"params": params}, x, t, None, train=False)[..., : shape[-1]]

    model_fn = jax.tree_util.Partial(network, params)

    def model_eps(x, t):
        return to_x0_eps(schedule, model_fn(x, t), x, t, prediction=prediction)[1]

    reference = evaluation.digits_reference(args.num_samples)
    results: dict[str, dict] = {}
    if args.out and os.path.exists(args.out):  # resume: cells already measured are not redone
        with open(args.out) as f:
            results = json.load(f)["cells"]
    start = time.perf_counter()

    def record(name: str, metrics: dict, extra: str = "") -> None:
        results[name] = {k: float(v) for k, v in metrics.items()}
        print(f"| {name} | {_cells(metrics)} | {extra} |", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"workdir": args.workdir, "step": step, "cells": results}, f, indent=1)

    def evaluate(name: str, sampler: str, ts: jax.Array, **options) -> None:
        if name in results:
            print(f"| {name} | {_cells(results[name])} | (from {args.out}) |", flush=True)
            return

        def sample_fn(key, n):
            x_T = schedule.prior_sample(key, (n, *shape))
            return samplers.sample(
                model_fn, schedule, x_T, sampler=sampler, timesteps=ts, prediction=prediction, **options
            )

        wall, cpu = time.perf_counter(), _cpu_seconds()
        metrics = evaluation.evaluate_samples(
            sample_fn,
            num_samples=args.num_samples,
            batch_size=min(500, args.num_samples),
            key=jax.random.key(1),
            **reference,
        )
        record(name, metrics, f"{time.perf_counter() - wall:.0f} s wall, {_cpu_seconds() - cpu:.0f} CPU-s")

    print(f"run {args.workdir} step {step}; {args.num_samples} samples per cell", flush=True)
    header = ["cell"] + [title for _, title, _ in COLUMNS] + ["time"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    real = reference["sample_judge"](evaluation.load_digits_reference("test")[0][: args.num_samples])
    real_row = {k.replace("real_", ""): v for k, v in real.items() if k.startswith(("real_", "judge/real_"))}
    record(
        "real held-out digits",
        real_row | {"fd_ratio": 1.0, "judge/fd_ratio": 1.0, "fd": reference["floor_fd"]},
    )

    grid_ends = samplers.timesteps(schedule, num_steps=1)  # (t_start, t_end) of every grid here
    if args.ems_file and os.path.exists(args.ems_file):
        stats = ModelStatistics.load(args.ems_file)
        print(f"EMS loaded from {args.ems_file}", flush=True)
    else:
        cpu = _cpu_seconds()
        images = _real_images(config.input, args.ems_samples, seed=0)
        stats = compute_statistics(
            model_eps,
            schedule,
            images,
            lambda_min=float(schedule.log_snr(grid_ends[0])) / 2 - 0.01,
            lambda_max=float(schedule.log_snr(grid_ends[-1])) / 2 + 0.01,
            num_points=args.ems_points,
            key=jax.random.key(5),
            chunk=4,
            ridge=args.ems_ridge,
        )
        if args.ems_file:
            stats.save(args.ems_file)
        print(
            f"EMS: {args.ems_samples} images, {args.ems_points + 1} lambdas, ridge {args.ems_ridge}: "
            f"{_cpu_seconds() - cpu:.0f} CPU-s; max |s| {np.max(np.abs(stats.s)):.3g}",
            flush=True,
        )

    def teacher(seed: int, count: int) -> tuple[jax.Array, jax.Array]:
        x_T = schedule.prior_sample(jax.random.key(seed), (count, *shape))
        ts = samplers.timesteps(schedule, num_steps=100)
        return x_T, samplers.sample(
            model_fn, schedule, x_T, sampler="unipc", timesteps=ts, prediction=prediction, order=3
        )

    train_x_T, train_ref = teacher(11, args.search_seeds)
    heldout_x_T, heldout_ref = teacher(12, args.heldout_seeds)

    def heldout_error(ts: jax.Array) -> float:
        x = samplers.sample(
            model_fn, schedule, heldout_x_T, sampler="dpm_solver++_2m", timesteps=ts, prediction=prediction
        )
        return float(np.sqrt(np.mean(np.square(np.asarray(x) - np.asarray(heldout_ref)))))

    searched = {}
    for nfe in BUDGETS:
        path = os.path.join(args.schedule_dir or ".", f"dpm_solver++_2m_{nfe}nfe.npz")
        cpu, note = _cpu_seconds(), f"loaded from {path}"
        if not os.path.exists(path):
            ts, info = schedule_search.search(
                model_fn,
                schedule,
                train_x_T,
                train_ref,
                sampler="dpm_solver++_2m",
                num_steps=nfe,
                key=jax.random.key(7),
                population=12,
                elite=4,
                rounds=5,
                prediction=prediction,
            )
            schedule_search.save(path, ts)
            note = f"train RMS {info['error']:.4f} (uniform {info['uniform_error']:.4f}), written to {path}"
        searched[nfe] = samplers.timesteps(schedule, num_steps=nfe, spacing="file", path=path)
        uniform_heldout = heldout_error(samplers.timesteps(schedule, num_steps=nfe))
        print(
            f"search {nfe} NFE: {note}; held-out RMS {heldout_error(searched[nfe]):.4f} (uniform "
            f"{uniform_heldout:.4f}); {_cpu_seconds() - cpu:.0f} CPU-s; grid "
            f"{np.round(np.asarray(searched[nfe]), 4).tolist()}",
            flush=True,
        )

    for nfe in BUDGETS:
        uniform = samplers.timesteps(schedule, num_steps=nfe)
        pndm_name = "pndm" if nfe - samplers.get("pndm").warmup_nfe >= 4 else "plms"
        pndm_steps = nfe - samplers.get(pndm_name).warmup_nfe
        evaluate(f"{nfe} NFE dpm_solver++_2m", "dpm_solver++_2m", uniform)
        evaluate(f"{nfe} NFE unipc", "unipc", uniform)
        ts = samplers.timesteps(schedule, num_steps=pndm_steps)
        evaluate(f"{nfe} NFE {pndm_name} ({pndm_steps} steps)", pndm_name, ts)
        evaluate(f"{nfe} NFE dpm_solver_v3", "dpm_solver_v3", uniform, statistics=stats)
        evaluate(f"{nfe} NFE dpm_solver++_2m, searched grid", "dpm_solver++_2m", searched[nfe])
    ts10 = samplers.timesteps(schedule, num_steps=10)
    for b in (1.005, 1.01):
        evaluate(f"10 NFE dpm_solver++_2m, epsilon_scale={b}", "dpm_solver++_2m", ts10, epsilon_scale=b)
    for window in (0.01, 0.05):
        evaluate(
            f"10 NFE dpm_solver++_2m, time_shift=({window}, 0.3)",
            "dpm_solver++_2m",
            ts10,
            time_shift=(window, 0.3),
        )
    for nfe in BUDGETS:
        uniform = samplers.timesteps(schedule, num_steps=nfe)
        evaluate(f"{nfe} NFE dpm_solver++_2m clipped", "dpm_solver++_2m", uniform, clip_denoised=True)
        evaluate(
            f"{nfe} NFE dpm_solver++_2m clipped, searched grid",
            "dpm_solver++_2m",
            searched[nfe],
            clip_denoised=True,
        )
        if nfe == 10:
            evaluate(
                "10 NFE dpm_solver++_2m clipped, time_shift=(0.01, 0.3)",
                "dpm_solver++_2m",
                ts10,
                clip_denoised=True,
                time_shift=(0.01, 0.3),
            )
    print(f"total {time.perf_counter() - start:.0f} s wall, {_cpu_seconds():.0f} CPU-s", flush=True)


if __name__ == "__main__":
    main()
