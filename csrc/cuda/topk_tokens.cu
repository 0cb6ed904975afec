// topk_tokens (SPEC 2.3) CUDA kernels: DASViT token scores, exact top-k of a
// whole row inside one block, gated gather, and the backward.
//
// Selection (one block per sample): the N scores become unsigned keys in shared
// memory whose order is the numeric order (-0 == +0, NaN above every number;
// 32-bit keys for float accumulation, 64-bit for double; 0 marks a token that
// is not a candidate, e.g. the CLS token). A most-significant-bit-first radix
// select (one block-wide count per key bit) finds the want-th largest key t;
// tokens with key > t are kept, then tokens with key == t in index order (a
// block scan) until keep is reached, and a second block scan over the kept
// flags gives each kept token its place: indices come out ascending, no sort.
// Every thread owns a contiguous chunk of tokens, so both scans follow the
// index order.
//
// Rows (gather, backward): one warp per row, 16-byte vector loads and stores
// when a row is a multiple of 16 bytes (torch allocations are 256-byte
// aligned), accumulation in float (double for float64), no atomics.
#include "topk_tokens.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace nasops {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kRowWarps = 8;  // warps (rows) per block of the row kernels

// ---- conversions (torch builds define __CUDA_NO_HALF_CONVERSIONS__) ----------
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// ---- order keys ----------------------------------------------------------------
template <typename Acc> struct KeyOf;
template <> struct KeyOf<float> {
  using type = uint32_t;
  static constexpr int bits = 32;
  __device__ static uint32_t of(float v) {
    const uint32_t b = __float_as_uint(v);
    const uint32_t magnitude = b & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return 0xffffffffu;  // NaN ranks highest
    if (magnitude == 0) return 0x80000000u;            // -0 == +0
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
};
template <> struct KeyOf<double> {
  using type = uint64_t;
  static constexpr int bits = 64;
  __device__ static uint64_t of(double v) {
    const uint64_t b = static_cast<uint64_t>(__double_as_longlong(v));
    const uint64_t magnitude = b & 0x7fffffffffffffffull;
    if (magnitude > 0x7ff0000000000000ull) return ~0ull;
    if (magnitude == 0) return 0x8000000000000000ull;
    return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
  }
};

// ---- warp and block reductions (blockDim.x a multiple of 32) ------------------
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the block, returned to every thread. scratch: 32 ints of shared memory.
__device__ int block_sum(int v, int* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Exclusive prefix sum over the threads in order; *total gets the block's sum.
__device__ int block_exclusive_scan(int v, int* scratch, int* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int inclusive = v;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const int other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == kWarp - 1) scratch[warp] = inclusive;
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) {
    if (w < warp) before += scratch[w];
    sum += scratch[w];
  }
  __syncthreads();
  *total = sum;
  return before + inclusive - v;
}

// q_row . k_mean over D, by one warp, returned to every lane.
template <typename T, typename Acc>
__device__ __forceinline__ Acc warp_dot(const T* __restrict__ row, const Acc* __restrict__ k_mean, int64_t D) {
  Acc dot = 0;
  for (int64_t d = threadIdx.x % kWarp; d < D; d += kWarp) dot += to_acc(row[d]) * k_mean[d];
  return warp_sum(dot);
}

// The score of a token: dot / sqrt(D), both steps correctly rounded in Acc (the
// build has no --use_fast_math). The one expression of a score in every backend
// (CPU, Triton, eager): a near-tie selects the same tokens everywhere.
template <typename Acc>
__device__ __forceinline__ Acc token_score(Acc dot, int64_t D) {
  return dot / sqrt(static_cast<Acc>(D));
}

