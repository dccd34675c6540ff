"""The C++ CPU kernels (``diffax/models/cpu_*.cc`` via ``cpu_kernels``) against truth.

Attention: values, logsumexp and gradients against float64 numpy (the closed-form softmax gradients),
over shapes with lengths off the kernel's 16-lane tiles, head widths 1 to 64 and huge logits; the
layer's forward and reverse modes against the plain formulation. Winograd transforms: against XLA's
formulation of the same linear maps, channels on and off 16-lane blocks; ``conv3x3`` and its training
form differentiated through them in every mode. Both: ``vmap`` and sharding over the 8 test devices.
The build: its cache, a missing compiler, a broken source, and the switch that turns it off.
"""

import os
import pathlib
import platform
import shutil
import subprocess
import sys
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffax.kernels.cpu import ffi as cpu_kernels
from diffax.kernels.cpu import winograd
from diffax.models import layers

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler: the kernel cannot be built"
)

# (B, T, S, N, H): self- and cross-attention, lengths on and off 16-row tiles, one row, head widths the
# kernel compiles for (8, 16, 32, 64) and others.
SHAPES = [
    (2, 9, 5, 3, 4),
    (1, 37, 45, 2, 5),
    (2, 16, 16, 1, 16),
    (1, 20, 33, 2, 64),
    (3, 1, 1, 1, 1),
    (2, 41, 23, 3, 8),
    (1, 18, 50, 1, 32),
]


def _normal(seed, *shapes, scale=1.0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for s in shapes)


