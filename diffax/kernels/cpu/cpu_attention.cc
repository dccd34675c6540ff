// Fused softmax attention for XLA's CPU backend, as two XLA FFI handlers (built and registered by
// diffax/models/cpu_kernels.py; called from layers.dot_product_attention with impl="cpu").
//
// Arrays are float32, row-major, in the layers' own (B, T, N, H) layout, so nothing is transposed
// around the calls: q (..., T, N, H), k and v (..., S, N, H); every leading index and head n is one
// independent attention problem (a "group"). `scale` multiplies the scores (1/sqrt(H)).
//
//   diffax_attention_fwd(q, k, v) -> (out (..., T, N, H), lse (..., N, T))
//     out = softmax(scale q k^T) v and lse = logsumexp(scale q k^T) per row; a group's (T, S) scores
//     never leave the cache (FlashAttention, Dao et al. 2022, Alg. 1; one pass per row, since the S
//     scores of 16 rows fit in L1).
//   diffax_attention_bwd(q, k, v, out, lse, d_out) -> (dq, dk, dv)
//     P = exp(scale q k^T - lse) recomputed, D = rowsum(d_out * out), dS = P * (d_out v^T - D),
//     dq = scale dS k, dk = scale dS^T q, dv = P^T d_out (Dao et al. 2022, Alg. 2).
//
// Inner loops run over vectors of kLanes floats (cpu_kernels.h: 16 with AVX-512). The forward puts
// kLanes query rows in the lanes, so a row's max and sum are lane-wise; the backward transposes a
// group's k and v to (H, S) once and puts keys in the lanes, so dk and dv accumulate lane-wise, taking
// query rows eight at a time (four without AVX-512) and keys kLanes at a time, P and dS never leaving
// the registers. Head widths 8, 16, 32 and 64 are
// compiled as constants (their loops unrolled): forward 1.54x, backward 1.22x at H = 8. Groups (and
// the forward's 16-row tiles) are shared among the threads of XLA's intra-op pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using namespace diffax_cpu;  // NOLINT: the shared helpers

