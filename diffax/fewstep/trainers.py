"""Few-step trainers as what the one training loop needs: a state pytree, a pure step, a sampling network.

``config.trainer.name`` picks the objective (``"diffusion"``, the default, is ``diffax.train_state``'s
own). A few-step trainer extends the ``TrainState`` with the target network (and the frozen teacher's
parameters, checkpointed with the run so a resume needs nothing else), builds its ``train_step`` on
``train_state.make_train_step`` (optimizer, sampling EMA, accumulation unchanged) and tells
``diffax.generate`` how its network samples.

Distillation reads the teacher run of ``config.teacher.workdir`` (its ``config.json`` and newest intact
checkpoint, EMA parameters): the student starts from the teacher's weights, so both must share the
data shape, schedule, network and prediction.

References: Song et al. 2023 (CD, CT), Song & Dhariwal 2024 (iCT); see ``diffax.fewstep.consistency``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffax import train_state
from diffax.fewstep import consistency as cm
from diffax.fewstep import progressive

__all__ = [
    "TRAINERS",
    "FewStepState",
    "build",
    "check",
    "load_teacher",
    "student_prediction",
    "teacher_range",
]

# Flow and JVP trainers (diffax.fewstep.flow_trainers, jvp_trainers; imported where used: they build on
# this module) check and build themselves.
FLOW_TRAINERS = ("rectified_flow", "interpolant", "meanflow", "shortcut", "scm")
TRAINERS = ("diffusion", "consistency", "progressive", *FLOW_TRAINERS)
_PROGRESSIVE_FIELDS = ("initial_steps", "final_steps", "steps_per_stage", "t_max", "prediction")
PREDICTIONS = ("eps", "x0", "v")
TARGETS = ("teacher", "data")
_CONSISTENCY_FIELDS = tuple(f.name for f in dataclasses.fields(cm.ConsistencySpec) if f.name != "total_steps")


@flax.struct.dataclass
class FewStepState(train_state.TrainState):
    """``TrainState`` plus the target network theta^- and the frozen teacher (``()`` without one)."""

    target_params: Any = None
    teacher_params: Any = ()


def _options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return train_state.registry_kwargs(config.trainer)


def student_prediction(config: ml_collections.ConfigDict) -> str:
    """What the student network's output is (``config.trainer.prediction``; by default the teacher's
    ``config.loss.prediction``). A student of an eps teacher may predict v: its data estimate
    alpha x - sigma v stays bounded where (x - sigma eps) / alpha divides by alpha -> 0 at high noise, and
    at low noise (alpha -> 1) the teacher's eps output read as v is nearly the teacher's own estimate."""
    return _options(config).get("prediction", config.loss.prediction)


def spec_of(config: ml_collections.ConfigDict) -> cm.ConsistencySpec:
    """The ``ConsistencySpec`` of ``config.trainer`` (its consistency fields, K = ``total_steps``)."""
    fields = {k: v for k, v in _options(config).items() if k in _CONSISTENCY_FIELDS}
    return cm.ConsistencySpec(total_steps=config.total_steps, **fields)


def teacher_range(schedule: Any) -> tuple[float, float]:
    """The scaled noise levels sigma / alpha a network of ``schedule`` was trained on: the grid points
    t = 1/T..1 of a discrete schedule, [t_min, t_max] of a continuous one (where finite)."""
    import numpy as np

    from diffax.schedules import DiscreteSchedule

    if isinstance(schedule, DiscreteSchedule):
        ts = np.array([1.0 / schedule.num_timesteps, 1.0])
    else:
        ts = np.array([schedule.t_min, schedule.t_max])
    scaled = np.exp(-0.5 * np.asarray(schedule.log_snr(ts), np.float64))
    return float(scaled[0]), float(scaled[1])


def check(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.trainer`` and ``config.teacher``; raises ``ValueError`` naming the field."""
    import diffax.schedules as schedules

    name = config.trainer.name
    if name not in TRAINERS:
        raise ValueError(f"config.trainer.name: unknown trainer {name!r}; known: {', '.join(TRAINERS)}.")
    if name == "diffusion":
        return
    if name in FLOW_TRAINERS:
        _flow_trainers()[name].check(config)
        return
    options = _options(config)
    fields = (
        _PROGRESSIVE_FIELDS
        if name == "progressive"
        else _CONSISTENCY_FIELDS + ("target", "teacher_sampler", "prediction")
    )
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(
            f"config.trainer.{unknown[0]}: no such option of {name!r}; known: {', '.join(fields)}."
        )
    if student_prediction(config) not in PREDICTIONS:
        raise ValueError(
            f"config.trainer.prediction: unknown {student_prediction(config)!r}; known: "
            f"{', '.join(PREDICTIONS)}."
        )
    schedule = schedules.get(config.process.name, **train_state.registry_kwargs(config.process))
    if name == "progressive":
        _check_progressive(options, schedule)
        _check_teacher(config)
        return
    try:
        spec = spec_of(config)
    except ValueError as e:
        raise ValueError(f"config.trainer.{e}") from None
    _check_levels(spec, schedule, "the student's schedule", config.process.name)
    target = options.get("target", "data")
    if target not in TARGETS:
        raise ValueError(f"config.trainer.target: unknown {target!r}; known: {', '.join(TARGETS)}.")
    workdir = config.teacher.workdir
    if target == "data" and spec.curriculum == "ect":  # data targets, but the start is a diffusion run
        _check_teacher_levels(config, spec)
        return
    if target == "data":
        if workdir:
            raise ValueError(
                "config.teacher.workdir: consistency training (target='data') uses no teacher; unset it."
            )
        return
    _check_teacher_sampler(options.get("teacher_sampler", "heun"))
    _check_teacher_levels(config, spec)