def _reference64(q, k, v, d_out):
    """Float64 (out, logsumexp, dq, dk, dv) from the closed forms: P = softmax(c q k^T), out = P v,
    dv = P^T d_out, dP = d_out v^T, dS = P (dP - rowsum(dP P)), dq = c dS k, dk = c dS^T q."""
    q, k, v, d_out = (np.asarray(a, np.float64) for a in (q, k, v, d_out))
    c = q.shape[-1] ** -0.5
    s = c * np.einsum("btnh,bsnh->bnts", q, k)
    m = s.max(-1, keepdims=True)
    lse = m + np.log(np.exp(s - m).sum(-1, keepdims=True))
    p = np.exp(s - lse)
    out = np.einsum("bnts,bsnh->btnh", p, v)
    dp = np.einsum("btnh,bsnh->bnts", d_out, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = c * np.einsum("bnts,bsnh->btnh", ds, k)
    dk = c * np.einsum("bnts,btnh->bsnh", ds, q)
    dv = np.einsum("bnts,btnh->bsnh", p, d_out)
    return out, lse[..., 0], dq, dk, dv


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels.available(), "the kernel did not build (see the warning)"


@pytest.mark.parametrize("transform", [jax.jit, lambda fn: fn], ids=["jit", "eager"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_equals_float64(transform, shape, seed):
    b, t, s, n, h = shape
    q, k, v, d_out = _normal(seed, (b, t, n, h), (b, s, n, h), (b, s, n, h), (b, t, n, h), scale=2.0)
    out, lse, dq, dk, dv = _reference64(q, k, v, d_out)
    got_out, got_lse = transform(cpu_kernels.attention_forward)(q, k, v)
    chex.assert_shape(got_lse, (b, n, t))
    # Within twice the float32 rounding of XLA's own attention (the same sums in another order): at
    # H=64 on an AVX2 machine that is 6e-6, above a fixed 3e-6.
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    xla_out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)
    float32_error = float(np.max(np.abs(np.asarray(xla_out, np.float64) - out)))
    np.testing.assert_allclose(got_out, out, atol=max(3e-6, 2 * float32_error), rtol=1e-5)
    np.testing.assert_allclose(got_lse, lse, atol=3e-6, rtol=1e-6)
    grads = transform(cpu_kernels.attention_backward)(q, k, v, got_out, got_lse, d_out)
    for got, want in zip(grads, (dq, dk, dv), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_huge_logits_stay_finite_and_exact():
    """Scores spread over thousands: most probabilities underflow, the row max must not overflow."""
    q, k, v, d_out = _normal(5, (2, 19, 2, 8), (2, 23, 2, 8), (2, 23, 2, 8), (2, 19, 2, 8))
    q = q * 300.0
    out, lse, *grads = _reference64(q, k, v, d_out)
    got_out, got_lse = jax.jit(cpu_kernels.attention_forward)(q, k, v)
    np.testing.assert_allclose(got_out, out, atol=3e-5, rtol=1e-5)
    np.testing.assert_allclose(got_lse, lse, rtol=1e-6)
    got = jax.jit(cpu_kernels.attention_backward)(q, k, v, got_out, got_lse, d_out)
    for g, want in zip(got, grads, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, want, atol=2e-3 * np.abs(want).max(), rtol=1e-3)


@pytest.mark.parametrize("train", [True, False])  # custom VJP with the kernel's backward; custom JVP
def test_layer_reverse_mode_equals_plain(train):
    q, k, v, w = _normal(6, (2, 21, 3, 8), (2, 17, 3, 8), (2, 17, 3, 8), (2, 21, 3, 8), scale=2.0)

    def loss(impl):
        return lambda q, k, v: jnp.sum(layers.dot_product_attention(q, k, v, impl=impl, train=train) * w)

    grads = {impl: jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v) for impl in ("cpu", "xla")}
    chex.assert_trees_all_close(grads["cpu"], grads["xla"], atol=2e-5, rtol=1e-5)
    # The kernel runs forward and backward in a train step; train=False differentiates the XLA
    # formulation (its custom JVP), and runs the kernel only without differentiation.
    assert str(jax.make_jaxpr(jax.grad(loss("cpu")))(q, k, v)).count("custom_vmap_call") == (
        2 if train else 0
    )
    assert "custom_vmap_call" in str(jax.make_jaxpr(loss("cpu"))(q, k, v))


def test_layer_forward_mode_equals_plain():
    """train=False stays differentiable in forward mode (the exact likelihood's JVPs)."""
    q, k, v, dq, dk, dv = _normal(7, *[(2, 12, 2, 4)] * 6)
    attend = lambda impl: lambda q, k, v: layers.dot_product_attention(q, k, v, impl=impl)
    got = jax.jit(lambda *a: jax.jvp(attend("cpu"), a[:3], a[3:]))(q, k, v, dq, dk, dv)
    want = jax.jvp(attend("xla"), (q, k, v), (dq, dk, dv))
    chex.assert_trees_all_close(got, want, atol=3e-6, rtol=1e-5)


def test_vmap_folds_the_mapped_axis_into_the_batch():
    q, k, v = _normal(8, (4, 2, 10, 2, 8), (2, 6, 2, 8), (4, 2, 6, 2, 8))
    attend = lambda q, k, v: layers.dot_product_attention(q, k, v, impl="cpu", train=True)
    got = jax.jit(jax.vmap(attend, in_axes=(0, None, 0)))(q, k, v)
    want = jnp.stack([attend(q[i], k, v[i]) for i in range(4)])
    chex.assert_trees_all_close(got, want, atol=1e-6)


@pytest.mark.parametrize("mesh_shape,batch_axes", [((8,), ("data",)), ((4, 2), ("data", "fsdp"))])
def test_sharded_batch_runs_per_device_without_gathering(mesh_shape, batch_axes):
    """Batch-sharded inputs: each device attends over its own batch slice (no all-gather), and the
    values and gradients equal the unsharded ones."""
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp")[: len(mesh_shape)])
    batch = NamedSharding(mesh, P(batch_axes))
    q, k, v = _normal(9, *[(8, 16, 2, 8)] * 3)

    def loss(q, k, v):
        return jnp.sum(layers.dot_product_attention(q, k, v, impl="cpu", train=True) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=batch, out_shardings=None)
    placed = [jax.device_put(a, batch) for a in (q, k, v)]
    hlo = step.lower(*placed).compile().as_text()
    assert "diffax_attention_bwd" in hlo and "all-gather" not in hlo
    chex.assert_trees_all_close(step(*placed), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v))


def test_mismatched_shapes_are_a_clear_error():
    q, k = _normal(10, (1, 4, 2, 8), (1, 4, 2, 4))
    with pytest.raises(Exception, match="diffax_attention_fwd: k and v need shape"):
        jax.block_until_ready(cpu_kernels.attention_forward(q, k, k))
    tiles, other = _normal(10, (36, 1, 2, 2, 8), (16, 1, 2, 2, 8))
    with pytest.raises(Exception, match=r"diffax_winograd_products: x \(a \* a, B, th, tw, C\), u"):
        jax.block_until_ready(cpu_kernels.winograd_products(tiles, jnp.zeros((36, 5, 3))))
    with pytest.raises(Exception, match="diffax_winograd_filter_grad: x .* give"):
        jax.block_until_ready(cpu_kernels.winograd_filter_grad(tiles, other, winograd.transforms(4)[1]))


@pytest.mark.slow
@pytest.mark.skipif(
    platform.machine() != "x86_64"
    or not {"avx2", "fma", "avx512f"} <= set(cpu_kernels._cpu_identity().split()),
    reason="builds for x86-64-v3 (AVX2) on an AVX-512 CPU; without AVX-512 the native build already takes "
    "the AVX2 path (cpu_kernels.h), which the rest of this file tests",
)
def test_kernels_built_for_avx2_equal_truth(tmp_path):
    """Built for AVX2 (8-lane vectors, 16 registers: smaller register blocks), the kernels pass this
    file's tests of their values, derivatives, vmap and sharding, run in a child process."""
    env = dict(os.environ, DIFFAX_CPU_MARCH="x86-64-v3", DIFFAX_CACHE_DIR=str(tmp_path))
    chosen = "not build and not without_the_kernel and not avx2"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        __file__,
        "-k",
        chosen,
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[2])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert list(tmp_path.glob("diffax_cpu_kernels-*.so")), "the child did not build its own library"


