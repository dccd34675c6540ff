"""The training state pytree, the optimizer from the config, and the pure train step.

``train_step(state, batch) -> (state, metrics)`` is one optimizer update: the gradient of the loss
(averaged over ``accum_steps`` microbatches), AdamW with a warmup + constant/cosine learning rate and
global-norm clipping, and every EMA copy updated in the same step. It is pure, so ``jax.jit`` with
explicit shardings and a donated state runs it unchanged on one device, a ``data``×``fsdp`` mesh, or
many hosts.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffax import posthoc_ema

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, Any]]
Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a run carries from step to step; checkpointed whole.

    Attributes:
      step: int32 scalar, number of updates applied.
      params: the model parameters.
      ema_params: one exponential moving average of ``params`` per configured decay, then one
        power-function EMA per configured ``std_rel`` (``diffax.posthoc_ema``).
      opt_state: the optax state.
      rng: uint32 key data of the run's base key; step ``s`` uses ``fold_in(key, s)``.
    """

    step: jax.Array
    params: Any
    ema_params: tuple[Any, ...]
    opt_state: Any
    rng: jax.Array

    def sampling_params(self) -> Any:
        """The parameters to sample with: the first EMA copy, or ``params`` when there is none."""
        return self.ema_params[0] if self.ema_params else self.params


def learning_rate_schedule(
    optim_config: ml_collections.ConfigDict, *, total_steps: int, cycle_ends: Sequence[int] = ()
) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then constant, cosine or linear decay.

    Cosine (Loshchilov & Hutter 2017, eq. 5) and linear decay reach ``lr * min_lr_ratio`` at
    ``total_steps``. With ``cycle_ends`` (the stages of progressive distillation) the schedule starts
    again after each end and decays over its own cycle, as Salimans & Ho 2022 anneal the learning rate
    linearly within each halving (their CIFAR-10 distillation config).
    """
    starts = [0, *(end for end in cycle_ends if end < total_steps)]
    stops = [*starts[1:], max(total_steps, starts[-1] + 1)]
    cycles = [_one_cycle(optim_config, stop - start) for start, stop in zip(starts, stops, strict=True)]
    return optax.join_schedules(cycles, starts[1:])


def _one_cycle(c: ml_collections.ConfigDict, length: int) -> optax.Schedule:
    """Warmup and decay over a cycle of ``length`` steps (see ``learning_rate_schedule``)."""
    if c.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=c.lr,
            warmup_steps=c.warmup_steps,
            decay_steps=max(length, c.warmup_steps + 1),
            end_value=c.lr * c.min_lr_ratio,
        )
    decay = (
        optax.linear_schedule(c.lr, c.lr * c.min_lr_ratio, max(length - c.warmup_steps, 1))
        if c.decay == "linear"
        else optax.constant_schedule(c.lr)
    )
    if c.warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, c.warmup_steps), decay], [c.warmup_steps])


def make_optimizer(
    optim_config: ml_collections.ConfigDict, *, total_steps: int, cycle_ends: Sequence[int] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation of ``config.optim`` and its learning-rate schedule (restarted after each
    of ``cycle_ends``: see ``learning_rate_schedule``).

    ``"adamw"`` is decoupled weight decay (Loshchilov & Hutter 2019, Alg. 2); ``"adam"`` is
    Kingma & Ba 2015; ``"sgd"`` uses ``b1`` as momentum. Clipping by global norm comes first.
    """
    c = optim_config
    lr = learning_rate_schedule(c, total_steps=total_steps, cycle_ends=cycle_ends)
    if c.name == "adamw":
        opt = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    elif c.name == "adam":
        opt = optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)
    elif c.name == "sgd":
        opt = optax.sgd(lr, momentum=c.b1)
    else:
        raise ValueError(f"config.optim.name: unknown optimizer {c.name!r}.")
    if c.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
    return opt, lr


