"""Progressive distillation against exact answers: with the exact teacher of an analytic mixture, the
target makes one student DDIM step land where two teacher DDIM steps land, on any schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import samplers, schedules
from diffax.fewstep import progressive
from diffax.samplers.exact import toy_mixture

MIXTURE = toy_mixture()


@pytest.mark.parametrize("name, kwargs", [("vp_linear", {}), ("cosine", {"num_timesteps": 1000})])
def test_one_student_step_lands_on_two_teacher_steps(name, kwargs):
    schedule = schedules.get(name, **kwargs)
    teacher = MIXTURE.model_fn(schedule, prediction="eps")
    num_steps = 4
    for i in (4, 2, 1):  # from t = 1 (pure noise on vp_linear) down to the last step, which ends at t = 0
        t = i / num_steps
        z_t = jax.random.normal(jax.random.key(i), (256, 2)) * float(schedule.sigma(t)) + float(
            schedule.alpha(t)
        )
        target = jax.jit(
            lambda z, t: progressive.distillation_target(teacher, schedule, z, t, num_steps, prediction="eps")
        )(z_t, jnp.full((256,), t))
        student = lambda x, s, target=target: target  # a perfect student: its x_0 prediction is the target
        end = max(t - 1 / num_steps, 0.0)
        one = samplers.sample(
            student, schedule, z_t, sampler="ddim", timesteps=jnp.array([t, end]), prediction="x0"
        )
        two = samplers.sample(
            teacher, schedule, z_t, sampler="ddim", timesteps=jnp.array([t, t - 0.5 / num_steps, end])
        )
        scale = float(jnp.max(jnp.abs(two)))
        np.testing.assert_allclose(one, two, rtol=0, atol=2e-6 * max(scale, 1.0), err_msg=f"{name} i={i}")


def test_stages_halve_and_weights_truncate():
    steps = np.array([0, 99, 100, 250, 399, 10_000])
    n = progressive.num_student_steps(steps, initial_steps=64, steps_per_stage=100, final_steps=4)
    np.testing.assert_array_equal(n, [64, 64, 32, 16, 8, 4])
    # One length per stage: 64 for 50 updates, 32 for 50, 16 for 100, 8 for 200, 4 for 300 (ends 50..700).
    lengths = (50, 50, 100, 200, 300)
    assert progressive.stage_ends(lengths, 5) == (50, 100, 200, 400, 700)
    assert progressive.stage_ends(100, 3) == (100, 200, 300)
    steps = np.array([0, 49, 50, 99, 100, 199, 200, 399, 400, 699, 700, 10_000])
    n = progressive.num_student_steps(steps, initial_steps=64, steps_per_stage=lengths, final_steps=4)
    np.testing.assert_array_equal(n, [64, 64, 32, 32, 16, 16, 8, 8, 4, 4, 4, 4])
    stages = progressive.stage_index(steps, lengths)
    np.testing.assert_array_equal(stages, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    # Equal lengths given per stage are the single length, step by step, under jit.
    steps = np.arange(0, 700)
    np.testing.assert_array_equal(
        jax.jit(lambda s: progressive.stage_index(s, (100,) * 7))(steps),
        progressive.stage_index(steps, 100),
    )
    schedule = schedules.get("vp_linear")
    t = jnp.array([0.01, 0.5, 0.99])
    snr = np.exp(np.asarray(schedule.log_snr(t)))
    np.testing.assert_allclose(progressive.truncated_snr_weight(schedule, t), np.maximum(snr, 1.0), rtol=1e-6)
