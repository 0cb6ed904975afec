"""Triton kernels of ``topk_tokens`` (SPEC 2.3): ``torch.ops.nasops.topk_tokens_triton``
and ``torch.ops.nasops.topk_tokens_backward_triton``, same schemas and canonical
shapes as the compiled ops (csrc/ops.cpp).

Forward, two launches:
  1. ``_select_kernel``, one program per sample: k_mean (a pass over k), the N
     scores (a pass over q, stored in the accumulation dtype to a scratch row),
     then the selection of the whole row inside the program. The scores become
     unsigned keys whose order is the numeric order (-0 == +0, NaN highest);
     a radix select, most significant bit first (one masked count over the
     row per key bit: 32, or 64 for float64), gives the keep-th largest key t;
     kept = key > t, plus the lowest-index tokens with key == t until keep is
     reached (a cumsum over the ties), plus token 0 with keep_cls. A cumsum
     over the kept mask gives each kept token its place, so the indices come
     out ascending with no sort at all. (Not ``tl.topk``, which returns values
     only under the interpreter, nor ``tl.sort``, whose bitonic network runs
     element by element in the interpreter: 15 s for N = 4096.) The row is
     padded to a power of two, so N is limited only by the registers of one
     program (tested to 4096).
  2. ``_gather_kernel``: BLOCK_R kept rows per program, copied (gates none and
     straight_through) or scaled by sigmoid(s) from the scratch scores.
Backward, two launches:
  3. ``_rows_backward_kernel`` over all B*N token rows: grad_x (the kept row's
     gradient times its gate, or zeros, each row written once: no memset) and,
     for kept rows, d(loss)/d(s_i) through the gate, added to the gradient of
     the returned s into one (B, N) accumulation-dtype row;
  4. ``_qk_backward_kernel``, one program per sample: grad_q = g_s k_mean /
     sqrt(D) and grad_k = sum_i g_s,i q_i / (N sqrt(D)) (the same for every j).
Accumulation in float32 (float64 for float64 inputs); no atomics, so results
are reproducible. Scores are dot / sqrt(D) with a correctly rounded square
root and division (``_token_score``), as in the CPU and CUDA kernels and the
eager reference; no Python float reaches a kernel (Triton would pass it as
float32). Under TRITON_INTERPRET=1 the row tiles are large (the
interpreter runs every program in Python).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nasops.backend import triton_interpreting
from nasops.triton import define_op

_INTERPRET = triton_interpreting()
_GATES = {"none": 0, "straight_through": 1, "sigmoid": 2}


@triton.jit
def _order_key(score, IS_F64: tl.constexpr):
    """Unsigned keys in the order of the scores; -0 == +0; NaN above every number.

    Every real key is >= 1 (0 would need a negative NaN, canonicalized away), so
    0 marks a token that is not a candidate.
    """
    score = tl.where(score == 0, 0.0, score)
    # XOR with all ones, not ~bits: Triton 3.8's interpreter builds ~'s all-ones
    # constant as -1 in an unsigned NumPy array, which NumPy 2 refuses.
    if IS_F64:
        bits = score.to(tl.uint64, bitcast=True)
        key = tl.where(bits >= 0x8000000000000000, bits ^ 0xFFFFFFFFFFFFFFFF, bits | 0x8000000000000000)
        key = tl.where(score != score, 0xFFFFFFFFFFFFFFFF, key)
    else:
        bits = score.to(tl.uint32, bitcast=True)
        key = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
        key = tl.where(score != score, 0xFFFFFFFF, key)
    return key


@triton.jit
def _div_rn(a, b):
    """a / b correctly rounded: Triton's float32 ``/`` is an approximate division
    on the GPU (div.full.f32, up to 2 ulp), float64's is exact (div.rn.f64)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _token_score(dot, D, ACC: tl.constexpr):
    """dot / sqrt(D) in ACC, correctly rounded at each step: the one expression of
    a token score in every backend (the CPU and CUDA kernels, the eager
    reference), so that near-ties select the same tokens everywhere."""
    d = tl.full([], D, ACC)  # (not D.to: Triton passes D == 1 as a constant)
    if ACC == tl.float64:
        return dot / tl.sqrt(d)
    else:
        return tl.div_rn(dot, tl.sqrt_rn(d))


