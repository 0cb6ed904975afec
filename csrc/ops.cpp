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
  // Returns y = sum_k w[b, p(h,w), k] * outputs[k], outputs' dtype, channels_last
  // when the outputs are read in that order (csrc/layout.h), else contiguous; the
  // backward's gradients of the outputs likewise.
  m.def("mixed_op(Tensor[] outputs, Tensor weights, int[] grid) -> Tensor");
  // Returns (grad of each output, or [] when not outputs_requires_grad;
  //          grad of weights in weights' shape and dtype, or an empty (0,)
  //          tensor when not weights_requires_grad).
  m.def(
      "mixed_op_backward(Tensor grad, Tensor[] outputs, Tensor weights, int[] grid, "
      "bool outputs_requires_grad, bool weights_requires_grad) -> (Tensor[], Tensor)");

  // ---- patch attention (SPEC 2.2) ---------------------------------------------
  // The mosaic of a (gh, gw) grid over an H x W map: patch row ph covers pixel
  // rows [ceil(ph*H/gh), ceil((ph+1)*H/gh)) (= SPEC 2.1's floor(h*gh/H) == ph),
  // columns likewise; |p| = its pixel count. "acc" = float32, float64 for f64.
  // maps: M >= 1 tensors (B, C, H, W), one shape and dtype, any strides.
  // Returns the patch means (B, gh*gw, M, C) in acc: one pass over each map.
  m.def("patch_pool(Tensor[] maps, int[] grid) -> Tensor");
  // maps in channels_last order are read in place, as all kernels do
  // (csrc/layout.h); any other strides are made contiguous.
  // grad: (B, P, C) acc. Returns (B, C, height, width) of `dtype`, channels_last
  // when `channels_last` (the layout of the pooled map): grad[b, p(h, w), c] / |p(h, w)|.
  m.def(
      "patch_pool_backward(Tensor grad, int[] grid, int height, int width, ScalarType dtype, "
      "bool channels_last=False) -> Tensor");
  // q: (B, P, D), k: (B, P, K, D), prior: (K,) or None, all acc (one dtype); tau > 0.
  // Returns w = softmax_k((q . k_k / sqrt(D) + prior_k) / tau), (B, P, K) acc.
  m.def("patch_softmax_attention(Tensor q, Tensor k, Tensor? prior, float tau) -> Tensor");
  // Returns (grad q, grad k, grad prior (K,) or an empty (0,) tensor when not
  // prior_requires_grad), from grad_w and the forward's w.
  m.def(
      "patch_softmax_attention_backward(Tensor grad_w, Tensor w, Tensor q, Tensor k, float tau, "
      "bool prior_requires_grad) -> (Tensor, Tensor, Tensor)");
  // The fused op's one backward pass over the K op outputs' gradients.
  // grad: (B, C, H, W) any float dtype; weights: (B, P, K) acc; grad_pooled:
  // (B, P, K, C) acc (gradient of the patch means of each output).
  // Returns K tensors (B, C, H, W) of grad's dtype and layout (csrc/layout.h):
  // weights[b, p, k] * grad + grad_pooled[b, p, k, c] / |p|.
  m.def(
      "patch_attention_outputs_backward(Tensor grad, Tensor weights, Tensor grad_pooled, "
      "int[] grid) -> Tensor[]");

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

  // ---- depthwise_conv2d (the search step's depthwise convolutions) ------------
  // Not in SPEC 2: the step's own op (issue 14). Compiled: a CPU kernel only;
  // the Triton kernels (nasops/triton/depthwise_conv2d.py) have this schema as
  // depthwise_conv2d_triton; other cases run the PyTorch expression
  // (nasops/ops/depthwise_conv2d.py).
  // x: (N, C, H, W) f32/f64, read in channels_last order (other strides are
  // copied once); weight: (C, 1, KH, KW), x's dtype; stride, padding, dilation: 2 ints.
  // Returns conv2d(relu(x) if relu_input else x, weight, groups=C), channels_last.
  m.def(
      "depthwise_conv2d(Tensor x, Tensor weight, int[] stride, int[] padding, int[] dilation, "
      "bool relu_input) -> Tensor");
  // grad: the output's gradient. Returns (grad x channels_last, or an empty (0,)
  // tensor when not x_requires_grad; grad weight (C, 1, KH, KW), or an empty (0,)
  // tensor when not weight_requires_grad). The ReLU's gradient at x = 0 is 0.
  m.def(
      "depthwise_conv2d_backward(Tensor grad, Tensor x, Tensor weight, int[] stride, int[] padding, "
      "int[] dilation, bool relu_input, bool x_requires_grad, bool weight_requires_grad) "
      "-> (Tensor, Tensor)");

  // ---- affine_free_batch_norm (the search ops' BatchNorm; csrc/batch_norm.cpp) --
  // Not in SPEC 2: the search network's own layer (nasops.spaces.operations.
  // AffineFreeBatchNorm2d). x: (N, C, ...) any float dtype and layout;
  // running_mean, running_var: (C,) or None, updated in place with `momentum`
  // as native_batch_norm does. Returns native_batch_norm's training output y;
  // its backward keeps y and the batch invstd, not x.
  m.def(
      "affine_free_batch_norm(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float momentum, float eps) -> Tensor");
}
