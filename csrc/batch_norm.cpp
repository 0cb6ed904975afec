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

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace nasops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The mean (zeros) and invstd (ones) of y, the normalised output, that the backward
// hands native_batch_norm_backward: shaped, typed and placed like `invstd`. Made once
// per (device, dtype, channels) and kept, not by every backward: on a GPU each
// would be a fill kernel, two per layer and step (~3,000 of a DARTS search step's
// ~30,000 kernels). Only for plain CPU and CUDA tensors: a fake, meta or
// functorch-wrapped one (torch.compile's tracing, opcheck) gets fresh tensors of
// its own kind, never a cached one, and a cached one never reaches it.
std::pair<at::Tensor, at::Tensor> unit_statistics(const at::Tensor& invstd) {
  constexpr auto kPlainKeys = c10::DispatchKeySet({c10::DispatchKey::CPU, c10::DispatchKey::CUDA,
                                                   c10::DispatchKey::ADInplaceOrView,
                                                   c10::DispatchKey::AutogradCPU,
                                                   c10::DispatchKey::AutogradCUDA,
                                                   c10::DispatchKey::AutocastCPU,
                                                   c10::DispatchKey::AutocastCUDA});
  const bool plain = (invstd.is_cpu() || invstd.is_cuda()) && !invstd.is_inference() &&
                     kPlainKeys.has_all(invstd.key_set()) && invstd.dim() == 1;
  if (!plain) {
    return {at::zeros_like(invstd), at::ones_like(invstd)};
  }
  using Key = std::tuple<c10::DeviceType, c10::DeviceIndex, c10::ScalarType, int64_t>;
  static std::mutex mutex;
  // Never destroyed: freeing CUDA memory from a static destructor at exit may
  // run after the CUDA runtime has shut down.
  static auto* cache = new std::map<Key, std::pair<at::Tensor, at::Tensor>>();
  const Key key{invstd.device().type(), invstd.device().index(), invstd.scalar_type(), invstd.size(0)};
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache->find(key);
  if (found == cache->end()) {
    // Made on the host and copied with a blocking copy, not by kernels on the
    // current stream: once here, they are ready for every stream. Under CUDA
    // graphs the warm-up calls before a capture make them (torch.cuda.
    // make_graphed_callables); a capture without warm-up would fail loudly on
    // the blocking copy rather than record values that a replay writes later.
    const auto host = invstd.options().device(at::kCPU).requires_grad(false);
    const auto device = invstd.device();
    found = cache->emplace(key, std::make_pair(at::zeros({invstd.size(0)}, host).to(device),
                                               at::ones({invstd.size(0)}, host).to(device))).first;
  }
  return found->second;
}

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
    // Grad mode is on in a backward asked to create a graph (a double backward):
    // differentiating this one in y alone would leave out invstd's dependence on
    // x, a wrong second derivative without a word.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "nasops.affine_free_batch_norm has no double backward (create_graph=True: Hessian-vector "
                "products, gradient penalties); run it with the eager backend (backend='eager', "
                "nasops.set_backend('eager'), --backend eager)");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& y = saved[0];
    const at::Tensor& invstd = saved[1];
    // x^ = (y - 0) * 1, and the result scaled per channel by the "weight" invstd:
    // invstd * (dy - mean(dy) - x^ * mean(dy * x^)).
    const auto [zeros, ones] = unit_statistics(invstd);
    auto grad_x = std::get<0>(at::native_batch_norm_backward(
        grads[0], y, invstd, {}, {}, zeros, ones, /*train=*/true, /*eps=*/0.0, {true, false, false}));
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
