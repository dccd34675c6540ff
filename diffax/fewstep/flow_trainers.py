"""Straight-flow trainers in the one training loop: rectified flow with reflow and k-step distillation,
and stochastic interpolants.

``config.trainer.name = "rectified_flow"`` regresses the velocity v = e - x of x_t = (1 - t) x + t e
(diffax's ``rectified_flow`` schedule, t = 1 noise) on independent noise (1-RF), or, with
``pairs_dir``, on the pairs (e, x) = (Z_0, ODE(Z_0)) of the previous flow written by the pair job
(``python -m diffax.fewstep.reflow``): reflow (Liu et al. 2023, Alg. 1); ``distill_steps`` K >= 1 puts
t on the K-grid {1/K, ..., 1} (t_max for 1), which for K = 1 is the one-step distillation
||e - t_max v(e) - x||^2 (Sec. 2.3, l2 in place of LPIPS). A ``teacher.workdir`` starts the run at the
previous flow's weights.

``config.trainer.name = "interpolant"`` trains on x_t = a(t) x_1 + c(t) x_0 + gamma(t) z (``process.name
= "interpolant"`` with its ``kind`` and ``gamma_scale``; ``diffax.fewstep.interpolants``) by the
velocity loss (eq. 2.13) or the denoiser loss of the Gaussian part s eps = c x_0 + gamma z (eq. 2.15 with
z replaced by that part, one Gaussian for a Gaussian base; score -eta / s); ``"interpolant_sde"`` samples
its SDE with a tunable diffusion, any deterministic sampler its ODE.

Both networks sample through their x_0 prediction on the trainer's own uniform grid from t_max to 0.

References: Liu, Gong, Liu 2023, "Flow Straight and Fast", eq. 1, Alg. 1, Sec. 2.3; Albergo, Boffi,
Vanden-Eijnden 2023, "Stochastic Interpolants", eq. 2.13, 2.15, 2.32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffax import train_state
from diffax.fewstep import interpolants
from diffax.fewstep.trainers import _check_teacher, _Trainer

__all__ = ["InterpolantTrainer", "RectifiedFlowTrainer", "TRAINERS", "uniform_grid"]


def _column(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape((-1,) + (1,) * (like.ndim - 1)).astype(like.dtype)


def uniform_grid(t_max: float, num_steps: int) -> jax.Array:
    """t_max, ..., 0 in ``num_steps`` equal intervals (float32)."""
    return jnp.linspace(t_max, 0.0, num_steps + 1, dtype=jnp.float32)


class OptionsTrainer(_Trainer):
    """A trainer whose ``config.trainer`` options have defaults (``DEFAULTS``), a required process
    (``PROCESS``) and a one-line check of each."""

    DEFAULTS: dict[str, Any] = {}
    PROCESS = ""

    @classmethod
    def options_of(cls, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """``config.trainer``'s options over ``DEFAULTS``."""
        return cls.DEFAULTS | train_state.registry_kwargs(config.trainer)

    def option(self, key: str) -> Any:
        return self.options_of(self.config)[key]

    @property
    def keeps_teacher(self) -> bool:
        return False

    @property
    def starts_from_teacher(self) -> bool:
        return False

    @classmethod
    def check(cls, config: ml_collections.ConfigDict) -> None:
        """Raises ``ValueError`` naming the field: unknown options, a process of another time convention."""
        name = config.trainer.name
        unknown = sorted(set(train_state.registry_kwargs(config.trainer)) - set(cls.DEFAULTS))
        if unknown:
            raise ValueError(
                f"config.trainer.{unknown[0]}: no such option of {name!r}; known: {', '.join(cls.DEFAULTS)}."
            )
        if config.process.name != cls.PROCESS:
            raise ValueError(
                f"config.process.name: the {name!r} trainer works in the {cls.PROCESS!r} time convention and "
                f"cannot convert {config.process.name!r}; set process.name={cls.PROCESS!r}."
            )
        t_max = cls.options_of(config).get("t_max")  # None: a trainer without that option
        if t_max is not None and not 0.0 < t_max < 1.0:  # sampling starts there; alpha = 0 at t = 1
            raise ValueError(f"config.trainer.t_max: {t_max} must lie in (0, 1) (alpha = 0 at 1).")

    def apply_output(
        self, params: Any, x: jax.Array, t: jax.Array, cond: Any, key: jax.Array | None, *, train: bool
    ) -> jax.Array:
        """The network's output, x's channels only."""
        return self.apply_fn(train=train)(params, x, t, cond, key)[..., : x.shape[-1]]

    def sampling_grid(self, sampler: str, num_steps: int) -> tuple[jax.Array, dict[str, Any]] | None:
        """The uniform grid t_max .. 0 for every fixed-step sampler (``"ode"`` keeps its default)."""
        if sampler == "ode":
            return None
        return uniform_grid(self.option("t_max"), num_steps), {}


