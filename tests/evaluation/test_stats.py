"""Streaming statistics: equal to np.cov on the concatenated data, the same on 1 and 8 devices."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from diffax.evaluation import (
    feature_mean_cov,
    init_feature_stats,
    merge_feature_stats,
    update_feature_stats,
)
from diffax.evaluation._stats import _batch_moments


def _data(seed=0, n=96, d=6, offset=50.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return (offset + rng.normal(size=(n, d)) @ mixing).astype(np.float32)


def _assert_close(actual, expected, rel):
    """Equal up to ``rel`` times the largest entry: float32 sums err relative to the scale."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * np.abs(expected).max())


def _stream(batches, shard=None):
    stats = init_feature_stats(batches[0].shape[1])
    for batch in batches:
        x = batch if shard is None else jax.device_put(batch, shard)
        stats = update_feature_stats(stats, x)
    return stats


def test_matches_np_cov_with_large_offset():
    x = _data()
    mean, cov = feature_mean_cov(_stream(np.split(x, 6)))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-6)
    _assert_close(cov, np.cov(x64, rowvar=False), 1e-6)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_same_on_one_and_eight_devices(axis_type):
    assert jax.device_count() == 8
    x = _data(seed=1)
    batches = np.split(x, 3)  # 32 rows each: 4 per device
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = _stream(batches, NamedSharding(mesh, P("data", None)))
    single = _stream(batches, jax.devices()[0])
    for a, b in zip(sharded, single, strict=True):
        _assert_close(a, b, 1e-6)
    _assert_close(feature_mean_cov(sharded)[1], np.cov(x.astype(np.float64), rowvar=False), 1e-6)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_batch_is_reduced_not_gathered(axis_type):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    x = jax.device_put(_data(n=32), NamedSharding(mesh, P("data", None)))
    hlo = _batch_moments.lower(x, np.ones(32, np.float32)).compile().as_text()
    assert "all-reduce" in hlo
    assert "all-gather" not in hlo


def test_mask_drops_rows_and_merge_is_order_free():
    x = _data(seed=2, n=40)
    mask = np.zeros(40, np.float32)
    mask[:25] = 1.0
    masked = update_feature_stats(init_feature_stats(6), x, mask=mask)
    direct = update_feature_stats(init_feature_stats(6), x[:25])
    for a, b in zip(masked, direct, strict=True):
        _assert_close(a, b, 1e-6)
    parts = [update_feature_stats(init_feature_stats(6), p) for p in np.split(x, [7, 19])]
    left = merge_feature_stats(merge_feature_stats(parts[0], parts[1]), parts[2])
    right = merge_feature_stats(parts[2], merge_feature_stats(parts[1], parts[0]))
    for a, b in zip(left, right, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    _assert_close(feature_mean_cov(left)[1], np.cov(x.astype(np.float64), rowvar=False), 1e-6)
    empty = init_feature_stats(6)
    assert merge_feature_stats(empty, empty).count == 0


def test_bad_input_raises():
    stats = init_feature_stats(3)
    with pytest.raises(ValueError, match=r"features must have shape \(batch, 3\)"):
        update_feature_stats(stats, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="mask"):
        update_feature_stats(stats, np.zeros((4, 3)), mask=np.ones(3))
    with pytest.raises(ValueError, match="ddof"):
        feature_mean_cov(update_feature_stats(stats, np.zeros((1, 3))))
