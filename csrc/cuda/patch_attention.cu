// Patchwise softmax attention (SPEC 2.2) CUDA kernels; see patch_attention.cuh.
//
// Pooling: one warp per (map, b, patch, channel); the warp's lanes stride over
// the patch's pixels row by row, so a patch row of >= 32 pixels is one
// coalesced 128-byte read (fp32). Map-sized elementwise kernels (pool
// backward, outputs backward) use a grid-stride loop over 16-byte runs of a
// row (when W allows), 32-bit index math when no index nor the loop counter
// can pass 2^31 - 1 (grid_stride.cuh); the outputs
// backward reads grad once and writes all K gradients. The attention kernels are one
// thread per (b, p) row: B*P rows of K <= 16 logits are tiny next to the maps.
// channels_last maps (PatchSizes::channels_last): pooling takes one block per
// (map, b, patch) whose threads own channels (consecutive addresses) and walk
// the patch's pixels; the elementwise kernels walk the NHWC order in runs of a
// pixel's channels (C % VEC == 0), which share one patch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "patch_attention.cuh"
#include "accumulate.cuh"
#include "grid_stride.cuh"

namespace nasops {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

struct MapTable {
  const void* ptr[kPatchMaxOps];
};
struct GradTable {
  void* ptr[kPatchMaxOps];
};

// First pixel of patch row (or column) i: ceil(i * size / parts).
__device__ __forceinline__ int patch_start(int i, int size, int parts) {
  return (i * size + parts - 1) / parts;
}

// The pool kernels' task of block blockIdx.x: map m, sample b, patch p, and the
// patch's rows [r0, r1) and columns [c0, c1).
struct PoolTask {
  int m, p, r0, r1, c0, c1;
  int64_t b;
};

__device__ __forceinline__ PoolTask pool_task(const PatchSizes& s) {
  const int P = static_cast<int>(s.gh * s.gw);
  const int H = static_cast<int>(s.H), W = static_cast<int>(s.W);
  const int64_t task = blockIdx.x;  // (m, b, p)
  PoolTask t;
  t.p = static_cast<int>(task % P);
  t.b = (task / P) % s.B;
  t.m = static_cast<int>(task / (P * s.B));
  const int ph = t.p / static_cast<int>(s.gw), pw = t.p % static_cast<int>(s.gw);
  t.r0 = patch_start(ph, H, s.gh);
  t.r1 = patch_start(ph + 1, H, s.gh);
  t.c0 = patch_start(pw, W, s.gw);
  t.c1 = patch_start(pw + 1, W, s.gw);
  return t;
}

template <typename T>
__global__ void pool_kernel(PatchSizes s, MapTable maps, int M, typename Acc<T>::type* out) {
  using A = typename Acc<T>::type;
  const int P = static_cast<int>(s.gh * s.gw);
  const int H = static_cast<int>(s.H), W = static_cast<int>(s.W);
  const PoolTask t = pool_task(s);
  const int width = t.c1 - t.c0, count = (t.r1 - t.r0) * width;
  const T* src = static_cast<const T*>(maps.ptr[t.m]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t c = warp; c < s.C; c += warps) {
    const T* plane = src + (t.b * s.C + c) * H * W;
    A sum = 0;
    for (int i = lane; i < count; i += 32) {
      const int h = t.r0 + i / width, w = t.c0 + i % width;
      sum += to_acc(plane[h * W + w]);
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) out[((t.b * P + t.p) * M + t.m) * s.C + c] = sum / static_cast<A>(count);
  }
}

// channels_last: one block per (m, b, p); thread c sums channel c over the
// patch's pixels, so a warp reads 32 consecutive channels of one pixel.
template <typename T>
__global__ void pool_kernel_nhwc(PatchSizes s, MapTable maps, int M, typename Acc<T>::type* out) {
  using A = typename Acc<T>::type;
  const int P = static_cast<int>(s.gh * s.gw);
  const int H = static_cast<int>(s.H), W = static_cast<int>(s.W);
  const PoolTask t = pool_task(s);
  const T* sample = static_cast<const T*>(maps.ptr[t.m]) + t.b * H * W * s.C;
  const A count = static_cast<A>((t.r1 - t.r0) * (t.c1 - t.c0));
  for (int64_t c = threadIdx.x; c < s.C; c += blockDim.x) {
    A sum = 0;
    for (int h = t.r0; h < t.r1; ++h) {
      for (int w = t.c0; w < t.c1; ++w) sum += to_acc(sample[(static_cast<int64_t>(h) * W + w) * s.C + c]);
    }
    out[((t.b * P + t.p) * M + t.m) * s.C + c] = sum / count;
  }
}

// A run of VEC consecutive elements of one map row (16 bytes when vectorized).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// The elementwise kernels below walk a flat (B, C, H, W) index in runs of VEC
// elements of one row (W % VEC == 0), so a run shares b, c and the row's
// patch row; only the patch column changes inside it. In channels_last order
// (kChannelsLast) a run is VEC channels of one pixel (C % VEC == 0): it shares
// b, the pixel and so the patch; only the channel changes inside it. Index is
// int32_t when 32-bit arithmetic cannot overflow (cheaper divisions), else int64_t.
template <typename Index>
struct RowRun {
  Index b, c, prow;  // prow = patch row * gw
  int h, w0;
};

template <bool kChannelsLast, typename Index>
__device__ __forceinline__ RowRun<Index> row_run(Index i, const PatchSizes& s) {
  const Index W = static_cast<Index>(s.W), H = static_cast<Index>(s.H), C = static_cast<Index>(s.C);
  if (kChannelsLast) {  // i = ((b * H + h) * W + w) * C + c: w0 is the pixel's column
    const Index pixel = i / C;
    const int w = static_cast<int>(pixel % W);
    const Index row = pixel / W;
    const int h = static_cast<int>(row % H);
    const int ph = static_cast<int>(h * s.gh / s.H);
    return {row / H, i - pixel * C, static_cast<Index>(ph * s.gw), h, w};
  }
  const Index row = i / W;
  const int w0 = static_cast<int>(i - row * W);
  const int h = static_cast<int>(row % H);
  const Index plane = row / H;
  const int ph = static_cast<int>(h * s.gh / s.H);
  return {plane / C, plane % C, static_cast<Index>(ph * s.gw), h, w0};
}

// |p| for patch row ph (encoded in the run) and patch column pw.
__device__ __forceinline__ int patch_count(int h, int pw, const PatchSizes& s) {
  const int H = static_cast<int>(s.H), W = static_cast<int>(s.W);
  const int gh = static_cast<int>(s.gh), gw = static_cast<int>(s.gw);
  const int ph = h * gh / H;
  const int rows = patch_start(ph + 1, H, gh) - patch_start(ph, H, gh);
  const int cols = patch_start(pw + 1, W, gw) - patch_start(pw, W, gw);
  return rows * cols;
}

template <typename T, int VEC, typename Index, bool kChannelsLast>
__global__ void pool_backward_kernel(PatchSizes s, const typename Acc<T>::type* grad, T* out) {
  using A = typename Acc<T>::type;
  const Index runs = static_cast<Index>(s.B * s.C * s.H * s.W / VEC);
  const Index P = static_cast<Index>(s.gh * s.gw), C = static_cast<Index>(s.C);
  for (Index r = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; r < runs;
       r += static_cast<Index>(gridDim.x) * blockDim.x) {
    const RowRun<Index> run = row_run<kChannelsLast, Index>(r * VEC, s);
    Pack<T, VEC> pack;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      // NCHW: element j is column w0 + j of channel c; NHWC: channel c + j of column w0.
      const int pw = static_cast<int>((run.w0 + (kChannelsLast ? 0 : j)) * s.gw / s.W);
      const Index p = run.prow + pw;
      const Index c = run.c + (kChannelsLast ? j : 0);
      pack.v[j] = from_acc<T, A>(grad[(run.b * P + p) * C + c] /
                                 static_cast<A>(patch_count(run.h, pw, s)));
    }
    reinterpret_cast<Pack<T, VEC>*>(out)[r] = pack;
  }
}

