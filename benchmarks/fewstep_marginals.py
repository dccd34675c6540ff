"""Where a few-step digits model loses classes: its map from noised real digits, level by level.

    python benchmarks/fewstep_marginals.py --run runs/digits_ect --sigmas 2,5,10,20 --out ect.md
    python benchmarks/fewstep_marginals.py --run runs/digits --sampler heun --steps 18 --sigmas 2,5,10,20 \
        --out teacher.md

The probability-flow ODE carries the noised data distribution at every level to the data, so an exact
consistency function f(x + sigma z, sigma) (Song et al. 2023, eq. 3 and Sec. 3) and the teacher's ODE
map from sigma to sigma_min both turn noised real digits into digits of the real class fractions,
whatever sigma is. Under both judges of ``diffax.evaluation`` this prints, for each sigma (of the
scaled variable y = x / alpha), the class fractions, their chi-square p-value against uniform, the
confident fraction and the fraction of outputs that keep the input's label (near 1 at small sigma, 1/10
once the noise has erased the class). A level where the fractions drift from the real ones, or the
confident fraction falls below the teacher's, is where the few-step model departs from the ODE.

A consistency run (``trainer.name="consistency"``) is read through its consistency function; any run
with ``--sampler`` (a deterministic diffax sampler) through that sampler for ``--steps`` steps on the
Karras grid from sigma to ``--sigma_min``. Every row uses all 1797 digits (both splits) and one noise
draw, the same for every sigma.
"""

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffax import evaluation, generate, sharding, train_state
from diffax.data.digits import load_digits
from diffax.evaluation._harness import uniform_chi2_pvalue
from diffax.fewstep import consistency as cm

_BATCH = 200


def _consistency_map(workdir: str):
    """``(map(y, sigma) -> x_0, label)``: a consistency run's f at sigma."""
    config, _, params, step = generate.load_run(workdir)
    if config.trainer.name != "consistency":
        raise SystemExit(f"--sampler: {workdir} is a {config.trainer.name!r} run; name an ODE sampler.")
    f = jax.jit(train_state.build(config).trainer.consistency_fn(train=False))
    return lambda y, sigma: f(params, y, jnp.full((len(y),), sigma), None, None), f"f at step {step}"


def _ode_map(workdir: str, sampler: str, steps: int, sigma_min: float):
    """``(map(y, sigma) -> x_0, label)``: ``sampler`` from sigma to ``sigma_min`` in ``steps`` steps."""
    config, _, params, step = generate.load_run(workdir)
    parts = train_state.build(config)
    schedule = parts.schedule
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.local_devices())
    config.sampler.spacing = "karras"
    config.sampler.t_end = float(cm.schedule_time(schedule, sigma_min))
    samplers = {}

    def ode_map(y, sigma):
        t = cm.schedule_time(schedule, sigma)
        if sigma not in samplers:  # one compiled grid per level
            config.sampler.t_start = float(t)
            samplers[sigma] = generate.make_sampler(config, parts, mesh=mesh, sampler=sampler, steps=steps)
        x_t = schedule.alpha(t) * y
        return samplers[sigma](params, jax.random.key(0), np.zeros(len(y), np.int32), x_T=x_t)

    return ode_map, f"{sampler} {steps} at step {step}"


def _judged(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Both judges' class fractions, p-value, confident fraction and kept-label fraction."""
    _, logits = evaluation.digits_features_and_logits(images)
    probabilities = {
        "cnn": np.asarray(jax.nn.softmax(logits)),
        "judge": evaluation.digits_judge().probabilities(evaluation.to_digit_pixels(images)),
    }
    out = {}
    for name, p in probabilities.items():
        predicted = np.argmax(p, axis=1)
        counts = np.bincount(predicted, minlength=10)
        out[f"{name}/fractions"] = (counts / counts.sum()).tolist()
        out[f"{name}/p"] = uniform_chi2_pvalue(counts)
        out[f"{name}/confident"] = float(np.mean(np.max(p, axis=1) > 0.9))
        out[f"{name}/kept"] = float(np.mean(predicted == labels))
    return out


def _row(level: str, m: dict[str, float]) -> str:
    cells = [level]
    for name in ("cnn", "judge"):
        fractions = " ".join(f"{100 * v:.1f}" for v in m[f"{name}/fractions"])
        cells += [
            fractions,
            f"{m[f'{name}/p']:.3f}",
            f"{100 * m[f'{name}/confident']:.1f}%",
            f"{100 * m[f'{name}/kept']:.1f}%",
        ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument(
        "--sampler", default=None, help="an ODE sampler (else the run's consistency function)"
    )
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--sigma_min", type=float, default=0.0065)
    parser.add_argument("--sigmas", default="1,2,5,10,20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    if args.sampler is None:
        one_step, label = _consistency_map(args.run)
    else:
        one_step, label = _ode_map(args.run, args.sampler, args.steps, args.sigma_min)
    images, labels = load_digits(split="all", upsample=2)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    z = jax.random.normal(jax.random.key(args.seed), x.shape)
    rows = [_row("real", _judged(np.asarray(x), labels))]
    for sigma in sigmas:
        out = [
            one_step(x[i : i + _BATCH] + sigma * z[i : i + _BATCH], sigma) for i in range(0, len(x), _BATCH)
        ]
        measured = _judged(np.clip(np.concatenate(out), -1.0, 1.0), labels)
        rows.append(_row(f"{sigma:g}", measured))
        print(rows[-1], flush=True)
    header = (
        "| sigma | CNN classes 0-9 (%) | CNN p | CNN confident | CNN kept label | judge classes 0-9 (%) | "
        "judge p | judge confident | judge kept label |"
    )
    lines = [
        f"# {os.path.abspath(args.run)}: {label}",
        "",
        f"Machine: {platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__}; {len(x)} digits, "
        f"noise seed {args.seed}.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
        *rows,
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
