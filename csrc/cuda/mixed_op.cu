// mixed_op (SPEC 2.1) CUDA kernels: y = sum_k w[b, p(h,w), k] * outputs[k].
//
// Memory bound, so everything serves the traffic floor (read K*N + write N
// forward; read N + K*N and write K*N backward):
// - one block row per patch (b, p): blockIdx.x = b*P + p, blockIdx.y = split of
//   that patch's elements. The block's K weights are one shared-memory load;
//   no per-element patch arithmetic and no per-element weight gather;
// - a patch is `nlines` lines of equal length: the whole sample when P == 1,
//   one band of rows per channel when gw == 1 (contiguous), else one row
//   segment per (channel, row). Threads walk its elements in 16-byte vectors
//   (4 float, 8 half/bfloat16, 2 double) when every pointer is 16-byte aligned
//   and every line starts on a vector boundary, else element by element;
// - the K op outputs are read in place through a by-value struct of data
//   pointers (kernel parameters), never stacked; channels_last outputs too: a
//   sample is then one plane of H rows of W*C elements whose patch columns
//   cover whole pixels (`pixel` = C elements each, MixedOpSizes);
// - accumulation in float (double for double);
// - the backward is fused: each vector of g is loaded once, kept in registers
//   as float, and used for grad o_k = w_k * g and for the dot products
//   sum(g * o_k) of every op (register accumulators for a group of up to 16 ops;
//   more ops loop over groups and re-read g). grad w is deterministic: a warp
//   shuffle butterfly and a fixed-order sum over warps give one partial per
//   (block, op); a second kernel adds the partials of each (bw, p, k) in index
//   order. No float atomics, so repeated runs give identical bits.
#include "mixed_op.cuh"
#include "accumulate.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace nasops {
namespace cuda {
namespace {

constexpr int kMaxThreads = 256;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC consecutive elements moved as one (up to 16-byte) memory transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const void* base, int64_t offset) {
  return *reinterpret_cast<const Pack<T, VEC>*>(static_cast<const T*>(base) + offset);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(void* base, int64_t offset, const Pack<T, VEC>& x) {
  *reinterpret_cast<Pack<T, VEC>*>(static_cast<T*>(base) + offset) = x;
}

struct InputPointers {
  const void* p[kMixedOpMaxOps];
};
struct OutputPointers {
  void* p[kMixedOpMaxOps];
};

// Sizes as the kernels use them; patch-local counts fit in int (checked on the host).
struct Args {
  int K, C, H, W, Bw, gh, gw, P;
  int pixel;       // elements per pixel column of a row (MixedOpSizes)
  int64_t sample;  // C*H*W
  int64_t plane;   // H*W
};

// First pixel row (column) of patch row (column) `part`: ceil(part * size / parts).
__host__ __device__ __forceinline__ int patch_start(int part, int parts, int size) {
  return static_cast<int>((static_cast<int64_t>(part) * size + parts - 1) / parts);
}

// The elements of patch p of sample b: nlines lines of line_len elements;
// line l is the row r = l % lines_per_plane of channel c = l / lines_per_plane.
template <int VEC>
struct PatchLayout {
  int64_t base;  // offset of the first element of line 0
  int64_t plane;
  int W, lines_per_plane, nlines, vecs_per_line;

  __device__ PatchLayout(const Args& a, int b, int p) : plane(a.plane), W(a.W) {
    const int ph = p / a.gw, pw = p - ph * a.gw;
    const int r0 = patch_start(ph, a.gh, a.H), r1 = patch_start(ph + 1, a.gh, a.H);
    const int pixels = a.W / a.pixel;  // pixel columns per row
    const int c0 = patch_start(pw, a.gw, pixels) * a.pixel;
    const int c1 = patch_start(pw + 1, a.gw, pixels) * a.pixel;
    int line_len;
    base = static_cast<int64_t>(b) * a.sample;
    if (a.P == 1) {  // the whole sample, contiguous
      lines_per_plane = 1;
      nlines = 1;
      line_len = static_cast<int>(a.sample);
    } else if (a.gw == 1) {  // full-width rows r0..r1 of each channel, contiguous
      base += static_cast<int64_t>(r0) * a.W;
      lines_per_plane = 1;
      nlines = a.C;
      line_len = (r1 - r0) * a.W;
    } else {  // columns c0..c1 of rows r0..r1 of each channel
      base += static_cast<int64_t>(r0) * a.W + c0;
      lines_per_plane = r1 - r0;
      nlines = a.C * lines_per_plane;
      line_len = c1 - c0;
    }
    vecs_per_line = line_len / VEC;  // exact: the host picks VEC > 1 only when it divides
  }
  __device__ __forceinline__ int num_vecs() const { return nlines * vecs_per_line; }
  __device__ __forceinline__ int64_t offset(int v) const {
    if (nlines == 1) return base + static_cast<int64_t>(v) * VEC;
    const int l = v / vecs_per_line, j = (v - l * vecs_per_line) * VEC;
    const int c = l / lines_per_plane, r = l - c * lines_per_plane;
    return base + c * plane + static_cast<int64_t>(r) * W + j;
  }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    mixed_op_forward_kernel(Args a, InputPointers in, const typename Acc<T>::type* __restrict__ w,
                            T* __restrict__ y) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t w_s[kMixedOpMaxOps];
  const int patch = blockIdx.x, b = patch / a.P, p = patch - b * a.P;
  const acc_t* wp = w + (static_cast<int64_t>(a.Bw == 1 ? 0 : b) * a.P + p) * a.K;
  for (int k = threadIdx.x; k < a.K; k += blockDim.x) w_s[k] = wp[k];
  __syncthreads();

  const PatchLayout<VEC> layout(a, b, p);
  const int n = layout.num_vecs();
  // A 64-bit counter: an int would wrap past 2^31 - 1 when n is within one
  // stride (gridDim.y * blockDim.x) of it; v < n < 2^31 inside the loop.
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; v < n; v += stride) {
    const int64_t off = layout.offset(static_cast<int>(v));
    acc_t acc[VEC];
    {
      const Pack<T, VEC> x = load<T, VEC>(in.p[0], off);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = w_s[0] * to_acc(x.v[j]);
    }
#pragma unroll 4
    for (int k = 1; k < a.K; ++k) {
      const Pack<T, VEC> x = load<T, VEC>(in.p[k], off);
      const acc_t wk = w_s[k];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += wk * to_acc(x.v[j]);
    }
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = from_acc<T>(acc[j]);
    store<T, VEC>(y, off, out);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, lane_mask);
  }
  return v;
}