template <typename T, int VEC, typename Index, bool kChannelsLast>
__global__ void outputs_backward_kernel(PatchSizes s, const T* grad, const typename Acc<T>::type* weights,
                                        const typename Acc<T>::type* grad_pooled, GradTable grads, int K) {
  using A = typename Acc<T>::type;
  const Index runs = static_cast<Index>(s.B * s.C * s.H * s.W / VEC);
  const Index P = static_cast<Index>(s.gh * s.gw), C = static_cast<Index>(s.C);
  for (Index r = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; r < runs;
       r += static_cast<Index>(gridDim.x) * blockDim.x) {
    const RowRun<Index> run = row_run<kChannelsLast, Index>(r * VEC, s);
    const Pack<T, VEC> g = reinterpret_cast<const Pack<T, VEC>*>(grad)[r];
    Index rows[VEC];  // (b, p) row of each element
    A inv_count[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int pw = static_cast<int>((run.w0 + (kChannelsLast ? 0 : j)) * s.gw / s.W);
      rows[j] = run.b * P + run.prow + pw;
      inv_count[j] = A(1) / static_cast<A>(patch_count(run.h, pw, s));
    }
    for (int k = 0; k < K; ++k) {
      Pack<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const Index row = rows[j] * K + k;
        const Index c = run.c + (kChannelsLast ? j : 0);
        out.v[j] = from_acc<T, A>(weights[row] * to_acc(g.v[j]) + grad_pooled[row * C + c] * inv_count[j]);
      }
      reinterpret_cast<Pack<T, VEC>*>(grads.ptr[k])[r] = out;
    }
  }
}

