// mixed_op (SPEC 2.1) CUDA launchers. Only CUDA headers here, so that plain
// nvcc compiles csrc/cuda/mixed_op.cu quickly; the torch glue (checks,
// allocation, stream) is csrc/cuda/mixed_op_glue.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace nasops {
namespace cuda {

enum class MixedOpDType { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Live ops one call can take: the kernels get the K data pointers by value in a
// fixed-size struct (kernel parameters), so this bounds the struct's size.
constexpr int kMixedOpMaxOps = 64;

// The canonical sizes (csrc/ops.cpp) in memory order: K tensors of B samples
// of C planes of H rows of W elements; weights (Bw, gh*gw, K) in float (double
// for float64 tensors); Bw in {1, B}. `pixel`: consecutive elements of a row
// that share one pixel column, 1 for contiguous (NCHW) tensors; channels_last
// (B, C, H, W) tensors are passed as C = 1, W = W*C, pixel = C (csrc/mixed_op.h,
// MixedOpShape::storage_order).
struct MixedOpSizes {
  int64_t K, B, C, H, W, Bw, gh, gw;
  int64_t pixel = 1;
};

// Bytes of device scratch the backward needs for its per-block partial sums of
// grad w (0 when the blocks write grad w directly). `device` is the CUDA device.
size_t mixed_op_backward_workspace_bytes(const MixedOpSizes& sizes, MixedOpDType dtype, int device);

// y = sum_k w[b, p, k] * outputs[k]; outputs: K device pointers.
cudaError_t launch_mixed_op_forward(const MixedOpSizes& sizes, MixedOpDType dtype,
                                    const void* const* outputs, const void* weights, void* y,
                                    int device, cudaStream_t stream);

// grad_outputs[k] = w * grad (skipped when grad_outputs == nullptr) and
// grad_weights = sum over each patch of grad * outputs[k] (skipped when
// grad_weights == nullptr; then outputs are not read). Deterministic: blocks
// write partial sums that a second kernel adds in a fixed order (no atomics).
// workspace: mixed_op_backward_workspace_bytes() bytes.
cudaError_t launch_mixed_op_backward(const MixedOpSizes& sizes, MixedOpDType dtype,
                                     const void* grad, const void* const* outputs,
                                     const void* weights, void* const* grad_outputs,
                                     void* grad_weights, void* workspace, int device,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace nasops