def test_build_is_cached_and_keyed_by_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFAX_CACHE_DIR", str(tmp_path / "cache"))
    first = cpu_kernels.build()
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    edited = tmp_path / "cpu_attention.cc"
    edited.write_text(cpu_kernels.SOURCES[0].read_text() + "\n// edited\n")
    assert cpu_kernels.build((edited, *cpu_kernels.SOURCES[1:])) != first


def test_build_failures_name_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFAX_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-c\\+\\+'"):
        cpu_kernels.build(compiler="no-such-c++")
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    with pytest.raises(RuntimeError, match="broken.cc"):
        cpu_kernels.build((broken,))
    assert not list(tmp_path.glob("*.so"))  # nothing half-built left behind


@pytest.fixture
def fresh_availability():
    cpu_kernels.available.cache_clear()
    yield
    cpu_kernels.available.cache_clear()


@pytest.mark.parametrize("env", [{"DIFFAX_CPU_KERNELS": "0"}, {"CXX": "no-such-c++"}])
def test_without_the_kernel_the_xla_formulation_runs(monkeypatch, tmp_path, fresh_availability, env):
    monkeypatch.setenv("DIFFAX_CACHE_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    q, k, v = _normal(11, *[(1, 8, 2, 4)] * 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attend = lambda q: layers.dot_product_attention(q, k, v, impl="cpu", train=True)
        jaxpr = str(jax.make_jaxpr(attend)(q))
    assert "custom_vmap_call" not in jaxpr
    assert ("CPU kernels not built" in " ".join(str(w.message) for w in caught)) == ("CXX" in env)
    np.testing.assert_allclose(attend(q), _reference64(q, k, v, q)[0], atol=3e-6, rtol=1e-5)


@pytest.mark.parametrize("tile", sorted(winograd.POINTS))
@pytest.mark.parametrize("shape", [(2, 9, 7, 3), (1, 16, 16, 20), (2, 12, 20, 32)])
def test_winograd_transforms_equal_xla(tile, shape):
    x = _normal(12, shape, scale=3.0)[0]
    a, (th, tw) = tile + 2, winograd._grid(x, tile)
    products = _normal(13, (a * a, shape[0], th, tw, shape[-1]))[0]
    xla = (winograd._input_tiles_xla, winograd._grad_tiles_xla, winograd._untile_xla)
    for which, arg in enumerate((x, x, products)):
        got = jax.jit(winograd._kernel_maps(tile)[which])(arg)
        want = xla[which](arg, tile)
        np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.max(jnp.abs(want))), rtol=1e-5)


