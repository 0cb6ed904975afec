// The contract: the schema of every compiled nasops op, in one place.
//
// Kernels register per dispatch key: csrc/cpu/<op>.cpp (CPU) and
// csrc/cuda/<op>_glue.cpp (CUDA). Fake (meta) implementations and autograd are
// registered in Python (nasops/ops/<op>.py), as are the Triton twins of these
// ops (nasops/triton/<op>.py, named `<op>_triton`, same schema).
//
// These ops are internal: the public functions in nasops.ops validate the user's
// arguments and bring them to the canonical shapes documented here.
#include <torch/library.h>

TORCH_LIBRARY(nasops, m) {
  // ---- mixed_op (SPEC 2.1) -------------------------------------------------
  // outputs: K >= 1 tensors (B, C, H, W), one dtype (f16/bf16/f32/f64), any strides.
  // weights: (Bw, gh*gw, K), Bw in {1, B}; float32 (float64 when outputs are f64).
  // grid:    [gh, gw], 1 <= gh <= H, 1 <= gw <= W; pixel (h, w) uses patch
  //          (h*gh/H)*gw + (w*gw/W) (integer division).
  // Returns y = sum_k w[b, p(h,w), k] * outputs[k], contiguous, outputs' dtype.
  m.def("mixed_op(Tensor[] outputs, Tensor weights, int[] grid) -> Tensor");
  // Returns (grad of each output, or [] when not outputs_requires_grad;
  //          grad of weights in weights' shape and dtype, or an empty (0,)
  //          tensor when not weights_requires_grad).
  m.def(
      "mixed_op_backward(Tensor grad, Tensor[] outputs, Tensor weights, int[] grid, "
      "bool outputs_requires_grad, bool weights_requires_grad) -> (Tensor[], Tensor)");

  // ---- patch attention (SPEC 2.2): schemas added with the kernels -----------

  // ---- topk_tokens, gather_rows, scatter_rows (SPEC 2.3) ---------------------
  // x: (B, N, C); q, k: (B, N, D); one float dtype (f16/bf16/f32/f64), any strides.
  // keep: 1 <= keep <= N (an int: ratios are resolved in Python).
  // gate: "none" | "straight_through" | "sigmoid".
  // Returns (x_sel (B, keep, C) x's dtype: x[b, idx[b, j]] * gate(s),
  //          idx (B, keep) int64 ascending,
  //          s (B, N) x's dtype: q_i . k_mean / sqrt(D),
  //          k_mean (B, D) float32 (float64 for f64): saved for backward,
  //          pos (B, N) int64: j where idx[b, j] == i, else -1; saved for backward).
  // Selection uses the float32 (f64) scores: highest first, ties to the lower
  // index, NaN above every number; with keep_cls token 0 is always kept.
  m.def(
      "topk_tokens(Tensor x, Tensor q, Tensor k, int keep, bool keep_cls, str gate) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad_x_sel: (B, keep, C); grad_s: (B, N) (the gradient of the returned s).
  // Returns (grad_x (B, N, C) or an empty (0,) tensor when not x_requires_grad,
  //          grad_q, grad_k (B, N, D) or empty (0,) tensors when not qk_requires_grad),
  // all in x's dtype.
  m.def(
      "topk_tokens_backward(Tensor grad_x_sel, Tensor grad_s, Tensor x, Tensor q, Tensor k, "
      "Tensor idx, Tensor k_mean, Tensor pos, str gate, bool x_requires_grad, "
      "bool qk_requires_grad) -> (Tensor, Tensor, Tensor)");
  // x: (n, *rest) any dtype; idx: (m,) int64 in [0, n). Returns x[idx] (m, *rest).
  m.def("gather_rows(Tensor x, Tensor idx) -> Tensor");
  // y: (m, *rest); idx: (m,) int64 in [0, n), no duplicates.
  // Returns zeros (n, *rest) with rows idx set to y.
  m.def("scatter_rows(Tensor y, Tensor idx, int n) -> Tensor");
}
