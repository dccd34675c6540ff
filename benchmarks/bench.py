"""diffax against Hugging Face diffusers on the DDPM U-Net: speed, and closeness to the matmul peak.

One measurement (the form outside code relies on; it mirrors the peer's runner):

  python benchmarks/bench.py --config small --what train --batch 32 --repeats 5

prints one JSON line with ``median_s`` (seconds per train step, per forward, or per whole sampling call),
``images_per_s``, ``compile_s`` (lowering + compiling, apart from the timings; for sampling the first
call less a steady one), the XLA-counted FLOPs (per train step or forward, convolutions counted as
direct ones and attention unblocked; a sampling call counts its network evaluations times one
forward), the achieved GFLOP/s and its fraction of the float32 matmul peak measured in the same run
(numpy and XLA, 2048x2048), the XLA flags and the layer formulations.

The suite runs every task for both configs, alternating repetition by repetition with the peer
(``../peer-venv``, ``../shared/peers/diffusers_bench.py``), prints a markdown table and writes it to
``benchmarks/results/<date>.md``:

  python benchmarks/bench.py --suite --eigen-conv

``--baseline DIR`` puts another diffax checkout in the peer's place (e.g. a git worktree of an
earlier commit; its own ``benchmarks/bench.py`` serves with ``PYTHONPATH=DIR``), so a change is timed
against the code before it, alternating in one run, with the same flags:

  git worktree add /tmp/before <commit> && python benchmarks/bench.py --suite --baseline /tmp/before

Both forms also report the process CPU time of the work (``cpu_s``, all threads) and ``cores_busy``
(CPU seconds per wall second): the suite's CPU ratio (peer CPU seconds over diffax's) separates doing
less work from keeping the cores busy. ``--cores N`` runs both sides on the first N CPUs (the peer with
N threads), e.g. ``--cores 1`` compares the two single-threaded.

One formulation switch against its plain form, both built in one process and timed alternately (so a
difference below the run-to-run noise shows), one JSON line:

  python benchmarks/bench.py --config small --what train --batch 32 --repeats 10 --compare-impl resblock_impl

and, the same way, the train or forward program compiled without and with one XLA option (how an XLA
flag is weighed before it becomes a ``diffax.perf`` setting; options take XLA's full enum spellings):

  python benchmarks/bench.py --config small --what train --batch 32 --repeats 16 --eigen-conv \
    --compare-xla-option \
    xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE

The network is the peer's ``UNet2DModel`` layout exactly (same parameter count, checked): the
``unet_ddpm_cifar10`` preset with 8-channel attention heads and GroupNorm eps 1e-5, as diffusers has.
The work is the peer's: train = noise a fixed batch at random DDPM steps, MSE to the noise, backward,
AdamW (lr 1e-4, weight decay 0.01, torch's defaults) with dropout 0.1 active; forward = one eval-mode
call; sampling = ``diffax.sample`` with DPM-Solver++ 2M (20 steps, diffusers' "linspace" grid) or DDIM
eta=0 (50 steps, diffusers' "leading" grid) on the linear schedule (1e-4 .. 0.02, 1000 steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffax
from diffax import models, perf, samplers
from diffax.kernels.cpu import attention as cpu_attention
from diffax.kernels.cpu import ffi as cpu_kernels
from diffax.models import layers
from diffax.train_state import TrainState, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT.parent / "peer-venv" / "bin" / "python"
PEER_RUNNER = ROOT.parent / "shared" / "peers" / "diffusers_bench.py"
PEER_WORKER = pathlib.Path(__file__).resolve().with_name("peer_worker.py")

# Overrides of the "unet_ddpm_cifar10" preset giving diffusers' UNet2DModel configs (diffusers_bench.py).
CONFIGS: dict[str, dict[str, Any]] = {
    "small": dict(base_channels=64, channel_mult=(1, 2, 2)),
    "ddpm-cifar10": dict(base_channels=128, channel_mult=(1, 2, 2, 2)),
}
# diffusers' UNet2DModel defaults that differ from the DDPM paper's preset.
PEER_LAYOUT = dict(head_channels=8, norm_eps=1e-5)
TASKS = ("train", "forward", "sample-dpmpp20", "sample-ddim50")
# task -> (sampler, steps, diffusers' default grid for that scheduler)
SAMPLING = {"sample-dpmpp20": ("dpm_solver++_2m", 20, "linspace"), "sample-ddim50": ("ddim", 50, "leading")}
# (task, batch) pairs of the suite.
SUITE = (("train", 32), ("train", 16), ("forward", 16), ("sample-dpmpp20", 16), ("sample-ddim50", 16))
# The U-Net's formulation switches (values ``layers.IMPLS``), each a command-line flag.
IMPL_FIELDS = ("attention_impl", "norm_impl", "resblock_impl", "conv_impl")


@dataclasses.dataclass
class Task:
    """One unit of work, compiled and warmed up: ``run()`` does it once and blocks until it is done."""

    run: Callable[[], None]
    compile_s: float
    flops: float  # per unit of work (one train step when a call runs several)
    params: int
    info: dict[str, Any]
    steps_per_call: int = 1
    executable: Any = None  # the compiled program (train and forward), for profiling


def build_task(
    config: str,
    what: str,
    batch: int,
    *,
    impls: Mapping[str, str] | None = None,
    compute_dtype: str = "float32",
    steps_per_call: int = 1,
    compiler_options: dict[str, str] | None = None,
    seed: int = 0,
) -> Task:
    """Builds, compiles (timed) and warms up one task; see the module docstring for the work.

    ``impls`` maps some of ``IMPL_FIELDS`` to values; the others are ``"auto"``.
    """
    impls = {field: "auto" for field in IMPL_FIELDS} | dict(impls or {})
    if what != "train" and steps_per_call != 1:
        raise ValueError(f"--steps-per-call applies to train only; got {steps_per_call} for {what!r}.")
    if what == "train" and compute_dtype != "float32":
        raise ValueError("--compute-dtype bfloat16 is for forward and sampling; train runs in float32.")
    net = models.get(
        "unet_ddpm_cifar10",
        **CONFIGS[config],
        **PEER_LAYOUT,
        **impls,
        dtype=compute_dtype,
    )
    schedule = diffax.schedules.get("linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    key = jax.random.key(seed)
    init_key, data_key, run_key = jax.random.split(key, 3)
    x0 = jax.random.normal(data_key, (batch, 32, 32, 3))
    params = jax.jit(lambda k: net.init(k, x0[:1], jnp.full((1,), 0.5), train=False)["params"])(init_key)
    info = {
        # What "auto" lowers to on this (CPU) backend, for the record.
        **{field: "cpu" if value == "auto" else value for field, value in impls.items()},
        "compute_dtype": compute_dtype,
    }

    def forward_of(network: nn.Module):
        def forward(p, x, t):
            return network.apply({"params": p}, x, t)

        return forward

    forward = forward_of(net)
    t_mid = jnp.full((batch,), 0.501)  # DDPM step 500, as the peer's forward
    # The network's work (forward and train step), counted on direct convolutions: Winograd
    # (conv_impl) gets the same result with fewer multiplications, and counting those would lower
    # the fraction of peak it reaches. Attention is counted unblocked: XLA's cost analysis counts a
    # loop's body once, so the blocked "cpu" attention's work would count only one block's.
    direct = net.clone(conv_impl="xla", attention_impl="xla")

    if what == "train":
        tx = optax.adamw(1e-4, weight_decay=0.01)

        def train_step(network: nn.Module):
            def apply_train(p, x, t, cond, k):
                return network.apply({"params": p}, x, t, cond, train=True, rngs={"dropout": k})

            loss = diffax.make_loss(schedule, apply_train)
            return make_train_step(loss, tx, optax.constant_schedule(1e-4), ema_decays=())

        step = train_step(net)
        batch_data = {"image": x0}

        def steps(state):
            if steps_per_call == 1:
                state, metrics = step(state, batch_data)
                return state, metrics["loss"]
            state, metrics = jax.lax.scan(lambda s, _: step(s, batch_data), state, length=steps_per_call)
            return state, metrics["loss"][-1]

        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=(),
            opt_state=tx.init(params),
            rng=jax.random.key_data(run_key),
        )
        flops = jax.jit(train_step(direct)).lower(state, batch_data).cost_analysis()["flops"]
        compiled, compile_s = _compile(jax.jit(steps, donate_argnums=0), state, options=compiler_options)
        holder = [state]

        def run():
            holder[0], loss = compiled(holder[0])
            loss.block_until_ready()

        run()
        info["steps_per_call"] = steps_per_call
        return Task(run, compile_s, flops, models.count_params(params), info, steps_per_call, compiled)

    forward_flops = jax.jit(forward_of(direct)).lower(params, x0, t_mid).cost_analysis()["flops"]
    if what == "forward":
        compiled, compile_s = _compile(jax.jit(forward), params, x0, t_mid, options=compiler_options)

        def run():
            compiled(params, x0, t_mid).block_until_ready()

        run()
        return Task(run, compile_s, forward_flops, models.count_params(params), info, executable=compiled)

    if what not in SAMPLING:
        raise ValueError(f"--what={what!r}; use one of {TASKS}.")
    if compiler_options:
        raise ValueError(
            "--xla-option applies to train and forward (diffax.sample compiles its own program)."
        )
    sampler, num_steps, spacing = SAMPLING[what]
    ts = samplers.timesteps(schedule, num_steps=num_steps, spacing=spacing)
    model_fn = jax.tree_util.Partial(forward, params)
    x_T = jax.random.normal(run_key, (batch, 32, 32, 3))

    def run():
        samplers.sample(model_fn, schedule, x_T, sampler=sampler, timesteps=ts).block_until_ready()

    first = time.perf_counter()
    run()
    second = time.perf_counter()
    run()
    compile_s = 2 * second - first - time.perf_counter()  # the first call less a steady one
    _, stats = samplers.sample(model_fn, schedule, x_T, sampler=sampler, timesteps=ts, return_info=True)
    info.update(sampler=sampler, num_steps=num_steps, spacing=spacing, nfe=int(stats["nfe"]))
    return Task(run, compile_s, forward_flops * info["nfe"], models.count_params(params), info)


def _compile(fn, *args, options=None):
    """AOT-compiles ``fn`` for ``args``; returns the executable and the seconds lowering + compiling took."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options=options)
    return compiled, time.perf_counter() - start


