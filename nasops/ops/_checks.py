"""Argument checks shared by the public ops: every error names the argument,
what was expected and what was given (SPEC 2); and the refusal of a double
backward where nasops computes first derivatives only."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(t, name: str, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {tuple(str(d) for d in dtypes)}, got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dimensions, "
                             f"got shape {tuple(t.shape)}")
    return t


def check_same_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def check_op_outputs(outputs, ndim) -> tuple[list[tuple[int, torch.Tensor]], tuple[int, ...]]:
    """A list of K op outputs (``None`` = Zero op) of one shape, dtype and device.

    Returns the live ``(k, tensor)`` pairs and their common shape.
    """
    if isinstance(outputs, torch.Tensor) or not isinstance(outputs, Sequence) or len(outputs) == 0:
        raise TypeError(f"outputs: expected a non-empty list of tensors (None for Zero ops), "
                        f"got {type(outputs).__name__}")
    live = []
    for k, o in enumerate(outputs):
        if o is None:
            continue
        check_tensor(o, f"outputs[{k}]", ndim=ndim)
        if live:
            k0, o0 = live[0]
            if o.shape != o0.shape:
                raise ValueError(f"outputs[{k}]: expected shape {tuple(o0.shape)} "
                                 f"(that of outputs[{k0}]), got {tuple(o.shape)}")
            if o.dtype != o0.dtype:
                raise TypeError(f"outputs[{k}]: expected dtype {o0.dtype} (that of outputs[{k0}]), "
                                f"got {o.dtype}")
            check_same_device(f"outputs[{k}]", o, o0, f"outputs[{k0}]")
        live.append((k, o))
    if not live:
        raise ValueError("outputs: every entry is None (all Zero ops): the output shape is unknown")
    return live, tuple(live[0][1].shape)


def check_grid(grid, height: int, width: int, name: str = "grid") -> tuple[int, int]:
    """A mosaic (gh, gw) with 1 <= gh <= height and 1 <= gw <= width."""
    if isinstance(grid, int):
        grid = (grid, grid)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)):
        raise TypeError(f"{name}: expected an int or a pair of ints (gh, gw), got {grid!r}")
    gh, gw = grid
    if not (1 <= gh <= height and 1 <= gw <= width):
        raise ValueError(f"{name}: expected 1 <= gh <= H={height} and 1 <= gw <= W={width}, "
                         f"got {(gh, gw)}")
    return gh, gw


def check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"tau: expected a positive number, got {tau!r}")
    return float(tau)


KERNELS_FIRST_ORDER = "run it with the eager backend (backend='eager', nasops.set_backend('eager'), --backend eager)"


def first_order_only(what: str, instead: str = KERNELS_FIRST_ORDER):
    """Decorates the backward of an autograd Function (or a registered op's
    autograd rule) that computes first derivatives only: it refuses a double
    backward, naming ``what`` and what to do ``instead``.

    Why not ``torch.autograd.function.once_differentiable``: its error fires only
    when a second backward reaches the Function itself, and ``autograd.grad``
    with ``inputs`` reaches only what leads to them, so a Hessian-vector product
    (RobustDARTS' eigenvalue of the architecture Hessian) or a gradient penalty
    came back without the op's second-order part, silently (grad None, or 0 for
    a registered op). Autograd runs a backward with grad mode on exactly when
    it is asked to create a graph (``create_graph=True``).
    """
    def decorate(backward):
        @functools.wraps(backward)
        def first_order_backward(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"{what} has no double backward (create_graph=True: Hessian-vector "
                                   f"products, gradient penalties); {instead}")
            return backward(ctx, *grads)
        return first_order_backward
    return decorate
