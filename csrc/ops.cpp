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
}
