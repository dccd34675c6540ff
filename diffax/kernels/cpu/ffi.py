"""Hand-written CPU kernels behind XLA's foreign function interface, built from their C++ source.

Next to this file: ``cpu_attention.cc`` (fused softmax attention, forward and backward),
``cpu_winograd.cc`` (the tile transforms and the kernel gradient of Winograd convolution),
``cpu_group_norm.cc`` (GroupNorm with a per-example affine and SiLU, forward and backward) and their
shared ``cpu_kernels.h``.
They are compiled on first use for the machine they run on (``-march=native``, or ``$DIFFAX_CPU_MARCH``)
into one library in a per-user cache, keyed by the sources, the compiler, the flags, jaxlib and the CPU,
then registered with XLA for the CPU platform. Their vectors are one register wide (16 floats with
AVX-512, 8 with AVX2, 4 otherwise). Without a C++17 compiler (``$CXX``, else ``c++``) or with
``DIFFAX_CPU_KERNELS=0`` nothing is built and ``available()`` is False: callers use their XLA
formulation instead (a warning says why once, for a failed build).
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

HERE = pathlib.Path(__file__).parent
SOURCES = (HERE / "cpu_attention.cc", HERE / "cpu_winograd.cc", HERE / "cpu_group_norm.cc")
HEADERS = (HERE / "cpu_kernels.h",)
MARCH_ENV = "DIFFAX_CPU_MARCH"  # the -march= target, "native" unless set (tests build for others)


def flags() -> tuple[str, ...]:
    """The compiler flags: optimised for ``$DIFFAX_CPU_MARCH``, else for the machine it runs on."""
    return ("-O3", f"-march={os.environ.get(MARCH_ENV, 'native')}", "-std=c++17", "-fPIC", "-shared", "-w")


# The FFI targets: name -> the handler symbol the source exports.
TARGETS = {
    "diffax_attention_fwd": "DiffaxAttentionForward",
    "diffax_attention_bwd": "DiffaxAttentionBackward",
    "diffax_winograd_tiles": "DiffaxWinogradTiles",
    "diffax_winograd_untile": "DiffaxWinogradUntile",
    "diffax_winograd_products": "DiffaxWinogradProducts",
    "diffax_winograd_filter_grad": "DiffaxWinogradFilterGrad",
    "diffax_group_norm_fwd": "DiffaxGroupNormForward",
    "diffax_group_norm_bwd": "DiffaxGroupNormBackward",
}
DISABLE_ENV = "DIFFAX_CPU_KERNELS"  # "0" keeps every caller on its XLA formulation


def cache_dir() -> pathlib.Path:
    """``$DIFFAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffax``, else ``~/.cache/diffax``."""
    if "DIFFAX_CACHE_DIR" in os.environ:
        return pathlib.Path(os.environ["DIFFAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "diffax"


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the model and feature flags of the first CPU."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    first = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(first[:2]) or platform.machine()


def build(sources: tuple[pathlib.Path, ...] = SOURCES, compiler: str | None = None) -> pathlib.Path:
    """Compiles ``sources`` into one shared library in ``cache_dir()`` unless it is there; returns its path.

    Raises ``RuntimeError`` with the compiler's message when the build fails or no compiler is found.
    """
    compiler = compiler or os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    texts = [path.read_text() for path in (*sources, *HEADERS)]
    compile_flags = flags()
    key = hashlib.sha256(
        "\0".join([*texts, version, " ".join(compile_flags), jaxlib.__version__, _cpu_identity()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"diffax_cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = pathlib.Path(scratch) / target.name
        cmd = [
            compiler,
            *compile_flags,
            f"-I{jax.ffi.include_dir()}",
            f"-I{HERE}",
            *map(str, sources),
            "-o",
            str(built),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
        os.replace(built, target)  # atomic: concurrent builders each install a whole library
    return target


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered (once per process; False when disabled)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"diffax: CPU kernels not built ({e}); the XLA formulations run instead", stacklevel=2)
        return False
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def runs() -> bool:
    """Whether callers use the kernels: on the CPU backend, once they are built (``available()``)."""
    return jax.default_backend() == "cpu" and available()


def _batch_parallel(call, rule: str):
    """``call`` (an FFI call whose arrays hold a batch axis ``b``, and maybe a heads axis ``n``) made
    shardable and batchable: under a mesh each device runs it on its own slice of ``b`` and ``n``
    (every other axis replicated: no all-gather of the batch), and ``vmap`` folds the mapped axis into
    ``b``. ``rule`` names every axis of the operands and results, einsum-like; the first operand
    holds ``b``. A call whose results lack ``b`` sums over it: its per-device results are summed
    across the devices (``psum``). ``vmap`` runs the call once per mapped index (``lax.map``) instead
    of folding where the call sums over ``b`` or an operand without ``b`` is mapped."""
    arrays = [spec.split() for spec in rule.replace("->", ",").split(",")]
    operands = len(rule.split("->")[0].split(","))
    order = list(dict.fromkeys(f for axes in arrays for f in axes))
    kept = ("b", "n")
    contracted = all("b" not in axes for axes in arrays[operands:])

    def shardings(mesh, arg_shapes):
        given = dict(
            zip(arrays[0], tuple(arg_shapes[0].sharding.spec) + (None,) * len(arrays[0]), strict=False)
        )
        return [NamedSharding(mesh, P(*(given[f] if f in kept else None for f in axes))) for axes in arrays]

    def infer(mesh, arg_shapes, result_shape):
        return tuple(shardings(mesh, arg_shapes)[len(arg_shapes) :])

    def partition(mesh, arg_shapes, result_shape):
        specs = shardings(mesh, arg_shapes)
        summed = specs[0].spec[arrays[0].index("b")] if contracted else None
        lower = call if summed is None else lambda *args: jax.lax.psum(call(*args), summed)
        return mesh, lower, tuple(specs[len(arg_shapes) :]), tuple(specs[: len(arg_shapes)])

    sharded = custom_partitioning(call)
    sharded.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=tuple(f for f in order if f not in kept),
    )
    # A custom partitioning's callback address enters the persistent compilation cache's key, so it is
    # left out where there is nothing to partition.
    batched = custom_vmap(lambda *args: (sharded if jax.device_count() > 1 else call)(*args))

    @batched.def_vmap
    def _(axis_size, in_batched, *args):
        if contracted or any(m and "b" not in axes for m, axes in zip(in_batched, arrays, strict=False)):
            mapped = [a for a, m in zip(args, in_batched, strict=True) if m]

            def one(sliced):
                each = iter(sliced)
                return batched(*(next(each) if m else a for a, m in zip(args, in_batched, strict=True)))

            return jax.lax.map(one, mapped), (True,) * (len(arrays) - operands)
        folded = []
        for a, mapped, axes in zip(args, in_batched, arrays, strict=False):
            if "b" not in axes:
                folded.append(a)
                continue
            k = axes.index("b")
            if mapped:  # the mapped axis next to (before) the batch axis
                whole = jnp.moveaxis(a, 0, k)
            else:
                whole = jnp.broadcast_to(jnp.expand_dims(a, k), (*a.shape[:k], axis_size, *a.shape[k:]))
            folded.append(whole.reshape(*whole.shape[:k], -1, *whole.shape[k + 2 :]))
        outs = batched(*folded)
        split = []
        for o, axes in zip(outs, arrays[len(args) :], strict=True):
            k = axes.index("b")
            split.append(jnp.moveaxis(o.reshape(*o.shape[:k], axis_size, -1, *o.shape[k + 1 :]), k, 0))
        return tuple(split), (True,) * len(outs)

    return batched


def _forward_call(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, t, n, h = q.shape
    result = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
    return jax.ffi.ffi_call("diffax_attention_fwd", result)(q, k, v, scale=np.float32(h**-0.5))


def _backward_call(q, k, v, out, lse, d_out):
    result = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
    call = jax.ffi.ffi_call("diffax_attention_bwd", result)
    return call(q, k, v, out, lse, d_out, scale=np.float32(q.shape[-1] ** -0.5))


_X, _KV = "b t n h", "b s n h"
_forward = _batch_parallel(_forward_call, f"{_X}, {_KV}, {_KV} -> {_X}, b n t")
_backward = _batch_parallel(_backward_call, f"{_X}, {_KV}, {_KV}, {_X}, b n t, {_X} -> {_X}, {_KV}, {_KV}")


def attention_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax attention ``softmax(q k^T / sqrt(H)) v`` of float32 (B, T, N, H) queries against
    (B, S, N, H) keys and values, heads in place; returns (out (B, T, N, H), the scores' logsumexp
    (B, N, T))."""
    return _forward(q, k, v)


