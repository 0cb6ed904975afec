"""``mixed_op``: the DARTS mixed edge y = sum_k w_k * o_k (SPEC 2.1).

The public function checks the arguments and brings them to the canonical form
of the kernels (csrc/ops.cpp): live outputs as (B, C, H, W) and weights as
(Bw, P, K_live) in the accumulation dtype. Token tensors (B, N, C) are viewed
as (B, 1, N, C) with the grid (N, 1) for per-token weights, (1, 1) otherwise.
Zero ops (``None``) are dropped before the kernel: they add nothing and their
weight's gradient is exactly zero.

Layouts: feature maps may be contiguous (NCHW) or channels_last (NHWC). The
kernels of every backend read either in place and return y, and the outputs'
gradients, in the outputs' layout; outputs in mixed layouts are first brought
to the majority's (nasops.ops._layout.common_layout: one copy per odd one out).
Per-edge and per-sample weights do not care about the layout (a sample is
C*H*W consecutive elements either way); per-patch weights index the NHWC rows
as W pixels of C channels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from nasops.backend import resolve
from nasops.ops import reference
from nasops.ops._layout import common_layout, kernel_channels_last, memory_format
from nasops.ops._checks import (accumulation_dtype, check_grid, check_op_outputs, check_same_device, check_tensor,
                                first_order_only)
from nasops.ops._registry import kernel_for, unique_variants, variants

_KERNELS = variants("mixed_op", "mixed_op", "mixed_op_backward")
# The most live ops a backend's kernels take in one call: the CUDA kernels hold
# their pointers in a fixed array (csrc/cuda/mixed_op.cuh, kMixedOpMaxOps).
MAX_LIVE_OPS = {"cuda": 64}


def mixed_op(outputs: Sequence[torch.Tensor | None], weights: torch.Tensor, *,
             grid: tuple[int, int] | int | None = None, backend: str | None = None) -> torch.Tensor:
    """Weighted sum of K op outputs, read in place (never stacked).

    Args:
        outputs: K tensors of one shape, (B, C, H, W) or (B, N, C), one dtype and
            device; ``None`` for a Zero op.
        weights: (K,) per edge, (B, K) per sample, or (B, P, K) per patch: with
            ``grid=(gh, gw)`` (P = gh*gw) for (B, C, H, W), per token (P = N)
            for (B, N, C). float32 weights with half-precision outputs are fine.
        grid: the mosaic for per-patch weights on feature maps; otherwise None.
        backend: 'auto' (default), 'cuda', 'triton', 'cpu' or 'eager'.

    Returns:
        y with the outputs' shape and dtype (accumulated in float32), and their
        layout: channels_last when they are (see the module docstring).
    """
    live, shape = check_op_outputs(outputs, ndim=(3, 4))
    weights = _check_weights(weights, len(outputs), shape, live[0][1], grid)
    if len(shape) == 4 and weights.dim() == 3:
        grid = check_grid(grid, shape[2], shape[3])
    ref = live[0][1]
    name = resolve(backend, ref.device, count=len(live), limits=MAX_LIVE_OPS, what="outputs (live ops)")
    if len(shape) == 4:  # every backend, the reference too, returns one layout
        live = list(zip((k for k, _ in live), common_layout([o for _, o in live])))
    if name == "eager" or ref.numel() == 0:
        maps = dict(live)
        return reference.mixed_op([maps.get(k) for k in range(len(outputs))], weights, grid)
    fwd, bwd = kernel_for(_KERNELS, name, "mixed_op")

    B = shape[0]
    K = len(outputs)
    if len(live) < K:
        index = [k for k, _ in live]
        # A run of live ops (DARTS: Zero first) is a view; others an index (slower per call).
        weights = weights[..., index[0]:index[-1] + 1] if index[-1] - index[0] + 1 == len(index) \
            else weights[..., index]
    w = weights.to(accumulation_dtype(ref.dtype))
    if len(shape) == 3:  # tokens (B, N, C) -> (B, 1, N, C)
        maps = [o.reshape(B, 1, shape[1], shape[2]) for _, o in live]
        kernel_grid = [shape[1], 1] if w.dim() == 3 else [1, 1]
    else:
        maps = [o for _, o in live]
        kernel_grid = list(grid) if w.dim() == 3 else [1, 1]
    w = w.reshape(B if w.dim() > 1 else 1, kernel_grid[0] * kernel_grid[1], len(live))
    if torch.compiler.is_compiling():
        # The registered op: traced as one node, with the fake and autograd rules below.
        return fwd(maps, w, kernel_grid).reshape(shape)
    if torch.is_grad_enabled() and (w.requires_grad or any(m.requires_grad for m in maps)):
        return _MixedOp.apply((fwd, bwd), kernel_grid, w, *maps).reshape(shape)
    with torch._C._AutoDispatchBelowAutograd():
        return fwd(maps, w, kernel_grid).reshape(shape)


class _MixedOp(torch.autograd.Function):
    """The eager path of the kernels: the same forward and backward as the op's
    registered autograd (below), without its Python layers (the tensor-list
    support of torch.library's autograd, a redispatch per call), which the
    eager path does not need; their cost per call was not measured on its own.
    The kernels run below the autograd dispatch key, straight to the CPU or
    CUDA (or Triton) implementation."""

    @staticmethod
    def forward(ctx, kernels, grid, weights, *maps):
        fwd, bwd = kernels
        with torch._C._AutoDispatchBelowAutograd():
            y = fwd(list(maps), weights, grid)
        ctx.bwd, ctx.grid = bwd, grid
        ctx.save_for_backward(weights, *maps)
        return y

    @staticmethod
    @first_order_only("nasops.mixed_op's kernels")
    def backward(ctx, grad):
        weights, *maps = ctx.saved_tensors
        need_weights = ctx.needs_input_grad[2]
        need_maps = ctx.needs_input_grad[3:]
        with torch._C._AutoDispatchBelowAutograd():
            grads, grad_w = ctx.bwd(grad, maps, weights, ctx.grid, any(need_maps), need_weights)
        grads = [g if need else None for g, need in zip(grads, need_maps)] if grads else [None] * len(maps)
        return None, None, (grad_w if need_weights else None), *grads


def _check_weights(weights, K, shape, ref, grid):
    check_tensor(weights, "weights", ndim=(1, 2, 3))
    check_same_device("weights", weights, ref, "outputs")
    if weights.shape[-1] != K:
        raise ValueError(f"weights: expected last dimension K={K} (len(outputs)), "
                         f"got shape {tuple(weights.shape)}")
    if weights.dim() >= 2 and weights.shape[0] != shape[0]:
        raise ValueError(f"weights: expected batch size {shape[0]} (that of outputs), "
                         f"got shape {tuple(weights.shape)}")
    if weights.dim() == 3:
        if len(shape) == 3:
            if weights.shape[1] != shape[1]:
                raise ValueError(f"weights: per-token weights need P = N = {shape[1]}, "
                                 f"got shape {tuple(weights.shape)}")
            if grid is not None:
                raise ValueError("grid: token outputs (B, N, C) take per-token weights, no grid; "
                                 f"got grid={grid!r}")
        else:
            if grid is None:
                raise ValueError("grid: per-patch weights (B, P, K) on (B, C, H, W) outputs need "
                                 "grid=(gh, gw)")
            gh, gw = check_grid(grid, shape[2], shape[3])
            if weights.shape[1] != gh * gw:
                raise ValueError(f"weights: expected P = gh*gw = {gh * gw} for grid {(gh, gw)}, "
                                 f"got shape {tuple(weights.shape)}")
    elif grid is not None:
        raise ValueError(f"grid: only per-patch weights (B, P, K) use a grid; weights have shape "
                         f"{tuple(weights.shape)}, got grid={grid!r}")
    return weights


# ---- registration: fake (meta) implementations and autograd --------------------

def _fake_forward(outputs, weights, grid):
    return torch.empty_like(outputs[0], memory_format=memory_format(kernel_channels_last(outputs)))


def _fake_backward(grad, outputs, weights, grid, outputs_requires_grad, weights_requires_grad):
    fmt = memory_format(kernel_channels_last(outputs))
    grads = [torch.empty_like(grad, memory_format=fmt) for _ in outputs] if outputs_requires_grad else []
    # Every kernel returns grad w contiguous, whatever the strides of ``weights``.
    gw = weights.new_empty(weights.shape) if weights_requires_grad else weights.new_empty(0)
    return grads, gw


def _setup_context(ctx, inputs, output):
    outputs, weights, grid = inputs
    ctx.grid = grid
    ctx.save_for_backward(weights, *outputs)


def _make_backward(backward_op):
    @first_order_only("nasops.mixed_op's kernels")
    def backward(ctx, grad):
        weights, *outputs = ctx.saved_tensors
        # needs_input_grad holds one flag per tensor of a Tensor[] argument.
        need_each_output, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grads, gw = backward_op(grad, outputs, weights, ctx.grid, any(need_each_output), need_weights)
        # The returned structure must mirror the inputs': a list, None where not needed.
        grads = [g if need else None for g, need in zip(grads, need_each_output)] if grads \
            else [None] * len(outputs)
        return grads, (gw if need_weights else None), None
    return backward


for _fwd, _bwd in unique_variants(_KERNELS):
    torch.library.register_fake(_fwd)(_fake_forward)
    torch.library.register_fake(_bwd)(_fake_backward)
    torch.library.register_autograd(_fwd, _make_backward(_bwd), setup_context=_setup_context)
