"""The training loop: config → mesh → data → model/optimizer → sharded state → restore → step → hooks.

Read top to bottom, :func:`train_and_evaluate` is the whole run. Restart order: the newest complete
checkpoint (Orbax) whose files match their digests gives the state and its step ``s`` (a damaged newer
one is reported and set aside, see ``diffax.checkpoint``); the input pipeline is put back at ``s``
(step-derived sources need nothing, tfds restores its iterator); the loop continues with the batch of
step ``s``. The result equals an uninterrupted run's, bit for bit on the same devices.
"""

import functools
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffax import (
    checkpoint,
    data,
    generate,
    latent,
    mfu,
    nonfinite,
    posthoc_ema,
    sharding,
    summaries,
    train_state,
)
from diffax import config as config_lib
from diffax import evaluate as evaluate_lib


class _Preemption:
    """Remembers a SIGTERM so the loop can save and stop between steps; all processes agree on it."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping.")
        self.requested = True

    def agreed(self, step: int) -> bool:
        """Whether to stop after ``step``. Several processes compare notes every 10 steps (a host
        round trip), so they all stop after the same step."""
        if jax.process_count() == 1:
            return self.requested
        if step % 10:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

    def restore_handler(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def _report(
    stacked: dict[str, np.ndarray],
    done: int,
    total: int,
    steps: int,
    seconds: float,
    *,
    batch_size: int,
    flops_per_step: float,
    peak_flops: float | None,
) -> dict[str, float]:
    """Scalars for TensorBoard over a window of ``steps`` steps, and the console progress line.

    ``flops_per_step`` (one device's, ``diffax.mfu.step_flops``) and the device's ``peak_flops`` give
    ``tflops_per_device`` and ``mfu``."""
    scalars = nonfinite.window_means(stacked)  # over the updates applied; "skipped" is a count
    scalars["lr"] = float(stacked["lr"][-1])
    line = f"step {done}/{total} ({100.0 * done / total:.0f}%) | loss {scalars['loss']:.4f}"
    line += f" | grad norm {scalars['grad_norm']:.3f}"
    if scalars.get("skipped"):
        line += f" | skipped {scalars['skipped']:.0f} non-finite updates"
    if steps > 0:
        rate = steps / max(seconds, 1e-9)
        scalars |= {"steps_per_sec": rate, "images_per_sec": rate * batch_size}
        scalars |= mfu.utilization(flops_per_step, steps, seconds, peak_flops)
        line += f" | {rate:.2f} steps/s | {scalars['tflops_per_device']:.3g} TFLOP/s/device"
        if "mfu" in scalars:
            line += f" (MFU {100.0 * scalars['mfu']:.1f}%)"
        line += f" | ETA {_format_seconds((total - done) / rate)}"
    logging.info("%s", line)
    return scalars


class _MetricWindow:
    """Per-step metrics since the last report, fetched (and checked for non-finite values) on demand."""

    def __init__(self, first_step: int):
        self.first_step = first_step
        self.metrics: list[dict[str, jax.Array]] = []

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.metrics.append(metrics)

    def check(self) -> dict[str, np.ndarray]:
        """Stacks the window's metrics on the host; raises ``FloatingPointError`` naming a bad step."""
        if not self.metrics:
            return {}
        host = jax.device_get(self.metrics)
        stacked = {k: np.stack([m[k] for m in host]) for k in host[0]}
        nonfinite.check(stacked, first_step=self.first_step)  # non-finite loss or gradient, not skipped
        self.first_step += len(host)
        self.metrics = []
        return stacked


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, devices: list[Any] | None = None
) -> train_state.TrainState:
    """Trains (or resumes) the run ``config`` describes in ``workdir``.

    Args:
      config: the experiment config (``diffax.config.base_config`` with overrides).
      workdir: run directory: config, checkpoints, TensorBoard events, ``samples/``.
      devices: the mesh's devices (default: all devices of all processes).

    Returns:
      The final train state (after ``config.total_steps`` updates, or at preemption).

    Raises:
      diffax.config.ConfigError: for an invalid config or workdir, before anything compiles.
      FloatingPointError: for a non-finite loss or gradient, naming the step (unless
        ``config.optim.skip_nonfinite``, see ``diffax.nonfinite``).
      diffax.checkpoint.CheckpointWriteError: when a checkpoint cannot be written (disk full, no
        permission), naming the step; the earlier checkpoints stay intact.
    """
    # Everything that can be wrong with the config fails here, in one line, before compiling.
    config_lib.validate(config, workdir=workdir, devices=devices)
    config = latent.with_scale(config)  # a latent run records its scale in config.json
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    batch_sharding = sharding.batch_sharding(mesh)
    config_lib.save(config, workdir)
    logging.info(
        "mesh %s over %d processes; global batch %d",
        dict(mesh.shape),
        jax.process_count(),
        config.input.batch_size,
    )

    # Input, model, loss, optimizer.
    pipeline = data.make_pipeline(config.input, seed=config.seed, latent_scale=config.vae.scale)
    parts = train_state.build(config)
    if parts.trainer is not None:  # e.g. reflow trains on its pair set
        pipeline = parts.trainer.input_pipeline(pipeline)

    # State: shapes and logical axes first, then shardings from the rules, then the real state.
    import diffax.models as models

    init_fn = train_state.state_initializer(config, parts)
    abstract = jax.eval_shape(init_fn)
    state_shardings = sharding.logical_shardings(abstract, mesh, models.LOGICAL_AXIS_RULES)
    ckpt = checkpoint.Checkpointer(
        workdir,
        every_steps=config.ckpt.every_steps,
        keep=config.ckpt.keep,
        async_save=config.ckpt.async_save,
        milestones=() if parts.trainer is None else parts.trainer.stage_ends(),
    )
    target = checkpoint.abstract_with_shardings(nn.meta.unbox(abstract), state_shardings)
    state, latest = ckpt.restore_latest_intact(target, pipeline)  # damaged newer ones are set aside
    if latest is None:
        state = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=state_shardings)()
        state = train_state.start(state, parts)  # e.g. a distilled student starts at its teacher
        logging.info("initialised %d parameters", sum(x.size for x in jax.tree.leaves(state.params)))
    else:
        logging.info("restored step %d from %s", latest, ckpt.directory)

    train_step = train_state.config_train_step(config, parts)
    if config.optim.skip_nonfinite:
        train_step = nonfinite.skip_nonfinite_updates(train_step)
    jitted_step = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    step_fn = sharding.under_mesh(mesh, jitted_step)
    peak_flops = mfu.peak_flops(jax.devices()[0])
    sample_fn = generate.make_sampler(config, parts, mesh=mesh)
    sampler = functools.partial(generate.sample_images, sample_fn, config=config)
    evaluate = evaluate_lib.make_evaluation(config, sample_fn)

    # TensorBoard events from process 0; the console gets the progress line of _report.
    writer = summaries.scalar_writer(workdir)
    preemption = _Preemption()
    start = int(state.step)
    total = config.total_steps
    window = _MetricWindow(start)
    log_every = config.log.every_steps
    tick, tick_step = time.perf_counter(), start
    try:
        for step in range(start, total):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = data.to_global(pipeline.get(step), batch_sharding)
                if step == start:  # compiles the step (its calls reuse the executable); its FLOPs/device
                    with jax.set_mesh(mesh):
                        flops_per_step = mfu.step_flops(jitted_step.lower(state, batch).compile())
                    if config.optim.accum_steps > 1 or config.model.get("scan_blocks"):
                        logging.warning("MFU: XLA counts a loop body once (accum_steps, scan_blocks): low.")
                state, metrics = step_fn(state, batch)
            window.add(metrics)
            done = step + 1

            if done == start + 1:  # the first step includes compilation: time it apart
                jax.block_until_ready(metrics)
                logging.info("first step (with compilation) took %.1f s", time.perf_counter() - tick)
                tick, tick_step = time.perf_counter(), done

            if done % log_every == 0 or done == total:
                scalars = _report(
                    window.check(),
                    done,
                    total,
                    done - tick_step,
                    time.perf_counter() - tick,
                    batch_size=config.input.batch_size,
                    flops_per_step=flops_per_step,
                    peak_flops=peak_flops,
                )
                summaries.write_scalars(writer, done, scalars)
                tick, tick_step = time.perf_counter(), done

            if config.log.sample_every_steps and (done % config.log.sample_every_steps == 0 or done == total):
                generate.write_sample_grid(sampler(state.sampling_params(), seed=done), workdir, done)
            if config.log.eval_every_steps and (done % config.log.eval_every_steps == 0 or done == total):
                metrics = evaluate(state.sampling_params(), step=done)
                summaries.write_scalars(writer, done, {f"eval/{k}": v for k, v in metrics.items()})

            if preemption.agreed(done):
                window.check()
                ckpt.save(done, state, pipeline, force=True)
                posthoc_ema.save_snapshot(workdir, done, state, config)
                logging.warning("preempted: saved step %d; rerun the same command to continue.", done)
                break
            if ckpt.should_save(done):
                window.check()  # never checkpoint a non-finite state
                ckpt.save(done, state, pipeline)
                posthoc_ema.save_snapshot(workdir, done, state, config)
        else:
            ckpt.save(total, state, pipeline, force=True)
            posthoc_ema.save_snapshot(workdir, total, state, config)
    finally:
        preemption.restore_handler()
        ckpt.close()
        if writer is not None:
            writer.close()
    return state


__all__ = ["train_and_evaluate"]