def _check_teacher_levels(config: ml_collections.ConfigDict, spec: cm.ConsistencySpec) -> None:
    import diffax.schedules as schedules

    teacher = _check_teacher(config)
    teacher_schedule = schedules.get(teacher.process.name, **train_state.registry_kwargs(teacher.process))
    _check_levels(spec, teacher_schedule, "the teacher's trained noise levels", teacher.process.name)


def _check_progressive(options: dict[str, Any], schedule: Any) -> None:
    initial, final = options.get("initial_steps", 256), options.get("final_steps", 1)
    per_stage, t_max = options.get("steps_per_stage", 1000), options.get("t_max", schedule.t_max)
    if not (final >= 1 and initial >= final and initial & (initial - 1) == 0 and final & (final - 1) == 0):
        raise ValueError(
            f"config.trainer.initial_steps: need powers of two initial_steps >= final_steps >= 1; got "
            f"{initial}, {final}."
        )
    stages = progressive.num_stages(initial, final)
    lengths = (per_stage,) if isinstance(per_stage, int) else tuple(per_stage)
    if not isinstance(per_stage, int) and len(lengths) != stages:
        raise ValueError(
            f"config.trainer.steps_per_stage: {initial} -> {final} steps is {stages} stages; give one "
            f"length or {stages}, got {len(lengths)}."
        )
    if not all(isinstance(n, int) and n >= 1 for n in lengths):
        raise ValueError(f"config.trainer.steps_per_stage: {per_stage} must be integers >= 1.")
    if not schedule.t_min < t_max <= schedule.t_max:
        raise ValueError(f"config.trainer.t_max: {t_max} must lie in ({schedule.t_min}, {schedule.t_max}].")


