// gather_rows / scatter_rows (SPEC 2.3) CUDA kernel: whole rows moved as raw
// words (16-byte vectors when the row size allows), one block column per row.
// Every idx entry is checked on the device: an entry outside [0, targets) is a
// device-side assert (CUDA_KERNEL_ASSERT, on in release builds too), never a
// read or write outside the tensors.
#include "rows.cuh"

#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT_MSG only (a header-only macro)
#include <cuda_runtime.h>

#include <cstdint>

namespace nasops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename Word>
__global__ void copy_rows_kernel(const Word* __restrict__ src, Word* __restrict__ dst,
                                 const int64_t* __restrict__ idx, int64_t words, int64_t targets,
                                 bool scatter) {
  const int64_t r = blockIdx.y;
  const int64_t target = idx[r];
  CUDA_KERNEL_ASSERT_MSG(target >= 0 && target < targets,
                         "nasops gather_rows/scatter_rows: an idx entry is outside [0, n)");
  if (target < 0 || target >= targets) return;  // builds where the assert is compiled out
  const int64_t src_row = scatter ? r : target;
  const int64_t dst_row = scatter ? target : r;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; w < words;
       w += static_cast<int64_t>(gridDim.x) * kThreads)
    dst[dst_row * words + w] = src[src_row * words + w];
}

template <typename Word>
cudaError_t launch(const void* src, void* dst, const int64_t* idx, int64_t rows, int64_t row_bytes,
                   int64_t targets, bool scatter, cudaStream_t stream) {
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(Word));
  int64_t columns = (words + kThreads - 1) / kThreads;
  if (columns > 1024) columns = 1024;  // the kernel strides over the rest
  // gridDim.y is at most 65535: launch the rows in slices.
  for (int64_t r0 = 0; r0 < rows; r0 += 65535) {
    const int64_t n = rows - r0 < 65535 ? rows - r0 : 65535;
    const int64_t src_offset = scatter ? r0 * words : 0;
    const int64_t dst_offset = scatter ? 0 : r0 * words;
    copy_rows_kernel<Word><<<dim3(static_cast<unsigned>(columns), static_cast<unsigned>(n)), kThreads, 0,
                             stream>>>(static_cast<const Word*>(src) + src_offset,
                                       static_cast<Word*>(dst) + dst_offset, idx + r0, words, targets,
                                       scatter);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_copy_rows(const void* src, void* dst, const int64_t* idx, int64_t rows,
                             int64_t row_bytes, int64_t targets, bool scatter, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  // The word must divide the row size and both base addresses (a contiguous
  // view may start anywhere in its storage).
  const int64_t bits = row_bytes | static_cast<int64_t>(reinterpret_cast<uintptr_t>(src)) |
                       static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst));
  if (bits % 16 == 0) return launch<uint4>(src, dst, idx, rows, row_bytes, targets, scatter, stream);
  if (bits % 8 == 0) return launch<uint2>(src, dst, idx, rows, row_bytes, targets, scatter, stream);
  if (bits % 4 == 0) return launch<uint32_t>(src, dst, idx, rows, row_bytes, targets, scatter, stream);
  if (bits % 2 == 0) return launch<uint16_t>(src, dst, idx, rows, row_bytes, targets, scatter, stream);
  return launch<uint8_t>(src, dst, idx, rows, row_bytes, targets, scatter, stream);
}

}  // namespace cuda
}  // namespace nasops
