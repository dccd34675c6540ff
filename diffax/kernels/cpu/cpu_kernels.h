// Helpers shared by diffax's CPU kernels (cpu_attention.cc, cpu_winograd.cc, cpu_group_norm.cc): float
// vectors one machine register wide (GCC vector extensions: 16 lanes with AVX-512, 8 with AVX, 4
// otherwise; a vector wider than the registers would live on the stack) and a parallel loop over XLA's
// intra-op thread pool.
#ifndef DIFFAX_MODELS_CPU_KERNELS_H_
#define DIFFAX_MODELS_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace diffax_cpu {

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
// Whether the machine has 32 vector registers (AVX-512) rather than 16: register blocks size by it.
constexpr bool kManyRegisters = kLanes == 16;
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline VecF Splat(float x) { return VecF{} + x; }

inline VecF Load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }

// The sum of v's lanes: halves added down to four lanes, then those pairwise (log2(kLanes) adds).
inline float SumLanes(VecF v) {
  typedef float Four __attribute__((vector_size(4 * sizeof(float))));
  Four parts[kLanes / 4];
  std::memcpy(parts, &v, sizeof v);
  for (int64_t width = kLanes / 4; width > 1; width /= 2)
    for (int64_t i = 0; i < width / 2; ++i) parts[i] += parts[i + width / 2];
  return (parts[0][0] + parts[0][2]) + (parts[0][1] + parts[0][3]);
}

// exp(x) lane by lane: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact product),
// exp(r) by its degree-6 Taylor polynomial (truncation below 1.2e-7 relative), 2^n from the exponent
// bits. Inputs are clamped to [-87, 88], where 2^n stays a normal float; exp(-87) = 1.6e-38 stands in
// for every smaller value (a probability, here, next to a row maximum of 1).
inline VecF Exp(VecF x) {
  const VecF lo = Splat(-87.0f), hi = Splat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // Round to nearest by adding 1.5 * 2^23: the sum's low mantissa bits hold n (|n| < 2^22).
  const VecF shifted = x * 1.44269504088896341f + 12582912.0f;
  const VecF nf = shifted - 12582912.0f;
  VecI n;
  std::memcpy(&n, &shifted, sizeof n);
  n -= 0x4B400000;
  const VecF r = (x - nf * 0.693145751953125f) - nf * 1.42860682030941723212e-6f;
  VecF p = Splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  VecF scale;
  const VecI bits = (n + 127) << 23;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The first `lanes` (<= kLanes) floats at p, zero beyond: a vector load when all lanes are used.
inline VecF LoadLanes(const float* p, int64_t lanes) {
  if (lanes == kLanes) return Load(p);
  VecF v = {};
  std::memcpy(&v, p, lanes * sizeof(float));
  return v;
}

// The first `lanes` (<= kLanes) lanes of v to p.
inline void StoreLanes(float* p, VecF v, int64_t lanes) {
  if (lanes == kLanes)
    Store(p, v);
  else
    std::memcpy(p, &v, lanes * sizeof(float));
}

// Runs body(begin, end) over chunks of [0, n) on the caller and the pool's other threads, and
// returns when every chunk is done. A pool task that starts late finds no chunk left and touches
// nothing but the shared counters it owns a reference to.
inline void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min<int64_t>(n, threads * 4);
  if (chunks <= 1) {
    if (n > 0) body(0, n);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable all_done;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, chunks, n, &body]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < chunks;) {
      body(n * c / chunks, n * (c + 1) / chunks);
      std::lock_guard<std::mutex> lock(shared->mu);
      if (++shared->done == chunks) shared->all_done.notify_all();
    }
  };
  for (int64_t i = 1; i < threads; ++i) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->all_done.wait(lock, [&] { return shared->done == chunks; });
}

}  // namespace diffax_cpu

#endif  // DIFFAX_MODELS_CPU_KERNELS_H_
