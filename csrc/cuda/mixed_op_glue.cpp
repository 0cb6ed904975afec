// mixed_op (SPEC 2.1) CUDA glue: checks, allocation, stream, and the
// registration of the kernels in csrc/cuda/mixed_op.cu for the CUDA key.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "cuda/mixed_op.cuh"
#include "mixed_op.h"

namespace nasops {
namespace {

cuda::MixedOpDType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return cuda::MixedOpDType::kFloat16;
    case at::kBFloat16:
      return cuda::MixedOpDType::kBFloat16;
    case at::kFloat:
      return cuda::MixedOpDType::kFloat32;
    case at::kDouble:
      return cuda::MixedOpDType::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, "nasops::mixed_op (CUDA): unsupported dtype ", t);
  return cuda::MixedOpDType::kFloat32;  // unreachable
}

cuda::MixedOpSizes kernel_sizes(const char* op, const MixedOpShape& s) {
  TORCH_CHECK(s.K <= cuda::kMixedOpMaxOps, op, " (CUDA): at most ", cuda::kMixedOpMaxOps,
              " live ops per call, got K=", s.K);
  // Patch-local indices are 32-bit in the kernels.
  TORCH_CHECK(s.sample() <= std::numeric_limits<int32_t>::max(), op,
              " (CUDA): C*H*W must be < 2^31, got ", s.sample());
  TORCH_CHECK(s.B * s.P() <= std::numeric_limits<int32_t>::max(), op,
              " (CUDA): B*P must be < 2^31, got ", s.B * s.P());
  return {s.K, s.B, s.C, s.H, s.W, s.Bw, s.gh, s.gw, s.pixel};
}

std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

at::Tensor mixed_op_cuda(at::TensorList outputs_in, const at::Tensor& weights_in,
                         at::IntArrayRef grid) {
  const char* op = "nasops::mixed_op";
  const MixedOpShape s = check_mixed_op(op, outputs_in, weights_in, grid);
  TORCH_CHECK(outputs_in[0].is_cuda(), op, " (CUDA): outputs on ", outputs_in[0].device());
  const bool channels_last = channels_last_order(outputs_in);
  const cuda::MixedOpSizes sizes = kernel_sizes(op, s.storage_order(channels_last));
  const c10::cuda::CUDAGuard guard(outputs_in[0].device());
  at::Tensor y = at::empty(outputs_in[0].sizes(), outputs_in[0].options().memory_format(
                                                      memory_format_of(channels_last)));
  if (y.numel() == 0) return y;
  const auto outputs = channels_last ? outputs_in.vec() : contiguous_all(outputs_in);
  const at::Tensor weights = weights_in.contiguous();
  std::vector<const void*> ptrs;
  for (const auto& o : outputs) ptrs.push_back(o.const_data_ptr());
  C10_CUDA_CHECK(cuda::launch_mixed_op_forward(sizes, kernel_dtype(y.scalar_type()), ptrs.data(),
                                               weights.const_data_ptr(), y.mutable_data_ptr(),
                                               y.get_device(),
                                               c10::cuda::getCurrentCUDAStream(y.get_device())));
  return y;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_backward_cuda(
    const at::Tensor& grad_in, at::TensorList outputs_in, const at::Tensor& weights_in,
    at::IntArrayRef grid, bool outputs_requires_grad, bool weights_requires_grad) {
  const char* op = "nasops::mixed_op_backward";
  const MixedOpShape s = check_mixed_op(op, outputs_in, weights_in, grid);
  TORCH_CHECK(grad_in.sizes() == outputs_in[0].sizes() &&
                  grad_in.scalar_type() == outputs_in[0].scalar_type() &&
                  grad_in.device() == outputs_in[0].device(),
              op, ": grad must match outputs[0] (", outputs_in[0].sizes(), ", ",
              outputs_in[0].scalar_type(), ", ", outputs_in[0].device(), "), got ", grad_in.sizes(),
              ", ", grad_in.scalar_type(), ", ", grad_in.device());
  TORCH_CHECK(grad_in.is_cuda(), op, " (CUDA): grad on ", grad_in.device());
  const bool channels_last = channels_last_order(outputs_in);
  const auto memory_format = memory_format_of(channels_last);
  const cuda::MixedOpSizes sizes = kernel_sizes(op, s.storage_order(channels_last));
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto options = grad_in.options().memory_format(memory_format);
  std::vector<at::Tensor> grad_outputs;
  if (outputs_requires_grad) {
    for (int64_t k = 0; k < s.K; ++k) grad_outputs.push_back(at::empty(grad_in.sizes(), options));
  }
  // zeros: a batch of size 0 leaves the (1, P, K) grad of shared weights at 0.
  at::Tensor grad_w = weights_requires_grad
                          ? at::zeros(weights_in.sizes(), weights_in.options())
                          : weights_in.new_empty({0});
  if (grad_in.numel() == 0 || (!outputs_requires_grad && !weights_requires_grad)) {
    return {grad_outputs, grad_w};
  }
  // Without grad w the outputs are never read: no copies of non-contiguous ones.
  const auto outputs = weights_requires_grad && !channels_last ? contiguous_all(outputs_in)
                                                               : outputs_in.vec();
  // A gradient in the other layout is copied once (autograd decides its layout).
  const at::Tensor grad = grad_in.contiguous(memory_format);
  const at::Tensor weights = weights_in.contiguous();
  const auto dtype = kernel_dtype(grad.scalar_type());
  const int device = grad.get_device();
  std::vector<const void*> in_ptrs;
  for (const auto& o : outputs) in_ptrs.push_back(o.const_data_ptr());
  std::vector<void*> grad_ptrs;
  for (auto& t : grad_outputs) grad_ptrs.push_back(t.mutable_data_ptr());
  at::Tensor workspace;
  void* workspace_ptr = nullptr;
  if (weights_requires_grad) {
    const size_t bytes = cuda::mixed_op_backward_workspace_bytes(sizes, dtype, device);
    if (bytes > 0) {
      workspace = at::empty({static_cast<int64_t>(bytes)}, grad.options().dtype(at::kByte));
      workspace_ptr = workspace.mutable_data_ptr();
    }
  }
  C10_CUDA_CHECK(cuda::launch_mixed_op_backward(
      sizes, dtype, grad.const_data_ptr(), in_ptrs.data(), weights.const_data_ptr(),
      outputs_requires_grad ? grad_ptrs.data() : nullptr,
      weights_requires_grad ? grad_w.mutable_data_ptr() : nullptr, workspace_ptr, device,
      c10::cuda::getCurrentCUDAStream(device)));
  return {grad_outputs, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(nasops, CUDA, m) {
  m.impl("mixed_op", &mixed_op_cuda);
  m.impl("mixed_op_backward", &mixed_op_backward_cuda);
}

}  // namespace nasops
