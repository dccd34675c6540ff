"""Progressive distillation (Salimans & Ho 2022): a student learns to take one DDIM step where its teacher
takes two, then becomes the teacher of a student with half as many steps.

On an N-step uniform grid of the schedule's time, t = i / N, t' = t - 1 / (2N), t'' = t - 1 / N, the teacher
takes two DDIM steps z_t -> z_t' -> z_t'' (diffax's ``"ddim"`` sampler step) and the target is the data
prediction that makes one DDIM step of the student land on z_t'' (Alg. 2):

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

which is z_t'' / alpha_t'' where sigma_t'' = 0. The loss is the truncated-SNR weighted error
max(alpha_t^2 / sigma_t^2, 1) ||x^ - x~||^2 on the student's data prediction (Sec. 4, "truncated SNR").

References: Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models",
Alg. 2, eq. 8-10, Sec. 4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from diffax.process import broadcast_to_data
from diffax.schedules import Schedule

__all__ = [
    "distillation_target",
    "num_stages",
    "num_student_steps",
    "stage_ends",
    "stage_index",
    "truncated_snr_weight",
]


def num_stages(initial_steps: int, final_steps: int) -> int:
    """How many students halve ``initial_steps`` down to ``final_steps`` (powers of two), both included:
    64 -> 1 is 7 stages."""
    return (initial_steps // final_steps).bit_length()


def stage_ends(steps_per_stage: int | Sequence[int], num_stages: int) -> tuple[int, ...]:
    """The training step at which each of ``num_stages`` stages ends: the running sums of the stage
    lengths, ``steps_per_stage`` for every stage or one length per stage."""
    lengths = (steps_per_stage,) * num_stages if isinstance(steps_per_stage, int) else steps_per_stage
    return tuple(int(end) for end in np.cumsum(lengths))


def stage_index(step: ArrayLike, steps_per_stage: int | Sequence[int]) -> jax.Array:
    """The stage of training step ``step`` (int32): ``step // steps_per_stage`` for one length; for one
    length per stage, the number of stages ended at or before ``step`` (past the last: the stage count)."""
    step = jnp.asarray(step, jnp.int32)
    if isinstance(steps_per_stage, int):
        return step // steps_per_stage
    ends = jnp.asarray(stage_ends(steps_per_stage, len(steps_per_stage)), jnp.int32)
    return jnp.searchsorted(ends, step, side="right").astype(jnp.int32)


def num_student_steps(
    step: ArrayLike, *, initial_steps: int, steps_per_stage: int | Sequence[int], final_steps: int
) -> jax.Array:
    """N of the stage that training step ``step`` belongs to: ``initial_steps`` halved once per stage
    (see ``stage_index``), never below ``final_steps`` (int32)."""
    stage = stage_index(step, steps_per_stage)
    return jnp.maximum(jnp.right_shift(jnp.int32(initial_steps), jnp.minimum(stage, 30)), final_steps)


def distillation_target(
    teacher_model: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    z_t: jax.Array,
    t: jax.Array,
    num_steps: ArrayLike,
    *,
    prediction: str,
    t_max: float = 1.0,
) -> jax.Array:
    """x~ for a batch: two teacher DDIM steps from each example's t (shape (batch,)) on the ``num_steps``
    grid t_max i / N, then the data prediction whose single DDIM step from t lands there (Alg. 2).

    ``teacher_model(x, t)`` is the teacher network at batch size 1 (the steps run per example, under vmap).
    """
    from diffax.samplers import get, make_denoiser

    ddim = get("ddim")
    denoise = make_denoiser(teacher_model, schedule, prediction=prediction)
    half = 0.5 * t_max / jnp.asarray(num_steps, jnp.float32)

    def one(z, t1):
        t_mid, t_end = t1 - half, jnp.maximum(t1 - 2.0 * half, 0.0)
        x = z[None]
        x_mid, _, _ = ddim.step(denoise, schedule, x, (), 0, t1, t_mid, None)
        x_end, _, _ = ddim.step(denoise, schedule, x_mid, (), 1, t_mid, t_end, None)
        return x_end[0], t_end

    z_end, t_end = jax.vmap(one)(z_t, t)
    b = lambda c: broadcast_to_data(c, z_t).astype(z_t.dtype)
    ratio = schedule.sigma(t_end) / schedule.sigma(t)
    return (z_end - b(ratio) * z_t) / b(
        schedule.alpha(t_end) - ratio * schedule.alpha(t)
    )  # sigma'' = 0: z'' / alpha''


def truncated_snr_weight(schedule: Schedule, t: ArrayLike) -> jax.Array:
    """max(SNR(t), 1): the x-loss weight of Salimans & Ho 2022, Sec. 4."""
    return jnp.maximum(jnp.exp(schedule.log_snr(t)), 1.0)