def _check_teacher(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The teacher run's config, checked against the student's; raises ``ValueError`` naming the field."""
    from diffax import config as config_lib

    workdir = config.teacher.workdir
    if not workdir:
        raise ValueError(
            "config.teacher.workdir: distillation needs a teacher run; pass "
            "--config.teacher.workdir=DIR of a finished diffax.main run."
        )
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise ValueError(
            f"config.teacher.workdir: {workdir} holds no diffax run (no config.json); train the teacher "
            "(python -m diffax.main --config=experiments/digits.py --workdir=DIR)."
        )
    if not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(
        os.path.join(workdir, "checkpoints")
    ):
        raise ValueError(
            f"config.teacher.workdir: {workdir} has no checkpoint yet; let the teacher run save one."
        )
    teacher = config_lib.load(workdir)
    for field, what in (("input", "data shape"), ("process", "schedule"), ("model", "network")):
        ours, theirs = _comparable(config[field], field), _comparable(teacher[field], field)
        if ours != theirs:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            k = diff[0]
            raise ValueError(
                f"config.{field}.{k}: the teacher's {what} has {k}={theirs.get(k)!r}, this run "
                f"{ours.get(k)!r}; the student starts from the teacher's weights: use the teacher's."
            )
    for key in ("name", "prediction"):
        if config.loss[key] != teacher.loss[key]:
            raise ValueError(
                f"config.loss.{key}: the teacher's network predicts with loss.{key}={teacher.loss[key]!r}, "
                f"this run has {config.loss[key]!r}; use the teacher's."
            )
    return teacher


_DATA_SHAPE = ("dataset", "image_size", "channels", "upsample", "labels", "num_classes")


def _comparable(section: ml_collections.ConfigDict, field: str) -> dict[str, Any]:
    values = section.to_dict()
    if field == "input":
        return {k: values.get(k) for k in _DATA_SHAPE}
    # The layers' formulation switches compute the same network; dropout only regularises the student (the
    # teacher runs without it), so neither changes the weights the student starts from.
    if field == "model":
        values = {k: v for k, v in values.items() if not k.endswith("_impl") and k != "dropout"}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _check_levels(spec: cm.ConsistencySpec, schedule: Any, what: str, name: str) -> None:
    """The student's levels [sigma_min, sigma_max] must map to times the network knows."""
    low, high = teacher_range(schedule)
    if spec.sigma_min < low * (1 - 1e-6) or spec.sigma_max > high * (1 + 1e-6):
        raise ValueError(
            f"config.trainer.sigma_min: the levels [{spec.sigma_min:g}, {spec.sigma_max:g}] (sigma/alpha) "
            f"do not convert into {what} ({name}: [{low:.6g}, {high:.6g}]); set sigma_min >= {low:.6g} "
            f"and sigma_max <= {high:.6g}."
        )


def _check_teacher_sampler(name: str) -> None:
    import diffax.samplers as samplers

    if name not in samplers.SAMPLERS:
        raise ValueError(f"config.trainer.teacher_sampler: unknown sampler {name!r}.")
    sampler = samplers.get(name)
    if sampler.stochastic or getattr(sampler, "min_steps", 1) > 1 or not hasattr(sampler, "step"):
        raise ValueError(
            f"config.trainer.teacher_sampler: {name!r} is not a deterministic one-step method; use "
            "'heun', 'euler', 'ddim' or 'dpm_solver_2'."
        )


def load_teacher(config: ml_collections.ConfigDict, like: Any) -> Any:
    """The teacher run's sampling (EMA) parameters, placed like the pytree ``like``.

    Each process restores the whole teacher onto its own devices and builds its shards of the global
    arrays from that copy, so no array crosses between processes (which the CPU backend cannot do)."""
    from diffax import checkpoint, sharding
    from diffax import config as config_lib

    teacher = config_lib.load(config.teacher.workdir)
    parts = train_state.build(teacher)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.local_devices())
    state, _ = checkpoint.restore_latest(config.teacher.workdir, teacher, parts, mesh=mesh)
    params = state.sampling_params()

    def place(ref: jax.Array, p: jax.Array) -> jax.Array:
        local = np.asarray(p)
        return jax.make_array_from_callback(ref.shape, ref.sharding, lambda index: local[index])

    return jax.tree.map(place, like, params)


