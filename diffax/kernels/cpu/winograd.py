"""Winograd minimal-filtering convolution F(m x m, 3 x 3) for NHWC arrays.

A 3x3 stride-1 convolution computes each m x m output tile from an (m + 2) x (m + 2) input tile as
``Y = A^T [(G g G^T) * (B^T d B)] A`` (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016, Eq. (8)): the transforms are fixed linear combinations, and the channel contraction
becomes (m + 2)^2 independent matrix products, with 9 m^2 / (m + 2)^2 times fewer multiplications than
the direct convolution (2.25x for m = 2, 4x for m = 4). On this project's 2-core CPU the products run
near the matmul peak and the ``ddpm-cifar10`` U-Net's forward pass ran 1.5x faster than with XLA's
direct convolutions (``benchmarks/results/2026-12-01-winograd.md``). ``conv3x3`` is differentiable in
every mode through the same linear maps; ``conv3x3_train`` has a Winograd backward pass of its own
(the kernel gradient as F(3 x 3, m x m)), which made the U-Net's train step 1.1-1.5x faster
(``benchmarks/results/2026-12-01-winograd-train.md``). The results equal the direct convolution's in
exact arithmetic; in float32 their error is ~4x the direct one's (``tests/perf/test_winograd.py``).

In float32 on the CPU backend the tile transforms, the per-point products and the kernel gradient
run as C++ kernels (``cpu_winograd.cc`` via ``cpu_kernels``: each reads its inputs and writes its
output once; the products register-blocked), differentiated through the XLA formulation of the same
maps; elsewhere, or without a compiler, XLA computes them. Against XLA's, in one process: the kernel
gradient made the ``small`` train step 1.18x faster (2.2x XLA's alone), the products its forward pass
1.07x (``benchmarks/results/2026-12-02-intel-winograd-kernels.md``).
"""

import functools
import operator
from collections.abc import Sequence
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from diffax.kernels.cpu import ffi as cpu_kernels

# Interpolation points of F(m, 3) besides the point at infinity. For m = 4, {0, 1, -1, 2, -1/2} (points
# and their reciprocals, as Barabasz et al., "Error Analysis and Improving the Accuracy of Winograd
# Convolution for Deep Neural Networks", 2020, recommend) gave a float32 RMS error 1.5x smaller than
# the textbook {0, 1, -1, 2, -2}: 1.5e-6 against 2.3e-6 (the direct convolution: 3.7e-7), for
# unit-variance outputs of a 128->128 convolution at 32x32.
POINTS: dict[int, tuple[Fraction, ...]] = {
    2: (Fraction(0), Fraction(1), Fraction(-1)),
    4: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-1, 2)),
}
# Spatial size below which the transforms cost more than they save (measured: 8x8 maps run 2x slower
# than XLA's convolution, 16x16 and larger faster; benchmarks/results/2026-12-01-winograd.md).
MIN_SPATIAL = 16
_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lax's (lhs, rhs, out) specs of NHWC / HWIO / NHWC


def _poly_mul(p: Sequence[Fraction], q: Sequence[Fraction]) -> list[Fraction]:
    out = [Fraction(0)] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


