"""Eager references: the semantics of every op in plain PyTorch (SPEC 2).

These are the ``eager`` backend and the ground truth of the tests. They favour
clarity over speed, but they do accumulate like the kernels (float32, float64
for float64 inputs) and return the inputs' dtype.
"""
from __future__ import annotations

import torch

from nasops.ops._checks import accumulation_dtype


# ---- the mosaic partition (SPEC 2.1) --------------------------------------------

def patch_of(size: int, parts: int, device=None) -> torch.Tensor:
    """Patch row (or column) of every pixel row (or column): floor(i * parts / size)."""
    return torch.arange(size, device=device) * parts // size


def patch_map(height: int, width: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """(H, W) long tensor: the patch index p = ph * gw + pw of every pixel."""
    gh, gw = grid
    return patch_of(height, gh, device)[:, None] * gw + patch_of(width, gw, device)[None, :]


def patch_pool(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, P, C): the mean over each patch of the mosaic."""
    B, C, H, W = x.shape
    P = grid[0] * grid[1]
    acc = accumulation_dtype(x.dtype)
    index = patch_map(H, W, grid, x.device).reshape(-1)
    sums = torch.zeros(B, C, P, dtype=acc, device=x.device)
    sums.index_add_(2, index, x.reshape(B, C, H * W).to(acc))
    counts = torch.bincount(index, minlength=P).to(acc)
    return (sums / counts).transpose(1, 2).to(x.dtype)


# ---- mixed_op (SPEC 2.1) ------------------------------------------------------------

def mixed_op(outputs, weights: torch.Tensor, grid=None) -> torch.Tensor:
    """y = sum_k w_k * o_k, weights (K,), (B, K) or (B, P, K); ``None`` = Zero op.

    Arguments are assumed valid (nasops.ops.mixed_op checks them).
    """
    live = [(k, o) for k, o in enumerate(outputs) if o is not None]
    ref = live[0][1]
    acc = accumulation_dtype(ref.dtype)
    w = weights.to(acc)
    if w.dim() == 3 and ref.dim() == 4:  # per patch of a feature map: paint the mosaic
        w = w[:, patch_map(ref.shape[2], ref.shape[3], grid, ref.device)]  # (B, H, W, K)
        w = w.permute(0, 3, 1, 2).unsqueeze(2)  # (B, K, 1, H, W)
        per_op = [w[:, k] for k, _ in live]
    elif w.dim() == 3:  # per token of (B, N, C)
        per_op = [w[:, :, k, None] for k, _ in live]
    elif w.dim() == 2:  # per sample
        per_op = [w[:, k].reshape((-1,) + (1,) * (ref.dim() - 1)) for k, _ in live]
    else:
        per_op = [w[k] for k, _ in live]
    y = sum(wk * o.to(acc) for wk, (_, o) in zip(per_op, live))
    return y.to(ref.dtype)


# ---- patchwise softmax attention over architecture weights (SPEC 2.2) -----------------

def patch_softmax_attention(q: torch.Tensor, k: torch.Tensor, prior=None, tau: float = 1.0) -> torch.Tensor:
    """w = softmax_k((q . k_k / sqrt(D) + prior_k) / tau): q (B, P, D), k (B, P, K, D) -> (B, P, K)."""
    acc = accumulation_dtype(q.dtype)
    logits = torch.einsum("bpd,bpkd->bpk", q.to(acc), k.to(acc)) / q.shape[-1] ** 0.5
    if prior is not None:
        logits = logits + prior.to(acc)
    return torch.softmax(logits / tau, dim=-1).to(q.dtype)


def patch_attention_mixed_op(x, outputs, Wq, Wk, grid, prior=None, tau: float = 1.0, zero_key=None):
    """MIDAS edge: (y, w) with w the per-patch softmax attention over the K ops.

    q = patch_pool(x) @ Wq, k_k = patch_pool(o_k) @ Wk (``zero_key``, or zeros,
    for a ``None`` op), w = patch_softmax_attention(q, k, prior, tau) in the
    accumulation dtype, y = mixed_op(outputs, w, grid). Arguments are assumed
    valid (nasops.ops.patch_attention_mixed_op checks them).
    """
    acc = accumulation_dtype(x.dtype)
    q = patch_pool(x, grid).to(acc) @ Wq.to(acc)  # (B, P, D)
    B, P, D = q.shape
    keys = []
    for o in outputs:
        if o is not None:
            keys.append(patch_pool(o, grid).to(acc) @ Wk.to(acc))
        elif zero_key is not None:
            keys.append(zero_key.to(acc).expand(B, P, D))
        else:
            keys.append(q.new_zeros(B, P, D))
    w = patch_softmax_attention(q, torch.stack(keys, dim=2), prior, tau)
    return mixed_op(outputs, w, grid), w


# ---- topk_tokens, gather_rows, scatter_rows (SPEC 2.3) ----------------------------

TOKEN_GATES = ("none", "straight_through", "sigmoid")


def token_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, N) scores s_i = q_i . mean_j(k_j) / sqrt(D), in the accumulation dtype.

    Equal to the DASViT mean over j of q_i . k_j / sqrt(D), in O(N*D). The
    division and the square root are correctly rounded, as in every kernel.
    """
    acc = accumulation_dtype(q.dtype)
    k_mean = k.to(acc).mean(dim=1)  # (B, D)
    # Divided by sqrt(D) as a tensor on q's device, not by a Python float: CUDA
    # torch multiplies by the reciprocal of a host scalar divisor, which rounds
    # differently from the kernels' dot / sqrt(D) and could break near-ties.
    sqrt_d = torch.full((), q.shape[-1], dtype=acc, device=q.device).sqrt()
    return (q.to(acc) @ k_mean.unsqueeze(-1)).squeeze(-1) / sqrt_d


def select_tokens(s: torch.Tensor, keep: int, keep_cls: bool) -> torch.Tensor:
    """(B, keep) int64 indices of the kept tokens, ascending.

    Highest scores win; a stable descending sort breaks ties to the lower index
    (and ranks NaN above every number). With ``keep_cls`` token 0 is kept
    whatever its score and the other keep - 1 come from tokens 1..N-1.
    """
    first = 1 if keep_cls else 0
    order = torch.sort(s[:, first:], dim=1, descending=True, stable=True).indices
    chosen = order[:, :keep - first] + first
    if keep_cls:
        chosen = torch.cat([chosen.new_zeros(chosen.shape[0], 1), chosen], dim=1)
    return torch.sort(chosen, dim=1).values


class _StraightThroughGate(torch.autograd.Function):
    """rows * (1 + s - s.detach()): the rows unchanged forward, d/ds = the rows backward.

    Why a Function and not that expression: its forward is x + x * (s - s), which
    is NaN for a kept token whose score is +-inf or NaN, or whose row holds an inf
    (a float16 overflow), where the gate must give the plain gather (SPEC 2.3).
    """

    @staticmethod
    def forward(ctx, rows, s_sel):
        ctx.save_for_backward(rows)
        return rows.clone()

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        acc = accumulation_dtype(rows.dtype)
        grad_s = (grad.to(acc) * rows.to(acc)).sum(-1, keepdim=True) if ctx.needs_input_grad[1] else None
        return grad, grad_s


def topk_tokens(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, keep: int, keep_cls: bool,
                gate: str):
    """(x_sel (B, keep, C), idx (B, keep) int64 ascending, s (B, N)); differentiable.

    Arguments are assumed valid (nasops.ops.topk_tokens checks them); ``keep`` is
    an int. The straight-through gate is :class:`_StraightThroughGate`.
    """
    acc = accumulation_dtype(x.dtype)
    s = token_scores(q, k)
    idx = select_tokens(s.detach(), keep, keep_cls)
    rows = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    s_sel = torch.gather(s, 1, idx).unsqueeze(-1)
    if gate == "straight_through":
        rows = _StraightThroughGate.apply(rows, s_sel)
    elif gate == "sigmoid":
        rows = (rows.to(acc) * torch.sigmoid(s_sel)).to(x.dtype)
    return rows, idx, s.to(x.dtype)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[idx] along dim 0."""
    return x.index_select(0, idx)


def scatter_rows(y: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Zeros (n, *y.shape[1:]) with rows idx set to y (idx without duplicates)."""
    out = y.new_zeros((n,) + tuple(y.shape[1:]))
    return out.index_copy(0, idx, y)


# ---- depthwise_conv2d (the search step's depthwise convolutions) ---------------------

def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                     relu_input: bool) -> torch.Tensor:
    """conv2d(relu(x) if relu_input else x, weight, groups=C): DARTS' ReLU then
    depthwise ``nn.Conv2d``, as its code writes them."""
    return torch.nn.functional.conv2d(torch.relu(x) if relu_input else x, weight, stride=stride,
                                      padding=padding, dilation=dilation, groups=x.shape[1])
