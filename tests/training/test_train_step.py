"""The pure train step: it learns, it is the same on 1 and 8 devices (with and without FSDP), and its
optimizer, schedule, accumulation and EMA follow their formulas."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffax import data, losses, schedules, sharding, train_state
from diffax.config import base_config
from diffax.models import LOGICAL_AXIS_RULES

IMAGE_SHAPE = (8, 8, 1)


def _optim(**overrides):
    cfg = base_config().optim
    cfg.update(overrides)
    return cfg


def _diffusion_loss(module):
    def apply_fn(params, x, t, cond, key):
        return module.apply({"params": params}, x, t, cond, train=True, rngs={"dropout": key})

    return losses.make_loss(schedules.get("vp_linear"), apply_fn, loss="simple", prediction="eps")


def _mixture(batch_size):
    means = data.mixture_means(num_components=4, image_shape=IMAGE_SHAPE, seed=0)
    return data.MixturePipeline(
        means, std=0.1, labels=False, global_batch=batch_size, seed=0, process_index=0, process_count=1
    )


def _train(module, mesh, *, steps, loss_fn, optim, batch_size=16, ema_decays=(0.9,), fixed_batch=False):
    """Initialises sharded on ``mesh`` and runs ``steps`` jitted, donated steps; returns the host state."""
    tx, lr = train_state.make_optimizer(optim, total_steps=steps)
    init_fn = functools.partial(
        train_state.init_state, module, tx, seed=0, image_shape=IMAGE_SHAPE, num_ema=len(ema_decays)
    )
    shardings = sharding.logical_shardings(jax.eval_shape(init_fn), mesh, LOGICAL_AXIS_RULES)
    state = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = jax.jit(
        train_state.make_train_step(loss_fn, tx, lr, ema_decays=ema_decays, accum_steps=optim.accum_steps),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    pipe = _mixture(batch_size)
    for step in range(steps):
        state, _ = step_fn(state, data.to_global(pipe.get(0 if fixed_batch else step), batch_sharding))
    return state, shardings


def _mesh(data_size, fsdp, devices=None):
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data_size, fsdp=fsdp)), devices=devices)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tiny_net):
    loss_fn = _diffusion_loss(tiny_net)
    batch = _mixture(16).get(0)
    keys = jax.random.split(jax.random.key(7), 16)
    mean_loss = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss_fn(p, batch, k)[0])(keys)))
    mesh = _mesh(-1, 1)
    before, _ = _train(tiny_net, mesh, steps=0, loss_fn=loss_fn, optim=_optim(lr=1e-2))
    after, _ = _train(tiny_net, mesh, steps=30, loss_fn=loss_fn, optim=_optim(lr=1e-2), fixed_batch=True)
    assert float(mean_loss(after.params)) < 0.5 * float(mean_loss(before.params))


@pytest.mark.parametrize(("data_size", "fsdp"), [(8, 1), (2, 4)], ids=["data8", "fsdp4"])
def test_eight_devices_equal_one_device(tiny_net, data_size, fsdp):
    loss_fn = _diffusion_loss(tiny_net)
    optim = _optim(lr=1e-2, warmup_steps=1)
    one, _ = _train(tiny_net, _mesh(1, 1, jax.devices()[:1]), steps=3, loss_fn=loss_fn, optim=optim)
    eight, shardings = _train(tiny_net, _mesh(data_size, fsdp), steps=3, loss_fn=loss_fn, optim=optim)
    specs = [s.spec for s in jax.tree.leaves(shardings.params)]
    assert any("fsdp" in spec for spec in specs) == (fsdp > 1)  # FSDP really splits parameters
    assert int(eight.step) == 3
    chex.assert_trees_all_close(jax.device_get(eight), jax.device_get(one), rtol=2e-5, atol=2e-6)


def test_gradient_accumulation_equals_the_full_batch(tiny_net):
    def loss_fn(params, batch, key):  # deterministic, so the microbatch keys do not matter
        del key
        t = jnp.full(batch["image"].shape[:1], 0.5)
        out = tiny_net.apply({"params": params}, batch["image"], t)
        return jnp.mean(jnp.square(out - batch["image"][:, ::-1])), {}

    mesh = _mesh(-1, 1)
    full, _ = _train(tiny_net, mesh, steps=2, loss_fn=loss_fn, optim=_optim(lr=1e-2))
    accumulated, _ = _train(tiny_net, mesh, steps=2, loss_fn=loss_fn, optim=_optim(lr=1e-2, accum_steps=2))
    chex.assert_trees_all_close(accumulated.params, full.params, rtol=1e-5, atol=1e-6)


def test_ema_and_optimizer_follow_their_formulas():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.25])}
    loss_fn = lambda p, batch, key: (jnp.sum(grads["w"] * p["w"]), {})  # gradient = grads
    optim = _optim(name="sgd", lr=0.1, b1=0.0, grad_clip=0.0)
    tx, lr = train_state.make_optimizer(optim, total_steps=10)
    state = train_state.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=(params, params),
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    step = train_state.make_train_step(loss_fn, tx, lr, ema_decays=(0.9, 0.5), ema_warmup=True)
    new, metrics = step(state, {"image": jnp.zeros((2, 1))})
    expected = params["w"] - 0.1 * grads["w"]
    np.testing.assert_allclose(new.params["w"], expected, rtol=1e-6)
    decay = min(0.9, 2.0 / 11.0)  # warmup: min(d, (1 + n) / (10 + n)) after n = 1 update
    np.testing.assert_allclose(
        new.ema_params[0]["w"], decay * params["w"] + (1 - decay) * expected, rtol=1e-6
    )
    np.testing.assert_allclose(
        new.ema_params[1]["w"], 2.0 / 11.0 * params["w"] + (1 - 2.0 / 11.0) * expected, rtol=1e-6
    )
    np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(grads["w"]), rtol=1e-6)
    assert int(new.step) == 1


def test_clipping_bounds_the_update():
    params = {"w": jnp.zeros(3)}
    g = jnp.array([3.0, 4.0, 0.0])  # norm 5
    tx, _ = train_state.make_optimizer(_optim(name="sgd", lr=1.0, b1=0.0, grad_clip=1.0), total_steps=1)
    updates, _ = tx.update({"w": g}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -g / 5.0, rtol=1e-6)


def test_learning_rate_warmup_then_cosine():
    cfg = _optim(lr=1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    lr = train_state.learning_rate_schedule(cfg, total_steps=110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.5, 1.0], atol=1e-6)
    # Cosine from 1 to 0.1 over steps 10..110: halfway is the mean of the two.
    np.testing.assert_allclose(lr(60), 0.55, rtol=1e-5)
    np.testing.assert_allclose(lr(110), 0.1, rtol=1e-5)
    constant = train_state.learning_rate_schedule(_optim(lr=2.0, warmup_steps=4), total_steps=100)
    np.testing.assert_allclose([constant(2), constant(4), constant(99)], [1.0, 2.0, 2.0], atol=1e-6)


def test_learning_rate_linear_restarts_every_cycle():
    """Linear decay from lr to lr * min_lr_ratio over each cycle between ``cycle_ends`` (progressive
    distillation's halvings); past the last end, one more cycle runs to ``total_steps``."""
    cfg = _optim(lr=1.0, decay="linear", min_lr_ratio=0.0)
    lr = train_state.learning_rate_schedule(cfg, total_steps=60, cycle_ends=(10, 30, 40))
    steps = [0, 5, 9, 10, 20, 29, 30, 35, 40, 50, 59, 60]
    expected = [1.0, 0.5, 0.1, 1.0, 0.5, 0.05, 1.0, 0.5, 1.0, 0.5, 0.05, 0.0]
    np.testing.assert_allclose([lr(s) for s in steps], expected, atol=1e-6)
    whole = train_state.learning_rate_schedule(cfg, total_steps=40, cycle_ends=(10, 30, 40))
    np.testing.assert_allclose([whole(39), whole(40)], [0.1, 0.0], atol=1e-6)  # the last end: no new cycle
    warm = train_state.learning_rate_schedule(
        _optim(lr=1.0, decay="linear", warmup_steps=2, min_lr_ratio=0.5), total_steps=20, cycle_ends=(10,)
    )
    steps, expected = (0, 1, 2, 6, 10, 11, 12, 20), [0, 0.5, 1, 0.75, 0, 0.5, 1, 0.5]
    np.testing.assert_allclose([warm(s) for s in steps], expected, atol=1e-6)


def test_bfloat16_compute_keeps_float32_state(mixture_config):
    mixture_config.model.dtype = "bfloat16"
    parts = train_state.build(mixture_config)
    state = jax.jit(lambda: nn.meta.unbox(train_state.state_initializer(mixture_config, parts)()))()
    step = jax.jit(
        train_state.make_train_step(
            parts.loss_fn, parts.tx, parts.lr_schedule, ema_decays=mixture_config.ema.decays
        )
    )
    state, metrics = step(state, _mixture(8).get(0))
    assert metrics["loss"].dtype == jnp.float32 and bool(jnp.isfinite(metrics["loss"]))
    assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.ema_params, state.opt_state))} <= {
        jnp.dtype(jnp.float32),
        jnp.dtype(jnp.int32),
    }