// KG: ops per group (register accumulators of the dot products).
// partial: [B*P][gridDim.y][K], or grad w itself when gridDim.y == 1 and Bw == B.
template <typename T, int VEC, int KG>
__global__ void __launch_bounds__(kMaxThreads)
    mixed_op_backward_kernel(Args a, InputPointers in, OutputPointers grad_in,
                             const T* __restrict__ g, const typename Acc<T>::type* __restrict__ w,
                             typename Acc<T>::type* __restrict__ partial, bool need_outputs,
                             bool need_weights) {
  using acc_t = typename Acc<T>::type;
  __shared__ acc_t w_s[kMixedOpMaxOps];
  __shared__ acc_t warp_sums[KG][kMaxThreads / 32];
  const int patch = blockIdx.x, b = patch / a.P, p = patch - b * a.P;
  const acc_t* wp = w + (static_cast<int64_t>(a.Bw == 1 ? 0 : b) * a.P + p) * a.K;
  for (int k = threadIdx.x; k < a.K; k += blockDim.x) w_s[k] = wp[k];
  __syncthreads();

  const PatchLayout<VEC> layout(a, b, p);
  const int n = layout.num_vecs();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int k0 = 0; k0 < a.K; k0 += KG) {
    acc_t dot[KG];
#pragma unroll
    for (int kk = 0; kk < KG; ++kk) dot[kk] = 0;
    for (int64_t v = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; v < n;
         v += stride) {  // 64-bit counter: see the forward kernel
      const int64_t off = layout.offset(static_cast<int>(v));
      acc_t gv[VEC];
      {
        const Pack<T, VEC> x = load<T, VEC>(g, off);
#pragma unroll
        for (int j = 0; j < VEC; ++j) gv[j] = to_acc(x.v[j]);
      }
#pragma unroll
      for (int kk = 0; kk < KG; ++kk) {
        const int k = k0 + kk;
        if (k < a.K) {
          if (need_weights) {
            const Pack<T, VEC> x = load<T, VEC>(in.p[k], off);
#pragma unroll
            for (int j = 0; j < VEC; ++j) dot[kk] += gv[j] * to_acc(x.v[j]);
          }
          if (need_outputs) {
            const acc_t wk = w_s[k];
            Pack<T, VEC> out;
#pragma unroll
            for (int j = 0; j < VEC; ++j) out.v[j] = from_acc<T>(wk * gv[j]);
            store<T, VEC>(grad_in.p[k], off, out);
          }
        }
      }
    }
    if (need_weights) {
#pragma unroll
      for (int kk = 0; kk < KG; ++kk) {
        const acc_t s = warp_sum(dot[kk]);
        if (lane == 0) warp_sums[kk][warp] = s;
      }
      __syncthreads();
      const int k = k0 + threadIdx.x;
      if (threadIdx.x < KG && k < a.K) {
        acc_t s = 0;
        for (int i = 0; i < num_warps; ++i) s += warp_sums[threadIdx.x][i];
        partial[(static_cast<int64_t>(patch) * gridDim.y + blockIdx.y) * a.K + k] = s;
      }
      __syncthreads();  // warp_sums is reused by the next group
    }
  }
}

