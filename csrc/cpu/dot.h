// Shared helpers of the CPU kernels.
#pragma once

#include <cstdint>

// The extension is built for the baseline x86-64 ISA; small hot helpers get
// an AVX2+FMA clone too, picked at load time (GCC function multiversioning).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NASOPS_CLONE_FOR_AVX2 __attribute__((target_clones("arch=x86-64-v3", "default")))
// Loops over 16-lane blocks also get an AVX-512 clone (one register per block).
#define NASOPS_CLONE_FOR_AVX512 \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NASOPS_CLONE_FOR_AVX2 inline
#define NASOPS_CLONE_FOR_AVX512 inline
#endif

namespace nasops {

// sum_i a[i] * b[i] in acc_t, as 8 interleaved partial sums added pairwise at
// the end. One running sum is a serial chain of adds (latency-bound, ~4 cycles
// an element: most of the backward's time at C = 768); 8 independent chains
// vectorize. The order is fixed, so the result does not depend on threads.
template <typename acc_t, typename A, typename Bv>
inline acc_t dot_inline(const A* a, const Bv* b, int64_t n) {
  constexpr int64_t kLanes = 8;
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l)
      part[l] += static_cast<acc_t>(a[i + l]) * static_cast<acc_t>(b[i + l]);
  acc_t tail = 0;
  for (; i < n; ++i) tail += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) +
         tail;
}

// dot_inline as a call, for long vectors.
template <typename acc_t, typename A, typename Bv>
NASOPS_CLONE_FOR_AVX2 acc_t dot(const A* a, const Bv* b, int64_t n) {
  return dot_inline<acc_t>(a, b, n);
}

// out[r * K + j] = dot(q[r, :], k[r, j, :]) for rows r in [0, rows): q is
// (rows, D), k (rows, K, D), both contiguous. One call for many short dot
// products (D of a few dozen), whose call overhead would otherwise dominate.
template <typename T>
NASOPS_CLONE_FOR_AVX2 void rowwise_dots(const T* q, const T* k, int64_t rows, int64_t K, int64_t D,
                                        T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < K; ++j) out[r * K + j] = dot_inline<T>(q + r * D, k + (r * K + j) * D, D);
  }
}

}  // namespace nasops
