"""Triton kernels, one op per file: kernels, launcher, torch.library registration.

Each file registers ``torch.ops.nasops.<op>_triton`` with the same schema as the
compiled ``torch.ops.nasops.<op>`` (csrc/ops.cpp). Import is lazy (only when
Triton is installed); see nasops/ops/<op>.py. This package file imports no
Triton: it holds what the launchers share.
"""
from __future__ import annotations

import contextlib

import torch

from nasops.backend import triton_interpreting


def on_device(t: torch.Tensor, op: str):
    """A context that launches on ``t``'s GPU (Triton launches on the current
    device); CPU tensors only under the interpreter (``op`` names the refusal)."""
    if t.is_cuda:
        return torch.cuda.device(t.device) if t.get_device() != torch.cuda.current_device() \
            else contextlib.nullcontext()
    if not triton_interpreting():
        raise RuntimeError(f"nasops {op} (triton): {t.device.type} tensors run only under the Triton "
                           "interpreter (TRITON_INTERPRET=1 set before importing nasops)")
    return contextlib.nullcontext()


# One library fragment for every torch.ops.nasops.<op>_triton.
_LIB = torch.library.Library("nasops", "FRAGMENT")


def define_op(name: str, schema: str, kernel) -> None:
    """Define ``torch.ops.nasops.<name>`` with ``schema`` (its arguments and
    results, ``"(Tensor x, ...) -> Tensor"``, the compiled op's) and ``kernel``
    as its implementation for CUDA tensors and CPU tensors (the interpreter)."""
    _LIB.define(name + schema)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, kernel, key)