// grad_w[bw, p, k] = sum over b of bw (all b when Bw == 1) and over splits of
// partial[b, p, split, k], in index order.
template <typename acc_t>
__global__ void mixed_op_reduce_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ grad_w,
                                       int B, int Bw, int P, int K, int splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(Bw) * P * K) return;
  const int k = static_cast<int>(i % K);
  const int64_t bp = i / K;
  const int p = static_cast<int>(bp % P), bw = static_cast<int>(bp / P);
  const int b0 = Bw == 1 ? 0 : bw, b1 = Bw == 1 ? B : bw + 1;
  acc_t s = 0;
  for (int b = b0; b < b1; ++b) {
    const acc_t* src = partial + (static_cast<int64_t>(b) * P + p) * splits * K + k;
    for (int split = 0; split < splits; ++split) s += src[static_cast<int64_t>(split) * K];
  }
  grad_w[i] = s;
}

// ---- host side -------------------------------------------------------------------

int sm_count(int device) {
  // Cached per device: the attribute query is a driver call on every launch otherwise.
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices && cache[device] > 0) return cache[device];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    cudaGetLastError();  // clear it: only the split count depends on this, never correctness
    return 132;          // an H100's
  }
  if (device >= 0 && device < kMaxDevices) cache[device] = n;
  return n;
}

size_t element_size(MixedOpDType dtype) {
  switch (dtype) {
    case MixedOpDType::kFloat16:
    case MixedOpDType::kBFloat16:
      return 2;
    case MixedOpDType::kFloat32:
      return 4;
    default:
      return 8;
  }
}

// Threads per block and splits per patch. It depends only on the sizes, the
// dtype and the device (not on pointer alignment), so the workspace query and
// the launch agree. min_vecs_per_thread keeps the backward's per-block
// reduction amortized.
struct LaunchPlan {
  int threads, splits;
};

LaunchPlan make_plan(const MixedOpSizes& s, MixedOpDType dtype, int device,
                     int64_t min_vecs_per_thread) {
  const int64_t vec = 16 / static_cast<int64_t>(element_size(dtype));
  const int64_t rows = (s.H + s.gh - 1) / s.gh;
  const int64_t cols = (s.W / s.pixel + s.gw - 1) / s.gw * s.pixel;
  const int64_t vecs = (s.C * rows * cols + vec - 1) / vec;  // in the largest patch
  const int64_t threads = std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (vecs + 31) / 32 * 32));
  const int64_t patches = s.B * s.gh * s.gw;
  // Two waves of fully occupied SMs (2048 threads each).
  const int64_t wanted = static_cast<int64_t>(sm_count(device)) * (2048 / threads) * 2;
  int64_t splits = (wanted + patches - 1) / std::max<int64_t>(1, patches);
  splits = std::min(splits, (vecs + threads * min_vecs_per_thread - 1) / (threads * min_vecs_per_thread));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
  return {static_cast<int>(threads), static_cast<int>(splits)};
}