// ---- 1. scores and selection: one block per sample ------------------------------
template <typename T>
__global__ void select_kernel(const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ s,
                              typename AccOf<T>::type* __restrict__ k_mean_out,
                              int64_t* __restrict__ idx, int64_t* __restrict__ pos,
                              int64_t N, int64_t D, int64_t keep, bool keep_cls) {
  using Acc = typename AccOf<T>::type;
  using Key = typename KeyOf<Acc>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  int* scratch = reinterpret_cast<int*>(smem);                     // 32 ints
  Acc* partial = reinterpret_cast<Acc*>(smem + 32 * sizeof(int) + 16 - (32 * sizeof(int)) % 16);
  Acc* k_mean = partial + blockDim.x;                              // D
  Key* key = reinterpret_cast<Key*>(k_mean + D);                   // N

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, threads = blockDim.x;
  const T* qb = q + b * N * D;
  const T* kb = k + b * N * D;

  // k_mean: thread (group g, column d) sums every groups-th token of column d.
  for (int64_t d0 = 0; d0 < D; d0 += threads) {
    const int width = static_cast<int>(D - d0 < threads ? D - d0 : threads);
    const int groups = threads / width;
    const int g = tid / width;
    const int64_t d = d0 + tid % width;
    Acc sum = 0;
    if (g < groups)
      for (int64_t i = g; i < N; i += groups) sum += to_acc(kb[i * D + d]);
    partial[tid] = sum;
    __syncthreads();
    if (tid < width) {
      Acc total = 0;
      for (int gg = 0; gg < groups; ++gg) total += partial[gg * width + tid];
      k_mean[d0 + tid] = total / static_cast<Acc>(N);
      k_mean_out[b * D + d0 + tid] = total / static_cast<Acc>(N);
    }
    __syncthreads();
  }

  // Scores and keys: one warp per token.
  const int first = keep_cls ? 1 : 0;
  for (int64_t i = tid / kWarp; i < N; i += threads / kWarp) {
    const Acc score = token_score(warp_dot(qb + i * D, k_mean, D), D);
    if (tid % kWarp == 0) {
      s[b * N + i] = from_acc<T>(score);
      key[i] = i >= first ? KeyOf<Acc>::of(score) : Key(0);
    }
  }
  __syncthreads();

  // Radix select of the want-th largest candidate key.
  const int64_t want = keep - first;
  const int64_t chunk = (N + threads - 1) / threads;
  const int64_t lo = tid * chunk < N ? tid * chunk : N;
  const int64_t hi = lo + chunk < N ? lo + chunk : N;
  Key threshold = 0;
  for (int bit = KeyOf<Acc>::bits - 1; bit >= 0; --bit) {
    const Key trial = threshold | (Key(1) << bit);
    int count = 0;
    for (int64_t i = lo; i < hi; ++i) count += key[i] >= trial;
    if (block_sum(count, scratch) >= want) threshold = trial;
  }
  int above = 0, tied = 0;
  for (int64_t i = lo; i < hi; ++i) {
    above += key[i] > threshold;
    tied += key[i] == threshold;
  }
  const int need = static_cast<int>(want) - block_sum(above, scratch);
  int tied_total;
  const int tie_rank0 = block_exclusive_scan(tied, scratch, &tied_total);

  // Kept flags (ties to the lowest indices), then their places in idx.
  int kept_here = 0;
  for (int64_t i = lo, rank = tie_rank0; i < hi; ++i) {
    const bool is_tied = key[i] == threshold;
    kept_here += (key[i] > threshold) || (is_tied && rank < need) || (keep_cls && i == 0);
    rank += is_tied;
  }
  int kept_total;
  int place = block_exclusive_scan(kept_here, scratch, &kept_total);
  for (int64_t i = lo, rank = tie_rank0; i < hi; ++i) {
    const bool is_tied = key[i] == threshold;
    const bool kept = (key[i] > threshold) || (is_tied && rank < need) || (keep_cls && i == 0);
    rank += is_tied;
    if (kept) {
      idx[b * keep + place] = i;
      pos[b * N + i] = place++;
    } else {
      pos[b * N + i] = -1;
    }
  }
}

// ---- row helpers: 16-byte vectors of T ------------------------------------------
template <typename T>
struct alignas(16) Vec {
  static constexpr int n = 16 / sizeof(T);
  T v[n];
};

// ---- 2. gather: one warp per kept row --------------------------------------------
template <typename T, bool kVector>
__global__ void gather_kernel(const T* __restrict__ x, const T* __restrict__ q,
                              const typename AccOf<T>::type* __restrict__ k_mean,
                              const int64_t* __restrict__ idx, T* __restrict__ out, int64_t rows,
                              int64_t N, int64_t C, int64_t D, int64_t keep, bool sigmoid) {
  using Acc = typename AccOf<T>::type;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (r >= rows) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = r / keep;
  const int64_t src_row = b * N + idx[r];
  const T* src = x + src_row * C;
  T* dst = out + r * C;
  Acc gate = 1;
  if (sigmoid) {
    const Acc score = token_score(warp_dot(q + src_row * D, k_mean + b * D, D), D);
    gate = Acc(1) / (Acc(1) + exp(-score));
  }
  if (kVector) {
    const int64_t n = C / Vec<T>::n;
    const Vec<T>* s4 = reinterpret_cast<const Vec<T>*>(src);
    Vec<T>* d4 = reinterpret_cast<Vec<T>*>(dst);
    for (int64_t w = lane; w < n; w += kWarp) {
      Vec<T> v = s4[w];
      if (sigmoid) {
#pragma unroll
        for (int e = 0; e < Vec<T>::n; ++e) v.v[e] = from_acc<T>(to_acc(v.v[e]) * gate);
      }
      d4[w] = v;
    }
  } else {
    for (int64_t c = lane; c < C; c += kWarp)
      dst[c] = sigmoid ? from_acc<T>(to_acc(src[c]) * gate) : src[c];
  }
}

