"""Error against NFE of every deterministic sampler on an exact-score Gaussian mixture.

The data is the 2-D three-component mixture of ``diffax.samplers.exact.toy_mixture`` under the VP-linear
schedule (beta 0.1..20); its noised score is exact, so the only error is the solver's. The reference is
the probability-flow ODE solved in float64 (DOP853, rtol 1e-11). Each sampler runs in float32 from the
same prior draws on a uniform-log-SNR grid from t = 1 to t = 1e-3 with NFE = 5, 10, 20, 50, 100 (steps =
NFE // evaluations per step, so two- and three-stage methods may use a little less), and the table
reports the RMS distance to the reference. It then finds, by bisection on the number of steps, the
fewest NFE at which each sampler matches DDIM's error at 100 NFE.

Run:
  python benchmarks/sampler_convergence.py --out sampler_convergence.png
"""

from __future__ import annotations

import argparse
import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from diffax import samplers, schedules
from diffax.samplers.exact import reference_samples, toy_mixture

DETERMINISTIC = (
    "ddim",
    "euler",
    "heun",
    "dpm_solver_1",
    "dpm_solver_2",
    "dpm_solver_3",
    "dpm_solver++_2s",
    "dpm_solver++_2m",
    "dpm_solver++_3m",
    "unipc",
    "pndm",
    "plms",
)
BUDGETS = (5, 10, 20, 50, 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sampler_convergence.png", help="where to write the plot")
    parser.add_argument("--batch", type=int, default=1000, help="prior draws (2-D points)")
    parser.add_argument("--t-end", type=float, default=1e-3, help="where sampling stops")
    parser.add_argument("--spacing", default="uniform_logsnr", choices=samplers.SPACINGS)
    args = parser.parse_args()

    mixture = toy_mixture()
    schedule = schedules.get("vp_linear", beta_min=0.1, beta_max=20.0)
    model = mixture.model_fn(schedule)
    x_T = jax.random.normal(jax.random.key(0), (args.batch, 2))
    start = time.perf_counter()
    reference = reference_samples(mixture, schedule, x_T, args.t_end)
    print(f"reference: float64 DOP853 in {time.perf_counter() - start:.1f} s")

    def run(name: str, steps: int) -> tuple[float, int]:
        ts = samplers.timesteps(schedule, num_steps=steps, spacing=args.spacing, t_end=args.t_end)
        x, info = samplers.sample(model, schedule, x_T, sampler=name, timesteps=ts, return_info=True)
        error = float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64) - reference))))
        return error, int(info["nfe"])

    table: dict[str, list[tuple[float, int] | None]] = {}
    for name in DETERMINISTIC:
        sampler = samplers.get(name)
        steps = [(nfe - sampler.warmup_nfe) // sampler.nfe_per_step for nfe in BUDGETS]
        table[name] = [run(name, n) if n >= sampler.min_steps else None for n in steps]

    header = "| sampler | order | " + " | ".join(f"NFE {n}" for n in BUDGETS) + " |"
    print("\nRMS error against the float64 reference (actual NFE in brackets where it differs)\n")
    print(header)
    print("|" + "---|" * (len(BUDGETS) + 2))
    for name, row in table.items():
        cells = []
        for nfe, cell in zip(BUDGETS, row, strict=True):
            if cell is None:
                cells.append("n/a")
            else:
                cells.append(f"{cell[0]:.2e}" + ("" if cell[1] == nfe else f" ({cell[1]})"))
        print(f"| {name} | {samplers.get(name).order} | " + " | ".join(cells) + " |")

    # within 0.1%: Euler and DPM-Solver-1 are DDIM up to float32 rounding
    target = table["ddim"][-1][0] * 1.001
    print(f"\nFewest NFE matching DDIM's error at 100 NFE ({target:.2e}, +0.1%):\n")
    print("| sampler | NFE | error |")
    print("|---|---|---|")
    for name in DETERMINISTIC:
        sampler = samplers.get(name)
        # bisection on the number of steps
        low, high = sampler.min_steps, (100 - sampler.warmup_nfe) // sampler.nfe_per_step
        best = run(name, high)
        if best[0] > target:
            print(f"| {name} | > 100 | {best[0]:.2e} at {best[1]} |")
            continue
        while low < high:
            mid = (low + high) // 2
            result = run(name, mid)
            if result[0] <= target:
                high, best = mid, result
            else:
                low = mid + 1
        print(f"| {name} | {best[1]} | {best[0]:.2e} |")

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, row in table.items():
        points = [cell for cell in row if cell is not None]
        ax.loglog([p[1] for p in points], [p[0] for p in points], marker="o", label=name)
    ax.axhline(target, color="gray", linestyle=":", label="DDIM at 100 NFE")
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("RMS error vs float64 reference")
    ax.set_title(f"2-D Gaussian mixture, VP-linear, {args.spacing} grid to t = {args.t_end:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