def init_state(
    module: nn.Module,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    image_shape: Sequence[int],
    cond: Any = None,
    num_ema: int,
    input_dtype: Any = jnp.float32,
) -> TrainState:
    """Initialises parameters, optimizer state and EMA copies (leaves stay boxed with logical axes).

    Call it under ``jax.eval_shape`` to get shapes and logical axes without allocating, and under
    ``jax.jit(..., out_shardings=...)`` (after ``nn.meta.unbox``) to create the state already sharded.

    Args:
      module: the Flax model.
      tx: the optimizer.
      seed: the run's seed; parameters and the per-step keys derive from it.
      image_shape: ``(H, W, C)`` of one example.
      cond: an example condition of batch 1 (e.g. a label array), or ``None``.
      num_ema: number of EMA copies.
      input_dtype: dtype of the example input (int32 for token runs, whose ``image_shape`` is ``(L,)``).
    """
    key = jax.random.key(seed)
    init_key, dropout_key, run_key = jax.random.split(key, 3)
    x = jnp.zeros((1, *image_shape), input_dtype)
    t = jnp.full((1,), 0.5, jnp.float32)
    params = module.init({"params": init_key, "dropout": dropout_key}, x, t, cond, train=False)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=tuple(jax.tree.map(jnp.copy, params) for _ in range(num_ema)),
        opt_state=tx.init(params),
        rng=jax.random.key_data(run_key),
    )