// ---- 3. backward over token rows: one warp per (b, i) ---------------------------
template <typename T, bool kVector>
__global__ void rows_backward_kernel(const T* __restrict__ grad_y,
                                     const typename AccOf<T>::type* __restrict__ grad_s,
                                     const T* __restrict__ x, const T* __restrict__ q,
                                     const typename AccOf<T>::type* __restrict__ k_mean,
                                     const int64_t* __restrict__ pos, T* __restrict__ grad_x,
                                     typename AccOf<T>::type* __restrict__ grad_score, int64_t rows,
                                     int64_t N, int64_t C, int64_t D, int64_t keep, int gate_kind) {
  using Acc = typename AccOf<T>::type;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (r >= rows) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = r / N;
  const int64_t place = pos[r];
  T* gx = grad_x ? grad_x + r * C : nullptr;
  if (place < 0) {
    if (gx) {
      if (kVector) {
        Vec<T> zero;
#pragma unroll
        for (int e = 0; e < Vec<T>::n; ++e) zero.v[e] = from_acc<T>(Acc(0));
        for (int64_t w = lane; w < C / Vec<T>::n; w += kWarp) reinterpret_cast<Vec<T>*>(gx)[w] = zero;
      } else {
        for (int64_t c = lane; c < C; c += kWarp) gx[c] = from_acc<T>(Acc(0));
      }
    }
    if (grad_score && lane == 0) grad_score[r] = grad_s[r];
    return;
  }
  Acc gate = 1, slope = 1;  // forward factor and d gate / d s (1: straight-through)
  if (gate_kind == static_cast<int>(TokenGate::kSigmoid)) {
    const Acc score = token_score(warp_dot(q + r * D, k_mean + b * D, D), D);
    gate = Acc(1) / (Acc(1) + exp(-score));
    slope = gate * (Acc(1) - gate);
  }
  const bool need_dot = grad_score != nullptr && gate_kind != static_cast<int>(TokenGate::kNone);
  const T* gy = grad_y + (b * keep + place) * C;
  const T* xr = x + r * C;
  Acc dot = 0;
  if (kVector) {
    for (int64_t w = lane; w < C / Vec<T>::n; w += kWarp) {
      const Vec<T> g = reinterpret_cast<const Vec<T>*>(gy)[w];
      if (gx) {
        Vec<T> out;
#pragma unroll
        for (int e = 0; e < Vec<T>::n; ++e) out.v[e] = from_acc<T>(to_acc(g.v[e]) * gate);
        reinterpret_cast<Vec<T>*>(gx)[w] = out;
      }
      if (need_dot) {
        const Vec<T> xv = reinterpret_cast<const Vec<T>*>(xr)[w];
#pragma unroll
        for (int e = 0; e < Vec<T>::n; ++e) dot += to_acc(g.v[e]) * to_acc(xv.v[e]);
      }
    }
  } else {
    for (int64_t c = lane; c < C; c += kWarp) {
      const Acc g = to_acc(gy[c]);
      if (gx) gx[c] = from_acc<T>(g * gate);
      if (need_dot) dot += g * to_acc(xr[c]);
    }
  }
  if (grad_score) {
    dot = warp_sum(dot);
    if (lane == 0) grad_score[r] = grad_s[r] + dot * slope;
  }
}