constexpr int64_t kBackwardMinVecsPerThread = 2;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether every line of every patch starts on a VEC boundary (pointer
// alignment is checked separately).
bool lines_divisible(const MixedOpSizes& s, int64_t vec) {
  if (s.gh * s.gw == 1) return (s.C * s.H * s.W) % vec == 0;
  const int pixels = static_cast<int>(s.W / s.pixel);
  for (int64_t pw = 0; pw <= s.gw; ++pw) {
    if (static_cast<int64_t>(patch_start(static_cast<int>(pw), static_cast<int>(s.gw), pixels)) *
            s.pixel % vec != 0) {
      return false;
    }
  }
  return true;
}

Args make_args(const MixedOpSizes& s) {
  Args a;
  a.K = static_cast<int>(s.K);
  a.C = static_cast<int>(s.C);
  a.H = static_cast<int>(s.H);
  a.W = static_cast<int>(s.W);
  a.Bw = static_cast<int>(s.Bw);
  a.gh = static_cast<int>(s.gh);
  a.gw = static_cast<int>(s.gw);
  a.P = a.gh * a.gw;
  a.pixel = static_cast<int>(s.pixel);
  a.sample = s.C * s.H * s.W;
  a.plane = s.H * s.W;
  return a;
}

template <typename T>
cudaError_t forward(const MixedOpSizes& s, const void* const* outputs, const void* weights, void* y,
                    const LaunchPlan& plan, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  constexpr int kVec = 16 / sizeof(T);
  InputPointers in{};
  bool vectorize = lines_divisible(s, kVec) && aligned16(y);
  for (int64_t k = 0; k < s.K; ++k) {
    in.p[k] = outputs[k];
    vectorize = vectorize && aligned16(outputs[k]);
  }
  const Args a = make_args(s);
  const dim3 grid(static_cast<unsigned>(s.B * a.P), plan.splits);
  const auto* wp = static_cast<const acc_t*>(weights);
  if (vectorize) {
    mixed_op_forward_kernel<T, kVec><<<grid, plan.threads, 0, stream>>>(a, in, wp, static_cast<T*>(y));
  } else {
    mixed_op_forward_kernel<T, 1><<<grid, plan.threads, 0, stream>>>(a, in, wp, static_cast<T*>(y));
  }
  return cudaGetLastError();
}

template <typename T, int VEC>
void launch_backward_groups(const Args& a, const dim3& grid, int threads, cudaStream_t stream,
                            const InputPointers& in, const OutputPointers& out, const T* g,
                            const typename Acc<T>::type* w, typename Acc<T>::type* partial,
                            bool need_outputs, bool need_weights) {
  if (a.K <= 4) {
    mixed_op_backward_kernel<T, VEC, 4><<<grid, threads, 0, stream>>>(a, in, out, g, w, partial,
                                                                        need_outputs, need_weights);
  } else if (a.K <= 8) {
    mixed_op_backward_kernel<T, VEC, 8><<<grid, threads, 0, stream>>>(a, in, out, g, w, partial,
                                                                        need_outputs, need_weights);
  } else {
    mixed_op_backward_kernel<T, VEC, 16><<<grid, threads, 0, stream>>>(a, in, out, g, w, partial,
                                                                         need_outputs, need_weights);
  }
}

template <typename T>
cudaError_t backward(const MixedOpSizes& s, const void* grad, const void* const* outputs,
                     const void* weights, void* const* grad_outputs, void* grad_weights,
                     void* workspace, const LaunchPlan& plan, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  constexpr int kVec = 16 / sizeof(T);
  const bool need_outputs = grad_outputs != nullptr, need_weights = grad_weights != nullptr;
  InputPointers in{};
  OutputPointers out{};
  bool vectorize = lines_divisible(s, kVec) && aligned16(grad);
  for (int64_t k = 0; k < s.K; ++k) {
    if (need_weights) {
      in.p[k] = outputs[k];
      vectorize = vectorize && aligned16(outputs[k]);
    }
    if (need_outputs) {
      out.p[k] = grad_outputs[k];
      vectorize = vectorize && aligned16(grad_outputs[k]);
    }
  }
  const Args a = make_args(s);
  const dim3 grid(static_cast<unsigned>(s.B * a.P), plan.splits);
  const bool direct = plan.splits == 1 && s.Bw == s.B;
  acc_t* partial = need_weights ? static_cast<acc_t*>(direct ? grad_weights : workspace) : nullptr;
  const auto* g = static_cast<const T*>(grad);
  const auto* wp = static_cast<const acc_t*>(weights);
  if (vectorize) {
    launch_backward_groups<T, kVec>(a, grid, plan.threads, stream, in, out, g, wp, partial,
                                    need_outputs, need_weights);
  } else {
    launch_backward_groups<T, 1>(a, grid, plan.threads, stream, in, out, g, wp, partial,
                                 need_outputs, need_weights);
  }
  if (need_weights && !direct) {
    const int64_t n = s.Bw * a.P * s.K;
    const int threads = 256;
    mixed_op_reduce_kernel<acc_t><<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0,
                                    stream>>>(partial, static_cast<acc_t*>(grad_weights),
                                              static_cast<int>(s.B), a.Bw, a.P, a.K, plan.splits);
  }
  return cudaGetLastError();
}

}  // namespace