namespace {

constexpr int kRows = kManyRegisters ? 8 : 4;  // query rows per tile of the backward

// Lane j of the vector starting at column `col` is a real column (col + j < s).
inline VecI Valid(int64_t col, int64_t s) {
  VecI lane;
  for (int64_t j = 0; j < kLanes; ++j) lane[j] = static_cast<int32_t>(col + j);
  return lane < static_cast<int32_t>(s);
}

// One group's S rows of width h, `stride` apart, into (h, s_pad) columns, zero past S.
void Transpose(const float* src, int64_t s, int64_t h, int64_t stride, int64_t s_pad, float* dst) {
  std::fill(dst, dst + h * s_pad, 0.0f);
  for (int64_t j = 0; j < s; ++j)
    for (int64_t c = 0; c < h; ++c) dst[c * s_pad + j] = src[j * stride + c];
}

// Shapes of one call: batch (all leading axes), query rows T, key rows S, heads N, head width H.
struct Dims {
  int64_t batch, t, s, n, h;
  int64_t groups() const { return batch * n; }
  int64_t stride() const { return n * h; }  // between consecutive rows of one group
  // Offset of row `row` of group g in a (..., rows, N, H) array.
  int64_t at(int64_t g, int64_t row, int64_t rows) const { return ((g / n * rows + row) * n + g % n) * h; }
};

ffi::Error CheckShapes(const char* what, ffi::AnyBuffer::Dimensions q, ffi::AnyBuffer::Dimensions k,
                       ffi::AnyBuffer::Dimensions v, Dims& d) {
  const size_t rank = q.size();
  if (rank < 3 || k.size() != rank || v.size() != rank)
    return ffi::Error::InvalidArgument(std::string(what) + ": q, k, v need one rank >= 3, (..., T, N, H)");
  d = Dims{1, q[rank - 3], k[rank - 3], q[rank - 2], q[rank - 1]};
  for (size_t i = 0; i + 3 < rank; ++i) {
    if (k[i] != q[i] || v[i] != q[i])
      return ffi::Error::InvalidArgument(std::string(what) + ": q, k, v leading axes differ");
    d.batch *= q[i];
  }
  for (auto x : {k, v})
    if (x[rank - 3] != d.s || x[rank - 2] != d.n || x[rank - 1] != d.h)
      return ffi::Error::InvalidArgument(std::string(what) + ": k and v need shape (..., S, N, H), N and H q's");
  return ffi::Error::Success();
}

// Forward of one tile of up to kLanes query rows of a group (rows in lanes): pass 1 keeps the scores of
// every key, pass 2 turns them into exp(s - max) and sums them, pass 3 takes the weighted sum of v's
// rows, eight columns at a time. q, k, v, out point at the tile's (or group's) first row. kH is the head
// width when it is one of the widths compiled for (the loops over it unrolled, the tile's scaled
// queries held in registers), else 0 (d.h at run time).
template <int kH>
void ForwardTile(const Dims& d, float scale, const float* q, int64_t rows, const float* k, const float* v,
                 float* q_t, float* probs, float* out, float* lse) {
  constexpr int64_t kCols = 8;
  const int64_t h = kH > 0 ? kH : d.h, stride = d.stride();
  std::fill(q_t, q_t + h * kLanes, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < h; ++c) q_t[c * kLanes + r] = scale * q[r * stride + c];
  VecF row_max = Splat(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < d.s; ++j) {
    VecF acc = {};
    for (int64_t c = 0; c < h; ++c) acc += Load(q_t + c * kLanes) * k[j * stride + c];
    Store(probs + j * kLanes, acc);
    row_max = acc > row_max ? acc : row_max;
  }
  VecF row_sum = {};
  for (int64_t j = 0; j < d.s; ++j) {
    const VecF p = Exp(Load(probs + j * kLanes) - row_max);
    Store(probs + j * kLanes, p);
    row_sum += p;
  }
  const VecF inv_sum = 1.0f / row_sum;
  for (int64_t c0 = 0; c0 < h; c0 += kCols) {
    const int64_t cols = std::min(kCols, h - c0);
    VecF acc[kCols] = {};
    for (int64_t j = 0; j < d.s; ++j) {
      const VecF p = Load(probs + j * kLanes);
      const float* vj = v + j * stride + c0;
      if (cols == kCols) {
        for (int64_t c = 0; c < kCols; ++c) acc[c] += p * vj[c];
      } else {
        for (int64_t c = 0; c < cols; ++c) acc[c] += p * vj[c];
      }
    }
    for (int64_t c = 0; c < cols; ++c) {
      const VecF o = acc[c] * inv_sum;
      for (int64_t r = 0; r < rows; ++r) out[r * stride + c0 + c] = o[r];
    }
  }
  for (int64_t r = 0; r < rows; ++r) lse[r] = row_max[r] + std::log(row_sum[r]);
}

// Calls body(std::integral_constant<int, kH>) with kH = h for the head widths compiled for, else 0.
template <typename Body>
void ForHeadWidth(int64_t h, Body&& body) {
  switch (h) {
    case 8: return body(std::integral_constant<int, 8>{});
    case 16: return body(std::integral_constant<int, 16>{});
    case 32: return body(std::integral_constant<int, 32>{});
    case 64: return body(std::integral_constant<int, 64>{});
    default: return body(std::integral_constant<int, 0>{});
  }
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, float scale, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  if (ffi::Error e = CheckShapes("diffax_attention_fwd", q.dimensions(), k.dimensions(), v.dimensions(), d);
      e.failure())
    return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  const int64_t tiles = (d.t + kLanes - 1) / kLanes;
  ParallelFor(pool, d.groups() * tiles, [&](int64_t begin, int64_t end) {
    std::vector<float> q_t(d.h * kLanes), probs(d.s * kLanes);
    ForHeadWidth(d.h, [&](auto width) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t g = item / tiles, i = item % tiles * kLanes;
        const int64_t at = d.at(g, i, d.t), kv_at = d.at(g, 0, d.s), rows = std::min(kLanes, d.t - i);
        ForwardTile<decltype(width)::value>(d, scale, qp + at, rows, kp + kv_at, vp + kv_at, q_t.data(),
                                            probs.data(), op + at, lp + g * d.t + i);
      }
    });
  });
  return ffi::Error::Success();
}

