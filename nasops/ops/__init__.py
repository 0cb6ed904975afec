"""The fused ops of nasops (SPEC 2), and the search step's depthwise convolution.
Each takes ``backend=`` (see nasops.backend)."""
from nasops.ops.depthwise_conv2d import depthwise_conv2d
from nasops.ops.mixed_op import mixed_op
from nasops.ops.patch_attention import patch_attention_mixed_op, patch_pool, patch_softmax_attention
from nasops.ops.rows import gather_rows, scatter_rows
from nasops.ops.topk_tokens import topk_tokens

__all__ = ["mixed_op", "depthwise_conv2d", "patch_pool", "patch_softmax_attention", "patch_attention_mixed_op",
           "topk_tokens", "gather_rows", "scatter_rows"]