@dataclasses.dataclass(frozen=True)
class _Trainer:
    """What every few-step trainer shares: the state with target and teacher, the start at the teacher,
    the frozen teacher network, and the update built on ``train_state.make_train_step``."""

    config: ml_collections.ConfigDict
    schedule: Any
    module: Any

    @property
    def keeps_teacher(self) -> bool:
        """Whether the frozen teacher is part of the state (its network makes the targets)."""
        return True

    @property
    def starts_from_teacher(self) -> bool:
        """Whether a fresh run starts at the teacher run's weights."""
        return True

    def initializer(self, base: Callable[[], train_state.TrainState]) -> Callable[[], FewStepState]:
        def init() -> FewStepState:
            state = base()
            fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
            teacher = jax.tree.map(jnp.copy, state.params) if self.keeps_teacher else ()
            return FewStepState(
                **fields, target_params=jax.tree.map(jnp.copy, state.params), teacher_params=teacher
            )

        return init

    def start(self, state: FewStepState) -> FewStepState:
        """A fresh distillation or ECT run starts every copy (online, target, EMA, teacher) at the teacher."""
        if not self.starts_from_teacher:
            return state
        teacher = load_teacher(self.config, state.params)
        copy = functools.partial(jax.tree.map, jnp.copy)  # distinct buffers: the state is donated
        return state.replace(
            params=copy(teacher),
            target_params=copy(teacher),
            teacher_params=teacher if self.keeps_teacher else (),
            ema_params=tuple(copy(teacher) for _ in state.ema_params),
        )

    def teacher_model(
        self, params: Any, cond: jax.Array | None
    ) -> Callable[[jax.Array, jax.Array], jax.Array]:
        """model_fn(x, t) of the frozen teacher at batch size 1 (distillation runs it per example under
        vmap, each example on its own interval; the XLA formulations of the layers batch there)."""
        impls = {
            f: "xla"
            for f in ("attention_impl", "norm_impl", "resblock_impl", "conv_impl")
            if hasattr(self.module, f)
        }
        module = self.module.clone(**impls)
        c = None if cond is None else cond[:1]  # labelled distillation is not offered

        def model_fn(x, t):
            return module.apply({"params": params}, x, t, c, train=False)[..., : x.shape[-1]]

        return model_fn

    def checkpoint_for(self, num_steps: int) -> int | None:
        """The newest training step whose parameters sample in ``num_steps`` steps (``None``: any)."""
        del num_steps
        return None

    def stage_ends(self) -> tuple[int, ...]:
        """The steps where a training stage ends: each is checkpointed and kept whatever ``ckpt.every_steps``
        and ``ckpt.keep`` say, and the learning-rate schedule starts again after it (``()``: one stage)."""
        return ()

    def input_pipeline(self, pipeline: Any) -> Any:
        """The training input: the config's pipeline (reflow replaces it by its pair set)."""
        return pipeline

    def grid_network(self, ts: jax.Array) -> Callable[..., jax.Array]:
        """The sampling network on the grid ``ts`` (a network of an interval needs the next time)."""
        del ts
        return self.sampling_network()

    def apply_fn(self, *, train: bool) -> Callable[..., jax.Array]:
        module = self.module

        def apply_fn(params, x, t, cond, key):
            rngs = {"dropout": key} if train else {}
            return module.apply({"params": params}, x, t, cond, train=train, rngs=rngs)

        return apply_fn


