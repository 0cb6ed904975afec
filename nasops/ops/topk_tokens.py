"""``topk_tokens``: DASViT attention-based partial token selection (SPEC 2.3).

Each token gets the score s_i = (1/N) sum_j q_i . k_j / sqrt(D), computed as
q_i . mean_j(k_j) / sqrt(D) in O(N*D) (the N x N attention matrix is never
formed). The ``keep`` best tokens are gathered, in ascending token order, and
optionally gated by their score so that the selection trains q and k.

Choices where SPEC is silent (what a NAS researcher expects):
- ``keep`` as an int is a token count; as a float it is a ratio of N:
  max(1, floor(ratio * N)), with a 1e-9 guard so that 0.29 * 100 keeps 29.
- The selection uses the scores in float32 (float64 for float64 inputs); the
  returned ``s`` is cast to x's dtype. A NaN score ranks above every number
  (as in ``torch.sort(descending=True)``); -0.0 ties with +0.0.
- The straight-through gate's forward is the plain gather bit for bit; its
  backward is that of ``x_sel * (1 + s_sel - s_sel.detach())``.
- ``s`` is differentiable too (its gradient reaches q and k).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from nasops.backend import resolve
from nasops.ops import reference
from nasops.ops._checks import accumulation_dtype, check_same_device, check_tensor, first_order_only
from nasops.ops._registry import kernel_for, unique_variants, variants

GATES = reference.TOKEN_GATES

_KERNELS = variants("topk_tokens", "topk_tokens", "topk_tokens_backward")


def topk_tokens(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, keep: int | float, *,
                keep_cls: bool = True, gate: str = "straight_through",
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``keep`` highest-scoring tokens of each sample.

    Args:
        x: (B, N, C) tokens (float16, bfloat16, float32 or float64).
        q, k: (B, N, D) their query and key projections, x's dtype and device.
        keep: tokens to keep, an int in [1, N] or a ratio in (0, 1]
            (max(1, floor(ratio * N))). With ``keep_cls`` the CLS token counts.
        keep_cls: always keep token 0 (the CLS token).
        gate: 'none' (plain gather), 'straight_through' (forward = gather,
            backward reaches q and k as if multiplied by 1 + s - s.detach()) or
            'sigmoid' (rows multiplied by sigmoid(s)).
        backend: 'auto' (default), 'cuda', 'triton', 'cpu' or 'eager'.

    Returns:
        x_sel (B, keep, C), idx (B, keep) int64 ascending, s (B, N) scores.
        Ties break to the lower token index.
    """
    check_tensor(x, "x", ndim=3)
    for name, t in (("q", q), ("k", k)):
        check_tensor(t, name, ndim=3)
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (that of x), got {t.dtype}")
        check_same_device(name, t, x, "x")
        if tuple(t.shape[:2]) != tuple(x.shape[:2]):
            raise ValueError(f"{name}: expected shape (B, N, D) with (B, N) = {tuple(x.shape[:2])} "
                             f"(that of x), got {tuple(t.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected shape {tuple(q.shape)} (that of q), got {tuple(k.shape)}")
    if q.shape[2] == 0:
        raise ValueError(f"q: expected D >= 1, got shape {tuple(q.shape)}")
    if not isinstance(keep_cls, bool):
        raise TypeError(f"keep_cls: expected a bool, got {type(keep_cls).__name__}")
    if not isinstance(gate, str) or gate not in GATES:
        raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
    keep = resolve_keep(keep, x.shape[1])

    name = resolve(backend, x.device)
    if name == "eager":
        return reference.topk_tokens(x, q, k, keep, keep_cls, gate)
    forward, _ = kernel_for(_KERNELS, name, "topk_tokens")
    x_sel, idx, s, _, _ = forward(x, q, k, keep, keep_cls, gate)
    return x_sel, idx, s


def resolve_keep(keep, n: int) -> int:
    """The number of kept tokens: an int in [1, n], or a ratio in (0, 1] of n."""
    if isinstance(keep, bool) or not isinstance(keep, Real):
        raise TypeError(f"keep: expected an int in [1, N={n}] or a float ratio in (0, 1], "
                        f"got {keep!r}")
    if isinstance(keep, Integral):
        if not 1 <= keep <= n:
            raise ValueError(f"keep: expected an int in [1, N={n}], got {keep}")
        return int(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep: expected a ratio in (0, 1], got {keep!r}")
    if n == 0:
        raise ValueError("keep: x has no tokens (N = 0), nothing to keep")
    return max(1, math.floor(keep * n + 1e-9))


# ---- registration: fake (meta) implementations and autograd --------------------

def _fake_forward(x, q, k, keep, keep_cls, gate):
    B, N, C = x.shape
    return (x.new_empty(B, keep, C), x.new_empty(B, keep, dtype=torch.long), x.new_empty(B, N),
            x.new_empty(B, q.shape[2], dtype=accumulation_dtype(x.dtype)),
            x.new_empty(B, N, dtype=torch.long))


def _fake_backward(grad_x_sel, grad_s, x, q, k, idx, k_mean, pos, gate, x_requires_grad,
                   qk_requires_grad):
    grad_x = x.new_empty(x.shape) if x_requires_grad else x.new_empty(0)
    grad_q = x.new_empty(q.shape) if qk_requires_grad else x.new_empty(0)
    grad_k = x.new_empty(k.shape) if qk_requires_grad else x.new_empty(0)
    return grad_x, grad_q, grad_k


def _setup_context(ctx, inputs, output):
    x, q, k, keep, keep_cls, gate = inputs
    _, idx, _, k_mean, pos = output
    ctx.gate = gate
    ctx.save_for_backward(x, q, k, idx, k_mean, pos)


def _make_backward(backward_op):
    @first_order_only("nasops.topk_tokens' kernels")
    def backward(ctx, grad_x_sel, grad_idx, grad_s, grad_k_mean, grad_pos):
        x, q, k, idx, k_mean, pos = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        need_q, need_k = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_x, grad_q, grad_k = backward_op(grad_x_sel, grad_s, x, q, k, idx, k_mean, pos, ctx.gate,
                                             need_x, need_q or need_k)
        return (grad_x if need_x else None, grad_q if need_q else None,
                grad_k if need_k else None, None, None, None)
    return backward


for _fwd, _bwd in unique_variants(_KERNELS):
    torch.library.register_fake(_fwd)(_fake_forward)
    torch.library.register_fake(_bwd)(_fake_backward)
    torch.library.register_autograd(_fwd, _make_backward(_bwd), setup_context=_setup_context)