def matmul_peak(*, n: int = 2048, repeats: int = 7, gap_s: float = 0.05) -> dict[str, float]:
    """Median float32 GFLOP/s of an n x n matmul in numpy and in XLA, measured alternately now."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ja = jnp.asarray(a)
    dot = jax.jit(jnp.dot).lower(ja, ja).compile()
    runs = {"numpy": lambda: np.dot(a, a), "xla": lambda: dot(ja, ja).block_until_ready()}
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            time.sleep(gap_s)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    gflops = {f"{name}_gflops": round(2 * n**3 / statistics.median(t) / 1e9, 1) for name, t in times.items()}
    gflops["peak_gflops"] = max(gflops.values())
    return gflops


def time_once(task: Task) -> tuple[float, float]:
    """Wall and process CPU seconds (all threads) per unit of work (per train step when a call runs
    several) of one call of ``task.run``; CPU over wall is how many cores the work kept busy."""
    start, cpu_start = time.perf_counter(), time.process_time()
    task.run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return wall / task.steps_per_call, cpu / task.steps_per_call


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def timing_stats(timings: list[tuple[float, float]]) -> dict[str, Any]:
    """Of (wall, CPU) seconds per repetition: the median (``s``) and least wall seconds, the median CPU
    seconds, the median CPU seconds per wall second (``cores_busy``), and the wall ``times``."""
    walls = [wall for wall, _ in timings]
    return {
        "s": statistics.median(walls),
        "min_s": min(walls),
        "cpu_s": statistics.median(cpu for _, cpu in timings),
        "cores_busy": statistics.median(cpu / wall for wall, cpu in timings),
        "times": walls,
    }


def summary(
    task: Task, timings: list[tuple[float, float]], batch: int, peak: dict[str, float]
) -> dict[str, Any]:
    """The JSON record of one measured task, from its (wall, CPU) seconds per repetition."""
    stats = timing_stats(timings)
    median = stats["s"]
    achieved = task.flops / median / 1e9
    return {
        "median_s": round(median, 4),
        "min_s": round(stats["min_s"], 4),
        "images_per_s": round(batch / median, 3),
        "cpu_s": round(stats["cpu_s"], 4),
        "cores_busy": round(stats["cores_busy"], 2),
        "compile_s": round(task.compile_s, 2),
        "gflop": round(task.flops / 1e9, 2),
        "gflops_per_s": round(achieved, 1),
        "fraction_of_peak": round(achieved / peak["peak_gflops"], 3),
        **peak,
        "params": task.params,
        "times_s": [round(t, 4) for t in stats["times"]],
        **task.info,
    }


def add_impl_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--attention-impl``, ``--norm-impl``, ``--resblock-impl``, ``--conv-impl`` (``IMPL_FIELDS``),
    default ``auto``."""
    for field in IMPL_FIELDS:
        parser.add_argument(f"--{field.replace('_', '-')}", choices=layers.IMPLS, default="auto")