class ConsistencyTrainer(_Trainer):
    """Consistency distillation (``target="teacher"``) or training (``target="data"``): CD, CT, iCT."""

    @property
    def spec(self) -> cm.ConsistencySpec:
        return spec_of(self.config)

    @property
    def keeps_teacher(self) -> bool:  # distillation: the teacher's sampler step makes the target point
        return _options(self.config).get("target", "data") == "teacher"

    @property
    def starts_from_teacher(self) -> bool:  # ECT tunes a diffusion run into a consistency model
        return self.keeps_teacher or self.spec.curriculum == "ect"

    def consistency_fn(self, *, train: bool) -> Callable[..., jax.Array]:
        """f(params, y, sigma, cond, key): the student's consistency function in scaled variables."""
        denoise = cm.scaled_denoiser(
            self.schedule,
            self.apply_fn(train=train),
            prediction=student_prediction(self.config),
            edm_preconditioned=self.config.loss.name == "edm",
        )
        spec = self.spec

        def f(params, y, sigma, cond, key):
            denoised = denoise(params, y, sigma, cond, key)
            return cm.consistency_function(
                denoised, y, sigma, sigma_data=spec.sigma_data, sigma_min=spec.sigma_min
            )

        return f

    def train_step(self, parts: train_state.Parts) -> Callable[..., Any]:
        import diffax.samplers as samplers

        config, spec, schedule = self.config, self.spec, self.schedule
        student_f = self.consistency_fn(train=True)
        teacher_sampler = samplers.get(_options(config).get("teacher_sampler", "heun"))

        def step(state: FewStepState, batch):
            teacher = self.teacher_model(state.teacher_params, batch.get("label"))

            def target_point(y_hi, sigma_hi, sigma_lo, x0, z):
                return cm.teacher_step(
                    teacher_sampler,
                    teacher,
                    schedule,
                    y_hi,
                    sigma_hi,
                    sigma_lo,
                    prediction=config.loss.prediction,
                )

            def loss_fn(params, batch, key):
                cond = batch.get("label")
                return cm.consistency_loss(
                    spec,
                    lambda y, s, k: student_f(params, y, s, cond, k),
                    lambda y, s, k: student_f(state.target_params, y, s, cond, k),
                    batch["image"],
                    key,
                    state.step,
                    target_point=target_point if self.keeps_teacher else None,
                )

            new, metrics = train_state.loss_train_step(self.config, parts, loss_fn)(state, batch)
            decay = spec.target_decay(state.step)
            metrics |= {"num_scales": spec.scales(state.step), "target_decay": decay}
            return new.replace(
                target_params=cm.update_target(state.target_params, new.params, decay)
            ), metrics

        return step

    def sampling_grid(self, sampler: str, num_steps: int) -> tuple[jax.Array, dict[str, Any]] | None:
        """For the ``"consistency"`` sampler: the Karras grid from sigma_max to sigma_min in the
        schedule's time, and the sampler's ``sigma_min``; ``None`` for any other sampler."""
        if sampler != "consistency":
            return None
        import diffax.samplers as samplers

        spec = self.spec
        ends = [float(cm.schedule_time(self.schedule, s)) for s in (spec.sigma_max, spec.sigma_min)]
        ts = samplers.timesteps(
            self.schedule, num_steps=num_steps, spacing="karras", t_start=ends[0], t_end=ends[1]
        )
        return ts, {"sigma_min": spec.sigma_min}

    def sampling_network(self) -> Callable[..., jax.Array]:
        """network(params, x, t, cond) -> the consistency function's x_0 at the schedule's time t."""
        f, schedule = self.consistency_fn(train=False), self.schedule

        def network(params, x, t, cond):
            alpha = schedule.alpha(t).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            sigma = jnp.exp(-0.5 * schedule.log_snr(t)).astype(x.dtype)
            return f(params, x / alpha, sigma, cond, None)

        return network


