#pragma once
// The accumulation type of the nasops CUDA kernels (SPEC 2): float for half,
// bfloat16 and float inputs; double for double inputs (gradcheck).
// CUDA headers only, like every csrc/cuda/*.cu.

namespace nasops {
namespace cuda {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

}  // namespace cuda
}  // namespace nasops
