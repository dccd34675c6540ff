// Winograd convolution (diffax/models/winograd.py) for XLA's CPU backend: its tile transforms, its
// per-point products and its kernel gradient, as XLA FFI handlers (built and registered by
// diffax/models/cpu_kernels.py). Each reads its inputs once and writes its output once; XLA's
// formulation of the transforms pads, slices and stacks through several intermediate arrays.
//
//   diffax_winograd_tiles(x (B, H, W, C), m (a, n)) -> (a * a, B, th, tw, C)
//     out[p a + q, b, i, j, c] = sum_{u, v < n} m[p, u] m[q, v] x[b, i s - pad + u, j s - pad + v, c]
//     for the (th, tw) grid of windows at stride s = a - 2 with pad = (n - s) / 2, zero outside x:
//     B^T d B of every input tile (m = B^T, n = s + 2, pad = 1), or A g A^T of every output-gradient
//     tile (m = A, n = s, pad = 0) (Lavin & Gray 2016, Eq. (8)).
//   diffax_winograd_untile(t (a * a, B, th, tw, C), m (s, a)) -> (B, th s, tw s, C)
//     y[b, i s + p, j s + q, c] = sum_{u, v < a} m[p, u] m[q, v] t[u a + v, b, i, j, c]: A^T M A of
//     every output tile.
//   diffax_winograd_products(x (a * a, B, th, tw, C), u (a * a, C, O)) -> (a * a, B, th, tw, O)
//     out[f, b, i, j, o] = sum_c x[f, b, i, j, c] u[f, c, o]: one (tiles x C) @ (C x O) product per
//     transform point f.
//   diffax_winograd_filter_grad(x (a * a, B, th, tw, C), d (a * a, B, th, tw, O), g (a, r))
//       -> (r, r, C, O)
//     out[k, l, c, o] = sum_{p, q < a} g[p, k] g[q, l] sum_{b, i, j} x[p a + q, b, i, j, c]
//                                                               * d[p a + q, b, i, j, o]:
//     the kernel gradient of a Winograd convolution from its input tiles and output-gradient tiles, one
//     (C x tiles) @ (tiles x O) product per transform point, then G^T P G once (F(r x r, m x m),
//     winograd.conv3x3_kernel_grad).
//
// The transforms run rows then columns, skipping the matrix's zeros, over a vector of channels at a time
// (cpu_kernels.h); rows of tiles, transform points or channels are shared among the threads of XLA's
// intra-op pool. The products are register-blocked: 8 rows (6 without AVX-512's 32 registers) by two
// vectors of columns of a result accumulate over 128 steps of the contraction at a time, that panel of
// the right-hand side staying in L1 while the rows of the left-hand side stream past it.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using namespace diffax_cpu;  // NOLINT: the shared helpers

namespace {

constexpr int64_t kMaxWindow = 8;  // a, n <= 8 (F(4, 3) and F(2, 3) need 6)
using Image = ffi::Buffer<ffi::F32, 4>;  // (B, H, W, C)
using Tiles = ffi::Buffer<ffi::F32, 5>;  // (a * a, B, th, tw, C)
using Matrix = ffi::Buffer<ffi::F32, 2>;
using Filter = ffi::Buffer<ffi::F32, 4>;  // (r, r, C, O)
using Filters = ffi::Buffer<ffi::F32, 3>;  // (a * a, C, O)

// The nonzero entries of a row-major (rows, cols) matrix, row by row.
struct Sparse {
  int64_t rows, cols;
  std::vector<int64_t> start;  // entries of row r: [start[r], start[r + 1])
  std::vector<int64_t> col;
  std::vector<float> value;

  Sparse(const float* m, int64_t rows, int64_t cols) : rows(rows), cols(cols), start(1, 0) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c)
        if (m[r * cols + c] != 0.0f) {
          col.push_back(c);
          value.push_back(m[r * cols + c]);
        }
      start.push_back(static_cast<int64_t>(col.size()));
    }
  }

  // out[r] = sum_c m[r, c] in[c * stride] for r < rows (vectors).
  void Apply(const VecF* in, int64_t stride, VecF* out, int64_t out_stride) const {
    for (int64_t r = 0; r < rows; ++r) {
      VecF acc = {};
      for (int64_t e = start[r]; e < start[r + 1]; ++e) acc += value[e] * in[col[e] * stride];
      out[r * out_stride] = acc;
    }
  }

  // out (rows, rows) = m window m^T of a row-major (cols, cols) window: m along the window's first
  // axis (into scratch, (rows, cols)), then along the second.
  void Sandwich(const VecF* window, VecF* scratch, VecF* out) const {
    for (int64_t v = 0; v < cols; ++v) Apply(window + v, cols, scratch + v, cols);
    for (int64_t p = 0; p < rows; ++p) Apply(scratch + p * cols, 1, out + p * rows, 1);
  }
};

