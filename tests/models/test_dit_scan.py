"""DiT's scanned blocks and remat policies: the same function as the unrolled network."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from diffax import models


def test_scanned_blocks_equal_the_unrolled_network_with_stacked_parameters():
    kw = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5, label_dropout=0.0)
    unrolled, scanned = (
        models.DiT(**kw),
        models.DiT(**kw, scan_blocks=True, remat=True, remat_policy="dots_saveable"),
    )
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, y = jnp.array([0.3, 0.7]), jnp.array([1, 4])

    @jax.jit
    def init(key):  # zero-initialised adaLN and output layers perturbed: every block changes the output
        params = nn.meta.unbox(unrolled.init(key, x, t, y)["params"])
        return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)

    params = init(jax.random.key(1))
    blocks = [params.pop(f"block_{i}") for i in range(2)]
    stacked = dict(params, blocks=jax.tree.map(lambda *b: jnp.stack(b), *blocks))
    abstract = jax.eval_shape(scanned.init, jax.random.key(1), x, t, y)["params"]
    assert nn.get_partition_spec(abstract)["blocks"]["adaln"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "mlp"
    )
    chex.assert_trees_all_equal_shapes(nn.meta.unbox(abstract), stacked)
    for_unrolled = dict(params, **{f"block_{i}": b for i, b in enumerate(blocks)})

    def value_and_grad(module, p):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(module.apply({"params": p}, x, t, y) ** 2)))(p)

    value, grads = value_and_grad(scanned, stacked)
    reference_value, reference = value_and_grad(unrolled, for_unrolled)
    chex.assert_trees_all_close(value, reference_value, rtol=1e-5)
    reference["blocks"] = jax.tree.map(
        lambda *b: jnp.stack(b), *[reference.pop(f"block_{i}") for i in range(2)]
    )
    chex.assert_trees_all_close(grads, reference, rtol=1e-4, atol=1e-6)


def test_unknown_remat_policy_and_scan_with_experts_are_named():
    with pytest.raises(ValueError, match="remat_policy='save_everything'"):
        models.DiT(depth=1, remat=True, remat_policy="save_everything")
    with pytest.raises(ValueError, match="scan_blocks"):
        models.DiT(depth=2, scan_blocks=True, num_experts=4)