size_t mixed_op_backward_workspace_bytes(const MixedOpSizes& s, MixedOpDType dtype, int device) {
  const LaunchPlan plan = make_plan(s, dtype, device, kBackwardMinVecsPerThread);
  if (plan.splits == 1 && s.Bw == s.B) return 0;
  const size_t acc_size = dtype == MixedOpDType::kFloat64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(s.B * s.gh * s.gw) * plan.splits * s.K * acc_size;
}

cudaError_t launch_mixed_op_forward(const MixedOpSizes& s, MixedOpDType dtype,
                                    const void* const* outputs, const void* weights, void* y,
                                    int device, cudaStream_t stream) {
  if (s.K < 1 || s.K > kMixedOpMaxOps) return cudaErrorInvalidValue;
  if (s.B * s.C * s.H * s.W == 0) return cudaSuccess;
  const LaunchPlan plan = make_plan(s, dtype, device, 1);
  switch (dtype) {
    case MixedOpDType::kFloat16:
      return forward<__half>(s, outputs, weights, y, plan, stream);
    case MixedOpDType::kBFloat16:
      return forward<__nv_bfloat16>(s, outputs, weights, y, plan, stream);
    case MixedOpDType::kFloat32:
      return forward<float>(s, outputs, weights, y, plan, stream);
    case MixedOpDType::kFloat64:
      return forward<double>(s, outputs, weights, y, plan, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_mixed_op_backward(const MixedOpSizes& s, MixedOpDType dtype, const void* grad,
                                     const void* const* outputs, const void* weights,
                                     void* const* grad_outputs, void* grad_weights, void* workspace,
                                     int device, cudaStream_t stream) {
  if (s.K < 1 || s.K > kMixedOpMaxOps) return cudaErrorInvalidValue;
  if (s.B * s.C * s.H * s.W == 0 || (grad_outputs == nullptr && grad_weights == nullptr)) {
    return cudaSuccess;
  }
  const LaunchPlan plan = make_plan(s, dtype, device, kBackwardMinVecsPerThread);
  switch (dtype) {
    case MixedOpDType::kFloat16:
      return backward<__half>(s, grad, outputs, weights, grad_outputs, grad_weights, workspace, plan,
                              stream);
    case MixedOpDType::kBFloat16:
      return backward<__nv_bfloat16>(s, grad, outputs, weights, grad_outputs, grad_weights,
                                     workspace, plan, stream);
    case MixedOpDType::kFloat32:
      return backward<float>(s, grad, outputs, weights, grad_outputs, grad_weights, workspace, plan,
                             stream);
    case MixedOpDType::kFloat64:
      return backward<double>(s, grad, outputs, weights, grad_outputs, grad_weights, workspace, plan,
                              stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace nasops