@pytest.mark.parametrize(
    "b,th,tw,c,o", [(2, 3, 5, 3, 7), (1, 9, 17, 37, 45), (2, 8, 8, 16, 70), (1, 20, 20, 200, 3)]
)
def test_winograd_products_equal_float64(b, th, tw, c, o):
    """The per-point products (register blocks of tiles by two vectors of columns, ragged edges,
    contractions over several 128-channel chunks, blocks of 256 tiles) against float64 numpy."""
    x, filters = _normal(26, (16, b, th, tw, c), (16, c, o))
    want = np.einsum("fbyzc,fco->fbyzo", np.asarray(x, np.float64), np.asarray(filters, np.float64))
    got = jax.jit(cpu_kernels.winograd_products)(x, filters)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-5)


@pytest.mark.parametrize("tile", sorted(winograd.POINTS))
@pytest.mark.parametrize(
    "b,th,tw,c,o", [(2, 3, 5, 3, 7), (1, 9, 17, 37, 45), (3, 8, 8, 16, 70), (1, 2, 2, 64, 3)]
)
def test_winograd_filter_grad_equals_float64(tile, b, th, tw, c, o):
    """The kernel gradient's products (register blocks, ragged edges, 128-tile chunks) and
    G^T P G output transform, against float64 numpy."""
    a, g = tile + 2, winograd.transforms(tile)[1]
    x, d = _normal(24, (a * a, b, th, tw, c), (a * a, b, th, tw, o))
    products = np.einsum(
        "ftc,fto->fco", *(np.asarray(t, np.float64).reshape(a * a, -1, t.shape[-1]) for t in (x, d))
    )
    want = np.einsum("pk,ql,pqco->klco", g, g, products.reshape(a, a, c, o))
    got = jax.jit(lambda x, d: cpu_kernels.winograd_filter_grad(x, d, g))(x, d)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-5)


def _conv_args(seed):
    x, kernel, dy = _normal(seed, (2, 16, 20, 6), (3, 3, 6, 5), (2, 16, 20, 5))
    return x, kernel / 4.0, dy


@pytest.fixture
def without_kernels(monkeypatch):
    def run(fn, *args):
        with monkeypatch.context() as patch:
            patch.setattr(cpu_kernels, "available", lambda: False)
            return fn(*args)

    return run


def test_conv3x3_derivatives_through_the_kernels_equal_xlas(without_kernels):
    """conv3x3 runs the transforms by the kernels and differentiates XLA's (custom JVP): forward and
    reverse mode, and the training form's custom backward, equal the all-XLA ones."""
    x, kernel, dy = _conv_args(14)
    tangents = _normal(15, x.shape, kernel.shape)
    cases = {
        "value": lambda x, k: winograd.conv3x3(x, k),
        "jvp": lambda x, k: jax.jvp(winograd.conv3x3, (x, k), tangents)[1],
        "vjp": lambda x, k: jax.vjp(winograd.conv3x3, x, k)[1](dy),
        "train vjp": lambda x, k: jax.vjp(winograd.conv3x3_train, x, k)[1](dy),
        "train vjp, second order": jax.grad(
            lambda x, k: jnp.sum(jax.vjp(winograd.conv3x3_train, x, k)[1](dy)[1] ** 2), argnums=(0, 1)
        ),
    }
    for name, fn in cases.items():
        assert "custom_vmap_call" in str(jax.make_jaxpr(fn)(x, kernel)), name
        got = jax.jit(fn)(x, kernel)
        want = without_kernels(jax.jit(fn), x, kernel)
        chex.assert_trees_all_close(got, want, atol=2e-5, rtol=1e-5, custom_message=name)