// ---- 4. backward to q and k: one block per sample --------------------------------
template <typename T>
__global__ void qk_backward_kernel(const typename AccOf<T>::type* __restrict__ grad_score,
                                   const T* __restrict__ q,
                                   const typename AccOf<T>::type* __restrict__ k_mean,
                                   T* __restrict__ grad_q, T* __restrict__ grad_k, int64_t N, int64_t D) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  Acc* partial = reinterpret_cast<Acc*>(smem);  // blockDim.x
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, threads = blockDim.x;
  const Acc* gs = grad_score + b * N;
  for (int64_t d0 = 0; d0 < D; d0 += threads) {
    const int width = static_cast<int>(D - d0 < threads ? D - d0 : threads);
    const int groups = threads / width;
    const int g = tid / width;
    const int64_t d = d0 + tid % width;
    Acc sum = 0;
    if (g < groups) {
      const Acc km = k_mean[b * D + d];
      for (int64_t i = g; i < N; i += groups) {
        const Acc gi = token_score(gs[i], D);  // d loss / d dot: the score's 1/sqrt(D)
        grad_q[(b * N + i) * D + d] = from_acc<T>(gi * km);
        sum += gi * to_acc(q[(b * N + i) * D + d]);
      }
    }
    partial[tid] = sum;
    __syncthreads();
    if (tid < width) {
      Acc total = 0;
      for (int gg = 0; gg < groups; ++gg) total += partial[gg * width + tid];
      partial[tid] = total / static_cast<Acc>(N);  // only threads < width read it below
    }
    __syncthreads();
    if (g < groups) {
      const T value = from_acc<T>(partial[tid % width]);
      for (int64_t i = g; i < N; i += groups) grad_k[(b * N + i) * D + d] = value;
    }
    __syncthreads();
  }
}

// ---- launchers -------------------------------------------------------------------
int select_threads(int64_t N) { return N <= 1024 ? 256 : (N <= 4096 ? 512 : 1024); }

template <typename T>
size_t select_smem_bytes(int64_t N, int64_t D, int threads) {
  using Acc = typename AccOf<T>::type;
  using Key = typename KeyOf<Acc>::type;
  const size_t head = 32 * sizeof(int) + 16 - (32 * sizeof(int)) % 16;
  return head + (threads + D) * sizeof(Acc) + N * sizeof(Key) + sizeof(Key);
}

// 16-byte vectors need rows of a multiple of 16 bytes and 16-byte aligned bases.
bool rows_vectorizable(int64_t C, size_t element_size, const void* a, const void* b, const void* c = nullptr) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                         reinterpret_cast<uintptr_t>(c);
  return (C * element_size) % 16 == 0 && bits % 16 == 0;
}

template <typename T>
cudaError_t forward_impl(const TokenSizes& z, TokenGate gate, bool keep_cls, const void* x,
                         const void* q, const void* k, void* x_sel, int64_t* idx, void* s,
                         void* k_mean, int64_t* pos, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  if (z.B == 0) return cudaSuccess;
  const int threads = select_threads(z.N);
  const size_t smem = select_smem_bytes<T>(z.N, z.D, threads);
  cudaError_t err = cudaFuncSetAttribute(select_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  select_kernel<T><<<static_cast<unsigned>(z.B), threads, smem, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<T*>(s), static_cast<Acc*>(k_mean),
      idx, pos, z.N, z.D, z.keep, keep_cls);
  if ((err = cudaGetLastError()) != cudaSuccess || z.C == 0) return err;
  const int64_t rows = z.B * z.keep;
  const unsigned blocks = static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps);
  const bool sigmoid = gate == TokenGate::kSigmoid;
  if (rows_vectorizable(z.C, sizeof(T), x, x_sel))
    gather_kernel<T, true><<<blocks, kRowWarps * kWarp, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(q), static_cast<const Acc*>(k_mean), idx,
        static_cast<T*>(x_sel), rows, z.N, z.C, z.D, z.keep, sigmoid);
  else
    gather_kernel<T, false><<<blocks, kRowWarps * kWarp, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(q), static_cast<const Acc*>(k_mean), idx,
        static_cast<T*>(x_sel), rows, z.N, z.C, z.D, z.keep, sigmoid);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const TokenSizes& z, TokenGate gate, const void* grad_x_sel,
                          const void* grad_s, const void* x, const void* q, const void* k_mean,
                          const int64_t* pos, void* grad_x, void* grad_q, void* grad_k,
                          void* grad_score, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  const bool need_qk = grad_q != nullptr && grad_k != nullptr;
  if (z.B == 0 || z.N == 0 || (grad_x == nullptr && !need_qk)) return cudaSuccess;
  const int64_t rows = z.B * z.N;
  const unsigned blocks = static_cast<unsigned>((rows + kRowWarps - 1) / kRowWarps);
  Acc* score = need_qk ? static_cast<Acc*>(grad_score) : nullptr;
  if (rows_vectorizable(z.C, sizeof(T), grad_x_sel, x, grad_x))
    rows_backward_kernel<T, true><<<blocks, kRowWarps * kWarp, 0, stream>>>(
        static_cast<const T*>(grad_x_sel), static_cast<const Acc*>(grad_s), static_cast<const T*>(x),
        static_cast<const T*>(q), static_cast<const Acc*>(k_mean), pos, static_cast<T*>(grad_x), score,
        rows, z.N, z.C, z.D, z.keep, static_cast<int>(gate));
  else
    rows_backward_kernel<T, false><<<blocks, kRowWarps * kWarp, 0, stream>>>(
        static_cast<const T*>(grad_x_sel), static_cast<const Acc*>(grad_s), static_cast<const T*>(x),
        static_cast<const T*>(q), static_cast<const Acc*>(k_mean), pos, static_cast<T*>(grad_x), score,
        rows, z.N, z.C, z.D, z.keep, static_cast<int>(gate));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !need_qk) return err;
  const int threads = 256;
  qk_backward_kernel<T><<<static_cast<unsigned>(z.B), threads, threads * sizeof(Acc), stream>>>(
      score, static_cast<const T*>(q), static_cast<const Acc*>(k_mean), static_cast<T*>(grad_q),
      static_cast<T*>(grad_k), z.N, z.D);
  return cudaGetLastError();
}

}  // namespace

