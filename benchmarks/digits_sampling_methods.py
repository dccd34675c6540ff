"""Digits FD of the sampling-time methods at 5, 10 and 20 NFE on a trained digits run.

Samplers: DPM-Solver++ 2M, UniPC (p = 2), PNDM/PLMS (PLMS below 10 NFE, where PNDM's 9 warm-up
evaluations leave no budget), DPM-Solver-v3 with statistics estimated from the digits data
(``compute_statistics``: ``--ems_samples`` training images, ``--ems_points`` lambdas), and DPM-Solver++ 2M on
a searched grid (``schedule_search``, teacher: UniPC-3 at 100 NFE on ``--search_seeds`` seeds, scored
here on other seeds); then exposure bias: epsilon scaling swept over b and the time shift over its window
for DPM-Solver++ 2M at 10 NFE.
No dynamic thresholding (not every method has a data prediction), so numbers differ from the run's own
evaluation. FD is diffax's digits Fréchet distance (``evaluation.digits_reference``) on ``--num_samples``.

Run (read-only on the run directory):
  nice -n 10 python benchmarks/digits_sampling_methods.py --workdir=/work/runs/digits --num_samples=1000
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import ml_collections

from diffax import checkpoint, evaluation, samplers, schedule_search, sharding, train_state
from diffax import config as config_lib
from diffax import data as data_lib
from diffax.evaluate import _real_images
from diffax.generate import _prediction
from diffax.parameterization import to_x0_eps
from diffax.samplers.dpm_solver_v3 import compute_statistics

BUDGETS = (5, 10, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--ems_samples", type=int, default=256)
    parser.add_argument("--ems_points", type=int, default=60)
    parser.add_argument("--search_seeds", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the table as JSON here")
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

    def fd(name, ts, **options):
        def sample_fn(key, n):
            x_T = schedule.prior_sample(key, (n, *shape))
            return samplers.sample(
                model_fn, schedule, x_T, sampler=name, timesteps=ts, prediction=prediction, **options
            )

        metrics = evaluation.evaluate_samples(
            sample_fn,
            num_samples=args.num_samples,
            batch_size=min(500, args.num_samples),
            key=jax.random.key(1),
            **reference,
        )
        return metrics["fd"]

    table: dict[str, dict[int, float]] = {}
    start = time.perf_counter()
    print(f"run {args.workdir} step {step}; {args.num_samples} samples per cell", flush=True)

    images = _real_images(config.input, args.ems_samples, seed=0)
    grid_ends = samplers.timesteps(schedule, num_steps=1)  # (t_start, t_end) of every grid here
    lam_lo = float(schedule.log_snr(grid_ends[0])) / 2 - 0.01
    lam_hi = float(schedule.log_snr(grid_ends[-1])) / 2 + 0.01
    stats = compute_statistics(
        model_eps,
        schedule,
        images,
        lambda_min=lam_lo,
        lambda_max=lam_hi,
        num_points=args.ems_points,
        key=jax.random.key(5),
        chunk=4,
    )
    print(
        f"EMS: {args.ems_samples} images, {args.ems_points + 1} lambdas, {time.perf_counter() - start:.0f} s",
        flush=True,
    )

    teacher_ts = samplers.timesteps(schedule, num_steps=100)
    train_x_T = schedule.prior_sample(jax.random.key(11), (args.search_seeds, *shape))
    teacher = samplers.sample(
        model_fn, schedule, train_x_T, sampler="unipc", timesteps=teacher_ts, prediction=prediction, order=3
    )
    for nfe in BUDGETS:
        uniform = samplers.timesteps(schedule, num_steps=nfe)
        pndm_name = "pndm" if nfe - 9 >= 4 else "plms"
        pndm_steps = nfe - samplers.get(pndm_name).warmup_nfe
        rows = {
            "dpm_solver++_2m": fd("dpm_solver++_2m", uniform),
            "unipc": fd("unipc", uniform),
            "pndm (plms below 13 NFE)": fd(pndm_name, samplers.timesteps(schedule, num_steps=pndm_steps)),
            "dpm_solver_v3": fd("dpm_solver_v3", uniform, statistics=stats),
        }
        searched, info = schedule_search.search(
            model_fn,
            schedule,
            train_x_T,
            teacher,
            sampler="dpm_solver++_2m",
            num_steps=nfe,
            key=jax.random.key(7),
            population=8,
            elite=3,
            rounds=4,
            prediction=prediction,
        )
        rows["dpm_solver++_2m, searched grid"] = fd("dpm_solver++_2m", searched)
        for name, value in rows.items():
            table.setdefault(name, {})[nfe] = value
        print(
            f"NFE {nfe}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in rows.items())
            + f" ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )

    print("\n| method | " + " | ".join(f"FD @ {n} NFE" for n in BUDGETS) + " |")
    print("|---|" + "---|" * len(BUDGETS))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[n]:.3f}" for n in BUDGETS) + " |")

    sweep = {}
    ts10 = samplers.timesteps(schedule, num_steps=10)
    for b in (1.0, 1.005, 1.01, 1.02):
        sweep[b] = fd("dpm_solver++_2m", ts10, epsilon_scale=b) if b != 1.0 else table["dpm_solver++_2m"][10]
    print(
        "\nEpsilon scaling (DPM-Solver++ 2M, 10 NFE): "
        + ", ".join(f"b={b}: FD {v:.3f}" for b, v in sweep.items())
    )
    shift = {w: fd("dpm_solver++_2m", ts10, time_shift=(w, 0.5)) for w in (0.01, 0.03)}
    print("Time shift (cutoff t = 0.5): " + ", ".join(f"window {w}: FD {v:.3f}" for w, v in shift.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"step": step, "table": table, "epsilon_scaling": sweep, "time_shift": shift}, f, indent=1
            )
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
