// Patchwise softmax attention (SPEC 2.2) CUDA glue: checks, allocation, stream,
// and the registration of the kernels in csrc/cuda/patch_attention.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cuda/patch_attention.cuh"
#include "layout.h"

namespace nasops {
namespace {

cuda::PatchDType kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kHalf:
      return cuda::PatchDType::kFloat16;
    case at::kBFloat16:
      return cuda::PatchDType::kBFloat16;
    case at::kFloat:
      return cuda::PatchDType::kFloat32;
    case at::kDouble:
      return cuda::PatchDType::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, op, " (CUDA): unsupported dtype ", t);
  return cuda::PatchDType::kFloat32;  // unreachable
}

at::ScalarType acc_scalar(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

cuda::PatchSizes check_sizes(const char* op, int64_t B, int64_t C, int64_t H, int64_t W,
                             at::IntArrayRef grid) {
  TORCH_CHECK(grid.size() == 2 && grid[0] >= 1 && grid[0] <= H && grid[1] >= 1 && grid[1] <= W, op,
              ": grid ", grid, " must be [gh, gw] with 1 <= gh <= H=", H, ", 1 <= gw <= W=", W);
  // Pixel and patch coordinates are 32-bit in the kernels.
  TORCH_CHECK(H * W <= std::numeric_limits<int32_t>::max() / std::max<int64_t>(grid[0], grid[1]), op,
              " (CUDA): H*W too large");
  return {B, C, H, W, grid[0], grid[1]};
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, " (CUDA): ", name, " on ", t.device());
}

at::Tensor patch_pool_cuda(at::TensorList maps_in, at::IntArrayRef grid) {
  const char* op = "nasops::patch_pool";
  TORCH_CHECK(!maps_in.empty() && maps_in.size() <= cuda::kPatchMaxOps, op, " (CUDA): 1 to ",
              cuda::kPatchMaxOps, " maps per call, got ", maps_in.size());
  const auto& ref = maps_in[0];
  TORCH_CHECK(ref.dim() == 4, op, ": maps must be (B, C, H, W), got ", ref.sizes());
  check_cuda(ref, op, "maps");
  for (const auto& m : maps_in) {
    TORCH_CHECK(m.sizes() == ref.sizes() && m.scalar_type() == ref.scalar_type() &&
                    m.device() == ref.device(),
                op, ": maps must share shape, dtype and device");
  }
  auto s = check_sizes(op, ref.size(0), ref.size(1), ref.size(2), ref.size(3), grid);
  s.channels_last = channels_last_order(maps_in);
  const c10::cuda::CUDAGuard guard(ref.device());
  const int64_t M = maps_in.size();
  auto out = at::empty({s.B, s.gh * s.gw, M, s.C}, ref.options().dtype(acc_scalar(ref.scalar_type())));
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> maps;
  std::vector<const void*> ptrs;
  for (const auto& m : maps_in) {
    maps.push_back(s.channels_last ? m : m.contiguous());
    ptrs.push_back(maps.back().const_data_ptr());
  }
  C10_CUDA_CHECK(cuda::launch_patch_pool(s, kernel_dtype(ref.scalar_type(), op), ptrs.data(),
                                         static_cast<int>(M), out.mutable_data_ptr(),
                                         c10::cuda::getCurrentCUDAStream(ref.get_device())));
  return out;
}

at::Tensor patch_pool_backward_cuda(const at::Tensor& grad_in, at::IntArrayRef grid, int64_t height,
                                    int64_t width, at::ScalarType dtype, bool channels_last) {
  const char* op = "nasops::patch_pool_backward";
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.scalar_type() == acc_scalar(dtype), op,
              ": grad must be (B, P, C) in float32 (float64 for float64 maps)");
  check_cuda(grad_in, op, "grad");
  auto s = check_sizes(op, grad_in.size(0), grad_in.size(2), height, width, grid);
  s.channels_last = channels_last;
  TORCH_CHECK(grad_in.size(1) == s.gh * s.gw, op, ": grad has P=", grad_in.size(1), ", grid has ",
              s.gh * s.gw);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  auto out = at::empty({s.B, s.C, height, width},
                       grad_in.options().dtype(dtype).memory_format(memory_format_of(channels_last)));
  if (out.numel() == 0) return out;
  const auto grad = grad_in.contiguous();
  C10_CUDA_CHECK(cuda::launch_patch_pool_backward(s, kernel_dtype(dtype, op), grad.const_data_ptr(),
                                                  out.mutable_data_ptr(),
                                                  c10::cuda::getCurrentCUDAStream(grad.get_device())));
  return out;
}