def impls_of(args: argparse.Namespace) -> dict[str, str]:
    """The ``IMPL_FIELDS`` values of parsed arguments."""
    return {field: getattr(args, field) for field in IMPL_FIELDS}


# ``perf.configure_cpu``'s keywords: its XLA flag settings and the allocator setting.
CPU_SETTING_NAMES = (*perf.CPU_SETTINGS, "retain_host_memory")


def add_cpu_settings_args(parser: argparse.ArgumentParser) -> None:
    """Adds one switch per ``diffax.perf`` setting: ``--eigen-conv`` (an XLA flag) and
    ``--retain-host-memory`` (glibc malloc keeps freed buffers)."""
    for name in CPU_SETTING_NAMES:
        parser.add_argument(f"--{name.replace('_', '-')}", action="store_true", help=f"diffax.perf: {name}")


def cpu_settings_of(args: argparse.Namespace) -> dict[str, bool]:
    """The ``perf.configure_cpu`` keywords of parsed arguments."""
    return {name: getattr(args, name) for name in CPU_SETTING_NAMES}


def _task_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        impls=impls_of(args),
        compute_dtype=args.compute_dtype,
        steps_per_call=args.steps_per_call,
        compiler_options=dict(option.split("=", 1) for option in args.xla_option) or None,
    )


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pin_cores(count: int) -> None:
    """Restricts this process's threads (numpy's BLAS pool included), and the workers it starts later,
    to the first ``count`` CPUs it may use (Linux).

    Call it before JAX starts a backend: XLA sizes its CPU thread pool from the CPUs allowed then.
    """
    cpus = sorted(os.sched_getaffinity(0))[:count]
    for thread in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread), cpus)


