"""Where a benchmark task spends its time, by op class, from a ``jax.profiler`` trace of XLA's CPU thunks.

  python benchmarks/profile_ops.py --config small --what train --batch 32 --eigen-conv [--cores 1]

Builds the task exactly as ``bench.py`` does, traces a few calls, and sums the thunk events by class:
each event is an instruction of the optimized HLO, classified through its ``op_name`` metadata (which
layer function it came from, forward or backward) and its opcode. Eigen convolutions run
asynchronously, so their events show only dispatch; the "unaccounted" row (wall time less the events
of all threads, which may overlap) is where their work and any idle time show up.
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import pathlib
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench

from diffax import perf

# (class, pattern on op_name metadata); the first match wins.
LAYER_CLASSES = (
    ("attention", re.compile(r"attn|attention|Attention")),
    ("group_norm+silu", re.compile(r"group_norm|GroupNorm|scale_shift_silu|silu")),
    ("optimizer", re.compile(r"adamw|scale_by_adam|optax|apply_updates|ema")),
)
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\(.*?\)|\S+) (\w[\w\-]*)\(")


def instruction_classes(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Maps each instruction name of the optimized HLO to its op class and its ``op_name`` metadata."""
    classes = {}
    for line in hlo_text.splitlines():
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.group(1), match.group(2)
        if opcode in ("while", "call", "conditional"):
            continue  # their bodies' thunks are events of their own
        op_name = line.split('op_name="', 1)[1].split('"', 1)[0] if 'op_name="' in line else ""
        backward = "transpose(" in op_name
        layer = next((label for label, pattern in LAYER_CLASSES if pattern.search(op_name)), None)
        if opcode == "convolution" or "conv_general_dilated" in op_name.rsplit("/", 1)[-1]:
            kind = "convolution"
        elif layer:
            kind = layer
        elif opcode in ("dot", "custom-call") or "dot_general" in op_name.rsplit("/", 1)[-1]:
            kind = "dense/dot"
        elif opcode in ("transpose", "copy"):
            kind = "transpose/copy"
        else:
            kind = "other elementwise/reduce"
        label = f"{kind} ({'bwd' if backward else 'fwd'})" if kind != "optimizer" else kind
        classes[name] = (label, op_name)
    return classes


def profile(
    task: bench.Task, calls: int, instructions: collections.abc.Container[str]
) -> tuple[collections.Counter, float, int]:
    """Traces ``calls`` calls; returns seconds per call of each of ``instructions``, wall seconds per
    call, and the number of their events."""
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        start = time.perf_counter()
        for _ in range(calls):
            task.run()
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        (path,) = pathlib.Path(logdir).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(path))
    totals: collections.Counter = collections.Counter()
    events = 0
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                if event.name in instructions:
                    totals[event.name] += event.duration_ns * 1e-9 / calls
                    events += 1
    return totals, wall / calls, events


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(bench.CONFIGS), default="small")
    p.add_argument("--what", choices=("train", "forward"), default="train")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calls", type=int, default=3)
    bench.add_impl_args(p)
    bench.add_cpu_settings_args(p)
    p.add_argument("--cores", type=int, default=0, help="run on the first N CPUs (bench.pin_cores); 0: all")
    p.add_argument("--top", type=int, default=0, help="also list the N slowest instructions")
    p.add_argument("--dump", type=pathlib.Path, help="also write the optimized HLO here")
    args = p.parse_args(argv)
    if args.cores:
        bench.pin_cores(args.cores)
    perf.configure_cpu(**bench.cpu_settings_of(args))
    task = bench.build_task(args.config, args.what, args.batch, impls=bench.impls_of(args))
    hlo_text = task.executable.as_text()
    if args.dump:
        args.dump.write_text(hlo_text)
    classes = instruction_classes(hlo_text)
    per_instruction, wall, events = profile(task, args.calls, classes)
    totals: collections.Counter = collections.Counter()
    for name, seconds in per_instruction.items():
        totals[classes[name][0]] += seconds
    traced = sum(totals.values())
    print(
        f"{args.config} {args.what} b{args.batch}: {wall:.3f} s per call,"
        f" {events // args.calls} events per call"
    )
    print("| op class | s per call | share of wall |\n|---|---|---|")
    for name, seconds in totals.most_common():
        print(f"| {name} | {seconds:.3f} | {seconds / wall:.0%} |")
    print(f"| unaccounted (async convolutions, idle) | {wall - traced:.3f} | {(wall - traced) / wall:.0%} |")
    for name, seconds in per_instruction.most_common(args.top):
        print(f"{seconds:8.4f} s  {name}  [{classes[name][0]}]  {classes[name][1]}")


if __name__ == "__main__":
    main()
