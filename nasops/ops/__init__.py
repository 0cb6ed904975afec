"""The fused ops of nasops (SPEC 2). Each takes ``backend=`` (see nasops.backend)."""
from nasops.ops.mixed_op import mixed_op
from nasops.ops.patch_attention import patch_attention_mixed_op, patch_pool, patch_softmax_attention

__all__ = ["mixed_op", "patch_pool", "patch_softmax_attention", "patch_attention_mixed_op"]
