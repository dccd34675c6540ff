// Group normalisation with a per-example affine and SiLU for XLA's CPU backend, as two XLA FFI handlers
// (built and registered by diffax/models/cpu_kernels.py; called from layers.group_norm, impl="cpu").
//
//   diffax_group_norm_fwd(x (B, P, C), gamma (B, C), beta (B, C)) -> (y (B, P, C), mean, rstd (B, G))
//     xhat = (x - mean_g) rstd_g over the P pixels and C / G channels of each group g,
//     z = xhat gamma + beta, y = silu(z) if `silu` else z (Wu & He 2018, Eq. (1)-(3); gamma and beta
//     already hold the layer's affine and any FiLM modulation, per example).
//   diffax_group_norm_bwd(x, gamma, beta, mean, rstd, dy) -> (dx, dgamma, dbeta)
//     dz = dy silu'(z), dbeta = sum_p dz, dgamma = sum_p dz xhat,
//     dx = rstd (gamma dz - mean_g(gamma dz) - xhat mean_g(gamma dz xhat)).
//
// One example at a time (its (P, C) slab stays in L2 between passes): the forward takes the means,
// then the squared deviations from them (two exact passes), then writes y; the backward sums dz and
// dz xhat per channel, then writes dx. Channels run in vectors of kLanes floats (cpu_kernels.h); examples are
// shared among the threads of XLA's intra-op pool.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using namespace diffax_cpu;  // NOLINT: the shared helpers

namespace {

using Slab = ffi::Buffer<ffi::F32, 3>;     // (B, P, C)
using PerChannel = ffi::Buffer<ffi::F32, 2>;  // (B, C) or (B, G)

inline VecF Sigmoid(VecF z) { return 1.0f / (1.0f + Exp(-z)); }

// Per-channel sums over the pixels of N terms, term(p, c0, lanes) -> std::array<VecF, N>, into
// sums[n][c]: in float over blocks of 32 pixels, the blocks added in double.
template <int N, typename Term>
void PixelSums(int64_t pixels, int64_t c, Term term, std::array<std::vector<double>, N>& sums) {
  constexpr int64_t kBlock = 32;
  std::array<std::vector<float>, N> block;
  for (int n = 0; n < N; ++n) {
    block[n].assign(c + kLanes, 0.0f);
    sums[n].assign(c, 0.0);
  }
  for (int64_t p0 = 0; p0 < pixels; p0 += kBlock) {
    for (int64_t p = p0; p < std::min(pixels, p0 + kBlock); ++p)
      for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
        const std::array<VecF, N> t = term(p, c0, std::min(kLanes, c - c0));
        for (int n = 0; n < N; ++n) Store(block[n].data() + c0, Load(block[n].data() + c0) + t[n]);
      }
    for (int n = 0; n < N; ++n)
      for (int64_t k = 0; k < c; ++k) {
        sums[n][k] += block[n][k];
        block[n][k] = 0.0f;
      }
  }
}

// The sum of a per-channel array over each group's channels.
void GroupSums(const std::vector<double>& per_channel, int64_t groups, double* per_group) {
  const int64_t size = static_cast<int64_t>(per_channel.size()) / groups;
  for (int64_t g = 0; g < groups; ++g) {
    per_group[g] = 0.0;
    for (int64_t k = g * size; k < (g + 1) * size; ++k) per_group[g] += per_channel[k];
  }
}

// Sizes of one call: examples, pixels, channels, channels per group, elements per group.
struct Sizes {
  int64_t batch, pixels, c, size;
  double count;
};

ffi::Error CheckShapes(const char* what, const Slab& x, const PerChannel& gamma, const PerChannel& beta,
                       int64_t groups, Sizes& n) {
  const auto xd = x.dimensions(), gd = gamma.dimensions(), bd = beta.dimensions();
  if (gd[0] != xd[0] || gd[1] != xd[2] || bd[0] != xd[0] || bd[1] != xd[2])
    return ffi::Error::InvalidArgument(std::string(what) + ": gamma and beta need shape (B, C) of x (B, P, C)");
  if (groups < 1 || xd[2] % groups != 0)
    return ffi::Error::InvalidArgument(std::string(what) + ": C must divide into `groups`");
  n = Sizes{xd[0], xd[1], xd[2], xd[2] / groups, static_cast<double>(xd[1] * (xd[2] / groups))};
  return ffi::Error::Success();
}