def _settings() -> dict[str, Any]:
    return {
        **perf.settings_in_force(),
        "cpu": _cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "l2_cache_bytes": cpu_attention.l2_cache_bytes(),
        "attention_block_bytes": cpu_attention.ATTENTION_BLOCK_BYTES,
        "cpu_attention_kernel": cpu_kernels.available(),
    }


def measure_one(args: argparse.Namespace) -> dict[str, Any]:
    """The single-measurement mode: build, warm up, time ``repeats`` calls, measure the peak, report."""
    task = build_task(args.config, args.what, args.batch, **_task_kwargs(args))
    for _ in range(args.warmup):
        task.run()
    timings = []
    for _ in range(args.repeats):
        time.sleep(args.gap)
        timings.append(time_once(task))
    record = {"impl": "diffax", "config": args.config, "what": args.what, "batch": args.batch}
    record.update(summary(task, timings, args.batch, matmul_peak()))
    record.update(_settings(), load_average=load_average())
    return record


def _alternate(args: argparse.Namespace, tasks: dict[str, Task]) -> dict[str, Any]:
    """Times ``tasks`` (two forms of one task) alternately, the order flipping every round; returns
    each form's median and times and ``speedup``, the first form's median over the second's."""
    for task in tasks.values():
        for _ in range(args.warmup):
            task.run()
    first, second = tasks
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for round_ in range(args.repeats):
        for name in (first, second) if round_ % 2 == 0 else (second, first):
            time.sleep(args.gap)
            times[name].append(time_once(tasks[name])[0])
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "config": args.config,
        "what": args.what,
        "batch": args.batch,
        **{f"{name}_median_s": round(m, 4) for name, m in median.items()},
        "speedup": round(median[first] / median[second], 3),
        "times_s": {name: [round(x, 4) for x in t] for name, t in times.items()},
        **_settings(),
        "load_average": load_average(),
    }


