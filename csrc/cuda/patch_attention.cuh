// Patchwise softmax attention (SPEC 2.2) CUDA launchers. Only CUDA headers
// here, so plain nvcc compiles csrc/cuda/patch_attention.cu in about a second;
// the torch glue (checks, allocation, stream) is csrc/cuda/patch_attention_glue.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nasops {
namespace cuda {

enum class PatchDType { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Maps (pool) and gradients (outputs backward) one launch reads or writes in
// place: their pointers travel by value in a fixed-size kernel parameter.
// The attention kernels keep a row of K logits in registers: same bound.
constexpr int kPatchMaxOps = 16;

// A (B, C, H, W) map cut into a (gh, gw) mosaic (csrc/ops.cpp); the maps the
// kernels read and write are contiguous, or channels_last when channels_last
// (the rule of csrc/layout.h, applied by the glue).
struct PatchSizes {
  int64_t B, C, H, W, gh, gw;
  bool channels_last = false;
};

// out (B, P, M, C) in float (double for kFloat64 maps) = the patch means of
// the M maps ((B, C, H, W) of `dtype`).
cudaError_t launch_patch_pool(const PatchSizes& sizes, PatchDType dtype, const void* const* maps,
                              int M, void* out, cudaStream_t stream);

// out (B, C, H, W) of `dtype` = grad[b, p(h, w), c] / |p|; grad (B, P, C) in float/double.
cudaError_t launch_patch_pool_backward(const PatchSizes& sizes, PatchDType dtype, const void* grad,
                                       void* out, cudaStream_t stream);

// grads[k] (B, C, H, W) of `dtype` = weights[b, p, k] * grad + grad_pooled[b, p, k, c] / |p|;
// weights (B, P, K), grad_pooled (B, P, K, C) in float/double.
cudaError_t launch_patch_attention_outputs_backward(const PatchSizes& sizes, PatchDType dtype,
                                                    const void* grad, const void* weights,
                                                    const void* grad_pooled, void* const* grads,
                                                    int K, cudaStream_t stream);

// w (R, K) = softmax_k((q . k_k * scale + prior_k) * inv_tau); q (R, D), k (R, K, D),
// prior (K,) or nullptr; all float (double when is_double).
cudaError_t launch_patch_softmax_attention(bool is_double, const void* q, const void* k,
                                           const void* prior, void* w, int64_t R, int K, int64_t D,
                                           double scale, double inv_tau, cudaStream_t stream);

// grad_logits (R, K), grad_q (R, D), grad_k (R, K, D) from grad_w and the forward's w.
cudaError_t launch_patch_softmax_attention_backward(bool is_double, const void* grad_w,
                                                    const void* w, const void* q, const void* k,
                                                    void* grad_q, void* grad_k, void* grad_logits,
                                                    int64_t R, int K, int64_t D, double scale,
                                                    double inv_tau, cudaStream_t stream);

}  // namespace cuda
}  // namespace nasops
