// Grid sizes of the elementwise grid-stride kernels, and when their loop
// counter may be 32-bit. Plain C++ (no CUDA headers): the host test compiles
// it with g++ (tests/test_cuda_sources.py).
#pragma once

#include <cstdint>

namespace nasops {
namespace cuda {

// Blocks of `threads` threads for n items, capped (the kernels stride over
// the rest): enough to fill any GPU, far below gridDim.x's limit.
inline unsigned grid_stride_blocks(int64_t n, int threads) {
  constexpr int64_t kMaxBlocks = 65535 * 8;
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// True when `for (Index i = first; i < n; i += stride)` may use a 32-bit
// Index: every index the kernel forms is below index_bound <= 2^31 - 1, and
// the counter's last step, at most n - 1 + stride, does not pass 2^31 - 1
// either (past it, a signed 32-bit counter wraps negative and passes i < n
// again: a loop over n just under 2^31 would run off the end).
inline bool int32_grid_stride_fits(int64_t index_bound, int64_t n, int64_t stride) {
  constexpr int64_t kInt32Max = (int64_t{1} << 31) - 1;
  return index_bound <= kInt32Max && n - 1 + stride <= kInt32Max;
}

}  // namespace cuda
}  // namespace nasops