class ProgressiveTrainer(_Trainer):
    """Progressive distillation (Salimans & Ho 2022): ``initial_steps`` halved every ``steps_per_stage``
    updates (one length, or one per stage) down to ``final_steps``; at each stage boundary the student
    becomes the teacher (kept in the state, so a run resumes mid-stage). The student predicts
    ``trainer.prediction`` (default: the teacher's); the paper finds eps-prediction unstable at few steps
    (Sec. 4) and uses x or v: a student of an eps teacher predicting v reads the teacher run's network as
    eps in stage 0 only."""

    def _option(self, key: str) -> Any:
        defaults = dict(initial_steps=256, final_steps=1, steps_per_stage=1000, t_max=self.schedule.t_max)
        return _options(self.config).get(key, defaults[key])

    def num_steps(self, step: Any) -> jax.Array:
        return progressive.num_student_steps(
            step,
            initial_steps=self._option("initial_steps"),
            steps_per_stage=self._option("steps_per_stage"),
            final_steps=self._option("final_steps"),
        )

    def train_step(self, parts: train_state.Parts) -> Callable[..., Any]:
        from diffax.parameterization import to_x0_eps
        from diffax.process import q_sample

        config, schedule, t_max = self.config, self.schedule, float(self._option("t_max"))
        apply_fn, prediction = self.apply_fn(train=True), student_prediction(config)
        stage = functools.partial(progressive.stage_index, steps_per_stage=self._option("steps_per_stage"))
        # The teacher run's network predicts config.loss.prediction; from stage 1 on the teacher is a student.
        first_teacher = config.loss.prediction

        def step(state: FewStepState, batch):
            # A new stage starts: the student of the last one is the teacher now (Alg. 2, outer loop).
            boundary = (state.step > 0) & (stage(state.step) != stage(state.step - 1))
            teacher_params = jax.tree.map(
                lambda p, t: jnp.where(boundary, p, t), state.params, state.teacher_params
            )
            teacher = self.teacher_model(teacher_params, batch.get("label"))
            num = self.num_steps(state.step)

            def loss_fn(params, batch, key):
                x0, cond = batch["image"], batch.get("label")
                index_key, noise_key, net_key = jax.random.split(key, 3)
                i = jax.random.randint(index_key, (x0.shape[0],), 1, num + 1)
                t = t_max * i.astype(jnp.float32) / num.astype(jnp.float32)
                z_t = q_sample(schedule, x0, t, jax.random.normal(noise_key, x0.shape, x0.dtype))
                targets = [
                    functools.partial(
                        progressive.distillation_target, teacher, schedule, prediction=p, t_max=t_max
                    )
                    for p in dict.fromkeys((prediction, first_teacher))  # one branch when they agree
                ]
                target = jax.lax.stop_gradient(
                    jax.lax.cond(stage(state.step) == 0, targets[-1], targets[0], z_t, t, num)
                    if len(targets) > 1
                    else targets[0](z_t, t, num)
                )
                out = apply_fn(params, z_t, t, cond, net_key)[..., : x0.shape[-1]]
                x_hat = to_x0_eps(schedule, out, z_t, t, prediction=prediction)[0]
                per_example = progressive.truncated_snr_weight(schedule, t) * cm.distance(
                    x_hat, target, kind="l2"
                )
                return jnp.mean(per_example), {"loss_per_example": per_example, "t": t}

            new, metrics = train_state.loss_train_step(self.config, parts, loss_fn)(
                state.replace(teacher_params=teacher_params), batch
            )
            return new, metrics | {"num_steps": num}

        return step

    def checkpoint_for(self, num_steps: int) -> int | None:
        """The last step of the stage whose student takes ``num_steps`` steps (one of ``stage_ends``);
        ``None`` for the final stage, which the newest checkpoint holds. Raises ``ValueError`` for a step
        count no stage trains."""
        initial, final = self._option("initial_steps"), self._option("final_steps")
        if num_steps == final:
            return None
        if not (final < num_steps <= initial and num_steps & (num_steps - 1) == 0):
            raise ValueError(
                f"--steps={num_steps}: a progressive run has students of {final}..{initial} steps "
                f"(powers of two); pick one of them."
            )
        return self.stage_ends()[progressive.num_stages(initial, num_steps) - 1]

    def stage_ends(self) -> tuple[int, ...]:
        """The end of every halving (Alg. 2 hands each student on as the next teacher)."""
        initial, final = self._option("initial_steps"), self._option("final_steps")
        return progressive.stage_ends(self._option("steps_per_stage"), progressive.num_stages(initial, final))

    def sampling_grid(self, sampler: str, num_steps: int) -> tuple[jax.Array, dict[str, Any]] | None:
        """The student's uniform grid t_max i / K, i = K..0, for DDIM."""
        if sampler != "ddim":
            return None
        return jnp.linspace(float(self._option("t_max")), 0.0, num_steps + 1, dtype=jnp.float32), {}

    def sampling_network(self) -> Callable[..., jax.Array]:
        """network(params, x, t, cond) -> the student's data prediction."""
        from diffax.parameterization import to_x0_eps

        apply_fn, schedule, prediction = (
            self.apply_fn(train=False),
            self.schedule,
            student_prediction(self.config),
        )

        def network(params, x, t, cond):
            out = apply_fn(params, x, t, cond, None)[..., : x.shape[-1]]
            return to_x0_eps(schedule, out, x, t, prediction=prediction)[0]

        return network


def build(config: ml_collections.ConfigDict, schedule: Any, module: Any) -> _Trainer | None:
    """The trainer ``config.trainer.name`` names (``None`` for plain diffusion)."""
    name = config.trainer.name
    if name == "diffusion":
        return None
    if name in FLOW_TRAINERS:
        return _flow_trainers()[name](config, schedule, module)
    return {"consistency": ConsistencyTrainer, "progressive": ProgressiveTrainer}[name](
        config, schedule, module
    )


def _flow_trainers() -> dict[str, type[_Trainer]]:
    from diffax.fewstep import flow_trainers, jvp_trainers

    return flow_trainers.TRAINERS | jvp_trainers.TRAINERS