template <typename A>
__global__ void attention_kernel(const A* q, const A* k, const A* prior, A* w, int64_t R, int K,
                                 int64_t D, A scale, A inv_tau) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= R) return;
  A logits[kPatchMaxOps];
  A top = -INFINITY;
  for (int kk = 0; kk < K; ++kk) {
    A dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += q[row * D + d] * k[(row * K + kk) * D + d];
    logits[kk] = (dot * scale + (prior ? prior[kk] : A(0))) * inv_tau;
    top = logits[kk] > top ? logits[kk] : top;
  }
  A total = 0;
  for (int kk = 0; kk < K; ++kk) total += (logits[kk] = exp(logits[kk] - top));
  for (int kk = 0; kk < K; ++kk) w[row * K + kk] = logits[kk] / total;
}

template <typename A>
__global__ void attention_backward_kernel(const A* grad_w, const A* w, const A* q, const A* k,
                                          A* grad_q, A* grad_k, A* grad_logits, int64_t R, int K,
                                          int64_t D, A scale, A inv_tau) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= R) return;
  A g[kPatchMaxOps];
  A dot = 0;
  for (int kk = 0; kk < K; ++kk) dot += w[row * K + kk] * grad_w[row * K + kk];
  for (int kk = 0; kk < K; ++kk) {
    const A gl = w[row * K + kk] * (grad_w[row * K + kk] - dot) * inv_tau;
    grad_logits[row * K + kk] = gl;
    g[kk] = gl * scale;
  }
  for (int64_t d = 0; d < D; ++d) {
    const A qd = q[row * D + d];
    A gq = 0;
    for (int kk = 0; kk < K; ++kk) {
      gq += g[kk] * k[(row * K + kk) * D + d];
      grad_k[(row * K + kk) * D + d] = g[kk] * qd;
    }
    grad_q[row * D + d] = gq;
  }
}

constexpr int kThreads = 256;

template <typename F>
cudaError_t dispatch(PatchDType dtype, F&& f) {
  switch (dtype) {
    case PatchDType::kFloat16:
      f(__half{});
      break;
    case PatchDType::kBFloat16:
      f(__nv_bfloat16{});
      break;
    case PatchDType::kFloat32:
      f(float{});
      break;
    case PatchDType::kFloat64:
      f(double{});
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_patch_pool(const PatchSizes& s, PatchDType dtype, const void* const* maps, int M,
                              void* out, cudaStream_t stream) {
  if (M < 1 || M > kPatchMaxOps) return cudaErrorInvalidValue;
  MapTable table{};
  for (int m = 0; m < M; ++m) table.ptr[m] = maps[m];
  const int64_t tasks = M * s.B * s.gh * s.gw;
  if (tasks == 0 || s.C == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* means = static_cast<typename Acc<T>::type*>(out);
    if (s.channels_last) {
      const int threads = s.C >= kThreads ? kThreads : static_cast<int>((s.C + 31) / 32 * 32);
      pool_kernel_nhwc<T><<<static_cast<unsigned>(tasks), threads, 0, stream>>>(s, table, M, means);
    } else {
      pool_kernel<T><<<static_cast<unsigned>(tasks), kThreads, 0, stream>>>(s, table, M, means);
    }
  });
}

// 16-byte runs when every row (NHWC: every pixel's channels) splits into them
// and the pointers allow it.
template <typename T>
bool vectorizable(const PatchSizes& s, const void* const* ptrs, int count) {
  constexpr int kVec = 16 / sizeof(T);
  if ((s.channels_last ? s.C : s.W) % kVec != 0) return false;
  for (int i = 0; i < count; ++i) {
    if (reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return false;
  }
  return true;
}

// Launch kernel<VEC, Index> over N / VEC runs: VEC = 16 / sizeof(T) or 1, Index
// int32_t when every index the kernel forms is below `index_bound` and the
// grid-stride counter cannot wrap (int32_grid_stride_fits).
template <typename T, typename Launch>
void launch_runs(const PatchSizes& s, bool vectorize, int64_t index_bound, Launch&& launch) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t n = s.B * s.C * s.H * s.W;
  const int64_t runs = vectorize ? n / kVec : n;
  const unsigned blocks = grid_stride_blocks(runs, kThreads);
  const bool small = int32_grid_stride_fits(index_bound, runs, static_cast<int64_t>(blocks) * kThreads);
  if (vectorize) {
    small ? launch(std::integral_constant<int, kVec>{}, int32_t{}, blocks)
          : launch(std::integral_constant<int, kVec>{}, int64_t{}, blocks);
  } else {
    small ? launch(std::integral_constant<int, 1>{}, int32_t{}, blocks)
          : launch(std::integral_constant<int, 1>{}, int64_t{}, blocks);
  }
}

cudaError_t launch_patch_pool_backward(const PatchSizes& s, PatchDType dtype, const void* grad,
                                       void* out, cudaStream_t stream) {
  if (s.B * s.C * s.H * s.W == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const void* ptrs[] = {out};
    launch_runs<T>(s, vectorizable<T>(s, ptrs, 1), s.B * s.C * s.H * s.W, [&](auto vec, auto index, unsigned blocks) {
      constexpr int kVec = decltype(vec)::value;
      using Index = decltype(index);
      if (s.channels_last) {
        pool_backward_kernel<T, kVec, Index, true><<<blocks, kThreads, 0, stream>>>(
            s, static_cast<const A*>(grad), static_cast<T*>(out));
      } else {
        pool_backward_kernel<T, kVec, Index, false><<<blocks, kThreads, 0, stream>>>(
            s, static_cast<const A*>(grad), static_cast<T*>(out));
      }
    });
  });
}

