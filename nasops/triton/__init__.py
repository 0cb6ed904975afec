"""Triton kernels, one op per file: kernels, launcher, torch.library registration.

Each file registers ``torch.ops.nasops.<op>_triton`` with the same schema as the
compiled ``torch.ops.nasops.<op>`` (csrc/ops.cpp). Import is lazy (only when
Triton is installed); see nasops/ops/<op>.py.
"""
