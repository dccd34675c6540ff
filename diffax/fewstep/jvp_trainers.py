"""The JVP family in the one training loop: MeanFlow, shortcut models and continuous-time consistency
(sCM in TrigFlow).

``"meanflow"`` and ``"shortcut"`` train a network of an interval on the ``rectified_flow`` schedule
(x_t = (1 - t) x + t e, t = 1 noise; ``model.interval_embedding=True``: the network sees (t, t - r)):
MeanFlow's average velocity u(z, r, t) regressed on v - (t - r) du/dt by ``jax.jvp``
(``diffax.fewstep.meanflow``), the shortcut s(x, t, d) = u(x, t - d, t) by flow matching at d = 0 and
self-consistency on a fraction of the batch (``diffax.fewstep.shortcut``, targets from the target
network, an EMA of the weights). Both sample K steps on the uniform grid t_max .. 0 with DDIM on the data
prediction x - t u(x, s, t), s the next grid time: exactly z_s = z_t - (t - s) u.

``"scm"`` trains F of TrigFlow (``process.name="trigflow"``) by the sCT objective of Lu & Song 2024
(``diffax.fewstep.scm``: tangent by ``jax.jvp`` in float32, normalised, warmed up, adaptive weight
w(t) learned beside the network: the parameters are {"network", "logvar"}); it samples with the
multistep consistency sampler on t_max, mid_t, ..., 0.

The tangents run the network's forward-differentiable formulation (``train=False``, XLA layers; no
dropout) under stop-gradient; the prediction that carries the gradient runs the training formulation.

References: Geng et al. 2025 (MeanFlow), Alg. 1; Frans et al. 2024 (shortcut models), Alg. 1;
Lu & Song 2024 (sCM), Alg. 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffax import models, train_state
from diffax.fewstep import consistency as cm
from diffax.fewstep import meanflow, scm, shortcut
from diffax.fewstep.flow_trainers import OptionsTrainer, uniform_grid

__all__ = ["MeanFlowTrainer", "SCMTrainer", "ShortcutTrainer", "TRAINERS"]


def _column(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape((-1,) + (1,) * (like.ndim - 1)).astype(like.dtype)


def check_time_features(config: ml_collections.ConfigDict) -> None:
    """A trainer that differentiates the network in t needs time features of bounded frequency: the
    positional embedding of t itself (c_noise(t) = t, Lu & Song 2024, Sec. 4.1). At DDPM's scale of 1000
    the tangent's d/dt term is the features' derivative, and sCT and MeanFlow unlearn denoising."""
    module = models.from_config(config.model)
    kind, scale = getattr(module, "time_embedding", "sinusoidal"), getattr(module, "time_scale", 1.0)
    if kind != "sinusoidal" or scale > 1.0:
        field = "time_embedding" if kind != "sinusoidal" else "time_scale"
        raise ValueError(
            f"config.model.{field}: the {config.trainer.name!r} trainer differentiates the network in t, so "
            "it needs the positional embedding of t (time_embedding='sinusoidal', time_scale=1; Lu & Song "
            f"2024 Sec. 4.1); {kind} features at time_scale={scale:g} make the tangent their derivative."
        )


class _JVPTrainer(OptionsTrainer):
    def plain_apply(self, params: Any, x: jax.Array, t: jax.Array, cond: Any) -> jax.Array:
        """The network in its XLA formulations with ``train=False``: differentiable in every mode."""
        impls = {
            f: "xla"
            for f in ("attention_impl", "norm_impl", "resblock_impl", "conv_impl")
            if hasattr(self.module, f)
        }
        out = self.module.clone(**impls).apply({"params": params}, x, t, cond, train=False)
        return out[..., : x.shape[-1]]


class _IntervalTrainer(_JVPTrainer):
    """A network of an interval u(z, r, t) on the rectified-flow schedule, sampled on a uniform grid."""

    PROCESS = "rectified_flow"

    @classmethod
    def check(cls, config: ml_collections.ConfigDict) -> None:
        super().check(config)
        if not config.model.get("interval_embedding", False):
            raise ValueError(
                f"config.model.interval_embedding: the {config.trainer.name!r} network is conditioned on "
                "(t, t - r); set model.interval_embedding=True."
            )

    def average_velocity(
        self, params: Any, cond: Any, key: jax.Array | None, *, train: bool
    ) -> meanflow.AverageVelocity:
        """u(z, r, t): the network at times (t, t - r)."""

        def u(z, r, t):
            times = jnp.stack([t, t - r], axis=-1)
            if train:
                return self.apply_output(params, z, times, cond, key, train=True)
            return self.plain_apply(params, z, times, cond)

        return u

    def grid_network(self, ts: jax.Array) -> Callable[..., jax.Array]:
        """network(params, x, t, cond) -> x - t u(x, s, t), s the time after t on ``ts``."""
        ts = jnp.asarray(ts, jnp.float32)

        def network(params, x, t, cond):
            t = t.astype(jnp.float32)
            nearest = jnp.argmin(jnp.abs(ts[None, :] - t[:, None]), axis=1)
            s = ts[jnp.minimum(nearest + 1, ts.shape[0] - 1)]
            u = self.average_velocity(params, cond, None, train=False)(x, s, t)
            return x - _column(t, x) * u.astype(x.dtype)

        return network

    def sampling_network(self) -> Callable[..., jax.Array]:
        """The one-step network (s = 0), for a grid the trainer did not make."""
        return self.grid_network(jnp.zeros((1,), jnp.float32))


class MeanFlowTrainer(_IntervalTrainer):
    """MeanFlow (Geng et al. 2025, Alg. 1): logit-normal (r, t) sorted, ``equal_fraction`` of the batch
    with r = t, the adaptively weighted loss of ``diffax.fewstep.meanflow``."""

    DEFAULTS = dict(p_mean=-0.4, p_std=1.0, equal_fraction=0.75, norm_p=1.0, norm_eps=0.01, t_max=0.999)

    @classmethod
    def check(cls, config: ml_collections.ConfigDict) -> None:
        super().check(config)
        check_time_features(config)

    def times(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """(r, t) with r <= t: two logit-normal draws sorted, r = t for ``equal_fraction`` of them."""
        draw_key, equal_key = jax.random.split(key)
        logits = self.option("p_mean") + self.option("p_std") * jax.random.normal(draw_key, (2, n))
        times = jax.nn.sigmoid(logits)
        t, r = jnp.max(times, axis=0), jnp.min(times, axis=0)
        equal = jax.random.uniform(equal_key, (n,)) < self.option("equal_fraction")
        return jnp.where(equal, t, r), t

    def train_step(self, parts: train_state.Parts) -> Callable[..., Any]:
        def loss_fn(params, batch, key):
            x, cond = batch["image"], batch.get("label")
            noise_key, time_key, net_key = jax.random.split(key, 3)
            e = jax.random.normal(noise_key, x.shape, x.dtype)
            r, t = self.times(time_key, x.shape[0])
            loss, error = meanflow.meanflow_loss(
                self.average_velocity(params, cond, net_key, train=True),
                x,
                e,
                r,
                t,
                norm_p=self.option("norm_p"),
                norm_eps=self.option("norm_eps"),
                target_fn=self.average_velocity(jax.lax.stop_gradient(params), cond, None, train=False),
            )
            return jnp.mean(loss), {"error": error}

        return train_state.loss_train_step(self.config, parts, loss_fn)


class ShortcutTrainer(_IntervalTrainer):
    """Shortcut models (Frans et al. 2024, Alg. 1): flow matching at d = 0 on most of the batch,
    self-consistency targets of the target network (EMA ``target_decay``) on ``bootstrap_fraction``."""

    DEFAULTS = dict(
        min_step=1.0 / 128, bootstrap_fraction=0.125, target_decay=0.999, target_clip=4.0, t_max=0.999
    )

    def train_step(self, parts: train_state.Parts) -> Callable[..., Any]:
        min_step, fraction = float(self.option("min_step")), float(self.option("bootstrap_fraction"))
        clip, decay = self.option("target_clip"), float(self.option("target_decay"))

        def step(state, batch):
            def loss_fn(params, batch, key):
                x, cond = batch["image"], batch.get("label")
                n = x.shape[0]
                num_bootstrap = int(round(n * fraction))
                noise_key, time_key, size_key, net_key = jax.random.split(key, 4)
                e = jax.random.normal(noise_key, x.shape, x.dtype)
                t_flow = jax.random.uniform(time_key, (n - num_bootstrap,))
                t_boot, d = shortcut.step_sizes(size_key, num_bootstrap, min_step=min_step)
                t = jnp.concatenate([t_boot, t_flow])
                x_t = (1.0 - _column(t, x)) * x + _column(t, x) * e
                c_boot = None if cond is None else cond[:num_bootstrap]
                target_u = self.average_velocity(state.target_params, c_boot, None, train=False)
                boot = shortcut.self_consistency_target(
                    lambda y, t, d: target_u(y, t - d, t), x_t[:num_bootstrap], t_boot, d, clip=clip
                )
                flow = (e - x)[num_bootstrap:].astype(jnp.float32)
                target = jnp.concatenate([boot, flow])
                size = jnp.concatenate([2.0 * d, jnp.zeros_like(t_flow)])  # the shortcut's d of each example
                u = self.average_velocity(params, cond, net_key, train=True)(x_t, t - size, t)
                per_example = jnp.mean(jnp.square(u.astype(jnp.float32) - target).reshape(n, -1), axis=-1)
                return jnp.mean(per_example), {}

            new, metrics = train_state.loss_train_step(self.config, parts, loss_fn)(state, batch)
            return new.replace(
                target_params=cm.update_target(state.target_params, new.params, decay)
            ), metrics

        return step


class SCMTrainer(_JVPTrainer):
    """sCT in TrigFlow (Lu & Song 2024, Alg. 1) with the adaptive weight learned beside the network."""

    DEFAULTS = dict(
        p_mean=-1.0,
        p_std=1.4,
        warmup_steps=1000,
        normalization=0.1,
        adaptive_weighting=True,
        sigma_max=80.0,
        mid_t=1.1,
    )
    PROCESS = "trigflow"

    @classmethod
    def check(cls, config: ml_collections.ConfigDict) -> None:
        super().check(config)
        options = cls.options_of(config)
        if options["warmup_steps"] < 0:
            raise ValueError(f"config.trainer.warmup_steps: {options['warmup_steps']} must be >= 0.")
        check_time_features(config)
        sigma_data = train_state.registry_kwargs(config.process).get("sigma_data", 0.5)
        t_max = math.atan(options["sigma_max"] / sigma_data)
        if not 0.0 < options["mid_t"] < t_max:
            raise ValueError(
                f"config.trainer.mid_t: {options['mid_t']} must lie in (0, {t_max:.4f}) (t_max)."
            )

    @property
    def sigma_data(self) -> float:
        return self.schedule.sigma_data

    def initializer(self, base: Callable[[], train_state.TrainState]) -> Callable[[], Any]:
        """The network's parameters and the adaptive weight's as {"network", "logvar"}; no target copy
        (theta^- = stopgrad(theta))."""
        init = super().initializer(base)
        tx, _ = train_state.make_optimizer(self.config.optim, total_steps=self.config.total_steps)

        def wrapped():
            state = init()
            params = {"network": state.params, "logvar": scm.init_logvar()}
            emas = tuple({"network": e, "logvar": scm.init_logvar()} for e in state.ema_params)
            return state.replace(params=params, ema_params=emas, opt_state=tx.init(params), target_params=())

        return wrapped

    def train_step(self, parts: train_state.Parts) -> Callable[..., Any]:
        sigma_data = self.sigma_data
        warmup_steps = int(self.option("warmup_steps"))
        adaptive, normalization = bool(self.option("adaptive_weighting")), self.option("normalization")

        def step(state, batch):
            warmup = (
                1.0 if warmup_steps == 0 else jnp.minimum(1.0, state.step.astype(jnp.float32) / warmup_steps)
            )

            def loss_fn(params, batch, key):
                x0, cond = batch["image"], batch.get("label")
                noise_key, time_key, net_key = jax.random.split(key, 3)
                z = sigma_data * jax.random.normal(noise_key, x0.shape, x0.dtype)
                t = scm.trigflow_times(
                    time_key,
                    x0.shape[0],
                    sigma_data=sigma_data,
                    p_mean=self.option("p_mean"),
                    p_std=self.option("p_std"),
                )
                frozen = jax.lax.stop_gradient(params["network"])
                loss, error = scm.scm_loss(
                    lambda y, t: self.apply_output(params["network"], y, t, cond, net_key, train=True),
                    lambda y, t: self.plain_apply(frozen, y, t, cond),
                    params["logvar"] if adaptive else None,
                    x0,
                    z,
                    t,
                    sigma_data=sigma_data,
                    warmup=warmup,
                    normalization=normalization,
                )
                return jnp.mean(loss), {"error": error}

            new, metrics = train_state.loss_train_step(self.config, parts, loss_fn)(state, batch)
            return new, metrics | {"tangent_warmup": warmup}

        return step

    def sampling_grid(self, sampler: str, num_steps: int) -> tuple[jax.Array, dict[str, Any]] | None:
        """For ``"consistency"``: t_max = arctan(sigma_max / sigma_d), then ``mid_t`` .. 0 in
        ``num_steps - 1`` intervals (Lu & Song 2024 sample two steps through t = 1.1), sigma_min 0."""
        if sampler != "consistency":
            return None
        t_max = math.atan(self.option("sigma_max") / self.sigma_data)
        rest = (
            uniform_grid(self.option("mid_t"), num_steps - 1)
            if num_steps > 1
            else jnp.zeros((1,), jnp.float32)
        )
        return jnp.concatenate([jnp.full((1,), t_max, jnp.float32), rest]), {"sigma_min": 0.0}

    def sampling_network(self) -> Callable[..., jax.Array]:
        """network(params, x, t, cond) -> f(x, t) = cos(t) x - sin(t) sigma_d F(x / sigma_d, t)."""
        sigma_data = self.sigma_data

        def network(params, x, t, cond):
            out = self.apply_output(params["network"], x / sigma_data, t, cond, None, train=False)
            return scm.consistency_function(out, x, t, sigma_data=sigma_data)

        return network


TRAINERS: dict[str, type[OptionsTrainer]] = {
    "meanflow": MeanFlowTrainer,
    "shortcut": ShortcutTrainer,
    "scm": SCMTrainer,
}