def test_conv3x3_vmap_and_sharding_through_the_kernels():
    x, kernel, dy = _conv_args(16)
    stacked = jnp.stack([x, 2.0 * x, -x])
    mapped = jax.jit(jax.vmap(winograd.conv3x3, in_axes=(0, None)))(stacked, kernel)
    chex.assert_trees_all_close(mapped, jnp.stack([winograd.conv3x3(a, kernel) for a in stacked]), atol=1e-5)
    grad = lambda x, dy: winograd.conv3x3_kernel_grad(x, dy)  # sums over the batch: vmap maps, not folds
    mapped = jax.jit(jax.vmap(grad, in_axes=(0, None)))(stacked, dy)
    chex.assert_trees_all_close(mapped, jnp.stack([grad(a, dy) for a in stacked]), atol=1e-4, rtol=1e-5)

    kernels = jnp.stack([kernel, -2.0 * kernel])  # an ensemble: the products map over the filters
    mapped = jax.jit(jax.vmap(winograd.conv3x3, in_axes=(None, 0)))(x, kernels)
    want = jnp.stack([winograd.conv3x3(x, k) for k in kernels])
    chex.assert_trees_all_close(mapped, want, atol=1e-5, rtol=1e-5)

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    batch = NamedSharding(mesh, P("data"))
    grad = jax.grad(lambda x, k: jnp.sum(winograd.conv3x3_train(x, k) ** 2), argnums=(0, 1))

    def check(x, kernel, kernel_spec):
        step = jax.jit(grad, in_shardings=(batch, kernel_spec and NamedSharding(mesh, kernel_spec)))
        placed = jax.device_put(x, batch)
        hlo = step.lower(placed, kernel).compile().as_text()
        assert "diffax_winograd_tiles" in hlo and "diffax_winograd_filter_grad" in hlo
        assert ("all-gather" in hlo) == (kernel_spec is not None)  # never the batch; an FSDP kernel
        for g, w in zip(step(placed, kernel), jax.jit(grad)(x, kernel), strict=True):  # sums in another order
            np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))), rtol=1e-5)

    big = jnp.concatenate([x] * 4)  # batch 8
    check(big, kernel, None)
    check(jnp.concatenate([big] * 4, axis=3), jnp.concatenate([kernel] * 4, axis=2), P(None, None, "fsdp"))