@functools.cache
def transforms(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A^T, G, B^T)`` of F(tile, 3), of shapes (m, m+2), (m+2, 3), (m+2, m+2), in float64.

    Cook-Toom construction (Lavin & Gray 2016, Sec. 4; Blahut, "Fast Algorithms for Signal
    Processing", Ch. 5) from ``POINTS[tile]`` and the point at infinity: ``A^T`` evaluates the output
    polynomial, ``G`` the filter at each point divided by the Lagrange denominator, ``B^T`` holds the
    coefficients of the Lagrange numerators. ``y = A^T [(G g) * (B^T d)]`` is then the correlation
    ``y_i = sum_k d_{i+k} g_k``.
    """
    if tile not in POINTS:
        raise ValueError(f"winograd: tile={tile}; use one of {sorted(POINTS)}.")
    points, r = POINTS[tile], 3
    at = [[p**i for p in points] + [Fraction(int(i == tile - 1))] for i in range(tile)]
    g, bt = [], []
    for j, p in enumerate(points):
        others = [q for k, q in enumerate(points) if k != j]
        denominator = np.prod([p - q for q in others], dtype=object)
        g.append([p**i / denominator for i in range(r)])
        numerator = functools.reduce(_poly_mul, ([-q, Fraction(1)] for q in others), [Fraction(1)])
        bt.append(numerator + [Fraction(0)] * (tile + 2 - len(numerator)))
    g.append([Fraction(int(i == r - 1)) for i in range(r)])
    bt.append(functools.reduce(_poly_mul, ([-q, Fraction(1)] for q in points), [Fraction(1)]))
    return tuple(np.array(m, dtype=np.float64) for m in (at, g, bt))


def _combine(coefficients: np.ndarray, terms: Sequence[jax.Array]) -> jax.Array:
    """``sum_i coefficients[i] * terms[i]``, skipping zeros and multiplications by +-1."""
    total = None
    for c, term in zip(coefficients.tolist(), terms, strict=True):
        if c == 0:
            continue
        scaled = term if c == 1 else -term if c == -1 else term * jnp.asarray(c, term.dtype)
        total = scaled if total is None else total + scaled
    return total


def _transformed_tiles(arr: jax.Array, matrix: np.ndarray, tile: int, grid: tuple[int, int]) -> jax.Array:
    """``matrix @ window @ matrix^T`` of each window of ``arr`` (B, H', W', C) on a ``grid`` of tiles.

    The window of tile (i, j) starts at (i * tile, j * tile) and has ``matrix.shape[1]`` rows and
    columns; windows overlap when that exceeds ``tile``. Rows are transformed first, then columns.
    Returns (a * a, B * th * tw, C) for an (a, n) ``matrix`` and ``grid = (th, tw)``.
    """
    a, n = matrix.shape
    b, c = arr.shape[0], arr.shape[-1]

    def windows(arr: jax.Array, axis: int, offset: int) -> jax.Array:
        """Row (or column) ``offset`` of every tile's window, one per tile along ``axis``."""
        count = grid[0] if axis == 1 else grid[1]
        return jax.lax.slice_in_dim(arr, offset, offset + (count - 1) * tile + 1, tile, axis)

    rows = [windows(arr, 1, u) for u in range(n)]
    by_rows = jnp.stack([_combine(matrix[i], rows) for i in range(a)])  # (a, B, th, W', C)
    cols = [windows(by_rows, 3, v) for v in range(n)]
    out = jnp.stack([_combine(matrix[j], cols) for j in range(a)], axis=1)  # (a, a, B, th, tw, C)
    return out.reshape(a * a, b * grid[0] * grid[1], c)


def _grid(x: jax.Array, tile: int) -> tuple[int, int]:
    """The (th, tw) tiles of ``tile`` x ``tile`` covering the H x W of (B, H, W, C) ``x``."""
    return -(-x.shape[1] // tile), -(-x.shape[2] // tile)


def _input_tiles_xla(x: jax.Array, tile: int) -> jax.Array:
    h, w = x.shape[1:3]
    grid = _grid(x, tile)
    padded = jnp.pad(x, ((0, 0), (1, grid[0] * tile + 1 - h), (1, grid[1] * tile + 1 - w), (0, 0)))
    return _transformed_tiles(padded, transforms(tile)[2], tile, grid)


def _grad_tiles_xla(dy: jax.Array, tile: int) -> jax.Array:
    h, w = dy.shape[1:3]
    grid = _grid(dy, tile)
    padded = jnp.pad(dy, ((0, 0), (0, grid[0] * tile - h), (0, grid[1] * tile - w), (0, 0)))
    return _transformed_tiles(padded, transforms(tile)[0].T, tile, grid)


def _untile_xla(products: jax.Array, tile: int) -> jax.Array:
    """(B, th m, tw m, O) of ``A^T M A`` of every (a, a) tile of (a * a, B, th, tw, O) ``products``."""
    at = transforms(tile)[0]
    a, (_, b, th, tw, o) = tile + 2, products.shape
    products = products.reshape(a, a, b, th, tw, o)
    # Columns slice ``products`` directly: a moveaxis here was materialised as a transpose of the products.
    columns = [products[:, j] for j in range(a)]
    out_cols = jnp.stack([_combine(at[q], columns) for q in range(tile)], axis=4)
    out = jnp.stack([_combine(at[p], list(out_cols)) for p in range(tile)], axis=2)  # (B, th, m, tw, m, O)
    return out.reshape(b, th * tile, tw * tile, o)


def _by_kernel(kernel, xla):
    """The map ``xla``, linear in each of its float32 arguments (a linear or a bilinear map), computed by
    the CPU ``kernel``; its derivatives (one term per argument, of every order and mode) are ``xla``'s."""
    multilinear = jax.custom_jvp(kernel)

    @multilinear.defjvp
    def _(primals, tangents):
        terms = [xla(*primals[:i], t, *primals[i + 1 :]) for i, t in enumerate(tangents)]
        return kernel(*primals), functools.reduce(operator.add, terms)

    return multilinear


@functools.cache
def _kernel_maps(tile: int) -> tuple:
    """``cpu_kernels``' input-tile, gradient-tile and untile transforms for F(tile, 3)."""
    at, _, bt = transforms(tile)

    def flat(tiles: jax.Array) -> jax.Array:
        return tiles.reshape(tiles.shape[0], -1, tiles.shape[-1])

    return (
        _by_kernel(lambda x: flat(cpu_kernels.winograd_tiles(x, bt)), lambda x: _input_tiles_xla(x, tile)),
        _by_kernel(
            lambda dy: flat(cpu_kernels.winograd_tiles(dy, at.T)), lambda dy: _grad_tiles_xla(dy, tile)
        ),
        _by_kernel(lambda p: cpu_kernels.winograd_untile(p, at), lambda p: _untile_xla(p, tile)),
    )


def _kernels_run(x: jax.Array) -> bool:
    """Whether the CPU kernels compute ``x``'s maps: float32 on the CPU backend, once built."""
    return x.dtype == jnp.float32 and cpu_kernels.runs()


def _transform(which: int, x: jax.Array, tile: int) -> jax.Array:
    """Transform ``which`` (0 input tiles, 1 gradient tiles, 2 untile) of ``x``: by the CPU kernels
    (``_kernels_run``), else by XLA."""
    if _kernels_run(x):
        return _kernel_maps(tile)[which](x)
    return (_input_tiles_xla, _grad_tiles_xla, _untile_xla)[which](x, tile)


def _as_tiles(t: jax.Array) -> jax.Array:
    """(a * a, tiles, C) as the kernels' (a * a, B, th, tw, C), the tiles standing in for the batch."""
    return t.reshape(t.shape[0], -1, 1, 1, t.shape[-1])


def _products_xla(inputs: jax.Array, filters: jax.Array) -> jax.Array:
    """One (tiles, C) @ (C, O) product per transform point f: the elementwise stage of Lavin & Gray
    (2016), Eq. (8), summed over channels."""
    return jnp.einsum("ftc,fco->fto", inputs, filters)


_kernel_products = _by_kernel(
    lambda inputs, filters: cpu_kernels.winograd_products(_as_tiles(inputs), filters).reshape(
        *inputs.shape[:2], filters.shape[-1]
    ),
    _products_xla,
)


def _filter_grad_xla(inputs: jax.Array, grads: jax.Array, tile: int) -> jax.Array:
    """``G^T (sum over tiles of inputs^T grads) G`` per transform point: (3, 3, C, O) from (a * a, tiles,
    C) input tiles and (a * a, tiles, O) gradient tiles."""
    g = transforms(tile)[1].astype(inputs.dtype)
    a, c, o = tile + 2, inputs.shape[-1], grads.shape[-1]
    products = jnp.einsum("ftc,fto->fco", inputs, grads).reshape(a, a, c, o)
    return jnp.einsum("pk,ql,pqco->klco", g, g, products)


@functools.cache
def _kernel_filter_grad(tile: int):
    """``_filter_grad_xla`` computed by ``cpu_kernels.winograd_filter_grad`` in one pass (products and
    output transform); its derivatives are XLA's."""
    return _by_kernel(
        lambda inputs, grads: cpu_kernels.winograd_filter_grad(
            _as_tiles(inputs), _as_tiles(grads), transforms(tile)[1]
        ),
        functools.partial(_filter_grad_xla, tile=tile),
    )


def conv3x3(x: jax.Array, kernel: jax.Array, tile: int = 4) -> jax.Array:
    """A 3x3, stride-1, "SAME"-padded convolution of (B, H, W, C) ``x`` with (3, 3, C, O) ``kernel``.

    Equals ``lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO",
    "NHWC"))`` up to rounding, computed as F(tile x tile, 3 x 3) Winograd (Lavin & Gray 2016, Eq. (8))
    with separable transforms: rows then columns of each input tile, one batched product per
    transform point, columns then rows of each output tile. H and W need not divide by ``tile``.
    Derivatives of every order come from differentiating these linear maps.
    """
    g = transforms(tile)[1]
    b, h, w, c = x.shape
    o, a = kernel.shape[-1], tile + 2
    th, tw = _grid(x, tile)
    inputs = _transform(0, x, tile)  # B^T d B per tile: (a * a, tiles, C)

    kernel_rows = [_combine(g[i], list(kernel)) for i in range(a)]  # (3, C, O) each
    filters = jnp.stack([jnp.stack([_combine(g[j], list(kr)) for j in range(a)]) for kr in kernel_rows])

    filters = filters.reshape(a * a, c, o).astype(x.dtype)
    products = (_kernel_products if _kernels_run(x) else _products_xla)(inputs, filters)
    return _transform(2, products.reshape(a * a, b, th, tw, o), tile)[:, :h, :w]


def conv3x3_kernel_grad(x: jax.Array, dy: jax.Array, tile: int = 4) -> jax.Array:
    """The (3, 3, C, O) gradient of ``sum(dy * conv3x3(x, kernel))`` with respect to ``kernel``.

    Each output tile contributes the correlation of its (m + 2)^2 input window with its m^2 output
    gradient, a 3 x 3 result: F(3 x 3, m x m) Winograd, whose matrices are those of F(m x m, 3 x 3)
    with the roles of ``A`` and ``G`` exchanged (the transposition principle: both compute the
    trilinear form ``sum_p (A u)_p (G g)_p (B^T d)_p``). The contraction over batch and
    tiles becomes one (C x tiles) @ (tiles x O) product per transform point; the fixed 3 x 3
    output transform is applied once, after the sum.
    """
    inputs = _transform(0, x, tile)  # B^T d B per tile: (a * a, tiles, C)
    grads = _transform(1, dy, tile)  # A dy A^T per tile: (a * a, tiles, O)
    if _kernels_run(x):
        return _kernel_filter_grad(tile)(inputs, grads)
    return _filter_grad_xla(inputs, grads, tile)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_train(x: jax.Array, kernel: jax.Array, tile: int = 4) -> jax.Array:
    """``conv3x3`` whose reverse-mode derivative keeps only ``x`` and ``kernel`` and is Winograd too.

    The input gradient is ``conv3x3`` of the output gradient with the kernel flipped and its
    channels swapped, the kernel gradient ``conv3x3_kernel_grad``. Differentiating ``conv3x3``
    instead would keep the transformed input tiles (2.25x the input) for the backward pass, and XLA's
    CPU fusion then recomputes their producers inside its relayouts: a ``small`` train step ran
    slower than with XLA's convolutions; with this one it runs faster (see
    ``benchmarks/results/2026-12-01-winograd-train.md``). Reverse mode only (``jax.grad`` of any
    order); forward mode (``jax.jvp``) raises, so inference uses ``conv3x3``.
    """
    return conv3x3(x, kernel, tile)


def _conv3x3_train_fwd(x: jax.Array, kernel: jax.Array, tile: int) -> tuple[jax.Array, tuple]:
    return conv3x3(x, kernel, tile), (x, kernel)


def _conv3x3_train_bwd(tile: int, residuals: tuple, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    return conv3x3(dy, flipped, tile), conv3x3_kernel_grad(x, dy, tile)


conv3x3_train.defvjp(_conv3x3_train_fwd, _conv3x3_train_bwd)


def applies(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers,
    feature_group_count: int,
    batch_group_count: int,
    dtype,
) -> bool:
    """Whether ``conv3x3`` computes this ``lax.conv_general_dilated`` call, at a size where it pays."""
    if (
        len(lhs_shape) != 4
        or tuple(rhs_shape[:2]) != (3, 3)
        or jnp.dtype(dtype) not in (jnp.float32, jnp.float64)
    ):
        return False
    specs = jax.lax.conv_dimension_numbers(tuple(lhs_shape), tuple(rhs_shape), dimension_numbers)
    same = padding == "SAME" or (not isinstance(padding, str) and [tuple(p) for p in padding] == [(1, 1)] * 2)
    return (
        tuple(specs) == _NHWC
        and tuple(window_strides) == (1, 1)
        and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
        and feature_group_count == 1
        and batch_group_count == 1
        and same
        and min(lhs_shape[1:3]) >= MIN_SPATIAL
    )


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    train: bool = False,
) -> jax.Array:
    """``lax.conv_general_dilated``, with the convolutions ``applies`` accepts computed by ``conv3x3``
    (``conv3x3_train`` with ``train=True``: reverse mode only, faster to differentiate).

    Drop-in for ``flax.linen.Conv(conv_general_dilated=...)`` (bind ``train`` with
    ``functools.partial``); every other call goes to lax unchanged.
    """
    dtype = jnp.result_type(lhs, rhs)
    if preferred_element_type is None and applies(
        lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, dtype,
    ):  # fmt: skip
        return (conv3x3_train if train else conv3x3)(lhs.astype(dtype), rhs.astype(dtype))
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