ffi::Error WinogradTiles(ffi::ThreadPool pool, Image x, Matrix matrix, ffi::Result<Tiles> out) {
  const auto xd = x.dimensions();
  const int64_t batch = xd[0], h = xd[1], w = xd[2], c = xd[3];
  const int64_t a = matrix.dimensions()[0], n = matrix.dimensions()[1], tile = a - 2, pad = (n - tile) / 2;
  const auto od = out->dimensions();
  const int64_t grid_h = od[2], grid_w = od[3];
  if (a > kMaxWindow || n > kMaxWindow || tile < 1 || od[0] != a * a || od[1] != batch ||
      grid_h != (h + tile - 1) / tile || grid_w != (w + tile - 1) / tile || od[4] != c)
    return ffi::Error::InvalidArgument(
        "diffax_winograd_tiles: x (B, H, W, C), m (a, n <= 8) give (a * a, B, H / (a - 2), W / (a - 2), C)");
  const Sparse m(matrix.typed_data(), a, n);
  const float* xp = x.typed_data();
  float* op = out->typed_data();
  const int64_t plane = batch * grid_h * grid_w * c;  // between transform points in out
  ParallelFor(pool, batch * grid_h, [&](int64_t begin, int64_t end) {
    VecF window[kMaxWindow * kMaxWindow], rows[kMaxWindow * kMaxWindow], both[kMaxWindow * kMaxWindow];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / grid_h, i = item % grid_h;
      for (int64_t j = 0; j < grid_w; ++j) {
        const int64_t y0 = i * tile - pad, x0 = j * tile - pad;
        float* dst = op + ((b * grid_h + i) * grid_w + j) * c;
        for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
          const int64_t lanes = std::min(kLanes, c - c0);
          for (int64_t u = 0; u < n; ++u)
            for (int64_t v = 0; v < n; ++v) {
              const int64_t yy = y0 + u, xx = x0 + v;
              if (yy < 0 || yy >= h || xx < 0 || xx >= w) {
                window[u * n + v] = VecF{};
                continue;
              }
              const float* src = xp + ((b * h + yy) * w + xx) * c + c0;
              window[u * n + v] = LoadLanes(src, lanes);
            }
          m.Sandwich(window, rows, both);  // (a, a)
          for (int64_t f = 0; f < a * a; ++f) {
            float* at = dst + f * plane + c0;
            StoreLanes(at, both[f], lanes);
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error WinogradUntile(ffi::ThreadPool pool, Tiles t, Matrix matrix, ffi::Result<Image> y) {
  const auto td = t.dimensions();
  const int64_t s = matrix.dimensions()[0], a = matrix.dimensions()[1];
  const int64_t grid_h = td[2], grid_w = td[3];
  const auto yd = y->dimensions();
  const int64_t batch = yd[0], h = yd[1], w = yd[2], c = yd[3];
  if (a > kMaxWindow || td[0] != a * a || td[1] != batch || td[4] != c || h != grid_h * s || w != grid_w * s)
    return ffi::Error::InvalidArgument(
        "diffax_winograd_untile: t (a * a, B, th, tw, C), m (s, a <= 8) give (B, th s, tw s, C)");
  const Sparse m(matrix.typed_data(), s, a);
  const float* tp = t.typed_data();
  float* yp = y->typed_data();
  const int64_t plane = batch * grid_h * grid_w * c;
  ParallelFor(pool, batch * grid_h, [&](int64_t begin, int64_t end) {
    VecF tiles[kMaxWindow * kMaxWindow], rows[kMaxWindow * kMaxWindow], both[kMaxWindow * kMaxWindow];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / grid_h, i = item % grid_h;
      for (int64_t j = 0; j < grid_w; ++j) {
        const float* src = tp + ((b * grid_h + i) * grid_w + j) * c;
        for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
          const int64_t lanes = std::min(kLanes, c - c0);
          for (int64_t f = 0; f < a * a; ++f) {
            const float* at = src + f * plane + c0;
            tiles[f] = LoadLanes(at, lanes);
          }
          m.Sandwich(tiles, rows, both);  // (s, s)
          for (int64_t p = 0; p < s && i * s + p < h; ++p)
            for (int64_t q = 0; q < s && j * s + q < w; ++q) {
              float* at = yp + ((b * h + i * s + p) * w + j * s + q) * c + c0;
              StoreLanes(at, both[p * s + q], lanes);
            }
        }
      }
    }
  });
  return ffi::Error::Success();
}

constexpr int kRowBlock = kManyRegisters ? 8 : 6;  // rows of the result per register block
constexpr int64_t kChunk = 128;  // contraction steps per pass over a panel

// c[r, v] (+)= sum_{k < len} x[k x_step + r x_row] d[k d_step + v] for r < R and the NV vectors v (the
// last holding `last_lanes` real columns): R x NV accumulators stay in registers; `add` keeps c's values.
template <int R, int NV>
void ProductBlock(const float* x, int64_t x_step, int64_t x_row, const float* d, int64_t d_step, int64_t len,
                  float* c, int64_t c_stride, int64_t last_lanes, bool add) {
  VecF acc[R][NV] = {};
  for (int64_t k = 0; k < len; ++k) {
    VecF dv[NV];
    for (int v = 0; v < NV; ++v) dv[v] = Load(d + k * d_step + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float xr = x[k * x_step + r * x_row];
      for (int v = 0; v < NV; ++v) acc[r][v] += xr * dv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      const int64_t lanes = v == NV - 1 ? last_lanes : kLanes;
      float* at = c + r * c_stride + v * kLanes;
      StoreLanes(at, add ? LoadLanes(at, lanes) + acc[r][v] : acc[r][v], lanes);
    }
}

// ProductBlock over every row of the result (blocks of 8, then of 4, then single rows).
template <int NV>
void ProductRows(const float* x, int64_t x_step, int64_t x_row, int64_t rows, const float* d, int64_t d_step,
                 int64_t len, float* c, int64_t c_stride, int64_t last_lanes, bool add) {
  int64_t r = 0;
  auto block = [&](auto size) {
    constexpr int kR = decltype(size)::value;
    ProductBlock<kR, NV>(x + r * x_row, x_step, x_row, d, d_step, len, c + r * c_stride, c_stride, last_lanes,
                         add);
    r += kR;
  };
  while (r + kRowBlock <= rows) block(std::integral_constant<int, kRowBlock>{});
  while (r + 4 <= rows) block(std::integral_constant<int, 4>{});
  while (r < rows) block(std::integral_constant<int, 1>{});
}

// c (rows, cols), row-major, = sum_{k < len} x[k x_step + r x_row] d[k d_step + col]: x^T d (x_row = 1) or
// x d (x_step = 1) for a row-major d. Columns go two vectors at a time, the contraction 128 steps at a
// time (that panel of d staying in L1 while the rows of x stream past); a ragged last block of columns
// is first copied into a zero-padded panel.
void Product(const float* x, int64_t x_step, int64_t x_row, int64_t rows, const float* d, int64_t d_step,
             int64_t cols, int64_t len, float* c, std::vector<float>& panel) {
  constexpr int64_t kCols = 2 * kLanes;
  for (int64_t k0 = 0; k0 < len; k0 += kChunk) {
    const int64_t chunk = std::min(kChunk, len - k0);
    const float* xs = x + k0 * x_step;
    const float* ds = d + k0 * d_step;
    const bool add = k0 > 0;
    int64_t o0 = 0;
    for (; o0 + kCols <= cols; o0 += kCols)
      ProductRows<2>(xs, x_step, x_row, rows, ds + o0, d_step, chunk, c + o0, cols, kLanes, add);
    if (o0 < cols) {
      const int64_t rest = cols - o0, vectors = (rest + kLanes - 1) / kLanes, width = vectors * kLanes;
      panel.assign(chunk * width, 0.0f);
      for (int64_t k = 0; k < chunk; ++k)
        std::copy(ds + k * d_step + o0, ds + k * d_step + cols, &panel[k * width]);
      const int64_t last = rest - (vectors - 1) * kLanes;
      if (vectors == 2)
        ProductRows<2>(xs, x_step, x_row, rows, panel.data(), width, chunk, c + o0, cols, last, add);
      else
        ProductRows<1>(xs, x_step, x_row, rows, panel.data(), width, chunk, c + o0, cols, last, add);
    }
  }
}

// The per-point products of a Winograd convolution: out[f] = tiles[f] filters[f], (tiles, C) @ (C, O);
// points and blocks of 256 tiles are shared among the threads.
ffi::Error WinogradProducts(ffi::ThreadPool pool, Tiles x, Filters filters, ffi::Result<Tiles> out) {
  const auto xd = x.dimensions(), fd = filters.dimensions(), od = out->dimensions();
  const int64_t points = xd[0], tiles = xd[1] * xd[2] * xd[3], c = xd[4], o = fd[2];
  if (fd[0] != points || fd[1] != c || od[0] != points || od[1] != xd[1] || od[2] != xd[2] ||
      od[3] != xd[3] || od[4] != o)
    return ffi::Error::InvalidArgument(
        "diffax_winograd_products: x (a * a, B, th, tw, C), u (a * a, C, O) give (a * a, B, th, tw, O)");
  constexpr int64_t kTiles = 256;
  const int64_t blocks = (tiles + kTiles - 1) / kTiles;
  const float *xp = x.typed_data(), *fp = filters.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, points * blocks, [&](int64_t begin, int64_t end) {
    std::vector<float> panel;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t f = item / blocks, t0 = item % blocks * kTiles, rows = std::min(kTiles, tiles - t0);
      float* at = op + (f * tiles + t0) * o;
      Product(xp + (f * tiles + t0) * c, 1, c, rows, fp + f * c * o, o, o, c, at, panel);
    }
  });
  return ffi::Error::Success();
}

ffi::Error WinogradFilterGrad(ffi::ThreadPool pool, Tiles x, Tiles d, Matrix g,
                              ffi::Result<Filter> out) {
  const auto xd = x.dimensions(), dd = d.dimensions(), od = out->dimensions();
  const int64_t a = g.dimensions()[0], r = g.dimensions()[1];
  const int64_t points = xd[0], tiles = xd[1] * xd[2] * xd[3], c = xd[4], o = dd[4];
  if (a > kMaxWindow || points != a * a || dd[0] != points || dd[1] != xd[1] || dd[2] != xd[2] ||
      dd[3] != xd[3] || od[0] != r || od[1] != r || od[2] != c || od[3] != o)
    return ffi::Error::InvalidArgument(
        "diffax_winograd_filter_grad: x (a * a, B, th, tw, C), d (a * a, B, th, tw, O), g (a <= 8, r) give "
        "(r, r, C, O)");
  const float *xp = x.typed_data(), *dp = d.typed_data();
  std::vector<float> products(points * c * o);
  ParallelFor(pool, points, [&](int64_t begin, int64_t end) {
    std::vector<float> panel;
    for (int64_t f = begin; f < end; ++f)
      Product(xp + f * tiles * c, c, 1, c, dp + f * tiles * o, o, o, tiles, &products[f * c * o], panel);
  });
  std::vector<float> gt(r * a);  // G^T (r, a)
  for (int64_t p = 0; p < a; ++p)
    for (int64_t k = 0; k < r; ++k) gt[k * a + p] = g.typed_data()[p * r + k];
  const Sparse m(gt.data(), r, a);
  float* op = out->typed_data();
  ParallelFor(pool, c, [&](int64_t begin, int64_t end) {
    VecF window[kMaxWindow * kMaxWindow], rows[kMaxWindow * kMaxWindow], both[kMaxWindow * kMaxWindow];
    for (int64_t ci = begin; ci < end; ++ci)
      for (int64_t o0 = 0; o0 < o; o0 += kLanes) {
        const int64_t lanes = std::min(kLanes, o - o0);
        for (int64_t f = 0; f < points; ++f) window[f] = LoadLanes(&products[(f * c + ci) * o + o0], lanes);
        m.Sandwich(window, rows, both);  // (r, r)
        for (int64_t f = 0; f < r * r; ++f) StoreLanes(op + (f * c + ci) * o + o0, both[f], lanes);
      }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffaxWinogradProducts, WinogradProducts,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Tiles>()
                                  .Arg<Filters>()
                                  .Ret<Tiles>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffaxWinogradFilterGrad, WinogradFilterGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Tiles>()
                                  .Arg<Tiles>()
                                  .Arg<Matrix>()
                                  .Ret<Filter>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffaxWinogradTiles, WinogradTiles,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Image>()
                                  .Arg<Matrix>()
                                  .Ret<Tiles>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffaxWinogradUntile, WinogradUntile,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Tiles>()
                                  .Arg<Matrix>()
                                  .Ret<Image>());
