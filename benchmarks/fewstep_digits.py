"""Few-step digits against their teacher: FD (both judges) at K steps, and 1-step vs 200-step speed.

    python benchmarks/fewstep_digits.py --student runs/digits_cd --teacher runs/digits \
        --student_steps 1,2 --teacher_steps 1,2,4 --num_samples 500 --speed_samples 1000

For each student K it samples with the student's own sampler (``python -m diffax.generate --steps=K``
does the same) and for each teacher K with DDIM; every row is ``diffax.evaluate``'s digits metrics
(the bundled classifier's FD and floor, confident fraction, class p-value, and the independent
judge's). ``--speed_samples`` times the student's 1-step sampler and the teacher's 200-step DDPM on
the same number of digits in this process (compiled first, then timed), and prints their ratio.
Prints one JSON line per row.
"""

import argparse
import json
import time

import jax

from diffax import evaluate, generate


def _rows(workdir: str, sampler: str | None, steps: list[int], num_samples: int, label: str):
    for k in steps:
        config, sample_fn, params, step = generate.load_run(workdir, sampler=sampler, steps=k)
        metrics = evaluate.make_evaluation(config, sample_fn, num_samples=num_samples)(
            params, step=step, seed=0
        )
        yield {"run": label, "sampler": config.sampler.name, "steps": k, "train_step": step} | metrics


def _seconds(workdir: str, sampler: str | None, steps: int, num: int) -> float:
    config, sample_fn, params, _ = generate.load_run(workdir, sampler=sampler, steps=steps)
    draw = lambda seed: generate.sample_images(
        sample_fn, params, config=config, seed=seed, num_samples=num, batch_size=500
    )
    jax.block_until_ready(draw(0))  # compile
    start = time.perf_counter()
    jax.block_until_ready(draw(1))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student_steps", default="1,2")
    parser.add_argument("--teacher_steps", default="1,2,4")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--speed_samples", type=int, default=0)
    args = parser.parse_args()
    steps = lambda s: [int(k) for k in s.split(",") if k]
    for row in _rows(args.student, None, steps(args.student_steps), args.num_samples, "student"):
        print(json.dumps(row), flush=True)
    for row in _rows(args.teacher, "ddim", steps(args.teacher_steps), args.num_samples, "teacher"):
        print(json.dumps(row), flush=True)
    if args.speed_samples:
        one = _seconds(args.student, None, 1, args.speed_samples)
        many = _seconds(args.teacher, "ddpm", 200, args.speed_samples)
        print(
            json.dumps(
                {
                    "digits": args.speed_samples,
                    "student_1_step_s": one,
                    "teacher_ddpm_200_s": many,
                    "speedup": many / one,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
