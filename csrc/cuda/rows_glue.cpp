// gather_rows / scatter_rows (SPEC 2.3) CUDA glue: checks, allocation, stream,
// and the registration for the CUDA key. Index ranges and duplicates are
// checked by nasops.ops before these run: on the host when called eagerly,
// with torch._assert_async on the device inside a torch.compile graph. The
// kernel checks the range again (a device-side assert: rows.cu); duplicates
// only nasops.ops checks (a duplicate scatter entry races, it stays in bounds).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/rows.cuh"

namespace nasops {
namespace {

using at::Tensor;

void check_rows(const char* op, const Tensor& t, const Tensor& idx) {
  TORCH_CHECK(t.dim() >= 1, op, ": the rows tensor must have at least one dimension");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, op, ": idx must be a 1-D int64 tensor");
  TORCH_CHECK(t.is_cuda() && idx.device() == t.device(), op, " (CUDA): tensors on one CUDA device");
}

Tensor gather_rows_cuda(const Tensor& x_in, const Tensor& idx_in) {
  check_rows("nasops::gather_rows", x_in, idx_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), idx = idx_in.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = idx.numel();
  Tensor out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = static_cast<int64_t>(out.nbytes()) / idx.numel();
  C10_CUDA_CHECK(cuda::launch_copy_rows(x.const_data_ptr(), out.mutable_data_ptr(),
                                        idx.const_data_ptr<int64_t>(), idx.numel(), row_bytes, x.size(0), false,
                                        c10::cuda::getCurrentCUDAStream(x.get_device())));
  return out;
}

Tensor scatter_rows_cuda(const Tensor& y_in, const Tensor& idx_in, int64_t n) {
  check_rows("nasops::scatter_rows", y_in, idx_in);
  TORCH_CHECK(n >= 0, "nasops::scatter_rows: n must be >= 0, got ", n);
  TORCH_CHECK(idx_in.numel() == y_in.size(0), "nasops::scatter_rows: idx must have y.size(0) entries");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const Tensor y = y_in.contiguous(), idx = idx_in.contiguous();
  std::vector<int64_t> shape(y.sizes().begin(), y.sizes().end());
  shape[0] = n;
  Tensor out = at::zeros(shape, y.options());
  if (y.numel() == 0) return out;
  const int64_t row_bytes = static_cast<int64_t>(y.nbytes()) / y.size(0);
  C10_CUDA_CHECK(cuda::launch_copy_rows(y.const_data_ptr(), out.mutable_data_ptr(),
                                        idx.const_data_ptr<int64_t>(), idx.numel(), row_bytes, n, true,
                                        c10::cuda::getCurrentCUDAStream(y.get_device())));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nasops, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
}

}  // namespace nasops