def compare_impl(args: argparse.Namespace) -> dict[str, Any]:
    """``--compare-impl FIELD``: the task with FIELD ``"xla"`` and ``"cpu"`` in one process, alternating;
    ``speedup`` is the xla median over the cpu median."""
    field = args.compare_impl
    kwargs = _task_kwargs(args)
    tasks = {
        value: build_task(
            args.config, args.what, args.batch, **(kwargs | {"impls": impls_of(args) | {field: value}})
        )
        for value in ("xla", "cpu")
    }
    return {"field": field, **_alternate(args, tasks)}


def compare_xla_option(args: argparse.Namespace) -> dict[str, Any]:
    """``--compare-xla-option KEY=VALUE``: the task compiled without and with that XLA option in one
    process, alternating; ``speedup`` is the median without over the median with."""
    key, value = args.compare_xla_option.split("=", 1)
    kwargs = _task_kwargs(args)
    base = kwargs["compiler_options"] or {}
    tasks = {
        name: build_task(
            args.config, args.what, args.batch, **(kwargs | {"compiler_options": options or None})
        )
        for name, options in (("without", base), ("with", base | {key: value}))
    }
    return {"option": args.compare_xla_option, **_alternate(args, tasks)}


def serve(args: argparse.Namespace) -> None:
    """Worker mode for the suite: build the task, say ready, then time one call per ``run`` line."""
    task = build_task(args.config, args.what, args.batch, **_task_kwargs(args))
    for _ in range(args.warmup):
        task.run()
    info = {"compile_s": task.compile_s, "flops": task.flops, "params": task.params, **task.info}
    print(json.dumps({"ready": info}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        seconds, cpu_seconds = time_once(task)
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds}), flush=True)


class Worker:
    """A benchmark process that times one repetition whenever asked (so two can alternate)."""

    def __init__(self, command: list[str], *, cwd: pathlib.Path = ROOT, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd, env=env
        )
        self.info = self._read()["ready"]

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.proc.args} exited with {self.proc.wait()}.")
        return json.loads(line)

    def time_once(self) -> tuple[float, float]:
        """Wall and CPU seconds of one repetition, timed in the worker."""
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        reply = self._read()
        return reply["seconds"], reply["cpu_seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _flag_args(args: argparse.Namespace) -> list[str]:
    out = [
        *(f"--{field.replace('_', '-')}={value}" for field, value in impls_of(args).items()),
        f"--compute-dtype={args.compute_dtype}",
        f"--warmup={args.warmup}",
    ]
    return out + [f"--{name.replace('_', '-')}" for name, on in cpu_settings_of(args).items() if on]


def _baseline_worker(directory: pathlib.Path, serve_args: list[str]) -> Worker:
    """``--baseline``: the checkout at ``directory`` serving the same task with its own bench.py."""
    env = os.environ | {"PYTHONPATH": str(directory)}
    command = [sys.executable, str(directory / "benchmarks" / "bench.py"), "--serve", *serve_args]
    return Worker(command, cwd=directory, env=env)


def _describe_checkout(directory: pathlib.Path) -> str:
    commit = subprocess.run(
        ["git", "-C", str(directory), "log", "-1", "--format=%h"], capture_output=True, text=True
    ).stdout.strip()
    return f"diffax at {directory} ({f'commit {commit}' if commit else 'not a git checkout'})"


def run_suite(args: argparse.Namespace) -> str:
    """Every task on both configs, each repetition alternating with the peer (or ``--baseline``); returns
    the markdown table."""
    peer = PEER_PYTHON.exists() and PEER_RUNNER.exists() and not args.no_peer
    peak_before = matmul_peak()
    rows, peer_info = [], {}
    if args.baseline:
        peer_info = {"checkout": _describe_checkout(args.baseline)}
    for config in args.configs:
        for what, batch in SUITE:
            if what not in args.tasks:
                continue
            common = ["--config", config, "--what", what, "--batch", str(batch)]
            steps = args.steps_per_call if what == "train" else 1
            serve_args = [*common, *_flag_args(args), f"--steps-per-call={steps}"]
            mine = Worker([sys.executable, __file__, "--serve", *serve_args])
            peer_cmd = [
                str(PEER_PYTHON),
                str(PEER_WORKER),
                str(PEER_RUNNER),
                *common,
                f"--threads={args.peer_threads or args.cores or 0}",
            ]
            if args.baseline:
                theirs = _baseline_worker(args.baseline, serve_args)
            else:
                theirs = Worker(peer_cmd) if peer else None
                peer_info = theirs.info if theirs is not None else peer_info
            if theirs is not None and theirs.info["params"] != mine.info["params"]:
                raise RuntimeError(
                    f"{config}: diffax has {mine.info['params']} parameters, the other side"
                    f" {theirs.info['params']}."
                )
            timings: dict[str, list[tuple[float, float]]] = {"diffax": [], "peer": []}
            loads = []
            for r in range(args.repeats):
                order = [("diffax", mine), ("peer", theirs)]
                for name, worker in order[:: 1 if r % 2 == 0 else -1]:
                    if worker is not None:
                        time.sleep(args.gap)
                        timings[name].append(worker.time_once())
                loads.append(load_average())
            for worker in (mine, theirs):
                if worker is not None:
                    worker.close()
            rows.append(_row(config, what, batch, mine.info, timings, loads))
            print(json.dumps(rows[-1]), flush=True)
    peak_after = matmul_peak()
    return _markdown(args, rows, peak_before, peak_after, peer_info)


def _row(config, what, batch, info, timings, loads) -> dict[str, Any]:
    """One table row from each side's (wall, CPU) seconds per repetition."""
    row = {"config": config, "what": what, "batch": batch}
    for side, side_timings in timings.items():
        if side_timings:
            row.update({f"{side}_{key}": value for key, value in timing_stats(side_timings).items()})
    row.update(compile_s=info["compile_s"], gflop=info["flops"] / 1e9, load=statistics.median(loads))
    if "peer_s" in row:
        row.update(ratio=row["peer_s"] / row["diffax_s"], cpu_ratio=row["peer_cpu_s"] / row["diffax_cpu_s"])
    return row


def _mib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / (1 << 20):g} MiB"


