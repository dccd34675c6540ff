"""Hand-written CPU kernels behind XLA's foreign function interface, built from their C++ source.

``cpu_attention.cc`` (next to this file) holds fused softmax attention, forward and backward. It is
compiled on first use for the machine it runs on (``-march=native``) into a per-user cache, keyed by
the source, the compiler, the flags, jaxlib and the CPU, then registered with XLA for the CPU
platform. Without a C++17 compiler (``$CXX``, else ``c++``) or with ``DIFFAX_CPU_KERNELS=0`` nothing
is built and ``available()`` is False: callers use their XLA formulation instead (a warning says why
once, for a failed build).
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

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-w")
# The FFI targets: name -> the handler symbol the source exports.
TARGETS = {
    "diffax_attention_fwd": "DiffaxAttentionForward",
    "diffax_attention_bwd": "DiffaxAttentionBackward",
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


def build(source: pathlib.Path = SOURCE, compiler: str | None = None) -> pathlib.Path:
    """Compiles ``source`` into a shared library in ``cache_dir()`` unless it is there; returns its path.

    Raises ``RuntimeError`` with the compiler's message when the build fails or no compiler is found.
    """
    compiler = compiler or os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join(
            [source.read_text(), version, " ".join(FLAGS), jaxlib.__version__, _cpu_identity()]
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = pathlib.Path(scratch) / target.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", str(built)]
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


def _batch_parallel(call, rule: str):
    """``call`` (an FFI call whose arrays all lead with the batch axis ``b`` and may hold a heads axis
    ``n``) made shardable and batchable: under a mesh each device runs it on its own slice of ``b``
    and ``n`` (every other axis replicated, no all-gather of the batch), and ``vmap`` folds the mapped
    axis into ``b``. ``rule`` names every axis of the operands and results, einsum-like."""
    arrays = [spec.split() for spec in rule.replace("->", ",").split(",")]
    order = list(dict.fromkeys(f for axes in arrays for f in axes))
    kept = ("b", "n")

    def shardings(mesh, arg_shapes):
        given = dict(
            zip(arrays[0], tuple(arg_shapes[0].sharding.spec) + (None,) * len(arrays[0]), strict=False)
        )
        return [NamedSharding(mesh, P(*(given[f] if f in kept else None for f in axes))) for axes in arrays]

    def infer(mesh, arg_shapes, result_shape):
        return tuple(shardings(mesh, arg_shapes)[len(arg_shapes) :])

    def partition(mesh, arg_shapes, result_shape):
        specs = shardings(mesh, arg_shapes)
        return mesh, call, tuple(specs[len(arg_shapes) :]), tuple(specs[: len(arg_shapes)])

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
        whole = [
            a if mapped else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, mapped in zip(args, in_batched, strict=True)
        ]
        folded = [a.reshape(-1, *a.shape[2:]) for a in whole]
        outs = batched(*folded)
        return tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in outs), (True,) * len(outs)

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