std::vector<at::Tensor> patch_attention_outputs_backward_cuda(const at::Tensor& grad_in,
                                                              const at::Tensor& weights_in,
                                                              const at::Tensor& grad_pooled_in,
                                                              at::IntArrayRef grid) {
  const char* op = "nasops::patch_attention_outputs_backward";
  TORCH_CHECK(grad_in.dim() == 4, op, ": grad must be (B, C, H, W), got ", grad_in.sizes());
  check_cuda(grad_in, op, "grad");
  auto s = check_sizes(op, grad_in.size(0), grad_in.size(1), grad_in.size(2), grad_in.size(3), grid);
  // The gradients take grad's layout (the caller brings grad to the outputs' layout).
  s.channels_last = channels_last_order({grad_in});
  const int64_t P = s.gh * s.gw;
  TORCH_CHECK(weights_in.dim() == 3 && weights_in.size(0) == s.B && weights_in.size(1) == P &&
                  weights_in.scalar_type() == acc_scalar(grad_in.scalar_type()) &&
                  weights_in.device() == grad_in.device(),
              op, ": weights must be (B, P, K) in float32 (float64 for float64 grad)");
  const int64_t K = weights_in.size(2);
  TORCH_CHECK(K >= 1 && K <= cuda::kPatchMaxOps, op, " (CUDA): 1 to ", cuda::kPatchMaxOps,
              " ops per call, got ", K);
  TORCH_CHECK(grad_pooled_in.sizes() == at::IntArrayRef({s.B, P, K, s.C}) &&
                  grad_pooled_in.scalar_type() == weights_in.scalar_type() &&
                  grad_pooled_in.device() == grad_in.device(),
              op, ": grad_pooled must be (B, P, K, C) of weights' dtype");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  std::vector<at::Tensor> grads;
  std::vector<void*> ptrs;
  for (int64_t k = 0; k < K; ++k) {
    grads.push_back(at::empty(grad_in.sizes(),
                              grad_in.options().memory_format(memory_format_of(s.channels_last))));
    ptrs.push_back(grads.back().mutable_data_ptr());
  }
  if (grad_in.numel() == 0) return grads;
  const auto grad = s.channels_last ? grad_in : grad_in.contiguous();
  const auto weights = weights_in.contiguous(), grad_pooled = grad_pooled_in.contiguous();
  C10_CUDA_CHECK(cuda::launch_patch_attention_outputs_backward(
      s, kernel_dtype(grad.scalar_type(), op), grad.const_data_ptr(), weights.const_data_ptr(),
      grad_pooled.const_data_ptr(), ptrs.data(), static_cast<int>(K),
      c10::cuda::getCurrentCUDAStream(grad.get_device())));
  return grads;
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const char* op) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(2),
              op, ": q must be (B, P, D) and k (B, P, K, D), got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.size(2) >= 1 && k.size(2) <= cuda::kPatchMaxOps, op, " (CUDA): 1 to ",
              cuda::kPatchMaxOps, " keys per patch, got K=", k.size(2));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              op, ": q and k must both be float32 or both float64");
  check_cuda(q, op, "q");
  TORCH_CHECK(k.device() == q.device(), op, ": k must be on q's device");
}