def attention_backward(
    q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array, d_out: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of ``attention_forward``'s out for the cotangent ``d_out``, from its saved out and
    logsumexp (Dao et al., "FlashAttention", 2022, Alg. 2)."""
    return _backward(q, k, v, out, lse, d_out)


def _tiles_call(x: jax.Array, matrix: jax.Array) -> tuple[jax.Array]:
    b, h, w, c = x.shape
    a, tile = matrix.shape[0], matrix.shape[0] - 2
    result = jax.ShapeDtypeStruct((a * a, b, -(-h // tile), -(-w // tile), c), jnp.float32)
    return jax.ffi.ffi_call("diffax_winograd_tiles", (result,))(x, matrix)


def _untile_call(t: jax.Array, matrix: jax.Array) -> tuple[jax.Array]:
    _, b, th, tw, c = t.shape
    tile = matrix.shape[0]
    result = jax.ShapeDtypeStruct((b, th * tile, tw * tile, c), jnp.float32)
    return jax.ffi.ffi_call("diffax_winograd_untile", (result,))(t, matrix)


def _products_call(x: jax.Array, filters: jax.Array) -> tuple[jax.Array]:
    result = jax.ShapeDtypeStruct((*x.shape[:-1], filters.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call("diffax_winograd_products", (result,))(x, filters)


def _filter_grad_call(x: jax.Array, d: jax.Array, matrix: jax.Array) -> tuple[jax.Array]:
    r = matrix.shape[1]
    result = jax.ShapeDtypeStruct((r, r, x.shape[-1], d.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call("diffax_winograd_filter_grad", (result,))(x, d, matrix)


_tiles = _batch_parallel(_tiles_call, "b h w c, p u -> f b y z c")
_untile = _batch_parallel(_untile_call, "f b y z c, s p -> b h w c")
_products = _batch_parallel(_products_call, "f b y z c, f c o -> f b y z o")
_filter_grad = _batch_parallel(_filter_grad_call, "f b y z c, f b y z o, p k -> k l c o")


def winograd_tiles(x: jax.Array, matrix: np.ndarray) -> jax.Array:
    """``m d m^T`` of every window of float32 (B, H, W, C) ``x`` for an (a, n) ``matrix``: windows of
    n x n at stride s = a - 2 from (-pad, -pad), pad = (n - s) / 2, zero outside ``x``, on the grid
    (th, tw) = (ceil(H / s), ceil(W / s)); returns (a * a, B, th, tw, C)."""
    return _tiles(x, jnp.asarray(matrix, jnp.float32))[0]


def winograd_untile(t: jax.Array, matrix: np.ndarray) -> jax.Array:
    """``m T m^T`` of every (a, a) tile of float32 (a * a, B, th, tw, C) ``t`` for an (s, a) ``matrix``,
    placed at stride s: returns (B, th s, tw s, C)."""
    return _untile(t, jnp.asarray(matrix, jnp.float32))[0]


def winograd_products(x: jax.Array, filters: jax.Array) -> jax.Array:
    """``x[f] @ filters[f]`` per transform point f of float32 (a * a, B, th, tw, C) tiles ``x`` and
    (a * a, C, O) ``filters``: the products of a Winograd convolution, (a * a, B, th, tw, O)."""
    return _products(x, filters)[0]


def winograd_filter_grad(x: jax.Array, d: jax.Array, matrix: np.ndarray) -> jax.Array:
    """``sum_{p, q} m[p, k] m[q, l] sum_{b, i, j} x[p a + q, b, i, j, c] d[p a + q, b, i, j, o]`` of
    float32 (a * a, B, th, tw, C) ``x`` and (a * a, B, th, tw, O) ``d`` for an (a, r) ``matrix``: the
    (r, r, C, O) kernel gradient of a Winograd convolution from its input tiles and output-gradient
    tiles (``m = G``)."""
    return _filter_grad(x, d, jnp.asarray(matrix, jnp.float32))[0]


@functools.cache
def _group_norm_forward_call(groups: int, epsilon: float, silu: bool):
    def forward(x, gamma, beta):
        b, _, c = x.shape
        per_group = jax.ShapeDtypeStruct((b, groups), jnp.float32)
        result = (jax.ShapeDtypeStruct(x.shape, jnp.float32), per_group, per_group)
        call = jax.ffi.ffi_call("diffax_group_norm_fwd", result)
        return call(x, gamma, beta, groups=np.int64(groups), epsilon=np.float32(epsilon), silu=silu)

    return _batch_parallel(forward, "b p c, b c, b c -> b p c, b g, b g")


@functools.cache
def _group_norm_backward_call(groups: int, silu: bool):
    def backward(x, gamma, beta, mean, rstd, dy):
        result = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, gamma, beta))
        call = jax.ffi.ffi_call("diffax_group_norm_bwd", result)
        return call(x, gamma, beta, mean, rstd, dy, groups=np.int64(groups), silu=silu)

    return _batch_parallel(backward, "b p c, b c, b c, b g, b g, b p c -> b p c, b c, b c")


def group_norm_forward(
    x: jax.Array, gamma: jax.Array, beta: jax.Array, *, groups: int, epsilon: float, silu: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """GroupNorm of float32 (B, P, C) ``x`` over ``groups`` groups of channels, then ``x_hat gamma +
    beta`` with per-example (B, C) ``gamma`` and ``beta``, then SiLU if ``silu`` (Wu & He 2018,
    Eq. (1)-(3)); returns (y, group means (B, G), group 1/sqrt(var + epsilon) (B, G))."""
    return _group_norm_forward_call(groups, float(epsilon), silu)(x, gamma, beta)


def group_norm_backward(
    x: jax.Array,
    gamma: jax.Array,
    beta: jax.Array,
    mean: jax.Array,
    rstd: jax.Array,
    dy: jax.Array,
    *,
    groups: int,
    silu: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dx, dgamma, dbeta) of ``group_norm_forward``'s y for the cotangent ``dy``, from its saved
    means and 1/sqrt(var + epsilon)."""
    return _group_norm_backward_call(groups, silu)(x, gamma, beta, mean, rstd, dy)
