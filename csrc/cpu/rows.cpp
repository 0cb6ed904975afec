// gather_rows / scatter_rows (SPEC 2.3, used for hard-exit batch compaction) on
// the CPU: whole rows of dim 0 moved with memcpy, any dtype and trailing shape.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace nasops {
namespace {

using at::Tensor;

void check_index(const Tensor& idx, int64_t n, const char* op) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, op, ": idx must be a 1-D int64 tensor");
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < idx.numel(); ++r)
    TORCH_CHECK_INDEX(ip[r] >= 0 && ip[r] < n, op, ": idx[", r, "] = ", ip[r], " is outside [0, ", n, ")");
}

Tensor gather_rows_cpu(const Tensor& x_in, const Tensor& idx_in) {
  TORCH_CHECK(x_in.dim() >= 1, "gather_rows: x must have at least one dimension");
  const Tensor x = x_in.contiguous(), idx = idx_in.contiguous();
  check_index(idx, x.size(0), "gather_rows");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = idx.numel();
  Tensor out = at::empty(shape, x.options());
  const int64_t row_bytes = x.size(0) ? x.nbytes() / x.size(0) : 0;
  if (out.numel() == 0) return out;
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  at::parallel_for(0, idx.numel(), std::max<int64_t>(1, 16384 / std::max<int64_t>(row_bytes, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + r * row_bytes, src + ip[r] * row_bytes, row_bytes);
  });
  return out;
}

Tensor scatter_rows_cpu(const Tensor& y_in, const Tensor& idx_in, int64_t n) {
  TORCH_CHECK(y_in.dim() >= 1, "scatter_rows: y must have at least one dimension");
  TORCH_CHECK(n >= 0, "scatter_rows: n must be >= 0, got ", n);
  const Tensor y = y_in.contiguous(), idx = idx_in.contiguous();
  TORCH_CHECK(idx.numel() == y.size(0), "scatter_rows: idx must have y.size(0) entries");
  check_index(idx, n, "scatter_rows");
  std::vector<int64_t> shape(y.sizes().begin(), y.sizes().end());
  shape[0] = n;
  Tensor out = at::empty(shape, y.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = out.nbytes() / n;
  // Which source row lands on each output row (-1: none), so every output row
  // is written exactly once.
  std::vector<int64_t> source(n, -1);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < idx.numel(); ++r) source[ip[r]] = r;
  const char* src = static_cast<const char*>(y.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(row_bytes, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (source[r] < 0)
        std::memset(dst + r * row_bytes, 0, row_bytes);
      else
        std::memcpy(dst + r * row_bytes, src + source[r] * row_bytes, row_bytes);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nasops, CPU, m) {
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
}

}  // namespace nasops
