"""``gather_rows`` / ``scatter_rows``: move whole rows of dim 0 (SPEC 2.3).

They serve hard-exit batch compaction (SPEC 4.4): ``gather_rows(h, alive)``
keeps the samples still computing, ``scatter_rows(h_alive, alive, B)`` puts
their results back in a batch-sized tensor. Each is the other's adjoint, which
is their backward. Any dtype and trailing shape; ``idx`` is checked (integer
dtype, range, no duplicates): eagerly on the host, in a ``torch.compile`` graph
with ``torch._assert_async`` on the device (a RuntimeError when the graph runs).
"""
from __future__ import annotations

from numbers import Integral

import torch

from nasops.backend import resolve
from nasops.ops import reference
from nasops.ops._checks import check_same_device, check_tensor
from nasops.ops._registry import kernel_for, unique_variants, variants

_KERNELS = variants("rows", "gather_rows", "scatter_rows")

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def gather_rows(x: torch.Tensor, idx: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``x[idx]`` along dim 0: (n, *rest) -> (len(idx), *rest); idx without duplicates
    (so that the backward, scatter_rows, writes each row once)."""
    check_tensor(x, "x", dtypes=None)
    if x.dim() == 0:
        raise ValueError("x: expected at least one dimension, got a 0-d tensor")
    idx = _check_index(idx, x.shape[0], "x.shape[0]", x, "x")
    name = resolve(backend, x.device)
    if name == "eager":
        return reference.gather_rows(x, idx)
    gather, _ = kernel_for(_KERNELS, name, "rows")
    return gather(x, idx)


def scatter_rows(y: torch.Tensor, idx: torch.Tensor, n: int, *,
                 backend: str | None = None) -> torch.Tensor:
    """Zeros ``(n, *y.shape[1:])`` with row ``idx[r]`` set to ``y[r]`` (idx without duplicates)."""
    check_tensor(y, "y", dtypes=None)
    if y.dim() == 0:
        raise ValueError("y: expected at least one dimension, got a 0-d tensor")
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    idx = _check_index(idx, int(n), "n", y, "y")
    if idx.numel() != y.shape[0]:
        raise ValueError(f"idx: expected {y.shape[0]} entries (y.shape[0]), got {idx.numel()}")
    name = resolve(backend, y.device)
    if name == "eager":
        return reference.scatter_rows(y, idx, int(n))
    _, scatter = kernel_for(_KERNELS, name, "rows")
    return scatter(y, idx, int(n))


def _check_index(idx, n: int, n_name: str, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """idx: 1-D, integer, on ref's device, entries distinct and in [0, n) (n named n_name)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx: expected an integer torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in _INDEX_DTYPES:
        raise TypeError(f"idx: expected an integer dtype, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"idx: expected 1 dimension, got shape {tuple(idx.shape)}")
    check_same_device("idx", idx, ref, ref_name)
    if torch.compiler.is_compiling():
        # Reading idx on the host would be a data-dependent guard (a graph
        # break): the graph checks it on the device instead, raising at run time
        # (CUDA: a device-side assert). The kernels check the range once more.
        torch._assert_async(((idx >= 0) & (idx < n)).all(),
                            f"idx: expected entries in [0, {n_name}), got one outside")
        ordered = torch.sort(idx).values
        torch._assert_async((ordered[1:] != ordered[:-1]).all(),
                            "idx: expected distinct entries (each row moves once), got duplicates")
    elif idx.numel():
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= n:
            raise ValueError(f"idx: expected entries in [0, {n}), got min {low} and max {high}")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("idx: expected distinct entries (each row moves once), "
                             "got duplicates")
    return idx.long()


# ---- registration: fake (meta) implementations and autograd --------------------

def _fake_gather(x, idx):
    return x.new_empty((idx.shape[0],) + tuple(x.shape[1:]))


def _fake_scatter(y, idx, n):
    return y.new_empty((n,) + tuple(y.shape[1:]))


def _setup_gather(ctx, inputs, output):
    x, idx = inputs
    ctx.n = x.shape[0]
    ctx.save_for_backward(idx)


def _setup_scatter(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _gather_backward_with(scatter):
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return scatter(grad, idx, ctx.n), None
    return backward


def _scatter_backward_with(gather):
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return gather(grad, idx), None, None
    return backward


for _gather, _scatter in unique_variants(_KERNELS):
    torch.library.register_fake(_gather)(_fake_gather)
    torch.library.register_fake(_scatter)(_fake_scatter)
    torch.library.register_autograd(_gather, _gather_backward_with(_scatter), setup_context=_setup_gather)
    torch.library.register_autograd(_scatter, _scatter_backward_with(_gather), setup_context=_setup_scatter)