int64_t topk_tokens_max_tokens(TokenDType dtype, int64_t D, int device) {
  int limit = 0;
  if (cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return 0;
  const bool wide = dtype == TokenDType::kFloat64;
  const size_t acc = wide ? sizeof(double) : sizeof(float);
  const size_t key = wide ? sizeof(uint64_t) : sizeof(uint32_t);
  const size_t fixed = 32 * sizeof(int) + 16 + (1024 + D) * acc + key;
  return limit > static_cast<int>(fixed) ? static_cast<int64_t>((limit - fixed) / key) : 0;
}

cudaError_t launch_topk_tokens_forward(const TokenSizes& sizes, TokenDType dtype, TokenGate gate,
                                       bool keep_cls, const void* x, const void* q, const void* k,
                                       void* x_sel, int64_t* idx, void* s, void* k_mean,
                                       int64_t* pos, int device, cudaStream_t stream) {
  (void)device;
  switch (dtype) {
    case TokenDType::kFloat16:
      return forward_impl<__half>(sizes, gate, keep_cls, x, q, k, x_sel, idx, s, k_mean, pos, stream);
    case TokenDType::kBFloat16:
      return forward_impl<__nv_bfloat16>(sizes, gate, keep_cls, x, q, k, x_sel, idx, s, k_mean, pos, stream);
    case TokenDType::kFloat32:
      return forward_impl<float>(sizes, gate, keep_cls, x, q, k, x_sel, idx, s, k_mean, pos, stream);
    case TokenDType::kFloat64:
      return forward_impl<double>(sizes, gate, keep_cls, x, q, k, x_sel, idx, s, k_mean, pos, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_topk_tokens_backward(const TokenSizes& sizes, TokenDType dtype, TokenGate gate,
                                        const void* grad_x_sel, const void* grad_s, const void* x,
                                        const void* q, const void* k_mean, const int64_t* pos,
                                        void* grad_x, void* grad_q, void* grad_k, void* grad_score,
                                        cudaStream_t stream) {
  switch (dtype) {
    case TokenDType::kFloat16:
      return backward_impl<__half>(sizes, gate, grad_x_sel, grad_s, x, q, k_mean, pos, grad_x, grad_q,
                                   grad_k, grad_score, stream);
    case TokenDType::kBFloat16:
      return backward_impl<__nv_bfloat16>(sizes, gate, grad_x_sel, grad_s, x, q, k_mean, pos, grad_x,
                                          grad_q, grad_k, grad_score, stream);
    case TokenDType::kFloat32:
      return backward_impl<float>(sizes, gate, grad_x_sel, grad_s, x, q, k_mean, pos, grad_x, grad_q,
                                  grad_k, grad_score, stream);
    case TokenDType::kFloat64:
      return backward_impl<double>(sizes, gate, grad_x_sel, grad_s, x, q, k_mean, pos, grad_x, grad_q,
                                   grad_k, grad_score, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace nasops
