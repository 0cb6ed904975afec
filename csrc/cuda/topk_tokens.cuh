// topk_tokens (SPEC 2.3) CUDA launchers. Only CUDA headers here, so that plain
// nvcc compiles csrc/cuda/topk_tokens.cu quickly; the torch glue (checks,
// allocation, stream) is csrc/cuda/topk_tokens_glue.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nasops {
namespace cuda {

enum class TokenDType { kFloat16, kBFloat16, kFloat32, kFloat64 };
enum class TokenGate { kNone = 0, kStraightThrough = 1, kSigmoid = 2 };

// Canonical sizes (csrc/ops.cpp): x (B, N, C), q and k (B, N, D), contiguous,
// one dtype; 1 <= keep <= N.
struct TokenSizes {
  int64_t B, N, C, D, keep;
};

// Largest N one block can select (its keys live in shared memory).
int64_t topk_tokens_max_tokens(TokenDType dtype, int64_t D, int device);

// Writes s (B, N) in the tokens' dtype, k_mean (B, D) in float (double for
// float64), idx (B, keep) ascending, pos (B, N) (place of token i in idx or -1)
// and x_sel (B, keep, C) = x[b, idx] * gate. Two launches: one block per sample
// scores and selects its row; one warp per kept row gathers it.
cudaError_t launch_topk_tokens_forward(const TokenSizes& sizes, TokenDType dtype, TokenGate gate,
                                       bool keep_cls, const void* x, const void* q, const void* k,
                                       void* x_sel, int64_t* idx, void* s, void* k_mean,
                                       int64_t* pos, int device, cudaStream_t stream);

// grad_x (B, N, C) (skipped when nullptr), grad_q and grad_k (B, N, D) (skipped
// when nullptr). grad_s: (B, N) in float (double for float64), the gradient of
// the returned s; grad_score: (B, N) float/double scratch. Two launches: one
// warp per token row (grad_x and d(loss)/d(s_i)), one block per sample (q, k).
cudaError_t launch_topk_tokens_backward(const TokenSizes& sizes, TokenDType dtype, TokenGate gate,
                                        const void* grad_x_sel, const void* grad_s, const void* x,
                                        const void* q, const void* k_mean, const int64_t* pos,
                                        void* grad_x, void* grad_q, void* grad_k, void* grad_score,
                                        cudaStream_t stream);

}  // namespace cuda
}  // namespace nasops