def _microbatches(batch: Batch, accum_steps: int) -> Batch:
    """Splits ``(B, ...)`` into ``(accum_steps, B / accum_steps, ...)`` taking rows ``j, j + a, ...``.

    The strided split keeps each microbatch's rows on the devices that already hold them.
    """
    return jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1), batch
    )


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    ema_decays: Sequence[float],
    ema_warmup: bool = False,
    ema_std_rels: Sequence[float] = (),
    batch_images: int = 1,
    accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the pure ``train_step(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (scalar, aux)``, e.g. from ``diffax.losses.make_loss``.
      tx: the optimizer.
      lr_schedule: the learning rate as a function of the step (logged only).
      ema_decays: one decay per EMA copy in the state.
      ema_warmup: use ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, which lets short runs'
        averages forget the initialisation (TensorFlow ``ExponentialMovingAverage(num_updates=n)``).
      ema_std_rels: one power-function EMA per value after the decays' copies, its length measured in
        images (Karras et al. 2024, eq. 5; ``diffax.posthoc_ema.power_beta``).
      batch_images: images per update (the global batch), the unit of the power-function EMAs.
      accum_steps: microbatches per update; gradients are averaged over them.

    Returns:
      The step. Its metrics are ``loss`` (mean over the batch), ``grad_norm`` (global norm before
      clipping) and ``lr`` (the rate applied in this step).
    """
    ema_decays = tuple(float(d) for d in ema_decays)
    gammas = tuple(posthoc_ema.gamma_from_std_rel(s) for s in ema_std_rels)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def loss_and_grads(params, batch, key):
        if accum_steps == 1:
            (loss, _), grads = grad_fn(params, batch, key)
            return loss, grads

        def accumulate(carry, inputs):
            index, micro = inputs
            (loss, _), grads = grad_fn(params, micro, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        inputs = (jnp.arange(accum_steps), _microbatches(batch, accum_steps))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, inputs)
        return jax.tree.map(lambda x: x / accum_steps, (loss, grads))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, grads = loss_and_grads(state.params, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        count = (state.step + 1).astype(jnp.float32)
        factors = [
            jnp.minimum(d, (1.0 + count) / (10.0 + count)) if ema_warmup else jnp.float32(d)
            for d in ema_decays
        ]
        factors += [posthoc_ema.power_beta(g, count * batch_images, batch_images) for g in gammas]
        ema_params = [
            jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p, ema, params)
            for d, ema in zip(factors, state.ema_params, strict=True)
        ]
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step)}
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=tuple(ema_params), opt_state=opt_state
        )
        return new_state, metrics

    return train_step


@dataclasses.dataclass(frozen=True)
class Parts:
    """What a config builds: the forward process, the network, the loss and the optimizer."""

    schedule: Any
    module: nn.Module
    loss_fn: LossFn
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    trainer: Any = None  # a few-step trainer (diffax.fewstep.trainers); None: diffusion


def build(config: ml_collections.ConfigDict) -> Parts:
    """Builds the schedule, model, loss and optimizer that ``config`` names (nothing is allocated)."""
    import diffax.fewstep.trainers as fewstep_trainers
    import diffax.losses as losses
    import diffax.models as models
    import diffax.schedules as schedules
    from diffax.autoencoding import system as autoencoder_system
    from diffax.discrete import system

    if system.is_token_run(config):
        return system.build(config)
    if autoencoder_system.is_autoencoder_run(config):
        return autoencoder_system.build(config)
    schedule = schedules.get(config.process.name, **registry_kwargs(config.process))
    module = models.from_config(config.model)

    def apply_fn(params, x, t, cond, key):
        return module.apply({"params": params}, x, t, cond, train=True, rngs={"dropout": key})

    loss_fn = losses.make_loss(schedule, apply_fn, loss=config.loss.name, **registry_kwargs(config.loss))
    trainer = fewstep_trainers.build(config, schedule, module)
    tx, lr_schedule = make_optimizer(
        config.optim, total_steps=config.total_steps, cycle_ends=trainer.stage_ends() if trainer else ()
    )
    return Parts(
        schedule=schedule, module=module, loss_fn=loss_fn, tx=tx, lr_schedule=lr_schedule, trainer=trainer
    )


def registry_kwargs(section: ml_collections.ConfigDict) -> dict[str, Any]:
    """A registry section's keyword arguments: every field but ``name``."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in section.to_dict().items() if k != "name"}


def example_cond(config: ml_collections.ConfigDict) -> jax.Array | None:
    """A batch-1 condition of the kind the run feeds the model (labels, or ``None``)."""
    return jnp.zeros((1,), jnp.int32) if config.input.labels else None


def state_initializer(config: ml_collections.ConfigDict, parts: Parts) -> Callable[[], TrainState]:
    """``init()`` building the (boxed) initial state of a run; see :func:`init_state`."""
    import diffax.data as data
    from diffax.autoencoding import system as autoencoder_system
    from diffax.discrete import system

    if autoencoder_system.is_autoencoder_run(config):
        return autoencoder_system.state_initializer(config, parts)

    example = (
        system.init_state_kwargs(config)
        if system.is_token_run(config)
        else dict(image_shape=data.image_shape(config.input))
    )
    init = functools.partial(
        init_state,
        parts.module,
        parts.tx,
        seed=config.seed,
        cond=example_cond(config),
        num_ema=len(config.ema.decays) + len(config.ema.std_rels),
        **example,
    )
    return init if parts.trainer is None else parts.trainer.initializer(init)


def config_train_step(
    config: ml_collections.ConfigDict, parts: Parts
) -> Callable[[Any, Batch], tuple[Any, Any]]:
    """The run's pure ``train_step``: :func:`make_train_step` on the loss, the autoencoder recipe's
    (``diffax.autoencoding.system``), or the few-step trainer's."""
    from diffax.autoencoding import system as autoencoder_system

    if autoencoder_system.is_autoencoder_run(config):
        return autoencoder_system.make_train_step(config, parts)
    if parts.trainer is not None:
        return parts.trainer.train_step(parts)
    return loss_train_step(config, parts, parts.loss_fn)


def loss_train_step(config: ml_collections.ConfigDict, parts: Parts, loss_fn: LossFn) -> Callable[..., Any]:
    """:func:`make_train_step` on ``loss_fn`` with the run's optimizer, EMA and accumulation settings."""
    return make_train_step(
        loss_fn,
        parts.tx,
        parts.lr_schedule,
        ema_decays=config.ema.decays,
        ema_warmup=config.ema.warmup,
        ema_std_rels=config.ema.std_rels,
        batch_images=config.input.batch_size,
        accum_steps=config.optim.accum_steps,
    )


def start(state: Any, parts: Parts) -> Any:
    """A fresh run's first state: the initialised one, or what the few-step trainer starts from (a
    distilled student starts at its teacher's weights)."""
    return state if parts.trainer is None else parts.trainer.start(state)