@triton.jit
def _select_kernel(q_ptr, k_ptr, s_ptr, score_ptr, k_mean_ptr, idx_ptr, pos_ptr,
                   N, D, keep, want,
                   KEEP_CLS: tl.constexpr, IS_F64: tl.constexpr, KEY_BITS: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    tokens = tl.arange(0, BLOCK_T)
    base = b * N * D

    k_sum = tl.zeros([BLOCK_D], dtype=ACC)
    for t0 in range(0, N, BLOCK_T):
        t = t0 + tokens
        tile = tl.load(k_ptr + base + t[:, None] * D + cols[None, :],
                       mask=(t < N)[:, None] & col_ok[None, :], other=0.0)
        k_sum += tl.sum(tile.to(ACC), axis=0)
    k_mean = _div_rn(k_sum, tl.full([BLOCK_D], N, ACC))
    tl.store(k_mean_ptr + b * D + cols, k_mean, mask=col_ok)

    for t0 in range(0, N, BLOCK_T):
        t = t0 + tokens
        tile = tl.load(q_ptr + base + t[:, None] * D + cols[None, :],
                       mask=(t < N)[:, None] & col_ok[None, :], other=0.0)
        score = _token_score(tl.sum(tile.to(ACC) * k_mean[None, :], axis=1), D, ACC)
        tl.store(score_ptr + b * N + t, score, mask=t < N)
        tl.store(s_ptr + b * N + t, score.to(s_ptr.dtype.element_ty), mask=t < N)
    tl.debug_barrier()  # the whole row of scores is read back by every thread

    offs = tl.arange(0, BLOCK_N)
    score = tl.load(score_ptr + b * N + offs, mask=offs < N, other=0.0)
    candidate = (offs < N) & (offs >= (1 if KEEP_CLS else 0))
    key = _order_key(score, IS_F64)
    key = tl.where(candidate, key, tl.zeros_like(key))
    # Radix select, most significant bit first: the largest threshold with at
    # least `want` candidate keys >= it is the want-th largest key.
    threshold = tl.full([], 0, key.dtype)
    bit = tl.full([], 1, key.dtype) << (KEY_BITS - 1)
    for _ in range(KEY_BITS):
        trial = threshold | bit
        count = tl.sum((key >= trial).to(tl.int32), axis=0)
        threshold = tl.where(count >= want, trial, threshold)
        bit = bit >> 1
    above = key > threshold
    tied = key == threshold
    need = want - tl.sum(above.to(tl.int32), axis=0)
    tie_rank = tl.cumsum(tied.to(tl.int32), axis=0)  # ties go to the lower index
    kept = above | (tied & (tie_rank <= need))  # want = 0: threshold = max, nothing
    if KEEP_CLS:
        kept = kept | (offs == 0)
    place = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    tl.store(idx_ptr + b * keep + place, offs.to(tl.int64), mask=kept)
    tl.store(pos_ptr + b * N + offs, tl.where(kept, place, -1).to(tl.int64), mask=offs < N)


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, score_ptr, out_ptr, rows, N, C, keep,
                   SIGMOID: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    token = tl.load(idx_ptr + r, mask=row_ok, other=0)
    src = (r // keep) * N + token
    if SIGMOID:
        score = tl.load(score_ptr + src, mask=row_ok, other=0.0)
        gate = 1.0 / (1.0 + tl.exp(-score))
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (c < C)[None, :]
        v = tl.load(x_ptr + src[:, None] * C + c[None, :], mask=mask)
        if SIGMOID:
            v = (v.to(ACC) * gate[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * C + c[None, :], v, mask=mask)


@triton.jit
def _rows_backward_kernel(grad_y_ptr, grad_s_ptr, x_ptr, q_ptr, k_mean_ptr, pos_ptr,
                          grad_x_ptr, grad_score_ptr, rows, N, C, D, keep,
                          GATE: tl.constexpr, NEED_X: tl.constexpr, NEED_QK: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # token rows b*N + i
    row_ok = r < rows
    b = r // N
    place = tl.load(pos_ptr + r, mask=row_ok, other=-1)
    kept = row_ok & (place >= 0)
    src = b * keep + place
    gate = tl.full([BLOCK_R], 1.0, ACC)
    slope = tl.full([BLOCK_R], 1.0, ACC)  # d gate / d s; 1 for straight-through
    if GATE == 2:
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        qr = tl.load(q_ptr + r[:, None] * D + d[None, :], mask=kept[:, None] & d_ok[None, :], other=0.0)
        km = tl.load(k_mean_ptr + b[:, None] * D + d[None, :], mask=kept[:, None] & d_ok[None, :],
                     other=0.0)
        gate = 1.0 / (1.0 + tl.exp(-_token_score(tl.sum(qr.to(ACC) * km, axis=1), D, ACC)))
        slope = gate * (1.0 - gate)
    dot = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = (c < C)[None, :]
        g = tl.load(grad_y_ptr + src[:, None] * C + c[None, :], mask=kept[:, None] & c_ok,
                    other=0.0).to(ACC)
        if NEED_X:
            tl.store(grad_x_ptr + r[:, None] * C + c[None, :],
                     (g * gate[:, None]).to(grad_x_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok)
        if NEED_QK and GATE != 0:
            xv = tl.load(x_ptr + r[:, None] * C + c[None, :], mask=kept[:, None] & c_ok, other=0.0)
            dot += tl.sum(g * xv.to(ACC), axis=1)
    if NEED_QK:
        gs = tl.load(grad_s_ptr + r, mask=row_ok, other=0.0).to(ACC)
        tl.store(grad_score_ptr + r, gs + dot * slope, mask=row_ok)


@triton.jit
def _qk_backward_kernel(grad_score_ptr, q_ptr, k_mean_ptr, grad_q_ptr, grad_k_ptr, N, D,
                        ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    tokens = tl.arange(0, BLOCK_T)
    base = b * N * D
    k_mean = tl.load(k_mean_ptr + b * D + cols, mask=col_ok, other=0.0)
    grad_k_mean = tl.zeros([BLOCK_D], dtype=ACC)
    for t0 in range(0, N, BLOCK_T):
        t = t0 + tokens
        mask = (t < N)[:, None] & col_ok[None, :]
        g = _token_score(tl.load(grad_score_ptr + b * N + t, mask=t < N, other=0.0), D, ACC)
        tl.store(grad_q_ptr + base + t[:, None] * D + cols[None, :],
                 (g[:, None] * k_mean[None, :]).to(grad_q_ptr.dtype.element_ty), mask=mask)
        qt = tl.load(q_ptr + base + t[:, None] * D + cols[None, :], mask=mask, other=0.0)
        grad_k_mean += tl.sum(g[:, None] * qt.to(ACC), axis=0)
    grad_k_row = (grad_k_mean / N).to(grad_k_ptr.dtype.element_ty)
    for t0 in range(0, N, BLOCK_T):
        t = t0 + tokens
        tl.store(grad_k_ptr + base + t[:, None] * D + cols[None, :],
                 tl.broadcast_to(grad_k_row[None, :], [BLOCK_T, BLOCK_D]),
                 mask=(t < N)[:, None] & col_ok[None, :])


# ---- launchers ----------------------------------------------------------------------------

def _acc(dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _gate_id(gate: str) -> int:
    if gate not in _GATES:
        raise ValueError(f"gate: expected one of {tuple(_GATES)}, got {gate!r}")
    return _GATES[gate]


def _token_tile(D: int) -> tuple[int, int]:
    """(BLOCK_T tokens, BLOCK_D) tiles of q and k: about 4096 elements (16384 interpreted)."""
    block_d = triton.next_power_of_2(max(D, 1))
    budget = 16384 if _INTERPRET else 4096
    return max(1, budget // block_d), block_d


def _row_tile(C: int) -> tuple[int, int]:
    """(BLOCK_R rows, BLOCK_C columns) of the row kernels."""
    if _INTERPRET:
        block_c = triton.next_power_of_2(max(C, 1))
        return max(1, 16384 // block_c), block_c
    return 4, min(triton.next_power_of_2(max(C, 1)), 512)


def topk_tokens_forward(x, q, k, keep: int, keep_cls: bool, gate: str):
    gate_id = _gate_id(gate)
    B, N, C = x.shape
    D = q.shape[2]
    if not (1 <= keep <= N):
        raise ValueError(f"keep: expected an int in [1, N={N}], got {keep}")
    x, q, k = x.contiguous(), q.contiguous(), k.contiguous()
    acc_torch, acc_tl = _acc(x.dtype)
    x_sel = x.new_empty(B, keep, C)
    idx = x.new_empty(B, keep, dtype=torch.long)
    s = x.new_empty(B, N)
    k_mean = x.new_empty(B, D, dtype=acc_torch)
    pos = x.new_empty(B, N, dtype=torch.long)
    if B == 0:
        return x_sel, idx, s, k_mean, pos
    scores = x.new_empty(B, N, dtype=acc_torch)
    block_t, block_d = _token_tile(D)
    block_n = triton.next_power_of_2(N)
    _select_kernel[(B,)](q, k, s, scores, k_mean, idx, pos, N, D, keep, keep - int(keep_cls),
                         KEEP_CLS=keep_cls, IS_F64=x.dtype == torch.float64,
                         KEY_BITS=64 if x.dtype == torch.float64 else 32,
                         ACC=acc_tl, BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d,
                         num_warps=1 if _INTERPRET else (4 if block_n <= 1024 else 8))
    if C:
        block_r, block_c = _row_tile(C)
        rows = B * keep
        _gather_kernel[(triton.cdiv(rows, block_r),)](
            x, idx, scores, x_sel, rows, N, C, keep, SIGMOID=gate_id == 2, ACC=acc_tl,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=1 if _INTERPRET else 4)
    return x_sel, idx, s, k_mean, pos


def topk_tokens_backward(grad_x_sel, grad_s, x, q, k, idx, k_mean, pos, gate: str,
                         x_requires_grad: bool, qk_requires_grad: bool):
    gate_id = _gate_id(gate)
    B, N, C = x.shape
    D = q.shape[2]
    keep = idx.shape[1]
    x, q = x.contiguous(), q.contiguous()
    acc_torch, acc_tl = _acc(x.dtype)
    grad_x = x.new_empty(x.shape) if x_requires_grad else x.new_empty(0)
    grad_q = x.new_empty(q.shape) if qk_requires_grad else x.new_empty(0)
    grad_k = x.new_empty(k.shape) if qk_requires_grad else x.new_empty(0)
    if B == 0 or N == 0 or not (x_requires_grad or qk_requires_grad):
        return grad_x, grad_q, grad_k
    grad_y = grad_x_sel.to(x.dtype).contiguous()
    grad_s = grad_s.contiguous()
    k_mean = k_mean.to(acc_torch).contiguous()
    pos = pos.contiguous()
    grad_score = x.new_empty(B, N, dtype=acc_torch)
    block_r, block_c = _row_tile(C)
    block_t, block_d = _token_tile(D)
    rows = B * N
    _rows_backward_kernel[(triton.cdiv(rows, block_r),)](
        grad_y, grad_s, x, q, k_mean, pos, grad_x, grad_score, rows, N, C, D, keep,
        GATE=gate_id, NEED_X=x_requires_grad, NEED_QK=qk_requires_grad, ACC=acc_tl,
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d,
        num_warps=1 if _INTERPRET else 4)
    if qk_requires_grad:
        _qk_backward_kernel[(B,)](grad_score, q, k_mean, grad_q, grad_k, N, D,
                                  ACC=acc_tl, BLOCK_T=block_t, BLOCK_D=block_d,
                                  num_warps=1 if _INTERPRET else 4)
    return grad_x, grad_q, grad_k


define_op("topk_tokens_triton", "(Tensor x, Tensor q, Tensor k, int keep, bool keep_cls, str gate) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", topk_tokens_forward)
define_op("topk_tokens_backward_triton", "(Tensor grad_x_sel, Tensor grad_s, Tensor x, Tensor q, "
          "Tensor k, Tensor idx, Tensor k_mean, Tensor pos, str gate, bool x_requires_grad, "
          "bool qk_requires_grad) -> (Tensor, Tensor, Tensor)", topk_tokens_backward)
