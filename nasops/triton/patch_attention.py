"""Triton kernels of the patchwise softmax attention (SPEC 2.2).

Registers ``torch.ops.nasops.<op>_triton`` for patch_pool, patch_pool_backward,
patch_softmax_attention, patch_softmax_attention_backward and
patch_attention_outputs_backward, with the schemas of csrc/ops.cpp.

Kernels accumulate in the dtype of their accumulation-typed tensor (the pooled
output, the weights, q): float32, or float64 for float64 inputs (gradcheck).
The mosaic: patch row ph covers rows [ceil(ph*H/gh), ceil((ph+1)*H/gh)), which
is SPEC 2.1's floor(h*gh/H) == ph; columns likewise.

Maps are read in place when all are contiguous or all channels_last (the rule
of nasops/ops/_layout.py); the pool indexes them through their layout's
strides, and the elementwise kernels decode flat offsets in the layout's order
(CHANNELS_LAST) and write their results in it.

Launches pass only tensors, ints and float64-annotated scalars: the K maps or
gradients as a tuple of tensors (K pointer parameters; a table of pointers
would be a host-to-device copy per call, which also breaks CUDA-graph capture),
and 1 / sqrt(D), 1 / tau computed in the kernel in the accumulation dtype (a
Python float would arrive as float32, losing the float64 path's precision).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nasops.backend import triton_interpreting
from nasops.ops._layout import kernel_channels_last, memory_format
from nasops.triton import define_op

# The interpreter runs each program instance in Python: fewer, bigger blocks.
_ELEMENT_BLOCK = 8192 if triton_interpreting() else 1024
_ROW_BLOCK = 64 if triton_interpreting() else 16


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- patch_pool ------------------------------------------------------------------------

@triton.jit
def _pool_kernel(maps, out, C, H, W, M: tl.constexpr, stride_b, stride_c, stride_h, stride_w,
                 gh: tl.constexpr, gw: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    # One program: the patch means of BLOCK_C channels of one (b, p) of map m.
    # The M maps arrive as a tuple (M pointer parameters: no table to copy to the
    # device per call); program_id(2) picks one, unrolled over the M choices.
    bp = tl.program_id(0)
    m_id = tl.program_id(2)
    P = gh * gw
    b = bp // P
    p = bp % P
    ph = p // gw
    pw = p % gw
    r0 = (ph * H + gh - 1) // gh
    r1 = ((ph + 1) * H + gh - 1) // gh
    c0 = (pw * W + gw - 1) // gw
    c1 = ((pw + 1) * W + gw - 1) // gw
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = c0 + tl.arange(0, BLOCK_W)
    mask = (chans[:, None] < C) & (cols[None, :] < c1)
    offs = (b.to(tl.int64) * stride_b + chans[:, None].to(tl.int64) * stride_c
            + cols[None, :] * stride_w)
    acc_ty = out.dtype.element_ty
    count = ((r1 - r0) * (c1 - c0)).to(acc_ty)
    for m in tl.static_range(M):
        if m == m_id:
            total = tl.zeros([BLOCK_C, BLOCK_W], dtype=acc_ty)
            for h in range(r0, r1):
                total += tl.load(maps[m] + offs + h * stride_h, mask=mask, other=0.0).to(acc_ty)
            mean = tl.sum(total, axis=1) / count
            tl.store(out + ((b * P + p) * M + m) * C + chans, mean, mask=chans < C)


def patch_pool_triton(maps: list[torch.Tensor], grid: list[int]) -> torch.Tensor:
    B, C, H, W = maps[0].shape
    gh, gw = grid
    P, M = gh * gw, len(maps)
    out = torch.empty(B, P, M, C, device=maps[0].device, dtype=_acc(maps[0].dtype))
    if out.numel() == 0:
        return out
    channels_last = kernel_channels_last(maps)
    if channels_last:  # (b, c, h, w) at b*HWC + c + h*WC + w*C
        strides = (H * W * C, 1, W * C, C)
    else:
        maps = [x.contiguous() for x in maps]
        strides = (C * H * W, H * W, W, 1)
    block_w = triton.next_power_of_2(triton.cdiv(W, gw))
    block_c = min(triton.next_power_of_2(C), max(1, 4096 // block_w) if triton_interpreting() else 32)
    # All M maps in one launch, each read in place.
    _pool_kernel[(B * P, triton.cdiv(C, block_c), M)](
        tuple(maps), out, C, H, W, M, *strides, gh, gw, BLOCK_C=block_c, BLOCK_W=block_w)
    return out


# ---- patch_pool_backward and patch_attention_outputs_backward ------------------------------

@triton.jit
def _pixel_patch(offs, C, H, W, gh: tl.constexpr, gw: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """(b, p, c, |p|) of flat offsets into (B, C, H, W) (B, H, W, C when CHANNELS_LAST)."""
    if CHANNELS_LAST:
        c = offs % C
        w = (offs // C) % W
        h = (offs // (C * W)) % H
    else:
        w = offs % W
        h = (offs // W) % H
        c = (offs // (H * W)) % C
    b = offs // (C * H * W)
    ph = h * gh // H
    pw = w * gw // W
    rows = ((ph + 1) * H + gh - 1) // gh - (ph * H + gh - 1) // gh
    cols = ((pw + 1) * W + gw - 1) // gw - (pw * W + gw - 1) // gw
    return b, ph * gw + pw, c, rows * cols


@triton.jit
def _pool_backward_kernel(grad, out, N, C, H, W, gh: tl.constexpr, gw: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    b, p, c, count = _pixel_patch(offs, C, H, W, gh, gw, CHANNELS_LAST)
    g = tl.load(grad + (b * (gh * gw) + p) * C + c, mask=mask, other=0.0)
    tl.store(out + offs, (g / count.to(g.dtype)).to(out.dtype.element_ty), mask=mask)


def patch_pool_backward_triton(grad: torch.Tensor, grid: list[int], height: int, width: int,
                               dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    B, P, C = grad.shape
    out = torch.empty(B, C, height, width, device=grad.device, dtype=dtype,
                      memory_format=memory_format(channels_last))
    N = out.numel()
    if N:
        _pool_backward_kernel[(triton.cdiv(N, _ELEMENT_BLOCK),)](
            grad.contiguous(), out, N, C, height, width, grid[0], grid[1],
            CHANNELS_LAST=bool(channels_last), BLOCK=_ELEMENT_BLOCK)
    return out


@triton.jit
def _outputs_backward_kernel(grad, weights, grad_pooled, grad_outs, N, C, H, W, K: tl.constexpr,
                             gh: tl.constexpr, gw: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                             BLOCK: tl.constexpr):
    # grad o_k = w[b, p, k] * g + grad_pooled[b, p, k, c] / |p|: g read once for all K.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    b, p, c, count = _pixel_patch(offs, C, H, W, gh, gw, CHANNELS_LAST)
    acc_ty = weights.dtype.element_ty
    g = tl.load(grad + offs, mask=mask, other=0.0).to(acc_ty)
    inv_count = 1.0 / count.to(acc_ty)
    row = b * (gh * gw) + p
    for k in tl.static_range(K):
        wk = tl.load(weights + row * K + k, mask=mask, other=0.0)
        add = tl.load(grad_pooled + (row * K + k) * C + c, mask=mask, other=0.0)
        tl.store(grad_outs[k] + offs, (wk * g + add * inv_count).to(grad.dtype.element_ty), mask=mask)


def patch_attention_outputs_backward_triton(grad: torch.Tensor, weights: torch.Tensor,
                                            grad_pooled: torch.Tensor, grid: list[int]) -> list[torch.Tensor]:
    B, C, H, W = grad.shape
    K = weights.shape[2]
    # The gradients take grad's layout (the caller brings grad to the outputs' layout).
    channels_last = kernel_channels_last([grad])
    grads = [torch.empty(B, C, H, W, device=grad.device, dtype=grad.dtype,
                         memory_format=memory_format(channels_last)) for _ in range(K)]
    N = grad.numel()
    if N:
        _outputs_backward_kernel[(triton.cdiv(N, _ELEMENT_BLOCK),)](
            grad if channels_last else grad.contiguous(), weights.contiguous(), grad_pooled.contiguous(),
            tuple(grads), N, C, H, W, K, grid[0], grid[1], CHANNELS_LAST=channels_last,
            BLOCK=_ELEMENT_BLOCK)
    return grads


# ---- patch_softmax_attention -------------------------------------------------------------

@triton.jit
def _logit_scales(D, inv_tau, ACC: tl.constexpr):
    """(1 / sqrt(D), 1 / tau) in ACC. Triton passes a Python float as float32, so
    D arrives as an int and 1 / tau as a float64 parameter (an exact float64
    path); both are rounded to ACC here, as the CPU kernel does."""
    d = tl.full([], D, ACC)  # (not D.to: Triton passes D == 1 as a constant)
    if ACC == tl.float64:
        scale = 1.0 / tl.sqrt(d)
    else:
        scale = tl.div_rn(tl.full([], 1.0, ACC), tl.sqrt_rn(d))
    return scale, tl.full([], inv_tau, ACC)


@triton.jit
def _attention_kernel(q, k, prior, w, R, K, D, inv_tau: tl.float64, HAS_PRIOR: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    ds = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    scale, inv_tau = _logit_scales(D, inv_tau, q.dtype.element_ty)
    qv = tl.load(q + rows[:, None] * D + ds[None, :], mask=row_ok[:, None] & (ds[None, :] < D), other=0.0)
    k_mask = row_ok[:, None, None] & (ks[None, :, None] < K) & (ds[None, None, :] < D)
    kv = tl.load(k + (rows[:, None, None] * K + ks[None, :, None]) * D + ds[None, None, :],
                 mask=k_mask, other=0.0)
    logits = tl.sum(qv[:, None, :] * kv, axis=2) * scale
    if HAS_PRIOR:
        logits += tl.load(prior + ks, mask=ks < K, other=0.0)[None, :]
    a = tl.where(ks[None, :] < K, logits * inv_tau, float("-inf"))
    e = tl.exp(a - tl.max(a, axis=1)[:, None])
    out = e / tl.sum(e, axis=1)[:, None]
    tl.store(w + rows[:, None] * K + ks[None, :], out, mask=row_ok[:, None] & (ks[None, :] < K))


def _row_block(K: int, D: int) -> int:
    return max(1, min(_ROW_BLOCK, 8192 // (triton.next_power_of_2(K) * triton.next_power_of_2(D))))


def patch_softmax_attention_triton(q: torch.Tensor, k: torch.Tensor, prior: torch.Tensor | None,
                                   tau: float) -> torch.Tensor:
    B, P, K, D = k.shape
    w = torch.empty(B, P, K, device=q.device, dtype=q.dtype)
    R = B * P
    if R:
        block_r = _row_block(K, D)
        _attention_kernel[(triton.cdiv(R, block_r),)](
            q.contiguous(), k.contiguous(), prior.contiguous() if prior is not None else q, w, R, K, D,
            1.0 / tau, HAS_PRIOR=prior is not None, BLOCK_R=block_r,
            BLOCK_K=triton.next_power_of_2(K), BLOCK_D=triton.next_power_of_2(D))
    return w


@triton.jit
def _attention_backward_kernel(grad_w, w, q, k, grad_q, grad_k, grad_logits, R, K, D,
                               inv_tau: tl.float64, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    ds = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    scale, inv_tau = _logit_scales(D, inv_tau, q.dtype.element_ty)
    rk_mask = row_ok[:, None] & (ks[None, :] < K)
    rk = rows[:, None] * K + ks[None, :]
    wv = tl.load(w + rk, mask=rk_mask, other=0.0)
    gw = tl.load(grad_w + rk, mask=rk_mask, other=0.0)
    gl = wv * (gw - tl.sum(wv * gw, axis=1)[:, None]) * inv_tau  # d loss / d logits
    tl.store(grad_logits + rk, gl, mask=rk_mask)
    rd_mask = row_ok[:, None] & (ds[None, :] < D)
    qv = tl.load(q + rows[:, None] * D + ds[None, :], mask=rd_mask, other=0.0)
    k_mask = rk_mask[:, :, None] & (ds[None, None, :] < D)
    k_offs = rk[:, :, None] * D + ds[None, None, :]
    kv = tl.load(k + k_offs, mask=k_mask, other=0.0)
    g = gl * scale
    tl.store(grad_q + rows[:, None] * D + ds[None, :], tl.sum(g[:, :, None] * kv, axis=1), mask=rd_mask)
    tl.store(grad_k + k_offs, g[:, :, None] * qv[:, None, :], mask=k_mask)


def patch_softmax_attention_backward_triton(grad_w: torch.Tensor, w: torch.Tensor, q: torch.Tensor,
                                            k: torch.Tensor, tau: float, prior_requires_grad: bool):
    B, P, K, D = k.shape
    R = B * P
    grad_q = torch.empty(B, P, D, device=q.device, dtype=q.dtype)
    grad_k = torch.empty(B, P, K, D, device=q.device, dtype=q.dtype)
    grad_logits = torch.empty(R, K, device=q.device, dtype=q.dtype)
    if R:
        block_r = _row_block(K, D)
        _attention_backward_kernel[(triton.cdiv(R, block_r),)](
            grad_w.contiguous(), w.contiguous(), q.contiguous(), k.contiguous(), grad_q, grad_k,
            grad_logits, R, K, D, 1.0 / tau, BLOCK_R=block_r,
            BLOCK_K=triton.next_power_of_2(K), BLOCK_D=triton.next_power_of_2(D))
    grad_prior = grad_logits.sum(0) if prior_requires_grad else q.new_empty(0)
    return grad_q, grad_k, grad_prior


# ---- registration ----------------------------------------------------------------------------

_OPS = {
    "patch_pool_triton": ("(Tensor[] maps, int[] grid) -> Tensor", patch_pool_triton),
    "patch_pool_backward_triton": (
        "(Tensor grad, int[] grid, int height, int width, ScalarType dtype, bool channels_last=False) "
        "-> Tensor",
        patch_pool_backward_triton),
    "patch_softmax_attention_triton": (
        "(Tensor q, Tensor k, Tensor? prior, float tau) -> Tensor", patch_softmax_attention_triton),
    "patch_softmax_attention_backward_triton": (
        "(Tensor grad_w, Tensor w, Tensor q, Tensor k, float tau, bool prior_requires_grad) "
        "-> (Tensor, Tensor, Tensor)", patch_softmax_attention_backward_triton),
    "patch_attention_outputs_backward_triton": (
        "(Tensor grad, Tensor weights, Tensor grad_pooled, int[] grid) -> Tensor[]",
        patch_attention_outputs_backward_triton),
}
for _name, (_schema, _fn) in _OPS.items():
    define_op(_name, _schema, _fn)
