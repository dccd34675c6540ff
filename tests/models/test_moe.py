"""DiT-MoE (Fei et al. 2024): routing, the balance loss at its extremes, the layer against a per-token
loop, expert-sharded equal to one device, the paper's parameter counts, and training through
``diffax.train`` with the experts spread over 8 devices."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffax import models, sharding
from diffax.models import moe

TINY = dict(depth=1, hidden_size=16, num_heads=2, num_classes=10, num_experts=8, experts_per_token=2)


def _tokens(shape=(2, 6, 16), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_balance_loss_is_one_for_a_uniform_balanced_router():
    e, k, t = 8, 2, 32
    scores = jnp.full((t, e), 1.0 / e)
    experts = (jnp.arange(t * k).reshape(t, k) % e).astype(jnp.int32)  # every expert chosen T K / E times
    np.testing.assert_allclose(moe.balance_loss(scores, experts, num_experts=e), 1.0, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_balance_loss_is_e_over_k_when_every_token_picks_the_same_experts(k):
    e, t = 8, 20
    scores = jnp.zeros((t, e)).at[:, :k].set(1.0 / k)
    experts = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (t, k))
    np.testing.assert_allclose(moe.balance_loss(scores, experts, num_experts=e), e / k, rtol=1e-6)


def test_balance_loss_gradient_flows_through_the_probabilities_only():
    """d/ds_{t,i} Σ_i f_i P_i = f_i / T: the load is a count (no gradient)."""
    e, k, t = 4, 1, 6
    logits = _tokens((t, e), seed=3)
    scores = jax.nn.softmax(logits)
    _, experts = moe.route(scores, k)
    grad = jax.grad(lambda s: moe.balance_loss(s, experts, num_experts=e))(scores)
    load = np.bincount(np.asarray(experts).ravel(), minlength=e) * e / (t * k)
    np.testing.assert_allclose(grad, np.broadcast_to(load / t, (t, e)), rtol=1e-6)


def test_route_keeps_the_largest_probabilities_unnormalised():
    scores = jax.nn.softmax(_tokens((5, 8), seed=1))
    weights, experts = moe.route(scores, 3)
    order = np.argsort(-np.asarray(scores), axis=-1)[:, :3]
    np.testing.assert_array_equal(experts, order)
    np.testing.assert_allclose(weights, np.take_along_axis(np.asarray(scores), order, axis=-1))


def _swiglu(x, p):
    gate = x @ p["gate"]
    return (gate / (1 + np.exp(-gate)) * (x @ p["up"])) @ p["down"]


def _loop_reference(params, x, *, k, capacity=None):
    """The layer token by token: Σ_k w_k expert_{i_k}(x) + shared(x); with ``capacity``, an expert
    takes the first ``capacity`` (token, choice) pairs of each example in order."""
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    logits = x @ p["router"]
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        used = np.zeros(scores.shape[-1], int)
        for t in range(x.shape[1]):
            for i in np.argsort(-scores[b, t])[:k]:
                used[i] += 1
                if capacity is None or used[i] <= capacity:
                    expert = {name: w[i] for name, w in p["experts"].items()}
                    out[b, t] += scores[b, t, i] * _swiglu(x[b, t], expert)
            out[b, t] += _swiglu(x[b, t], p["shared"])
    return out


@pytest.mark.parametrize(("capacity_factor", "capacity"), [(0.0, None), (0.5, 2)])
def test_layer_equals_a_per_token_loop(capacity_factor, capacity):
    layer = moe.MoEFeedForward(moe.Routing(4, 2, 2, capacity_factor=capacity_factor), 24)
    x = _tokens((2, 7, 16))
    params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), x)["params"])
    assert moe.expert_capacity(7, num_experts=4, top_k=2, capacity_factor=capacity_factor) == (capacity or 7)
    out = jax.jit(layer.apply)({"params": params}, x)
    np.testing.assert_allclose(out, _loop_reference(params, x, k=2, capacity=capacity), rtol=2e-5, atol=2e-5)


def test_training_adds_the_balance_loss_gradient_and_leaves_the_value():
    layer = moe.MoEFeedForward(moe.Routing(4, 1, 1, balance_weight=0.3), 8)
    x = _tokens((2, 5, 16), seed=2)
    params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(1), x)["params"])
    target = _tokens((2, 5, 16), seed=4)

    def objective(p, train):
        return jnp.sum(jnp.square(layer.apply({"params": p}, x, train) - target))

    apply = jax.jit(layer.apply, static_argnums=2, static_argnames="mutable")
    out, sown = apply({"params": params}, x, True, mutable="intermediates")
    np.testing.assert_array_equal(out, apply({"params": params}, x, False))
    balance = lambda p: layer.apply({"params": p}, x, mutable=["intermediates"])[1]["intermediates"][
        "balance_loss"
    ][0]
    scores = jax.nn.softmax(x @ params["router"])
    expected = 0.3 * moe.balance_loss(scores, moe.route(scores, 1)[1], num_experts=4)
    np.testing.assert_allclose(sown["intermediates"]["balance_loss"][0], expected, rtol=1e-6)
    with_loss = jax.jit(jax.grad(objective), static_argnums=1)(params, True)
    plain = jax.jit(jax.grad(objective), static_argnums=1)(params, False)
    extra = jax.jit(jax.grad(balance))(params)
    chex.assert_trees_all_close(with_loss, jax.tree.map(jnp.add, plain, extra), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(extra["router"]).max()) > 0


# Fei et al. 2024, Table 1: total parameters, truncated to the digits the table prints (the
# reference code's B/2-8E2A has 795,664,928; the table says 795M).
@pytest.mark.parametrize(
    ("name", "total", "digits"),
    [
        ("dit_moe_s_2_8e2a", 199e6, 1e6),
        ("dit_moe_s_2_16e2a", 369e6, 1e6),
        ("dit_moe_b_2_8e2a", 795e6, 1e6),
        ("dit_moe_l_2_8e2a", 2.8e9, 1e8),
        ("dit_moe_xl_2_8e2a", 4.1e9, 1e8),
        ("dit_moe_g_2_16e2a", 16.5e9, 1e8),
    ],
)
def test_paper_configurations_have_the_papers_parameter_counts(name, total, digits):
    module = models.get(name)  # ImageNet 256 through the SD VAE: 32x32x4 latents, 1000 classes
    count = models.count_params(models.abstract_params(module, (1, 32, 32, 4)))
    assert count // digits * digits == pytest.approx(total), count


@functools.cache
def _tiny_dit():
    return models.get("dit_moe_s_2_8e2a", **TINY)


def test_eight_expert_devices_equal_one_device():
    module = _tiny_dit()
    x = _tokens((8, 4, 4, 4), seed=5)
    t = jnp.linspace(0.1, 0.9, 8)
    labels = jnp.arange(8) % 10
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, labels)["params"])

    @jax.jit
    def init():  # moved off the zero-initialised adaLN-Zero start, so every parameter has a gradient
        params = nn.meta.unbox(module.init(jax.random.key(0), x, t, labels)["params"])
        return jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)

    params = init()

    def loss(p, x):
        out = module.apply({"params": p}, x, t, labels, train=True, rngs={"dropout": jax.random.key(2)})
        return jnp.sum(jnp.square(out))

    def value_and_grad(p, x):
        return jax.value_and_grad(loss)(p, x)

    one = jax.jit(value_and_grad)(params, x)

    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=8)))
    shardings = sharding.logical_shardings(boxed, mesh, models.LOGICAL_AXIS_RULES)
    kernel = shardings["block_0"]["moe"]["experts"]["gate"]
    assert kernel.spec[0] == "expert"  # each device holds one of the 8 experts
    sharded = jax.device_put(params, shardings)
    eight = jax.jit(value_and_grad, out_shardings=(None, shardings))(sharded, x)
    assert len(eight[1]["block_0"]["moe"]["experts"]["gate"].addressable_shards) == 8
    chex.assert_trees_all_close(jax.device_get(eight), jax.device_get(one), rtol=2e-5, atol=2e-6)
