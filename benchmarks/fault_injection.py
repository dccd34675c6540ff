"""Fault injection: kill a training run at random points, restart it each time, and report what was lost.

A run of the tiny mixture experiment (``python -m diffax.main --config=experiments/mixture.py``) is
interrupted again and again: SIGKILL the moment an asynchronous checkpoint write starts (its temporary
directory appears while an earlier checkpoint is complete), SIGKILL at a random delay, SIGKILL just
after a checkpoint is committed, or SIGTERM (preemption) 1 to 3 steps after the restart.
After each one the same command is rerun. The report gives, per save mode: interruptions tried, how
many landed in the middle of a checkpoint write, restarts, clean exits after SIGTERM, whether each
restart restored exactly the newest complete checkpoint on disk, the steps lost per kill (steps
reported done minus the step restored), whether any checkpoint came out damaged, and whether the final
parameters equal those of an uninterrupted run bit for bit (which they can only do if no example was
lost, repeated or reordered).

Steps lost are bounded by the save interval when saves are synchronous. An asynchronous save of step
``s`` is committed while steps ``s + 1, ...`` run, and the save of ``s + every`` waits for it, so a kill
just before that commit loses up to twice the interval. SIGTERM loses nothing.

Run (about 10 minutes on 2 CPU cores):
  python benchmarks/fault_injection.py --kills=12

``tests/reliability/test_kill_anywhere.py`` runs the same harness with two interruptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = ("during_save", "random", "after_save", "sigterm")
_PROGRESS = re.compile(r"\bstep (\d+)/\d+ \(")
_RESTORED = re.compile(r"restored step (\d+) from|initialised \d+ parameters")
_PARTIAL = ".orbax-checkpoint-tmp"  # Orbax's suffix for a checkpoint directory being written


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now: the coordinator port of child processes joined through it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(num_devices: int = 8) -> dict[str, str]:
    """Environment of a child run: ``num_devices`` fake CPU devices, this process's other XLA flags, the
    test compile cache, the repo."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/diffax-test-jax"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def command(workdir: os.PathLike, overrides: Mapping[str, object]) -> list[str]:
    """``python -m diffax.main`` on the mixture experiment with ``--config.<key>=<value>`` overrides."""
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]
    config = REPO / "experiments" / "mixture.py"
    return [sys.executable, "-m", "diffax.main", f"--config={config}", f"--workdir={workdir}", *flags]


