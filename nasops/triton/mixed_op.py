"""Triton kernels of ``mixed_op`` (SPEC 2.1): ``torch.ops.nasops.mixed_op_triton``
and ``torch.ops.nasops.mixed_op_backward_triton``, same schemas and canonical
shapes as the compiled ops (csrc/ops.cpp):

- ``outputs``: K tensors (B, C, H, W), one dtype (f16/bf16/f32/f64);
- ``weights``: (Bw, P = gh*gw, K), Bw in {1, B}, float32 (float64 for f64 outputs);
- ``grid``: [gh, gw]; pixel (h, w) uses patch (h*gh//H)*gw + (w*gw//W).

Reading the K outputs in place
    The K tensors are passed as ONE tuple argument (Triton >= 3.3 lowers a tuple
    of tensors to K pointer parameters, each with its own 16-byte-alignment
    specialization, so loads stay vectorized) and walked with
    ``tl.static_range(K)``. Nothing is stacked or copied (a non-contiguous entry
    is made contiguous first, nothing else is). K is a compile-time constant: one
    compiled variant per K, any K >= 1 (tested to 20); no chunking is needed.
    The tuple works identically under ``TRITON_INTERPRET=1`` on CPU tensors.

channels_last
    When every output is channels_last-dense (and they are not all contiguous
    too: the rule every backend shares, nasops/ops/_layout.py), the kernels
    read them in place in that order, and y and the gradients of the outputs
    are channels_last. A sample is then one plane of
    H rows of W*C elements: the P == 1 path is the same (a sample is C*H*W
    consecutive elements either way), and the P > 1 path runs with C = 1,
    W = W*C and PIXEL = C, PIXEL being the elements of a row that share one
    pixel column (1 for contiguous maps). Any other strides are made
    contiguous first.

Accumulation
    In the weights' dtype: float32, or float64 for float64 outputs (gradcheck).
    Results are cast to the outputs' dtype once, at the store.

Mapping, P == 1 (per edge (1, 1, K) or per sample (B, 1, K)): the fast path
    A sample's C*H*W elements are contiguous and share one weight per op, so a
    program owns BLOCK contiguous elements of one sample (grid = B * cdiv(CHW,
    BLOCK), 1D) and loads the K weights as scalars; per-edge weights treat the
    whole batch as one sample. Forward reads K*N and writes
    N; nothing else. Backward reads g once, then per op writes w_k*g (if the
    outputs need grad) and, if the weights need grad, reads o_k and reduces
    g*o_k over its block to one scalar, stored to partial[b, block, k]. A second
    tiny reduction (``partial.sum``: B * cdiv(CHW, BLOCK) * K values, i.e.
    K/BLOCK of the data) gives grad w; for per-edge weights (Bw = 1) it also sums
    over the batch, so the whole-tensor reduction is one pass over N plus a sum
    of a few thousand floats.

Mapping, P > 1 (per patch; per token after the (B, 1, N, C) view with grid (N, 1))
    Patch row ph covers pixel rows [ceil(ph*H/gh), ceil((ph+1)*H/gh)): within a
    channel those rows are ONE contiguous segment of L = rows*W elements. A
    program owns a 2D tile [BLOCK_C channels, BLOCK_HW positions of that segment]
    of one sample b and one patch row ph (grid = B * gh * cdiv(C, BLOCK_C) *
    cdiv(max L, BLOCK_HW), 1D), so b and ph are scalars and only the patch column
    pw = (w*gw)//W varies, per position: the K weight vectors w[b, ph*gw + pw, k]
    are gathered once per program (from cache) and broadcast over the channels
    (scalars when gw == 1, e.g. per-token weights).
    Backward reduces g*o_k over the tile's channels first (a [BLOCK_HW] column
    sum), then into the gw patch columns with a [BLOCK_HW, GW_PAD] one-hot sum
    (cheap: gw is small next to BLOCK_C*BLOCK_HW work), storing partial[b, ph,
    part, pw, k]; summing over the parts (and the batch, for Bw = 1) gives
    (Bw, gh*gw, K) exactly, whatever the grid: patches of unequal size (a grid
    that does not divide the map) are exact, since each program knows its own
    rows and columns. H, W, gh and gw are compile-time constants (one compiled
    variant per map size and grid, a handful per network): the index maths
    becomes multiply-shift and the alignment of every row segment is known.

Determinism
    No atomics: every partial sum has one writer, and the second stage is a
    fixed-order ``torch.sum``; results are bitwise reproducible run to run.
    This also makes autotuning safe (benchmark runs only overwrite partials).

Traffic (N = B*C*H*W elements of s bytes, K live ops)
    forward  K*N*s read + N*s written: the SPEC floor;
    backward N*s (g) + K*N*s (o_k, only when weights need grad) read, K*N*s
    (grad o_k, only when outputs need grad) written, plus the partials:
    B*cdiv(CHW, BLOCK)*K (P == 1) or B*gh*parts*gw*K (P > 1) accumulator values
    written and read once, below 1% of the data at the benchmark shapes. E.g.
    (64, 16, 32, 32) fp32, K = 8: forward 36 MiB (~11 us at the H100's
    3.35 TB/s), backward 68 MiB (~21 us); partials 32 KiB.

Blocks, tiles and vector loads (GPU)
    Forward P == 1 autotunes BLOCK in {1024, 2048, 4096} x num_warps {4, 8}.
    Backward P == 1 blocks and all P > 1 tiles hold _MAX_TILE = 4096 elements,
    halved down to 1024 until the grid has ~4 programs per SM; num_warps is
    autotuned ({4, 8}, and {2, 4, 8} for the small tiles of P > 1). Loads and
    stores are 16-byte vectors (checked in the sm_90 PTX for f32/f16/bf16/f64)
    when C*H*W is a multiple of 16 (P == 1) or W a multiple of 16 bytes' worth
    of elements (P > 1; narrower vectors for smaller powers of two in W); an
    odd W (7x7 maps) with a grid falls back to scalar, still coalesced, loads.
    Host side, a launch costs the tensor checks (~1 us
    per op) plus Triton's launcher: at DARTS-edge sizes (tens of us of GPU
    time) that overhead matters, and the compiled CUDA backend avoids it.

Tuning
    Under ``TRITON_INTERPRET=1`` each kernel has exactly one config and tiles of
    16384 elements (the interpreter pays ~0.3 ms per Triton op per program, so
    fewer, bigger programs). Backward block sizes are chosen by the launcher,
    not the autotuner, because the number of partial sums (allocated before the
    launch) depends on them.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from nasops.backend import triton_interpreting
from nasops.ops._layout import empty_like_layout, kernel_channels_last
from nasops.triton import define_op, on_device

_INTERPRET = triton_interpreting()
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    # Plain Python: triton.cdiv / triton.next_power_of_2 cost ~4 us each per call.
    return 1 << max(n - 1, 0).bit_length()


def _configs(blocks, warps):
    """Autotune candidates; one config under the interpreter (more would fail there)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK": blocks[-1]} if blocks else {}, num_warps=4)]
    return [triton.Config({"BLOCK": b} if b else {}, num_warps=w) for b in (blocks or [None]) for w in warps]