at::Tensor patch_softmax_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                        const std::optional<at::Tensor>& prior_in, double tau) {
  const char* op = "nasops::patch_softmax_attention";
  check_attention(q_in, k_in, op);
  TORCH_CHECK(tau > 0, op, ": tau must be > 0, got ", tau);
  const int64_t B = q_in.size(0), P = q_in.size(1), D = q_in.size(2), K = k_in.size(2);
  const bool has_prior = prior_in.has_value() && prior_in->defined();
  if (has_prior) {
    TORCH_CHECK(prior_in->dim() == 1 && prior_in->size(0) == K &&
                    prior_in->scalar_type() == q_in.scalar_type() && prior_in->device() == q_in.device(),
                op, ": prior must be (K,) = (", K, ",) of q's dtype and device");
  }
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto w = at::empty({B, P, K}, q_in.options());
  if (w.numel() == 0) return w;
  const auto q = q_in.contiguous(), k = k_in.contiguous();
  const auto prior = has_prior ? prior_in->contiguous() : at::Tensor();
  C10_CUDA_CHECK(cuda::launch_patch_softmax_attention(
      q.scalar_type() == at::kDouble, q.const_data_ptr(), k.const_data_ptr(),
      has_prior ? prior.const_data_ptr() : nullptr, w.mutable_data_ptr(), B * P,
      static_cast<int>(K), D, 1.0 / std::sqrt(static_cast<double>(D)), 1.0 / tau,
      c10::cuda::getCurrentCUDAStream(q.get_device())));
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_softmax_attention_backward_cuda(
    const at::Tensor& grad_w_in, const at::Tensor& w_in, const at::Tensor& q_in,
    const at::Tensor& k_in, double tau, bool prior_requires_grad) {
  const char* op = "nasops::patch_softmax_attention_backward";
  check_attention(q_in, k_in, op);
  const int64_t B = q_in.size(0), P = q_in.size(1), D = q_in.size(2), K = k_in.size(2);
  TORCH_CHECK(w_in.sizes() == at::IntArrayRef({B, P, K}) && grad_w_in.sizes() == w_in.sizes() &&
                  w_in.scalar_type() == q_in.scalar_type() &&
                  grad_w_in.scalar_type() == q_in.scalar_type() && w_in.device() == q_in.device() &&
                  grad_w_in.device() == q_in.device(),
              op, ": w and grad_w must be (B, P, K) of q's dtype and device");
  const c10::cuda::CUDAGuard guard(q_in.device());
  auto grad_q = at::empty({B, P, D}, q_in.options());
  auto grad_k = at::empty({B, P, K, D}, q_in.options());
  auto grad_logits = at::empty({B * P, K}, q_in.options());
  if (B * P > 0) {
    const auto grad_w = grad_w_in.contiguous(), w = w_in.contiguous(), q = q_in.contiguous(),
               k = k_in.contiguous();
    C10_CUDA_CHECK(cuda::launch_patch_softmax_attention_backward(
        q.scalar_type() == at::kDouble, grad_w.const_data_ptr(), w.const_data_ptr(),
        q.const_data_ptr(), k.const_data_ptr(), grad_q.mutable_data_ptr(), grad_k.mutable_data_ptr(),
        grad_logits.mutable_data_ptr(), B * P, static_cast<int>(K), D,
        1.0 / std::sqrt(static_cast<double>(D)), 1.0 / tau,
        c10::cuda::getCurrentCUDAStream(q.get_device())));
  }
  auto grad_prior = prior_requires_grad ? at::sum(grad_logits, {0}) : q_in.new_empty({0});
  return {grad_q, grad_k, grad_prior};
}

}  // namespace

TORCH_LIBRARY_IMPL(nasops, CUDA, m) {
  m.impl("patch_pool", &patch_pool_cuda);
  m.impl("patch_pool_backward", &patch_pool_backward_cuda);
  m.impl("patch_softmax_attention", &patch_softmax_attention_cuda);
  m.impl("patch_softmax_attention_backward", &patch_softmax_attention_backward_cuda);
  m.impl("patch_attention_outputs_backward", &patch_attention_outputs_backward_cuda);
}

}  // namespace nasops
