// affine_free_batch_norm: training BatchNorm without affine parameters whose
// backward keeps its output y instead of its input x (nasops.spaces.operations.
// AffineFreeBatchNorm2d says why: y is the normalised input the backward
// needs, and the op after it keeps y anyway).
//
// Device-agnostic: it calls ATen's native_batch_norm and
// native_batch_norm_backward, whatever device they run on. In C++ rather than a
// Python autograd.Function because a search step calls it ~1,500 times: the
// Python Function cost ~30 us a call in forward + backward (2-3 % of a CPU step,
// more of a host-bound GPU step), this C++ node about what PyTorch's own costs.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace nasops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor forward_kernel(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                          const std::optional<at::Tensor>& running_var, double momentum, double eps) {
  return std::get<0>(at::native_batch_norm(x, {}, {}, running_mean, running_var, /*training=*/true,
                                           momentum, eps));
}

class BatchNormKeepingOutput : public torch::autograd::Function<BatchNormKeepingOutput> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, double momentum, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, invstd] = at::native_batch_norm(x, {}, {}, running_mean, running_var,
                                                   /*training=*/true, momentum, eps);
    ctx->save_for_backward({y, invstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& y = saved[0];
    const at::Tensor& invstd = saved[1];
    // x^ = (y - 0) * 1, and the result scaled per channel by the "weight" invstd:
    // invstd * (dy - mean(dy) - x^ * mean(dy * x^)).
    auto grad_x = std::get<0>(at::native_batch_norm_backward(
        grads[0], y, invstd, {}, {}, at::zeros_like(invstd), at::ones_like(invstd), /*train=*/true,
        /*eps=*/0.0, {true, false, false}));
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor autograd_kernel(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var, double momentum, double eps) {
  return BatchNormKeepingOutput::apply(x, running_mean, running_var, momentum, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(nasops, CompositeExplicitAutograd, m) {
  m.impl("affine_free_batch_norm", &forward_kernel);
}

TORCH_LIBRARY_IMPL(nasops, Autograd, m) {
  m.impl("affine_free_batch_norm", &autograd_kernel);
}

}  // namespace nasops
