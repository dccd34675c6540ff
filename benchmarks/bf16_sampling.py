"""What bfloat16 compute costs in sample quality and buys in speed, on a trained run's sampler.

    python benchmarks/bf16_sampling.py --workdir runs/digits --num_samples 1000
    python benchmarks/bf16_sampling.py --mixture

``--mixture``: on the exact-score 2-D Gaussian mixture (``diffax.samplers.exact.toy_mixture``, VP-linear)
the network is replaced by the exact prediction evaluated as a bfloat16 network would: its input rounded
to bfloat16 and its output rounded to bfloat16. It prints the RMS distance to the float64
probability-flow reference for DDIM and DPM-Solver++ 2M at several NFE, with exact float32 evaluations
beside the bfloat16 ones, so the table separates the solver's error from bfloat16's.

With ``--workdir``:

loads the run's newest checkpoint (EMA parameters), draws the same samples (same seeds, the run's own
sampler settings) with the network computing in float32 and in bfloat16 (parameters stay float32;
GroupNorm statistics and attention stay float32 inside the layers), and prints one JSON line per dtype:
seconds per sampling batch (median) and, for a digits run, ``diffax.evaluation.digits_metrics`` (FD,
its floor, confident fraction), plus the mean absolute difference between the two dtypes' images.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffax import checkpoint, generate, samplers, schedules, sharding, train_state
from diffax import config as config_lib
from diffax.evaluation import digits_metrics
from diffax.samplers.exact import reference_samples, toy_mixture

MIXTURE_SAMPLERS = ("ddim", "dpm_solver++_2m")
MIXTURE_NFE = (10, 20, 50)


def mixture_table(num_points: int = 2000, t_end: float = 1e-3) -> list[dict[str, object]]:
    """RMS error to the float64 reference of each sampler with float32 and bfloat16-rounded evaluations."""
    schedule = schedules.get("vp_linear", beta_min=0.1, beta_max=20.0)
    mixture = toy_mixture()
    exact = mixture.model_fn(schedule)

    def rounded(x, t):  # what a network computing in bfloat16 hands back: rounded in, rounded out
        return exact(x.astype(jnp.bfloat16).astype(jnp.float32), t).astype(jnp.bfloat16).astype(jnp.float32)

    x_T = jax.random.normal(jax.random.key(0), (num_points, 2))
    reference = reference_samples(mixture, schedule, x_T, t_end)
    rows = []
    for name in MIXTURE_SAMPLERS:
        for nfe in MIXTURE_NFE:
            ts = samplers.timesteps(schedule, num_steps=nfe, spacing="uniform_logsnr", t_end=t_end)
            row: dict[str, object] = {"sampler": name, "nfe": nfe}
            for label, model in (("float32", exact), ("bfloat16", rounded)):
                x = samplers.sample(model, schedule, x_T, sampler=name, timesteps=ts)
                row[label] = float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64) - reference))))
            rows.append(row)
    return rows


def sample_with_dtype(workdir: str, dtype: str, *, num_samples: int, batch_size: int, seed: int):
    """(uint8 images, seconds per batch after the first) of the run's sampler computing in ``dtype``."""
    config = config_lib.load(workdir)
    config.model.dtype = dtype
    parts = train_state.build(config)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.local_devices())
    state, _ = checkpoint.restore_latest(workdir, config, parts, mesh=mesh)
    params = state.sampling_params()
    sample_fn = generate.make_sampler(config, parts, mesh=mesh)
    times, chunks = [], []
    for i in range(num_samples // batch_size):
        start = time.perf_counter()
        chunk, _ = generate.sample_images(
            sample_fn, params, config=config, seed=seed + i, num_samples=batch_size, batch_size=batch_size
        )
        times.append(time.perf_counter() - start)
        chunks.append(chunk)
    return config, np.concatenate(chunks), statistics.median(times[1:] or times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--workdir", help="a trained run")
    mode.add_argument("--mixture", action="store_true", help="the exact-score Gaussian mixture instead")
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.mixture:
        print("| sampler | NFE | RMS error, float32 | RMS error, bfloat16 evaluations |\n|---|---|---|---|")
        for row in mixture_table():
            print(f"| {row['sampler']} | {row['nfe']} | {row['float32']:.2e} | {row['bfloat16']:.2e} |")
        return
    if args.num_samples % args.batch_size:
        p.error("--num_samples must be a multiple of --batch_size.")
    images = {}
    for dtype in ("float32", "bfloat16"):
        config, images[dtype], seconds = sample_with_dtype(
            args.workdir, dtype, num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed
        )
        record = {"dtype": dtype, "seconds_per_batch": round(seconds, 3), "batch": args.batch_size}
        if config.input.dataset == "digits":
            metrics = digits_metrics(images[dtype].astype(np.float32) / 127.5 - 1.0)
            record.update({k: round(float(metrics[k]), 4) for k in ("fd", "fd_floor", "confident_fraction")})
        print(json.dumps(record), flush=True)
    diff = np.abs(images["float32"].astype(np.float32) - images["bfloat16"].astype(np.float32))
    print(json.dumps({"mean_abs_pixel_difference_0_255": round(float(diff.mean()), 3)}))


if __name__ == "__main__":
    main()