# ---- P == 1: one weight per (sample, op); blocks of one sample's C*H*W ------------------

@triton.jit
def _flat_block_offsets(pid, CHW, BLOCK: tl.constexpr):
    """(sample, offsets, mask) of program ``pid``'s block. The mask compares the
    position in the block with what is left of the sample, never a sum that
    could pass 2^31 - 1: the offsets of live lanes stay below CHW < 2^31."""
    blocks_per_sample = tl.cdiv(CHW, BLOCK)
    b = pid // blocks_per_sample
    start = (pid % blocks_per_sample) * BLOCK
    lane = tl.arange(0, BLOCK)
    return b, start + lane, lane < CHW - start


@triton.autotune(configs=_configs([1024, 2048, 4096], [4, 8]), key=["CHW", "K"])
@triton.jit
def _forward_flat(outs, w_ptr, y_ptr, CHW, w_batch_stride,
                  K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b, offs, mask = _flat_block_offsets(pid, CHW, BLOCK)
    base = b.to(tl.int64) * CHW
    acc = tl.zeros([BLOCK], dtype=w_ptr.dtype.element_ty)
    for k in tl.static_range(K):
        wk = tl.load(w_ptr + b * w_batch_stride + k)
        o = tl.load(outs[k] + base + offs, mask=mask, other=0.0)
        acc += o.to(acc.dtype) * wk
    tl.store(y_ptr + base + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs([], [4, 8]), key=["CHW", "K", "NEED_GO", "NEED_GW"])
@triton.jit
def _backward_flat(g_ptr, outs, grad_outs, w_ptr, partial_ptr, CHW, w_batch_stride,
                   K: tl.constexpr, BLOCK: tl.constexpr,
                   NEED_GO: tl.constexpr, NEED_GW: tl.constexpr):
    pid = tl.program_id(0)
    b, offs, mask = _flat_block_offsets(pid, CHW, BLOCK)
    base = b.to(tl.int64) * CHW
    acc_t = w_ptr.dtype.element_ty
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(acc_t)
    for k in tl.static_range(K):
        if NEED_GO:
            wk = tl.load(w_ptr + b * w_batch_stride + k)
            tl.store(grad_outs[k] + base + offs, (g * wk).to(grad_outs[k].dtype.element_ty), mask=mask)
        if NEED_GW:
            o = tl.load(outs[k] + base + offs, mask=mask, other=0.0).to(acc_t)
            tl.store(partial_ptr + pid.to(tl.int64) * K + k, tl.sum(g * o, axis=0))


# ---- P > 1: tiles [channels, positions] of one (sample, patch row) --------------------

@triton.jit
def _patch_tile(pid, C, n_cblocks, n_chunks, H: tl.constexpr, W: tl.constexpr, GH: tl.constexpr,
                GW: tl.constexpr, PIXEL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Decode a program id into its sample, patch row and tile (see module docstring)."""
    chunk = pid % n_chunks
    t = pid // n_chunks
    cblock = t % n_cblocks
    t = t // n_cblocks
    ph = t % GH
    b = t // GH
    row0 = (ph * H + GH - 1) // GH          # first pixel row of patch row ph
    row1 = ((ph + 1) * H + GH - 1) // GH    # one past its last
    j = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)   # position in the segment of rows
    valid_j = j < (row1 - row0) * W
    pw = (j % W) // PIXEL * GW // (W // PIXEL)   # patch column of each position
    c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    offs = c[:, None] * (H * W) + (row0 * W + j)[None, :]
    mask = (c < C)[:, None] & valid_j[None, :]
    part = cblock * n_chunks + chunk
    return b, ph, pw, valid_j, offs, mask, part


@triton.jit
def _tile_weight(w_ptr, row_offset, pw, valid_j, k, GW: tl.constexpr, K: tl.constexpr):
    """w[b, ph*GW + pw, k] at the tile's positions, shaped to broadcast over its channels
    (``row_offset`` locates w[b, ph*GW, 0])."""
    if GW == 1:  # one patch per row (per token, or a (gh, 1) grid): a scalar
        return tl.load(w_ptr + row_offset + k)
    else:
        return tl.load(w_ptr + row_offset + pw * K + k, mask=valid_j, other=0.0)[None, :]


@triton.autotune(configs=_configs([], [2, 4, 8]),
                 key=["C", "H", "W", "GH", "GW", "PIXEL", "K", "BLOCK_C", "BLOCK_HW"])
@triton.jit
def _forward_patch(outs, w_ptr, y_ptr, C, n_cblocks, n_chunks, w_batch_stride,
                   H: tl.constexpr, W: tl.constexpr, GH: tl.constexpr, GW: tl.constexpr,
                   PIXEL: tl.constexpr, K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    b, ph, pw, valid_j, offs, mask, _ = _patch_tile(
        tl.program_id(0), C, n_cblocks, n_chunks, H, W, GH, GW, PIXEL, BLOCK_C, BLOCK_HW)
    base = b.to(tl.int64) * C * H * W
    w_row = b * w_batch_stride + ph * GW * K
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=w_ptr.dtype.element_ty)
    for k in tl.static_range(K):
        wk = _tile_weight(w_ptr, w_row, pw, valid_j, k, GW, K)
        o = tl.load(outs[k] + base + offs, mask=mask, other=0.0)
        acc += o.to(acc.dtype) * wk
    tl.store(y_ptr + base + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs([], [2, 4, 8]),
                 key=["C", "H", "W", "GH", "GW", "PIXEL", "K", "BLOCK_C", "BLOCK_HW", "NEED_GO", "NEED_GW"])
@triton.jit
def _backward_patch(g_ptr, outs, grad_outs, w_ptr, partial_ptr, C, n_cblocks, n_chunks, w_batch_stride,
                    H: tl.constexpr, W: tl.constexpr, GH: tl.constexpr, GW: tl.constexpr,
                    PIXEL: tl.constexpr, K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                    GW_PAD: tl.constexpr, NEED_GO: tl.constexpr, NEED_GW: tl.constexpr):
    b, ph, pw, valid_j, offs, mask, part = _patch_tile(
        tl.program_id(0), C, n_cblocks, n_chunks, H, W, GH, GW, PIXEL, BLOCK_C, BLOCK_HW)
    base = b.to(tl.int64) * C * H * W
    acc_t = w_ptr.dtype.element_ty
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(acc_t)
    # partial[b, ph, part, pw, k]: (B, GH, n_cblocks * n_chunks, GW, K)
    cols = tl.arange(0, GW_PAD)
    partial_row = partial_ptr + (((b * GH + ph).to(tl.int64) * (n_cblocks * n_chunks) + part) * GW + cols) * K
    in_column = (pw[:, None] == cols[None, :]) & valid_j[:, None]   # [BLOCK_HW, GW_PAD] one-hot
    w_row = b * w_batch_stride + ph * GW * K
    for k in tl.static_range(K):
        if NEED_GO:
            wk = _tile_weight(w_ptr, w_row, pw, valid_j, k, GW, K)
            tl.store(grad_outs[k] + base + offs, (g * wk).to(grad_outs[k].dtype.element_ty), mask=mask)
        if NEED_GW:
            o = tl.load(outs[k] + base + offs, mask=mask, other=0.0).to(acc_t)
            per_position = tl.sum(g * o, axis=0)                     # over the tile's channels
            per_column = tl.sum(tl.where(in_column, per_position[:, None], 0.0), axis=0)
            tl.store(partial_row + k, per_column, mask=cols < GW)


# ---- launchers -----------------------------------------------------------------------

def _canonical(outputs, weights, grid, read_outputs=True):
    """Validate the canonical arguments (csrc/ops.cpp) and bring the outputs to one
    layout the kernels walk (see the module docstring: channels_last).

    Returns (outputs, weights, (B, C, H, W), (gh, gw), pixel, channels_last, w_batch_stride)
    with (C, H, W) and pixel in memory order: (1, H, W*C) and C for channels_last.
    Outputs that are not read (``read_outputs=False``) are not copied.
    """
    if len(outputs) == 0:
        raise ValueError("outputs: expected at least one tensor, got an empty list")
    ref = outputs[0]
    if ref.dim() != 4 or ref.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"outputs[0]: expected a floating (B, C, H, W) tensor, got "
                         f"{ref.dtype} of shape {tuple(ref.shape)}")
    for k, o in enumerate(outputs):
        if o.shape != ref.shape or o.dtype != ref.dtype or o.device != ref.device:
            raise ValueError(f"outputs[{k}]: expected {ref.dtype} {tuple(ref.shape)} on {ref.device} "
                             f"(as outputs[0]), got {o.dtype} {tuple(o.shape)} on {o.device}")
    B, C, H, W = ref.shape
    if len(grid) != 2 or not (1 <= grid[0] <= H and 1 <= grid[1] <= W):
        raise ValueError(f"grid: expected [gh, gw] with 1 <= gh <= {H}, 1 <= gw <= {W}, got {list(grid)}")
    gh, gw = grid
    K = len(outputs)
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    if (weights.dim() != 3 or weights.shape[0] not in (1, B) or weights.shape[1] != gh * gw
            or weights.shape[2] != K):
        raise ValueError(f"weights: expected shape (1 or {B}, {gh * gw}, {K}), got {tuple(weights.shape)}")
    if weights.dtype != acc or weights.device != ref.device:
        raise ValueError(f"weights: expected {acc} on {ref.device}, got {weights.dtype} on {weights.device}")
    # Offsets are 32-bit within a sample: a live lane's offset is below C*H*W, and
    # the P > 1 tiles' positions reach at most one tile (_MAX_TILE) beyond it.
    if C * H * W > _MAX_SAMPLE:
        raise ValueError(f"outputs: one sample has {C * H * W} elements; at most {_MAX_SAMPLE} supported")
    channels_last = kernel_channels_last(outputs)
    if channels_last or not read_outputs:
        outs = tuple(outputs)
    else:
        outs = tuple(o.contiguous() for o in outputs)
    weights = weights.contiguous()
    # A batch of one sample and per-sample weights index like per-edge weights.
    w_batch_stride = weights.shape[1] * K if weights.shape[0] > 1 else 0
    if channels_last:
        return outs, weights, (B, 1, H, W * C), (gh, gw), C, True, w_batch_stride
    return outs, weights, (B, C, H, W), (gh, gw), 1, False, w_batch_stride


def _on_device(t: torch.Tensor):
    return on_device(t, "mixed_op")


# Elements per program of the backward P == 1 blocks and of the P > 1 tiles, at most:
# big in the interpreter, which pays per program. A module attribute so that tests
# can shrink it to exercise many programs per sample on tiny shapes.
_MAX_TILE = 16384 if _INTERPRET else 4096
_MIN_TILE = 1024
# The largest sample (C*H*W elements) the 32-bit offsets allow (see _canonical).
_MAX_SAMPLE = 2**31 - 1 - 16384


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile_elements(total: int, device: torch.device) -> int:
    """The largest tile (_MAX_TILE down to _MIN_TILE) that still gives every SM
    about four programs, so that small problems keep the whole GPU busy."""
    tile = _MAX_TILE
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        while tile > _MIN_TILE and total < target * tile:
            tile //= 2
    return tile


def _flat_samples(B: int, chw: int, weights: torch.Tensor) -> tuple[int, int]:
    """(samples, elements per sample) of the P == 1 path: per-edge weights treat the
    whole batch as one sample (no partly filled block at each sample's end)."""
    if weights.shape[0] == 1 and B * chw <= _MAX_SAMPLE:
        return 1, B * chw
    return B, chw


def _flat_block(chw: int, tile: int) -> int:
    """Backward block of the P == 1 path: the tile, but not much bigger than a sample."""
    return min(tile, max(256, _next_pow2(chw)))


@functools.lru_cache(maxsize=1024)
def _patch_tiling(C, H, W, gh, tile):
    """(BLOCK_C, BLOCK_HW, n_cblocks, n_chunks) for the P > 1 path: a tile of about
    ``tile`` elements over a patch row's contiguous segment, whole channels first."""
    max_rows = max(-(-(ph + 1) * H // gh) - (-(-ph * H // gh)) for ph in range(gh))
    segment = max_rows * W
    block_hw = min(_next_pow2(segment), tile)
    block_c = min(_next_pow2(C), max(1, tile // block_hw))
    return block_c, block_hw, _cdiv(C, block_c), _cdiv(segment, block_hw)


def mixed_op_forward(outputs: list[torch.Tensor], weights: torch.Tensor, grid: list[int]) -> torch.Tensor:
    outs, w, (B, C, H, W), (gh, gw), pixel, channels_last, w_batch_stride = \
        _canonical(outputs, weights, grid)
    y = empty_like_layout(outs[0], channels_last)
    if y.numel() == 0:
        return y
    K = len(outs)
    with _on_device(y):
        if gh * gw == 1:
            samples, chw = _flat_samples(B, C * H * W, w)
            _forward_flat[lambda meta: (samples * _cdiv(chw, meta["BLOCK"]),)](
                outs, w, y, chw, w_batch_stride, K=K)
        else:
            tile = _tile_elements(y.numel(), y.device)
            block_c, block_hw, n_cblocks, n_chunks = _patch_tiling(C, H, W, gh, tile)
            _forward_patch[(B * gh * n_cblocks * n_chunks,)](
                outs, w, y, C, n_cblocks, n_chunks, w_batch_stride,
                H=H, W=W, GH=gh, GW=gw, PIXEL=pixel, K=K, BLOCK_C=block_c, BLOCK_HW=block_hw)
    return y


def mixed_op_backward(grad: torch.Tensor, outputs: list[torch.Tensor], weights: torch.Tensor,
                      grid: list[int], outputs_requires_grad: bool, weights_requires_grad: bool):
    outs, w, (B, C, H, W), (gh, gw), pixel, channels_last, w_batch_stride = \
        _canonical(outputs, weights, grid, read_outputs=weights_requires_grad)
    if grad.shape != outs[0].shape or grad.device != outs[0].device:
        raise ValueError(f"grad: expected shape {tuple(outs[0].shape)} on {outs[0].device}, "
                         f"got {tuple(grad.shape)} on {grad.device}")
    # A gradient in the other layout is copied once (autograd decides its layout).
    g = grad.to(outs[0].dtype).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    K = len(outs)
    grad_outs = [empty_like_layout(g, channels_last) for _ in outs] if outputs_requires_grad else []
    if not weights_requires_grad:
        grad_w = weights.new_empty(0)
    elif g.numel() == 0:
        return grad_outs, weights.new_zeros(weights.shape)  # contiguous, as below
    if g.numel() == 0 or not (outputs_requires_grad or weights_requires_grad):
        return grad_outs, grad_w
    # Unused pointer arguments get a harmless stand-in (their stores are compiled out).
    grad_out_ptrs = tuple(grad_outs) if outputs_requires_grad else outs
    flags = dict(K=K, NEED_GO=bool(outputs_requires_grad), NEED_GW=bool(weights_requires_grad))
    tile = _tile_elements(g.numel(), g.device)
    with _on_device(g):
        if gh * gw == 1:
            samples, chw = _flat_samples(B, C * H * W, w)
            block = _flat_block(chw, tile)
            n_blocks = _cdiv(chw, block)
            partial = torch.empty((samples, n_blocks, K), dtype=w.dtype, device=g.device) \
                if weights_requires_grad else w
            _backward_flat[(samples * n_blocks,)](g, outs, grad_out_ptrs, w, partial, chw, w_batch_stride,
                                            BLOCK=block, **flags)
            if weights_requires_grad:  # per-edge weights also sum over the batch
                grad_w = partial.sum((0, 1) if w.shape[0] == 1 else 1, keepdim=True)  # (Bw, 1, K)
        else:
            block_c, block_hw, n_cblocks, n_chunks = _patch_tiling(C, H, W, gh, tile)
            parts = n_cblocks * n_chunks
            partial = torch.empty((B, gh, parts, gw, K), dtype=w.dtype, device=g.device) \
                if weights_requires_grad else w
            _backward_patch[(B * gh * parts,)](
                g, outs, grad_out_ptrs, w, partial, C, n_cblocks, n_chunks, w_batch_stride,
                H=H, W=W, GH=gh, GW=gw, PIXEL=pixel, BLOCK_C=block_c, BLOCK_HW=block_hw,
                GW_PAD=_next_pow2(gw), **flags)
            if weights_requires_grad:
                grad_w = partial.sum((0, 2) if w.shape[0] == 1 else 2).reshape(w.shape)  # (Bw, P, K)
    return grad_outs, grad_w


# ---- registration (same schemas as csrc/ops.cpp's mixed_op / mixed_op_backward) ---------

define_op("mixed_op_triton", "(Tensor[] outputs, Tensor weights, int[] grid) -> Tensor", mixed_op_forward)
define_op("mixed_op_backward_triton", "(Tensor grad, Tensor[] outputs, Tensor weights, int[] grid, "
          "bool outputs_requires_grad, bool weights_requires_grad) -> (Tensor[], Tensor)", mixed_op_backward)
