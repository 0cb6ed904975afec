"""Find the kernel variants of an op and register their fake and autograd rules.

Every op ``<name>`` has up to two registered variants with the same schema:
- ``torch.ops.nasops.<name>``: compiled (``nasops._C``), CPU and CUDA kernels
  chosen by the dispatcher;
- ``torch.ops.nasops.<name>_triton``: the Triton kernels (nasops/triton/<name>.py).
``variants()`` maps the backend names of nasops.backend to those overloads.
"""
from __future__ import annotations

import importlib
from importlib.util import find_spec

import torch

from nasops.backend import extension_loaded, kernels_failed_to_import

# Why a Triton module could not be imported, by module name (for error messages).
TRITON_IMPORT_ERRORS: dict[str, str] = {}


def _compiled(name: str):
    if extension_loaded() and hasattr(torch.ops.nasops, name):
        return getattr(torch.ops.nasops, name).default
    return None


def _triton(module: str, name: str):
    try:
        importlib.import_module(f"nasops.triton.{module}")
    except ImportError as exc:  # triton not installed, or too old
        TRITON_IMPORT_ERRORS[module] = str(exc)
        if find_spec("triton") is not None:  # installed: the backend must not look usable
            kernels_failed_to_import("triton", f"nasops' Triton kernels do not import with the installed "
                                               f"triton ({exc})")
        return None
    return getattr(torch.ops.nasops, f"{name}_triton").default


def variants(module: str, *names: str) -> dict[str, tuple]:
    """Backend -> tuple of op overloads (one per name), for the backends that have them all."""
    found = {}
    compiled = tuple(_compiled(n) for n in names)
    if all(op is not None for op in compiled):
        found["cpu"] = found["cuda"] = compiled
    triton = tuple(_triton(module, n) for n in names)
    if all(op is not None for op in triton):
        found["triton"] = triton
    return found


def unique_variants(found: dict[str, tuple]) -> list[tuple]:
    """The distinct op tuples of ``variants()`` (cpu and cuda share one)."""
    seen = []
    for ops in found.values():
        if ops not in seen:
            seen.append(ops)
    return seen


def kernel_for(found: dict[str, tuple], backend: str, op: str) -> tuple:
    if backend not in found:
        why = TRITON_IMPORT_ERRORS.get(op, "the compiled extension lacks this op")
        raise RuntimeError(f"nasops.ops.{op}: backend {backend!r} has no kernel ({why})")
    return found[backend]