cudaError_t launch_patch_attention_outputs_backward(const PatchSizes& s, PatchDType dtype,
                                                    const void* grad, const void* weights,
                                                    const void* grad_pooled, void* const* grads,
                                                    int K, cudaStream_t stream) {
  if (K < 1 || K > kPatchMaxOps) return cudaErrorInvalidValue;
  GradTable table{};
  const void* ptrs[kPatchMaxOps + 1] = {grad};
  for (int k = 0; k < K; ++k) {
    table.ptr[k] = grads[k];
    ptrs[k + 1] = grads[k];
  }
  if (s.B * s.C * s.H * s.W == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    // grad_pooled (B, P, K, C) is the largest index space: at most K elements per pixel.
    launch_runs<T>(s, vectorizable<T>(s, ptrs, K + 1), s.B * s.C * s.H * s.W * K, [&](auto vec, auto index, unsigned blocks) {
      constexpr int kVec = decltype(vec)::value;
      using Index = decltype(index);
      if (s.channels_last) {
        outputs_backward_kernel<T, kVec, Index, true><<<blocks, kThreads, 0, stream>>>(
            s, static_cast<const T*>(grad), static_cast<const A*>(weights),
            static_cast<const A*>(grad_pooled), table, K);
      } else {
        outputs_backward_kernel<T, kVec, Index, false><<<blocks, kThreads, 0, stream>>>(
            s, static_cast<const T*>(grad), static_cast<const A*>(weights),
            static_cast<const A*>(grad_pooled), table, K);
      }
    });
  });
}

cudaError_t launch_patch_softmax_attention(bool is_double, const void* q, const void* k,
                                           const void* prior, void* w, int64_t R, int K, int64_t D,
                                           double scale, double inv_tau, cudaStream_t stream) {
  if (K < 1 || K > kPatchMaxOps) return cudaErrorInvalidValue;
  if (R == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((R + kThreads - 1) / kThreads);
  if (is_double) {
    attention_kernel<double><<<blocks, kThreads, 0, stream>>>(
        static_cast<const double*>(q), static_cast<const double*>(k),
        static_cast<const double*>(prior), static_cast<double*>(w), R, K, D, scale, inv_tau);
  } else {
    attention_kernel<float><<<blocks, kThreads, 0, stream>>>(
        static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(prior),
        static_cast<float*>(w), R, K, D, static_cast<float>(scale), static_cast<float>(inv_tau));
  }
  return cudaGetLastError();
}

cudaError_t launch_patch_softmax_attention_backward(bool is_double, const void* grad_w,
                                                    const void* w, const void* q, const void* k,
                                                    void* grad_q, void* grad_k, void* grad_logits,
                                                    int64_t R, int K, int64_t D, double scale,
                                                    double inv_tau, cudaStream_t stream) {
  if (K < 1 || K > kPatchMaxOps) return cudaErrorInvalidValue;
  if (R == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((R + kThreads - 1) / kThreads);
  if (is_double) {
    attention_backward_kernel<double><<<blocks, kThreads, 0, stream>>>(
        static_cast<const double*>(grad_w), static_cast<const double*>(w),
        static_cast<const double*>(q), static_cast<const double*>(k), static_cast<double*>(grad_q),
        static_cast<double*>(grad_k), static_cast<double*>(grad_logits), R, K, D, scale, inv_tau);
  } else {
    attention_backward_kernel<float><<<blocks, kThreads, 0, stream>>>(
        static_cast<const float*>(grad_w), static_cast<const float*>(w),
        static_cast<const float*>(q), static_cast<const float*>(k), static_cast<float*>(grad_q),
        static_cast<float*>(grad_k), static_cast<float*>(grad_logits), R, K, D,
        static_cast<float>(scale), static_cast<float>(inv_tau));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace nasops
