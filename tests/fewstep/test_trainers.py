"""Few-step trainers in the one training loop: state, step, checkpoints, sampling, bad input."""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import app

from diffax import checkpoint, generate, train, train_state
from diffax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import digits_cd, digits_ect, digits_ict, digits_pd, mixture  # noqa: E402


def _consistency(config, **options):
    config.trainer = ml_collections.ConfigDict(
        dict(name="consistency", sigma_min=0.002, sigma_max=80.0, num_scales=6) | options
    )
    config.sampler = ml_collections.ConfigDict(
        dict(config_lib.base_config().sampler) | dict(name="consistency", steps=2)
    )
    return config


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        np.testing.assert_array_equal(x, y)


def _fake_teacher(path, config):
    os.makedirs(os.path.join(path, "checkpoints", "8"), exist_ok=True)
    config_lib.save(config, str(path))
    return str(path)


def test_experiment_files_validate_and_bad_teachers_get_one_line(tmp_path):
    """The iCT and CD experiments are valid configs; a teacher that is missing, of another data shape or
    schedule, or whose noise levels the student's cannot convert into, is named in one line."""
    config_lib.validate(digits_ict.get_config())
    teacher = _fake_teacher(tmp_path / "teacher", mixture.get_config())

    def student(**changes):
        config = _consistency(mixture.get_config(), target="teacher")
        config.teacher.workdir = teacher
        for field, value in changes.items():
            section, key = field.split(".")
            config[section][key] = value
        return config

    config_lib.validate(student())
    cases = {
        "teacher.workdir": (str(tmp_path / "nowhere"), "config.teacher.workdir: "),
        "input.image_size": (16, "config.input.image_size: the teacher's data shape has image_size=8"),
        "process.name": ("vp_cosine", "config.process.name: the teacher's schedule has name='vp_linear'"),
        "trainer.sigma_max": (
            500.0,
            "config.trainer.sigma_min: the levels [0.002, 500] (sigma/alpha) do not convert",
        ),
        "trainer.teacher_sampler": ("ddpm", "config.trainer.teacher_sampler: 'ddpm' is not a deterministic"),
        "trainer.distance": ("lpips", "config.trainer.distance: unknown 'lpips'"),
        "trainer.prediction": ("score", "config.trainer.prediction: unknown 'score'"),
    }
    for field, (value, message) in cases.items():
        with pytest.raises(config_lib.ConfigError) as error:
            config_lib.validate(student(**{field: value}))
        assert str(error.value).startswith(message) and "\n" not in str(error.value), (
            field,
            str(error.value),
        )
    cd = digits_cd.get_config()
    cd.teacher.workdir = _fake_teacher(
        tmp_path / "digits", ml_collections.ConfigDict(digits_cd.get_config().to_dict())
    )
    cd_teacher = config_lib.load(cd.teacher.workdir)
    cd_teacher.trainer.name = "diffusion"
    cd_teacher.model.conv_impl = "cpu"  # another formulation of the same network (runs/digits has these)
    config_lib.save(cd_teacher, cd.teacher.workdir)
    config_lib.validate(cd)
    pd = digits_pd.get_config()
    pd.teacher.workdir = cd.teacher.workdir
    config_lib.validate(pd)
    for lengths, message in (
        ((250,) * 6, "config.trainer.steps_per_stage: 64 -> 1 steps is 7 stages; give one length or 7"),
        ((250,) * 6 + (0,), "config.trainer.steps_per_stage: (250, 250, 250, 250, 250, 250, 0) must be"),
    ):
        pd.trainer.steps_per_stage = lengths
        with pytest.raises(config_lib.ConfigError) as error:
            config_lib.validate(pd)
        assert str(error.value).startswith(message), str(error.value)
    ect = digits_ect.get_config()
    ect.teacher.workdir = cd.teacher.workdir
    config_lib.validate(ect)  # data targets, started from the teacher run
    ect.model.dropout = 0.2  # regularises the student only: the same weights (ECT and iCT use dropout)
    config_lib.validate(ect)
    ect.model.dropout = 0.0
    ect.model.num_res_blocks += 1
    with pytest.raises(config_lib.ConfigError, match=r"^config.model.num_res_blocks: the teacher's network"):
        config_lib.validate(ect)
    ect.model.num_res_blocks -= 1
    ect.teacher.workdir = ""
    with pytest.raises(
        config_lib.ConfigError, match=r"^config.teacher.workdir: distillation needs a teacher"
    ):
        config_lib.validate(ect)
    cd.trainer.sigma_min = 0.002  # below t = 1/1000 of the cosine teacher
    with pytest.raises(
        config_lib.ConfigError, match=r"^config.trainer.sigma_min: .* set sigma_min >= 0.00642"
    ):
        config_lib.validate(cd)


