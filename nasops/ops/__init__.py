"""The fused ops of nasops (SPEC 2). Each takes ``backend=`` (see nasops.backend)."""
from nasops.ops.mixed_op import mixed_op
from nasops.ops.rows import gather_rows, scatter_rows
from nasops.ops.topk_tokens import topk_tokens

__all__ = ["mixed_op", "topk_tokens", "gather_rows", "scatter_rows"]