def _markdown(args, rows, peak_before, peak_after, peer_info) -> str:
    peak = max(peak_before["peak_gflops"], peak_after["peak_gflops"])
    other = "baseline" if args.baseline else "peer"  # who the ratios are against
    if args.baseline:
        other_line = f"Baseline: {peer_info['checkout']}, served with the same flags."
    elif peer_info:
        other_line = f"Peer: {peer_info['versions']}, {peer_info['threads']} threads."
    else:
        other_line = "Peer: not run."
    settings = _settings()
    impls = ", ".join(f"{field.removesuffix('_impl')}={value}" for field, value in impls_of(args).items())
    lines = [
        f"# diffax vs {'a baseline' if args.baseline else 'diffusers'}, {datetime.date.today().isoformat()}",
        "",
        f"Command: `python benchmarks/bench.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {settings['cpu']}, {settings['cores']} cores, L2 {_mib(settings['l2_cache_bytes'])} per"
        f" core; jax {settings['jax']} / jaxlib"
        f" {settings['jaxlib']}; XLA_FLAGS: `{' '.join(settings['xla_flags']) or '(none)'}`; diffax.perf"
        f" settings: {', '.join(settings['cpu_settings']) or 'none'}; impls: {impls}, compute dtype"
        f" {args.compute_dtype}, train steps per call {args.steps_per_call}, fused CPU"
        f" attention kernel {'built' if settings['cpu_attention_kernel'] else 'not built'}, XLA attention"
        f" blocks {_mib(settings['attention_block_bytes'])} of scores.",
        f"float32 matmul peak (2048², median GFLOP/s) before: numpy {peak_before['numpy_gflops']}, XLA"
        f" {peak_before['xla_gflops']}; after: numpy {peak_after['numpy_gflops']}, XLA"
        f" {peak_after['xla_gflops']}; % peak below uses {peak}.",
        other_line,
        f"Repetitions: {args.repeats} per side, alternating with the {other}, {args.gap} s idle before each;"
        f" medians (min in parentheses). Speed ratio = {other} time / diffax time (> 1: diffax faster)."
        f" CPU ratio = {other} CPU seconds / diffax CPU seconds (all threads; > 1: diffax does the work in"
        f" less CPU time); cores busy = CPU seconds per wall second, diffax / {other}.",
        "",
        f"| config | task | batch | diffax s | {other} s | speed ratio | CPU ratio | cores busy |"
        " diffax img/s | GFLOP (XLA) | GFLOP/s | % peak | compile s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        achieved = r["gflop"] / r["diffax_s"]
        peer_s = f"{r['peer_s']:.3f} ({r['peer_min_s']:.3f})" if "peer_s" in r else "-"
        ratio = f"{r['ratio']:.2f}×" if "ratio" in r else "-"
        cpu_ratio = f"{r['cpu_ratio']:.2f}×" if "cpu_ratio" in r else "-"
        busy = f"{r['diffax_cores_busy']:.2f}" + (f" / {r['peer_cores_busy']:.2f}" if "peer_s" in r else "")
        lines.append(
            f"| {r['config']} | {r['what']} | {r['batch']} | {r['diffax_s']:.3f} ({r['diffax_min_s']:.3f}) |"
            f" {peer_s} | {ratio} | {cpu_ratio} | {busy} | {r['batch'] / r['diffax_s']:.2f} |"
            f" {r['gflop']:.1f} | {achieved:.0f} |"
            f" {100 * achieved / peak:.0f}% | {r['compile_s']:.1f} | {r['load']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--what", choices=TASKS, default="train")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gap", type=float, default=0.5, help="idle seconds before each timed repetition")
    add_impl_args(p)
    p.add_argument(
        "--compare-impl", choices=IMPL_FIELDS, help="time this switch's xla and cpu forms alternately"
    )
    p.add_argument(
        "--compare-xla-option",
        metavar="KEY=VALUE",
        help="time the train or forward program compiled without and with this XLA option alternately",
    )
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps-per-call", type=int, default=1, help="train steps per jitted call (lax.scan)")
    add_cpu_settings_args(p)
    p.add_argument(
        "--xla-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="XLA compile option for the train/forward program, e.g. "
        "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    )
    p.add_argument("--suite", action="store_true", help="every task, both configs, alternating with the peer")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS, reverse=True))
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=TASKS, help="suite: the tasks to run")
    p.add_argument("--no-peer", action="store_true", help="suite without the peer")
    p.add_argument(
        "--baseline",
        type=pathlib.Path,
        help="suite: alternate with the diffax checkout at this directory instead of the peer",
    )
    p.add_argument(
        "--peer-threads", type=int, default=0, help="suite: torch threads (0: --cores, else torch's default)"
    )
    p.add_argument(
        "--cores",
        type=int,
        default=0,
        help="run on the first N CPUs this process may use (the peer's worker too, with N threads); 0: all",
    )
    p.add_argument("--out", type=pathlib.Path, help="suite: markdown file (default results/<date>.md)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.steps_per_call < 1:
        p.error("--batch, --repeats and --steps-per-call must be positive.")
    allowed = len(os.sched_getaffinity(0))
    if not 0 <= args.cores <= allowed:
        p.error(
            f"--cores {args.cores}: this process may use {allowed} CPUs; pass 1 to {allowed}, or 0 for all."
        )
    if any("=" not in option for option in args.xla_option):
        p.error("--xla-option takes KEY=VALUE.")
    if args.baseline and not (args.baseline / "benchmarks" / "bench.py").is_file():
        p.error(f"--baseline {args.baseline}: no benchmarks/bench.py there; pass a diffax checkout.")
    if args.suite and args.xla_option:
        p.error("--xla-option is for single measurements of train or forward, not --suite.")
    if args.suite and (args.compare_impl or args.compare_xla_option):
        p.error("--compare-impl and --compare-xla-option are single measurements, not --suite.")
    if args.compare_impl and args.compare_xla_option:
        p.error("--compare-impl and --compare-xla-option: pass one of them.")
    if args.compare_xla_option and "=" not in args.compare_xla_option:
        p.error("--compare-xla-option takes KEY=VALUE.")
    if (
        (args.xla_option or args.compare_xla_option)
        and not args.suite
        and args.what not in ("train", "forward")
    ):
        p.error(
            f"--xla-option and --compare-xla-option apply to --what train or forward, not {args.what} "
            "(diffax.sample compiles its own program)."
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Before anything starts a JAX backend (XLA sizes its thread pool from the CPUs it may use).
    if args.cores:
        pin_cores(args.cores)
    perf.configure_cpu(**cpu_settings_of(args))
    if args.serve:
        serve(args)
    elif args.suite:
        table = run_suite(args)
        out = args.out or ROOT / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        print(table)
    elif args.compare_impl:
        print(json.dumps(compare_impl(args)))
    elif args.compare_xla_option:
        print(json.dumps(compare_xla_option(args)))
    else:
        print(json.dumps(measure_one(args)))


if __name__ == "__main__":
    main()