@pytest.mark.slow
def test_distillation_runs_resumes_and_samples_in_few_steps(tmp_path):
    """A teacher run (the mixture's one-block DiT, the cheapest network to compile), then CD in the one
    loop: the student starts at the teacher (teacher weights frozen in its checkpoint), mu = 0 keeps the
    target equal to the online weights, and ``diffax.generate`` samples it with its own sampler; then PD,
    resumed at a stage boundary."""
    teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
    teacher_config = mixture.get_config("dit")
    teacher_config.total_steps = 2
    teacher_state = train.train_and_evaluate(teacher_config, teacher_dir)
    config = _consistency(mixture.get_config("dit"), target="teacher", teacher_sampler="euler")
    config.teacher.workdir = teacher_dir
    config.total_steps = 2
    state = train.train_and_evaluate(config, student_dir)
    teacher_ema = jax.device_get(teacher_state.sampling_params())
    _assert_same(state.teacher_params, teacher_ema)
    _assert_same(state.target_params, state.params)
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(teacher_ema), strict=True)
    )
    assert 0 < moved < 0.05
    run_config, sample_fn, params, step = generate.load_run(student_dir, steps=1)
    assert step == 2 and run_config.sampler.name == "consistency"
    one = generate.sample_images(sample_fn, params, config=run_config, seed=0, num_samples=4)[0]
    assert one.shape == (4, 8, 8, 1) and one.dtype == np.uint8
    parts = train_state.build(run_config)
    ts, options = parts.trainer.sampling_grid("consistency", 2)
    assert options == {"sigma_min": 0.002} and ts.shape == (3,)
    np.testing.assert_allclose(float(jnp.exp(-0.5 * parts.schedule.log_snr(ts[-1]))), 0.002, rtol=1e-3)

    # Progressive distillation from the same teacher: 4 -> 2 steps after 2 updates, then 2 more at 2 steps
    # (one length per stage). Resumed at the stage boundary, the student of stage 0 becomes the teacher of
    # stage 1. Each stage's end is kept beyond ckpt.keep (step 3, on the save interval, is not).
    pd = mixture.get_config("dit")
    pd.trainer = ml_collections.ConfigDict(
        dict(name="progressive", initial_steps=4, final_steps=2, steps_per_stage=(2, 2), prediction="v")
    )
    pd.teacher.workdir = teacher_dir
    pd.sampler.name = "ddim"
    pd.total_steps = 2
    pd.ckpt.every_steps, pd.ckpt.keep = 3, 1
    pd_dir = str(tmp_path / "pd")
    stage0 = train.train_and_evaluate(pd, pd_dir)
    _assert_same(stage0.teacher_params, teacher_ema)
    student0 = jax.device_get(stage0.params)
    pd.total_steps = 4
    stage1 = train.train_and_evaluate(pd, pd_dir)
    _assert_same(stage1.teacher_params, student0)
    assert sorted(os.listdir(os.path.join(pd_dir, "checkpoints"))) == ["2", "4"]
    milestones = train_state.build(pd).trainer.stage_ends()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "saves"), every_steps=3, keep=1, milestones=milestones)
    assert milestones == (2, 4) and [s for s in range(1, 7) if ckpt.should_save(s)] == [2, 3, 4, 6]
    ckpt.close()
    run_config, sample_fn, params, step = generate.load_run(pd_dir, steps=2)
    assert step == 4  # the final (2-step) stage: the newest checkpoint
    assert generate.sample_images(sample_fn, params, config=run_config, seed=0, num_samples=4)[0].shape == (
        4,
        8,
        8,
        1,
    )
    _, _, params, step = generate.load_run(pd_dir, steps=4, ema=False)  # stage 0 (4 steps)
    assert step == 2
    _assert_same(params, student0)
    with pytest.raises(app.UsageError, match=r"^--steps=8: a progressive run has students of 2..4 steps"):
        generate.load_run(pd_dir, steps=8)