ffi::Error GroupNormForward(ffi::ThreadPool pool, Slab x, PerChannel gamma, PerChannel beta, int64_t groups,
                            float epsilon, bool silu, ffi::Result<Slab> y, ffi::Result<PerChannel> mean,
                            ffi::Result<PerChannel> rstd) {
  Sizes n;
  if (ffi::Error e = CheckShapes("diffax_group_norm_fwd", x, gamma, beta, groups, n); e.failure()) return e;
  const int64_t batch = n.batch, pixels = n.pixels, c = n.c, size = n.size;
  const double count = n.count;
  const float *xp = x.typed_data(), *gp = gamma.typed_data(), *bp = beta.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  ParallelFor(pool, batch, [&](int64_t begin, int64_t end) {
    std::array<std::vector<double>, 1> sums;
    std::vector<double> group(groups);
    std::vector<float> a(c + kLanes), shift(c + kLanes), channel_mean(c + kLanes);
    for (int64_t b = begin; b < end; ++b) {
      const float* xb = xp + b * pixels * c;
      // Pass 1: the group means.
      PixelSums<1>(pixels, c, [&](int64_t p, int64_t c0, int64_t lanes) {
        return std::array<VecF, 1>{LoadLanes(xb + p * c + c0, lanes)};
      }, sums);
      GroupSums(sums[0], groups, group.data());
      for (int64_t g = 0; g < groups; ++g) {
        mp[b * groups + g] = static_cast<float>(group[g] / count);
        std::fill(channel_mean.begin() + g * size, channel_mean.begin() + (g + 1) * size, mp[b * groups + g]);
      }
      // Pass 2: the squared deviations from them.
      PixelSums<1>(pixels, c, [&](int64_t p, int64_t c0, int64_t lanes) {
        const VecF d = LoadLanes(xb + p * c + c0, lanes) - Load(channel_mean.data() + c0);
        return std::array<VecF, 1>{d * d};
      }, sums);
      GroupSums(sums[0], groups, group.data());
      for (int64_t g = 0; g < groups; ++g) {
        const float r = 1.0f / std::sqrt(static_cast<float>(group[g] / count) + epsilon);
        rp[b * groups + g] = r;
        for (int64_t k = g * size; k < (g + 1) * size; ++k) {
          a[k] = r * gp[b * c + k];
          shift[k] = bp[b * c + k] - mp[b * groups + g] * a[k];
        }
      }
      // Pass 3: y = silu(x a + shift).
      float* yb = yp + b * pixels * c;
      for (int64_t p = 0; p < pixels; ++p)
        for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
          const int64_t lanes = std::min(kLanes, c - c0);
          const VecF z = LoadLanes(xb + p * c + c0, lanes) * Load(a.data() + c0) + Load(shift.data() + c0);
          StoreLanes(yb + p * c + c0, silu ? z * Sigmoid(z) : z, lanes);
        }
    }
  });
  return ffi::Error::Success();
}

