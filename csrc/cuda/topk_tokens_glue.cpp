// topk_tokens (SPEC 2.3) CUDA glue: checks, allocation, stream, and the
// registration of the kernels in csrc/cuda/topk_tokens.cu for the CUDA key.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "cuda/topk_tokens.cuh"

namespace nasops {
namespace {

using at::Tensor;

cuda::TokenDType token_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return cuda::TokenDType::kFloat16;
    case at::kBFloat16:
      return cuda::TokenDType::kBFloat16;
    case at::kFloat:
      return cuda::TokenDType::kFloat32;
    case at::kDouble:
      return cuda::TokenDType::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, "nasops::topk_tokens (CUDA): unsupported dtype ", t);
  return cuda::TokenDType::kFloat32;  // unreachable
}

cuda::TokenGate token_gate(c10::string_view name) {
  if (name == "none") return cuda::TokenGate::kNone;
  if (name == "straight_through") return cuda::TokenGate::kStraightThrough;
  if (name == "sigmoid") return cuda::TokenGate::kSigmoid;
  TORCH_CHECK(false, "nasops::topk_tokens: gate must be 'none', 'straight_through' or 'sigmoid', got '",
              std::string(name), "'");
  return cuda::TokenGate::kNone;  // unreachable
}

void check_tokens(const char* op, const Tensor& x, const Tensor& q, const Tensor& k) {
  TORCH_CHECK(x.dim() == 3 && q.dim() == 3 && k.dim() == 3, op,
              ": x, q, k must be (B, N, C), (B, N, D), (B, N, D)");
  TORCH_CHECK(q.sizes() == k.sizes() && q.size(0) == x.size(0) && q.size(1) == x.size(1), op,
              ": q and k must be (B, N, D) with x's B and N; got x ", x.sizes(), ", q ", q.sizes(),
              ", k ", k.sizes());
  TORCH_CHECK(q.scalar_type() == x.scalar_type() && k.scalar_type() == x.scalar_type(), op,
              ": x, q and k must share one dtype");
  TORCH_CHECK(x.is_cuda() && q.device() == x.device() && k.device() == x.device(), op,
              " (CUDA): x, q and k must be on one CUDA device");
}

at::ScalarType acc_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topk_tokens_cuda(
    const Tensor& x_in, const Tensor& q_in, const Tensor& k_in, int64_t keep, bool keep_cls,
    c10::string_view gate_name) {
  const char* op = "nasops::topk_tokens";
  check_tokens(op, x_in, q_in, k_in);
  const cuda::TokenGate gate = token_gate(gate_name);
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2), D = q_in.size(2);
  TORCH_CHECK(keep >= 1 && keep <= N, op, ": keep must be in [1, N=", N, "], got ", keep);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cuda::TokenDType dtype = token_dtype(x_in.scalar_type());
  const int64_t max_tokens = cuda::topk_tokens_max_tokens(dtype, D, x_in.get_device());
  TORCH_CHECK(N <= max_tokens, op, " (CUDA): one block selects a row; N must be <= ", max_tokens,
              " on this device, got ", N);
  const Tensor x = x_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous();
  Tensor x_sel = at::empty({B, keep, C}, x.options());
  Tensor idx = at::empty({B, keep}, x.options().dtype(at::kLong));
  Tensor s = at::empty({B, N}, x.options());
  Tensor k_mean = at::empty({B, D}, x.options().dtype(acc_type(x)));
  Tensor pos = at::empty({B, N}, x.options().dtype(at::kLong));
  if (B == 0) return {x_sel, idx, s, k_mean, pos};
  const cuda::TokenSizes sizes{B, N, C, D, keep};
  C10_CUDA_CHECK(cuda::launch_topk_tokens_forward(
      sizes, dtype, gate, keep_cls, x.const_data_ptr(), q.const_data_ptr(), k.const_data_ptr(),
      x_sel.mutable_data_ptr(), idx.mutable_data_ptr<int64_t>(), s.mutable_data_ptr(),
      k_mean.mutable_data_ptr(), pos.mutable_data_ptr<int64_t>(), x.get_device(),
      c10::cuda::getCurrentCUDAStream(x.get_device())));
  return {x_sel, idx, s, k_mean, pos};
}

std::tuple<Tensor, Tensor, Tensor> topk_tokens_backward_cuda(
    const Tensor& grad_x_sel_in, const Tensor& grad_s_in, const Tensor& x_in, const Tensor& q_in,
    const Tensor& k_in, const Tensor& idx_in, const Tensor& k_mean_in, const Tensor& pos_in,
    c10::string_view gate_name, bool x_requires_grad, bool qk_requires_grad) {
  const char* op = "nasops::topk_tokens_backward";
  check_tokens(op, x_in, q_in, k_in);
  const cuda::TokenGate gate = token_gate(gate_name);
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2), D = q_in.size(2);
  const int64_t keep = idx_in.size(1);
  TORCH_CHECK(grad_x_sel_in.sizes() == at::IntArrayRef({B, keep, C}) &&
                  grad_s_in.sizes() == at::IntArrayRef({B, N}) &&
                  k_mean_in.sizes() == at::IntArrayRef({B, D}) &&
                  pos_in.sizes() == at::IntArrayRef({B, N}) && pos_in.scalar_type() == at::kLong,
              op, ": inconsistent shapes");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), q = q_in.contiguous();
  const Tensor grad_y = grad_x_sel_in.to(x.scalar_type()).contiguous();
  const Tensor grad_s = grad_s_in.to(acc_type(x)).contiguous();
  const Tensor k_mean = k_mean_in.to(acc_type(x)).contiguous();
  const Tensor pos = pos_in.contiguous();
  Tensor grad_x = x_requires_grad ? at::empty({B, N, C}, x.options()) : at::empty({0}, x.options());
  Tensor grad_q = qk_requires_grad ? at::empty({B, N, D}, x.options()) : at::empty({0}, x.options());
  Tensor grad_k = qk_requires_grad ? at::empty({B, N, D}, x.options()) : at::empty({0}, x.options());
  if (B == 0 || !(x_requires_grad || qk_requires_grad)) return {grad_x, grad_q, grad_k};
  Tensor grad_score = at::empty({qk_requires_grad ? B : 0, N}, x.options().dtype(acc_type(x)));
  const cuda::TokenSizes sizes{B, N, C, D, keep};
  C10_CUDA_CHECK(cuda::launch_topk_tokens_backward(
      sizes, token_dtype(x.scalar_type()), gate, grad_y.const_data_ptr(), grad_s.const_data_ptr(),
      x.const_data_ptr(), q.const_data_ptr(), k_mean.const_data_ptr(), pos.const_data_ptr<int64_t>(),
      x_requires_grad ? grad_x.mutable_data_ptr() : nullptr,
      qk_requires_grad ? grad_q.mutable_data_ptr() : nullptr,
      qk_requires_grad ? grad_k.mutable_data_ptr() : nullptr,
      qk_requires_grad ? grad_score.mutable_data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream(x.get_device())));
  return {grad_x, grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(nasops, CUDA, m) {
  m.impl("topk_tokens", &topk_tokens_cuda);
  m.impl("topk_tokens_backward", &topk_tokens_backward_cuda);
}

}  // namespace nasops