def _group_norm64(x, gamma, beta, groups, silu, dy, epsilon=1e-5):
    """Float64 (y, mean, rstd, dx, dgamma, dbeta) of GroupNorm with per-example (B, C) gamma, beta and
    optional SiLU, from the closed forms (Wu & He 2018, Eq. (1)-(3) and their derivative)."""
    x, gamma, beta, dy = (np.asarray(a, np.float64) for a in (x, gamma, beta, dy))
    b, p, c = x.shape
    grouped = x.reshape(b, p, groups, c // groups)
    mean = grouped.mean(axis=(1, 3))
    rstd = 1.0 / np.sqrt(grouped.var(axis=(1, 3)) + epsilon)
    xhat = ((grouped - mean[:, None, :, None]) * rstd[:, None, :, None]).reshape(b, p, c)
    z = xhat * gamma[:, None] + beta[:, None]
    sig = 1.0 / (1.0 + np.exp(-z))
    y = z * sig if silu else z
    dz = dy * sig * (1.0 + z * (1.0 - sig)) if silu else dy
    dxhat = (dz * gamma[:, None]).reshape(b, p, groups, c // groups)
    xh = xhat.reshape(dxhat.shape)
    dx = rstd[:, None, :, None] * (
        dxhat - dxhat.mean(axis=(1, 3), keepdims=True) - xh * (dxhat * xh).mean(axis=(1, 3), keepdims=True)
    )
    return y, mean, rstd, dx.reshape(b, p, c), (dz * xhat).sum(1), dz.sum(1)


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize(
    "shape,groups,centre", [((2, 30, 16), 4, 0.0), ((3, 64, 24), 4, 5.0), ((2, 7, 6), 2, 0.0)]
)
def test_group_norm_kernel_equals_float64(shape, groups, centre, silu):
    x, dy = _normal(17, shape, shape)
    x = x + centre
    gamma, beta = _normal(18, (shape[0], shape[-1]), (shape[0], shape[-1]))
    y, mean, rstd, dx, dgamma, dbeta = _group_norm64(x, gamma, beta, groups, silu, dy)
    kw = dict(groups=groups, silu=silu)
    got = jax.jit(lambda *a: cpu_kernels.group_norm_forward(*a, epsilon=1e-5, **kw))(x, gamma, beta)
    for g, want in zip(got, (y, mean, rstd), strict=True):
        np.testing.assert_allclose(g, want, atol=2e-6 * max(1.0, centre), rtol=1e-5)
    grads = jax.jit(lambda *a: cpu_kernels.group_norm_backward(*a, **kw))(x, gamma, beta, *got[1:], dy)
    for g, want in zip(grads, (dx, dgamma, dbeta), strict=True):
        np.testing.assert_allclose(g, want, atol=2e-5 * np.abs(want).max(), rtol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_group_norm_layer_through_the_kernel_equals_plain(train):
    """impl="cpu" (the kernel, its custom VJP or custom JVP) against the plain formulation: values,
    reverse mode with FiLM modulation, and forward mode."""
    x, w, tangent = _normal(19, *[(2, 6, 5, 24)] * 3)
    scale, bias = _normal(20, (24,), (24,))
    modulation = _normal(21, (2, 24), (2, 24))

    def norm(impl):
        return lambda x, s, b, m: layers.group_norm(
            x, s, b, num_groups=4, modulation=m, impl=impl, train=train
        )

    assert "custom_vmap_call" in str(jax.make_jaxpr(norm("cpu"))(x, scale, bias, modulation))
    loss = lambda impl: lambda *a: jnp.sum(norm(impl)(*a) * w)
    args = (x, scale, bias, modulation)
    chex.assert_trees_all_close(jax.jit(norm("cpu"))(*args), norm("xla")(*args), atol=2e-6)
    grads = {impl: jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2, 3)))(*args) for impl in ("cpu", "xla")}
    chex.assert_trees_all_close(grads["cpu"], grads["xla"], atol=2e-5, rtol=1e-5)
    if not train:
        jvp = lambda impl: jax.jvp(lambda x: norm(impl)(x, scale, bias, modulation), (x,), (tangent,))
        chex.assert_trees_all_close(jax.jit(lambda: jvp("cpu"))(), jvp("xla"), atol=2e-5, rtol=1e-5)


def test_group_norm_kernel_vmap_and_sharding():
    x = _normal(22, (8, 12, 16))[0]
    gamma, beta = _normal(23, (8, 16), (8, 16))
    fwd = lambda x, g, b: cpu_kernels.group_norm_forward(x, g, b, groups=4, epsilon=1e-5, silu=True)[0]
    mapped = jax.jit(jax.vmap(fwd, in_axes=(0, None, None)))(jnp.stack([x[:2], x[2:4]]), gamma[:2], beta[:2])
    chex.assert_trees_all_close(
        mapped, jnp.stack([fwd(x[:2], gamma[:2], beta[:2]), fwd(x[2:4], gamma[:2], beta[:2])])
    )
    mesh = jax.make_mesh((8,), ("data",))
    batch = NamedSharding(mesh, P("data"))
    step = jax.jit(fwd, in_shardings=batch)
    placed = [jax.device_put(a, batch) for a in (x, gamma, beta)]
    assert "all-gather" not in step.lower(*placed).compile().as_text()
    chex.assert_trees_all_close(step(*placed), fwd(x, gamma, beta))
