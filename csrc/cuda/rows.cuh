// gather_rows / scatter_rows (SPEC 2.3) CUDA launchers. Only CUDA headers here;
// the torch glue is csrc/cuda/rows_glue.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nasops {
namespace cuda {

// Rows are row_bytes of raw memory (any dtype). gather: dst row r = src row
// idx[r]; scatter: dst row idx[r] = src row r (dst zero-filled first by the
// caller). rows = idx's length; targets = the row count of src (gather) or dst
// (scatter): an idx entry outside [0, targets) is a device-side assert. The
// copy uses the widest word (16..1 bytes) dividing row_bytes and both base
// addresses.
cudaError_t launch_copy_rows(const void* src, void* dst, const int64_t* idx, int64_t rows,
                             int64_t row_bytes, int64_t targets, bool scatter, cudaStream_t stream);

}  // namespace cuda
}  // namespace nasops
