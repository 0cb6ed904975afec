// mixed_op (SPEC 2.1): argument checks and the mosaic geometry shared by the
// CPU kernel (csrc/cpu/mixed_op.cpp) and the CUDA glue (csrc/cuda/mixed_op_glue.cpp).
//
// The public Python function (nasops/ops/mixed_op.py) already validated the
// user's arguments; these checks guard the internal op's canonical form
// (csrc/ops.cpp) against direct torch.ops.nasops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <vector>

#include "layout.h"

namespace nasops {

// The first pixel row (or column) of patch row (or column) `part`: the
// smallest i with floor(i * parts / size) >= part, i.e. ceil(part * size / parts).
inline int64_t patch_start(int64_t part, int64_t parts, int64_t size) {
  return (part * size + parts - 1) / parts;
}

// The canonical sizes of one mixed_op call, as the kernels walk memory: C
// planes of H rows of W elements per sample. `pixel` is the number of
// consecutive elements of a row that belong to one pixel column: 1 for a
// contiguous (NCHW) map; for a channels_last (NHWC) map the kernels see one
// plane of H rows of W*C elements with pixel = C (storage_order()).
struct MixedOpShape {
  int64_t K, B, C, H, W;
  int64_t Bw;      // 1 (weights shared by the batch) or B
  int64_t gh, gw;  // the mosaic; P = gh * gw
  int64_t pixel = 1;
  int64_t P() const { return gh * gw; }
  int64_t plane() const { return H * W; }
  int64_t sample() const { return C * H * W; }
  // First element of patch column `pw` within a row.
  int64_t col_start(int64_t pw) const { return patch_start(pw, gw, W / pixel) * pixel; }
  // The shape in the order the elements lie in memory: itself for NCHW; for
  // NHWC one plane per sample whose rows hold W pixels of C channels each.
  MixedOpShape storage_order(bool channels_last) const {
    if (!channels_last) return *this;
    MixedOpShape s = *this;
    s.C = 1;
    s.W = W * C;
    s.pixel = C;
    return s;
  }
};

inline MixedOpShape check_mixed_op(const char* op, c10::ArrayRef<at::Tensor> outputs,
                                   const at::Tensor& weights, c10::ArrayRef<int64_t> grid) {
  TORCH_CHECK(!outputs.empty(), op, ": outputs is empty");
  const at::Tensor& o0 = outputs[0];
  TORCH_CHECK(o0.dim() == 4, op, ": outputs[0] must be (B, C, H, W), got ", o0.sizes());
  const auto dtype = o0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": outputs must be float16, bfloat16, float32 or float64, got ", dtype);
  for (size_t k = 1; k < outputs.size(); ++k) {
    TORCH_CHECK(outputs[k].sizes() == o0.sizes(), op, ": outputs[", k, "] has shape ",
                outputs[k].sizes(), ", outputs[0] has ", o0.sizes());
    TORCH_CHECK(outputs[k].scalar_type() == dtype, op, ": outputs[", k, "] has dtype ",
                outputs[k].scalar_type(), ", outputs[0] has ", dtype);
    TORCH_CHECK(outputs[k].device() == o0.device(), op, ": outputs[", k, "] is on ",
                outputs[k].device(), ", outputs[0] on ", o0.device());
  }
  MixedOpShape s{};
  s.K = static_cast<int64_t>(outputs.size());
  s.B = o0.size(0);
  s.C = o0.size(1);
  s.H = o0.size(2);
  s.W = o0.size(3);
  TORCH_CHECK(grid.size() == 2, op, ": grid must be [gh, gw], got ", grid);
  s.gh = grid[0];
  s.gw = grid[1];
  // An empty map has no pixels to place in patches; the grid only has to be positive.
  TORCH_CHECK(s.gh >= 1 && s.gw >= 1 && (s.H == 0 || s.gh <= s.H) && (s.W == 0 || s.gw <= s.W),
              op, ": grid ", grid, " must satisfy 1 <= gh <= H=", s.H, ", 1 <= gw <= W=", s.W);
  const auto wdtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weights.scalar_type() == wdtype, op, ": weights must be ", wdtype, " for ", dtype,
              " outputs, got ", weights.scalar_type());
  TORCH_CHECK(weights.device() == o0.device(), op, ": weights are on ", weights.device(),
              ", outputs on ", o0.device());
  TORCH_CHECK(weights.dim() == 3 && (weights.size(0) == 1 || weights.size(0) == s.B) &&
                  weights.size(1) == s.P() && weights.size(2) == s.K,
              op, ": weights must be (1 or B=", s.B, ", P=", s.P(), ", K=", s.K, "), got ",
              weights.sizes());
  s.Bw = weights.size(0);
  return s;
}

}  // namespace nasops