ffi::Error GroupNormBackward(ffi::ThreadPool pool, Slab x, PerChannel gamma, PerChannel beta, PerChannel mean,
                             PerChannel rstd, Slab dy, int64_t groups, bool silu, ffi::Result<Slab> dx,
                             ffi::Result<PerChannel> dgamma, ffi::Result<PerChannel> dbeta) {
  Sizes n;
  if (ffi::Error e = CheckShapes("diffax_group_norm_bwd", x, gamma, beta, groups, n); e.failure()) return e;
  const int64_t batch = n.batch, pixels = n.pixels, c = n.c, size = n.size;
  const double count = n.count;
  const float *xp = x.typed_data(), *gp = gamma.typed_data(), *bp = beta.typed_data();
  const float *mp = mean.typed_data(), *rp = rstd.typed_data(), *dyp = dy.typed_data();
  float *dxp = dx->typed_data(), *dgp = dgamma->typed_data(), *dbp = dbeta->typed_data();
  ParallelFor(pool, batch, [&](int64_t begin, int64_t end) {
    std::vector<float> a(c + kLanes), shift(c + kLanes), mu(c + kLanes), r(c + kLanes), g_b(c + kLanes);
    std::vector<float> k1(c + kLanes), k2(c + kLanes);
    std::array<std::vector<double>, 2> sums;
    std::vector<double> group(groups), group2(groups), tmp(c);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t k = 0; k < c; ++k) {
        const int64_t g = k / size;
        mu[k] = mp[b * groups + g];
        r[k] = rp[b * groups + g];
        g_b[k] = gp[b * c + k];
        a[k] = r[k] * g_b[k];
        shift[k] = bp[b * c + k] - mu[k] * a[k];
      }
      const float *xb = xp + b * pixels * c, *dyb = dyp + b * pixels * c;
      auto dz_at = [&](int64_t p, int64_t c0, int64_t lanes, VecF& xhat) {
        const VecF xv = LoadLanes(xb + p * c + c0, lanes);
        xhat = (xv - Load(mu.data() + c0)) * Load(r.data() + c0);
        const VecF d = LoadLanes(dyb + p * c + c0, lanes);
        if (!silu) return d;
        const VecF z = xv * Load(a.data() + c0) + Load(shift.data() + c0);
        const VecF s = Sigmoid(z);
        return d * s * (1.0f + z * (1.0f - s));  // d silu(z) / dz
      };
      // Pass 1: per-channel sums of dz and dz xhat.
      PixelSums<2>(pixels, c, [&](int64_t p, int64_t c0, int64_t lanes) {
        VecF xhat;
        const VecF dz = dz_at(p, c0, lanes, xhat);
        return std::array<VecF, 2>{dz, dz * xhat};
      }, sums);
      for (int64_t k = 0; k < c; ++k) {
        dbp[b * c + k] = static_cast<float>(sums[0][k]);
        dgp[b * c + k] = static_cast<float>(sums[1][k]);
      }
      // Per-group means of gamma dz and gamma dz xhat, as per-channel coefficients.
      for (int64_t k = 0; k < c; ++k) tmp[k] = g_b[k] * sums[0][k];
      GroupSums(tmp, groups, group.data());
      for (int64_t k = 0; k < c; ++k) tmp[k] = g_b[k] * sums[1][k];
      GroupSums(tmp, groups, group2.data());
      for (int64_t k = 0; k < c; ++k) {
        k1[k] = static_cast<float>(group[k / size] / count);
        k2[k] = static_cast<float>(group2[k / size] / count);
      }
      // Pass 2: dx = rstd (gamma dz - k1 - xhat k2).
      float* dxb = dxp + b * pixels * c;
      for (int64_t p = 0; p < pixels; ++p)
        for (int64_t c0 = 0; c0 < c; c0 += kLanes) {
          const int64_t lanes = std::min(kLanes, c - c0);
          VecF xhat;
          const VecF dz = dz_at(p, c0, lanes, xhat);
          const VecF out = Load(r.data() + c0) *
                           (Load(g_b.data() + c0) * dz - Load(k1.data() + c0) - xhat * Load(k2.data() + c0));
          StoreLanes(dxb + p * c + c0, out, lanes);
        }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffaxGroupNormForward, GroupNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Slab>()
                                  .Arg<PerChannel>()
                                  .Arg<PerChannel>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("silu")
                                  .Ret<Slab>()
                                  .Ret<PerChannel>()
                                  .Ret<PerChannel>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffaxGroupNormBackward, GroupNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Slab>()
                                  .Arg<PerChannel>()
                                  .Arg<PerChannel>()
                                  .Arg<PerChannel>()
                                  .Arg<PerChannel>()
                                  .Arg<Slab>()
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("silu")
                                  .Ret<Slab>()
                                  .Ret<PerChannel>()
                                  .Ret<PerChannel>());