def mixture_config(overrides: Mapping[str, object]) -> ml_collections.ConfigDict:
    """The config :func:`command` runs, for an in-process ``diffax.train.train_and_evaluate``."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from experiments import mixture

    config = mixture.get_config()
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


class _Child:
    """A training process whose stderr is followed line by line (steps reported, step restored)."""

    def __init__(self, workdir: pathlib.Path, overrides: Mapping[str, object], env: dict[str, str]):
        self.proc = subprocess.Popen(
            command(workdir, overrides),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.steps_done = 0
        self.restored: int | None = None
        self.started = threading.Event()  # set once the state is initialised or restored
        self.tail: list[str] = []
        self._reader = threading.Thread(target=self._follow, daemon=True)
        self._reader.start()

    def _follow(self) -> None:
        for line in self.proc.stderr:
            self.tail = [*self.tail[-40:], line]
            if progress := _PROGRESS.search(line):
                self.steps_done = int(progress.group(1))
            elif restored := _RESTORED.search(line):
                self.restored = int(restored.group(1)) if restored.group(1) else None
                self.steps_done = self.restored or 0  # done so far, counting those restored
                self.started.set()

    def finish(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        self._reader.join()
        return code


def complete_steps(workdir: pathlib.Path) -> list[int]:
    """The steps Orbax lists as complete: directories named by a step number."""
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _partial_saves(workdir: pathlib.Path) -> set[tuple[str, int]]:
    """(name, inode) of every checkpoint directory still being written (a rewrite gets a new inode)."""
    directory = workdir / "checkpoints"
    if not directory.exists():
        return set()
    return {(e.name, e.inode()) for e in os.scandir(directory) if _PARTIAL in e.name}


def _damaged(workdir: pathlib.Path) -> list[str]:
    directory = workdir / "checkpoints"
    return [p.name for p in directory.iterdir() if ".damaged" in p.name] if directory.exists() else []


@dataclasses.dataclass
class Kill:
    """One SIGKILL and the restart after it."""

    mode: str  # one of MODES: SIGKILL at a checkpoint write / a random delay / a commit, or SIGTERM
    steps_done: int  # steps the run had done (restored or reported) when it was killed
    newest_complete: int | None  # the newest complete checkpoint on disk after the kill
    interrupted_save: bool  # a checkpoint directory was left half-written
    exit_code: int  # -9 for SIGKILL; 0 expected after SIGTERM (a final save, then a clean exit)
    restored: int | None = None  # the step the next run restored (None: it started afresh)

    @property
    def steps_lost(self) -> int:
        return self.steps_done - (self.restored or 0)


def _kill_trigger(
    mode: str, child: _Child, workdir: pathlib.Path, partial_before: set, rng: random.Random
) -> Callable[[], bool]:
    """A predicate that turns true at the moment to kill ``child``."""
    if mode == "during_save":  # a write that starts when an earlier checkpoint is complete
        return lambda: bool(_partial_saves(workdir) - partial_before) and bool(complete_steps(workdir))
    if mode == "after_save":
        complete_before = set(complete_steps(workdir))
        return lambda: bool(set(complete_steps(workdir)) - complete_before)
    if mode == "random":  # a delay counted from the restore (or initialisation) of the state
        delay, deadline = rng.uniform(0.0, 2.0), []

        def after_delay() -> bool:
            if not deadline and child.started.is_set():
                deadline.append(time.monotonic() + delay)
            return bool(deadline) and time.monotonic() >= deadline[0]

        return after_delay
    if mode == "sigterm":  # 1 to 3 steps after the restore (before, Python's default handling is active)
        steps = rng.randint(1, 3)
        return lambda: child.started.is_set() and child.steps_done >= (child.restored or 0) + steps
    raise ValueError(f"mode={mode!r}: use one of {MODES}.")


def run_with_kills(
    workdir: os.PathLike,
    overrides: Mapping[str, object],
    modes: Sequence[str],
    *,
    seed: int = 0,
    num_devices: int = 8,
    timeout: float = 300.0,
) -> list[Kill]:
    """Runs the mixture experiment in ``workdir``, interrupts it once per entry of ``modes``, and finishes it.

    Args:
      workdir: the run directory (new or empty).
      overrides: ``--config`` overrides (e.g. ``{"total_steps": 16, "ckpt.every_steps": 2}``); use
        ``log.every_steps=1`` so that every step done is reported.
      modes: one kill per entry, each of :data:`MODES`; when the run ends before a kill's moment
        comes, the remaining kills are dropped.
      seed: seeds the random delays.
      num_devices: fake CPU devices of each run.
      timeout: seconds allowed to each process.

    Returns:
      The kills made, each with the step the following run restored.

    Raises:
      RuntimeError: when a run fails or times out.
    """
    workdir, rng, env = pathlib.Path(workdir), random.Random(seed), child_env(num_devices)
    kills: list[Kill] = []
    for mode in [*modes, None]:  # None: the last run, which must finish
        partial_before = _partial_saves(workdir)
        child = _Child(workdir, overrides, env)
        trigger = _kill_trigger(mode, child, workdir, partial_before, rng) if mode else (lambda: False)
        deadline = time.monotonic() + timeout
        try:
            while child.proc.poll() is None and not trigger():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"run timed out:\n{''.join(child.tail)}")
                time.sleep(0.001)
        except BaseException:  # a timeout or an interrupted harness leaves no run behind
            child.proc.kill()
            child.finish()
            raise
        killed = child.proc.poll() is None
        if killed:
            child.proc.send_signal(signal.SIGTERM if mode == "sigterm" else signal.SIGKILL)
        code = child.finish()
        if kills:
            kills[-1].restored = child.restored  # this run restarted after the previous kill
        if killed:
            newest = complete_steps(workdir)
            interrupted = bool(_partial_saves(workdir) - partial_before)
            kills.append(Kill(mode, child.steps_done, newest[-1] if newest else None, interrupted, code))
        elif code != 0:
            raise RuntimeError(f"run failed:\n{''.join(child.tail)}")
        else:
            return kills
    raise AssertionError("unreachable: the last run has no kill")


def final_state(workdir: os.PathLike) -> tuple[object, int]:
    """The newest checkpoint of a finished run on the host, and its step."""
    from diffax import checkpoint, sharding, train_state
    from diffax import config as config_lib

    config = config_lib.load(str(workdir))
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    state, step = checkpoint.restore_latest(str(workdir), config, train_state.build(config), mesh=mesh)
    return jax.device_get(state), step


def bitwise_equal(a: object, b: object) -> bool:
    """Whether two pytrees have the same structure and the same bytes in every leaf."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def report_row(
    label: str, kills: Sequence[Kill], *, every: int, async_save: bool, equal: bool, damaged: Sequence[str]
) -> str:
    """One markdown table row summarising an interrupted run (see :data:`HEADER`)."""
    sigkills = [k for k in kills if k.mode != "sigterm"]
    sigterms = [k for k in kills if k.mode == "sigterm"]
    lost = [k.steps_lost for k in sigkills]
    exact = sum(k.restored == k.newest_complete for k in kills)
    return (
        f"| {label} | {len(sigkills)} | {sum(k.interrupted_save for k in sigkills)} |"
        f" {sum(k.exit_code == 0 and k.steps_lost == 0 for k in sigterms)}/{len(sigterms)} | {len(kills)} |"
        f" {exact}/{len(kills)} | {max(lost, default=0)} / {np.mean(lost) if lost else 0:.1f} |"
        f" {2 * every if async_save else every} | {'none' if equal and not damaged else 'YES'} |"
        f" {'yes' if equal else 'NO'} |"
    )


