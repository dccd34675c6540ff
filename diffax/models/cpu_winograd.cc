// The tile transforms of Winograd convolution (diffax/models/winograd.py) for XLA's CPU backend, as two
// XLA FFI handlers (built and registered by diffax/models/cpu_kernels.py). Each reads its input once
// and writes its output once; XLA's formulation of the same maps pads, slices and stacks through
// several intermediate arrays.
//
//   diffax_winograd_tiles(x (B, H, W, C), m (a, n)) -> (a * a, B, th, tw, C)
//     out[p a + q, b, i, j, c] = sum_{u, v < n} m[p, u] m[q, v] x[b, i s - pad + u, j s - pad + v, c]
//     for the (th, tw) grid of windows at stride s = a - 2 with pad = (n - s) / 2, zero outside x:
//     B^T d B of every input tile (m = B^T, n = s + 2, pad = 1), or A g A^T of every output-gradient
//     tile (m = A, n = s, pad = 0) (Lavin & Gray 2016, Eq. (8)).
//   diffax_winograd_untile(t (a * a, B, th, tw, C), m (s, a)) -> (B, th s, tw s, C)
//     y[b, i s + p, j s + q, c] = sum_{u, v < a} m[p, u] m[q, v] t[u a + v, b, i, j, c]: A^T M A of
//     every output tile.
//
// Both transform rows then columns, skipping the matrix's zeros, over 16 channels at a time
// (cpu_kernels.h); rows of tiles are shared among the threads of XLA's intra-op pool.

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
          for (int64_t v = 0; v < n; ++v) m.Apply(window + v, n, rows + v, n);  // rows: (a, n)
          for (int64_t p = 0; p < a; ++p) m.Apply(rows + p * n, 1, both + p * a, 1);  // columns: (a, a)
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
          for (int64_t v = 0; v < a; ++v) m.Apply(tiles + v, a, rows + v, a);  // rows: (s, a)
          for (int64_t p = 0; p < s; ++p) m.Apply(rows + p * a, 1, both + p * s, 1);  // columns: (s, s)
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

}  // namespace

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
