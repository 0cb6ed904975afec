"""Triton kernels of ``gather_rows`` / ``scatter_rows`` (SPEC 2.3):
``torch.ops.nasops.gather_rows_triton`` and ``torch.ops.nasops.scatter_rows_triton``,
same schemas as the compiled ops (csrc/ops.cpp).

Rows are moved as raw bits: each row is viewed as the widest integer words that
divide its size (8, 4, 2 or 1 bytes), so one kernel serves every dtype and
trailing shape, with wide loads. A program copies a [BLOCK_R rows, BLOCK_W
words] tile; gather reads row idx[r] and writes row r, scatter the reverse
into a zero-filled output (idx has no duplicates: checked by nasops.ops). A
program strides over the row's words when a row is wider than
_MAX_COLUMN_PROGRAMS blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nasops.backend import triton_interpreting
from nasops.triton import define_op

_INTERPRET = triton_interpreting()
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, idx_ptr, rows, W, targets, SCATTER: tl.constexpr,
                      STRIDED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    target = tl.load(idx_ptr + r, mask=row_ok, other=0)
    # nasops.ops checked idx before the launch (on the host, or with
    # torch._assert_async in a compiled graph); this is the device's own check
    # (active with TRITON_DEBUG=1), and whatever happens a bad entry is never
    # dereferenced: its gather row comes out zero, its scatter row is dropped.
    in_range = (target >= 0) & (target < targets)
    tl.device_assert(in_range | ~row_ok, "gather_rows/scatter_rows: an idx entry is outside [0, n)")
    read_ok = row_ok & in_range
    if SCATTER:
        src_row, dst_row, write_ok = r, target, read_ok
    else:
        src_row, dst_row, write_ok = target, r, row_ok
    # Grid axis 1 is capped (CUDA allows 65535 programs there): with STRIDED a
    # program strides over the row's words, 64-bit offsets since W may reach
    # 2^31; without, it copies one tile (fewer registers: a loop keeps the tile's
    # row offsets live).
    if STRIDED:
        for w0 in range(tl.program_id(1).to(tl.int64) * BLOCK_W, W, tl.num_programs(1).to(tl.int64) * BLOCK_W):
            _copy_tile(src_ptr, dst_ptr, src_row, dst_row, read_ok, write_ok, w0 + tl.arange(0, BLOCK_W), W)
    else:
        _copy_tile(src_ptr, dst_ptr, src_row, dst_row, read_ok, write_ok,
                   tl.program_id(1).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W), W)


@triton.jit
def _copy_tile(src_ptr, dst_ptr, src_row, dst_row, read_ok, write_ok, w, W):
    col_ok = (w < W)[None, :]
    v = tl.load(src_ptr + src_row[:, None] * W + w[None, :], mask=read_ok[:, None] & col_ok, other=0)
    tl.store(dst_ptr + dst_row[:, None] * W + w[None, :], v, mask=write_ok[:, None] & col_ok)


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous (rows, W) integer view of t's rows (rows = t.shape[0])."""
    t = t.contiguous()
    rows = t.shape[0]
    row_bytes = t.element_size() * (t.numel() // rows if rows else 0)
    offset_bytes = t.storage_offset() * t.element_size()
    width = next(w for w in (8, 4, 2, 1) if row_bytes % w == 0 and offset_bytes % w == 0)
    as_bytes = t.reshape(rows, -1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(rows, -1)
    return as_bytes.view(_WORDS[width])


# Programs along grid axis 1 (the words of a row) at most: CUDA's limit there is
# 65535; a row wider than this many blocks is strided over (1024 as rows.cu).
_MAX_COLUMN_PROGRAMS = 1024


def _launch_shape(rows: int, W: int) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK_R, BLOCK_W) of a copy of ``rows`` rows of ``W`` words."""
    block_w = min(triton.next_power_of_2(W), 16384 if _INTERPRET else 1024)
    block_r = max(1, (16384 if _INTERPRET else 2048) // block_w)
    grid = (triton.cdiv(rows, block_r), min(triton.cdiv(W, block_w), _MAX_COLUMN_PROGRAMS))
    return grid, block_r, block_w


def _launch(src_words, dst_words, idx, rows, targets, scatter):
    W = src_words.shape[1]
    if rows == 0 or W == 0:
        return
    grid, block_r, block_w = _launch_shape(rows, W)
    _copy_rows_kernel[grid](src_words, dst_words, idx, rows, W, targets, SCATTER=scatter,
                            STRIDED=grid[1] * block_w < W, BLOCK_R=block_r, BLOCK_W=block_w,
                            num_warps=1 if _INTERPRET else 4)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    idx = idx.contiguous()
    out = x.new_empty((idx.shape[0],) + tuple(x.shape[1:]))
    if out.numel() == 0:
        return out
    src = _as_words(x)
    _launch(src, out.view(-1).view(torch.uint8).view(src.dtype).view(out.shape[0], -1), idx,
            idx.shape[0], x.shape[0], scatter=False)
    return out


def scatter_rows(y: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    idx = idx.contiguous()
    out = y.new_zeros((n,) + tuple(y.shape[1:]))
    if y.numel() == 0:
        return out
    src = _as_words(y)
    _launch(src, out.view(-1).view(torch.uint8).view(src.dtype).view(n, -1), idx, idx.shape[0], n,
            scatter=True)
    return out


define_op("gather_rows_triton", "(Tensor x, Tensor idx) -> Tensor", gather_rows)
define_op("scatter_rows_triton", "(Tensor y, Tensor idx, int n) -> Tensor", scatter_rows)