// Backward of R query rows of one group (keys in lanes), one block of kLanes keys at a time: the rows'
// scores and d_out v^T against the block, then P and dS in registers, then their terms added to the
// block's columns of dk_t and dv_t and to the rows' per-lane partial sums of dq, summed across lanes at
// the end. qs (scale q), d_out, dq point at the first of the R rows, gathered contiguous (h apart),
// lse and delta (rowsum(d_out out)) at their entries; dq_part holds R h vectors. kH as for ForwardTile.
template <int R, int kH>
void BackwardRows(const Dims& d, float scale, int64_t s_pad, const float* qs, const float* k_t,
                  const float* v_t, const float* lse, const float* delta, const float* d_out, float* dq_part,
                  float* dq, float* dk_t, float* dv_t) {
  const int64_t h = kH > 0 ? kH : d.h, vecs = s_pad / kLanes;
  std::fill(dq_part, dq_part + R * h * kLanes, 0.0f);
  for (int64_t jv = 0; jv < vecs; ++jv) {
    const int64_t o = jv * kLanes;
    VecF s[R] = {}, dp[R] = {};
    for (int64_t c = 0; c < h; ++c) {
      const VecF kv = Load(k_t + c * s_pad + o), vv = Load(v_t + c * s_pad + o);
      for (int r = 0; r < R; ++r) {
        s[r] += qs[r * h + c] * kv;
        dp[r] += d_out[r * h + c] * vv;
      }
    }
    const VecI valid = Valid(o, d.s);
    VecF p[R], ds[R];
    for (int r = 0; r < R; ++r) {
      const VecF e = Exp(s[r] - lse[r]);
      p[r] = valid ? e : VecF{};
      ds[r] = p[r] * (dp[r] - delta[r]);
    }
    for (int64_t c = 0; c < h; ++c) {
      const VecF kv = Load(k_t + c * s_pad + o);
      VecF dk = Load(dk_t + c * s_pad + o), dv = Load(dv_t + c * s_pad + o);
      for (int r = 0; r < R; ++r) {
        dk += ds[r] * qs[r * h + c];
        dv += p[r] * d_out[r * h + c];
        float* part = dq_part + (r * h + c) * kLanes;
        Store(part, Load(part) + ds[r] * kv);
      }
      Store(dk_t + c * s_pad + o, dk);
      Store(dv_t + c * s_pad + o, dv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < h; ++c) dq[r * h + c] = scale * SumLanes(Load(dq_part + (r * h + c) * kLanes));
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> d_out, float scale, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (ffi::Error e = CheckShapes("diffax_attention_bwd", q.dimensions(), k.dimensions(), v.dimensions(), d);
      e.failure())
    return e;
  if (out.element_count() != q.element_count() || d_out.element_count() != q.element_count() ||
      lse.element_count() * d.h != q.element_count())
    return ffi::Error::InvalidArgument("diffax_attention_bwd: out and d_out need q's shape, lse (..., N, T)");
  const int64_t s_pad = (d.s + kLanes - 1) / kLanes * kLanes, stride = d.stride();
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = d_out.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, d.groups(), [&](int64_t begin, int64_t end) {
    std::vector<float> k_t(d.h * s_pad), v_t(d.h * s_pad), dk_t(d.h * s_pad), dv_t(d.h * s_pad);
    std::vector<float> dq_part(kRows * d.h * kLanes), delta(d.t);
    std::vector<float> qs_g(d.t * d.h), do_g(d.t * d.h), dq_g(d.t * d.h);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t kv_at = d.at(g, 0, d.s);
      Transpose(kp + kv_at, d.s, d.h, stride, s_pad, k_t.data());
      Transpose(vp + kv_at, d.s, d.h, stride, s_pad, v_t.data());
      std::fill(dk_t.begin(), dk_t.end(), 0.0f);
      std::fill(dv_t.begin(), dv_t.end(), 0.0f);
      for (int64_t i = 0; i < d.t; ++i) {  // the group's rows, contiguous
        const int64_t at = d.at(g, i, d.t);
        delta[i] = 0.0f;
        for (int64_t c = 0; c < d.h; ++c) {
          qs_g[i * d.h + c] = scale * qp[at + c];
          do_g[i * d.h + c] = gp[at + c];
          delta[i] += gp[at + c] * op[at + c];
        }
      }
      ForHeadWidth(d.h, [&](auto width) {
        constexpr int kH = decltype(width)::value;
        auto rows = [&](auto tile, int64_t i) {
          constexpr int R = decltype(tile)::value;
          const int64_t at = i * d.h;
          BackwardRows<R, kH>(d, scale, s_pad, qs_g.data() + at, k_t.data(), v_t.data(), lp + g * d.t + i,
                              delta.data() + i, do_g.data() + at, dq_part.data(), dq_g.data() + at,
                              dk_t.data(), dv_t.data());
        };
        int64_t i = 0;
        for (; i + kRows <= d.t; i += kRows) rows(std::integral_constant<int, kRows>{}, i);
        for (; i < d.t; ++i) rows(std::integral_constant<int, 1>{}, i);
      });
      for (int64_t i = 0; i < d.t; ++i)
        std::copy(dq_g.data() + i * d.h, dq_g.data() + (i + 1) * d.h, dqp + d.at(g, i, d.t));
      for (int64_t j = 0; j < d.s; ++j)
        for (int64_t c = 0; c < d.h; ++c) {
          dkp[kv_at + j * stride + c] = dk_t[c * s_pad + j];
          dvp[kv_at + j * stride + c] = dv_t[c * s_pad + j];
        }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffaxAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffaxAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