HEADER = (
    "| saves | SIGKILLs | SIGKILLs mid-write | SIGTERMs: exit 0, nothing lost | restarts |"
    " restored = newest complete | steps lost per SIGKILL (max / mean) | bound | data lost |"
    " final params bitwise equal |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12, help="interruptions per save mode")
    parser.add_argument("--total_steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=4, help="checkpoint interval (steps)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    overrides = {"total_steps": args.total_steps, "ckpt.every_steps": args.every, "log.every_steps": 1}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = pathlib.Path(tmp) / "reference"
        run_with_kills(reference, overrides, modes=())  # uninterrupted; saving does not change the params
        ref_state, ref_step = final_state(reference)
        for async_save in (True, False):
            label = "async" if async_save else "sync"
            modes = [MODES[i % len(MODES)] for i in range(args.kills)]
            random.Random(args.seed).shuffle(modes)
            killed = pathlib.Path(tmp) / label
            start = time.perf_counter()
            kills = run_with_kills(killed, overrides | {"ckpt.async_save": async_save}, modes, seed=args.seed)
            seconds = time.perf_counter() - start
            state, step = final_state(killed)
            for k in kills:
                print(
                    f"{label}: {k.mode:11s} after {k.steps_done:3d} steps"
                    f" | newest complete {k.newest_complete} | mid-write {k.interrupted_save}"
                    f" | exit {k.exit_code} | restored {k.restored} | lost {k.steps_lost}"
                )
            print(f"{label}: {len(kills)} interruptions and restarts in {seconds:.0f} s")
            equal = step == ref_step and bitwise_equal(state, ref_state)
            damaged = _damaged(killed)
            rows.append(
                report_row(
                    label, kills, every=args.every, async_save=async_save, equal=equal, damaged=damaged
                )
            )
    print(
        f"\nmixture experiment, {args.total_steps} steps, a checkpoint every {args.every} steps; SIGKILL as a"
        " checkpoint write starts / at a random delay / after a commit, SIGTERM 1-3 steps after a restart:\n"
    )
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
