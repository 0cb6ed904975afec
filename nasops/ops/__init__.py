"""The fused ops of nasops (SPEC 2). Each takes ``backend=`` (see nasops.backend)."""
from nasops.ops.mixed_op import mixed_op

__all__ = ["mixed_op"]