class RectifiedFlowTrainer(OptionsTrainer):
    """1-RF, reflow on the pair job's pairs, and k-step distillation (module docstring)."""

    DEFAULTS = dict(pairs_dir="", distill_steps=0, t_max=0.999)
    PROCESS = "rectified_flow"

    @classmethod
    def check(cls, config: ml_collections.ConfigDict) -> None:
        super().check(config)
        options = cls.options_of(config)
        if options["distill_steps"] < 0:
            raise ValueError(f"config.trainer.distill_steps: {options['distill_steps']} must be >= 0.")
        pairs_dir = options["pairs_dir"]
        if pairs_dir:
            from diffax import data
            from diffax.fewstep import reflow

            if config.input.labels:
                raise ValueError("config.input.labels: reflow pairs carry no labels; set input.labels=False.")
            reflow.check_pairs(pairs_dir, data.image_shape(config.input))
        elif options["distill_steps"]:
            raise ValueError(
                "config.trainer.pairs_dir: distillation needs the pairs of the flow it distils; write them "
                "with python -m diffax.fewstep.reflow --workdir=RUN --out=DIR and pass pairs_dir=DIR."
            )
        if config.teacher.workdir:
            _check_teacher(config)

    @property
    def starts_from_teacher(self) -> bool:  # reflow may start at the flow that made its pairs
        return bool(self.config.teacher.workdir)

    def input_pipeline(self, pipeline: Any) -> Any:
        """The pair set of ``pairs_dir`` (noise, image), or the config's data."""
        if not self.option("pairs_dir"):
            return pipeline
        from diffax.fewstep import reflow

        return reflow.PairPipeline.like(pipeline, self.option("pairs_dir"))

    def times(self, key: jax.Array, n: int) -> jax.Array:
        """t ~ U(0, t_max], or uniform on the distillation grid {1/K, ..., 1} (t_max for 1)."""
        t_max, k = float(self.option("t_max")), int(self.option("distill_steps"))
        if k == 0:
            return t_max * (1.0 - jax.random.uniform(key, (n,)))
        return jnp.minimum(jax.random.randint(key, (n,), 1, k + 1).astype(jnp.float32) / k, t_max)

    def train_step(self, parts: train_state.Parts) -> Callable[..., Any]:
        def loss_fn(params, batch, key):
            x, cond = batch["image"], batch.get("label")
            noise_key, time_key, net_key = jax.random.split(key, 3)
            e = batch["noise"] if "noise" in batch else jax.random.normal(noise_key, x.shape, x.dtype)
            t = self.times(time_key, x.shape[0])
            x_t = (1.0 - _column(t, x)) * x + _column(t, x) * e
            v = self.apply_output(params, x_t, t, cond, net_key, train=True)
            per_example = jnp.mean(jnp.square(v - (e - x)).reshape(x.shape[0], -1), axis=-1)
            return jnp.mean(per_example), {"t": t}

        return train_state.loss_train_step(self.config, parts, loss_fn)

    def sampling_network(self) -> Callable[..., jax.Array]:
        """network(params, x, t, cond) -> x_0 = x - t v(x, t)."""

        def network(params, x, t, cond):
            return x - _column(t, x) * self.apply_output(params, x, t, cond, None, train=False)

        return network


class InterpolantTrainer(OptionsTrainer):
    """Stochastic interpolants: the velocity or the denoiser loss (module docstring)."""

    DEFAULTS = dict(loss="velocity", t_max=0.999)
    PROCESS = "interpolant"
    LOSSES = ("velocity", "denoiser")

    @classmethod
    def check(cls, config: ml_collections.ConfigDict) -> None:
        super().check(config)
        options = cls.options_of(config)
        if options["loss"] not in cls.LOSSES:
            raise ValueError(
                f"config.trainer.loss: unknown {options['loss']!r}; known: {', '.join(cls.LOSSES)}."
            )

    @property
    def interpolant(self) -> interpolants.Interpolant:
        return self.schedule.interpolant

    def train_step(self, parts: train_state.Parts) -> Callable[..., Any]:
        interpolant, kind, t_max = self.interpolant, self.option("loss"), float(self.option("t_max"))

        def loss_fn(params, batch, key):
            x1, cond = batch["image"], batch.get("label")
            noise_key, latent_key, time_key, net_key = jax.random.split(key, 4)
            x0 = jax.random.normal(noise_key, x1.shape, x1.dtype)
            z = jax.random.normal(latent_key, x1.shape, x1.dtype)
            tau = t_max * (1.0 - jax.random.uniform(time_key, (x1.shape[0],)))  # diffax time, t = 1 - tau
            x_t, velocity = interpolant.sample(x0, x1, z, 1.0 - tau)
            out = self.apply_output(params, x_t, tau, cond, net_key, train=True)
            if kind == "velocity":
                per_example = interpolants.velocity_loss(out, velocity)
            else:
                _, c, gamma = interpolant.coefficients(1.0 - tau)
                s = jnp.sqrt(jnp.square(c) + jnp.square(gamma))
                gaussian = (_column(c, x0) * x0 + _column(gamma, z) * z) / _column(s, x0)
                per_example = interpolants.denoiser_loss(out, gaussian)
            return jnp.mean(per_example), {"t": tau}

        return train_state.loss_train_step(self.config, parts, loss_fn)

    def sampling_network(self) -> Callable[..., jax.Array]:
        """network(params, x, tau, cond) -> x_1: from eta, x_1 = (x - s eta) / a; from b, the solution of
        [a s; a' s'] [x_1; eps] = [x; b] with s = sqrt(c^2 + gamma^2)."""
        interpolant, kind = self.interpolant, self.option("loss")

        def network(params, x, tau, cond):
            out = self.apply_output(params, x, tau, cond, None, train=False)
            t = 1.0 - tau.astype(jnp.float32)
            (a, s), (da, ds) = jax.jvp(lambda t: _scales(interpolant, t), (t,), (jnp.ones_like(t),))
            if kind == "denoiser":
                return (x - _column(s, x) * out) / _column(a, x)
            return (_column(ds, x) * x - _column(s, x) * out) / _column(a * ds - s * da, x)

        return network


def _scales(interpolant: interpolants.Interpolant, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, c, gamma = interpolant.coefficients(t)
    return a, jnp.sqrt(jnp.square(c) + jnp.square(gamma))


TRAINERS: dict[str, type[OptionsTrainer]] = {
    "rectified_flow": RectifiedFlowTrainer,
    "interpolant": InterpolantTrainer,
}
