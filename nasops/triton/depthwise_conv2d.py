"""Triton kernels of ``depthwise_conv2d`` (the search step's ReLU -> depthwise
conv): ``torch.ops.nasops.depthwise_conv2d_triton`` and
``torch.ops.nasops.depthwise_conv2d_backward_triton``, same schemas as the
compiled ops (csrc/ops.cpp).

Why on the GPU: PyTorch runs DARTS' ``nn.ReLU`` -> ``nn.Conv2d(groups=C)`` as
a ReLU kernel whose output the convolution keeps for its backward, then the
convolution (cuDNN's or ATen's depthwise kernel), and in the backward two
gradient kernels plus the ReLU's. Here the ReLU is applied as x is read
(forward and weight gradient) and as the input gradient is written, so its
map is never written or kept (36 % of what a DARTS step keeps on the CUDA
path, benchmarks/RESULTS.md, "seventh round"), and a convolution is one
kernel forward, two plus a small sum backward.

Layouts: x contiguous (NCHW, what the driver runs on CUDA) or channels_last
(NHWC), read in place (the rule of nasops/ops/_layout.py: other strides are
copied once); y and grad x come back in x's layout, the output gradient is
copied into it if autograd hands it over in another.

Mapping: a program owns a [BLOCK_C channels, BLOCK_P pixels] tile of one
sample (pixels flattened row-major), the tile's long side along the layout's
contiguous dimension (pixels for NCHW, channels for NHWC: coalesced loads).
- forward: output pixels; for each of the KH*KW taps (unrolled, the geometry
  is compile-time) it loads the shifted input tile, applies the ReLU and
  accumulates tap weight * input.
- input gradient: input pixels; for each tap it gathers the output pixels that
  read this input pixel through that tap (at stride s only every s-th), sums
  grad * tap weight, and zeroes it where x <= 0 (torch.relu's gradient: 0 at
  x == 0, passed through at NaN).
- weight gradient: output pixels; per tap the tile's sum over pixels of
  grad * relu(shifted x), one value per channel, stored to a partial table
  (programs, C, taps) that one ``sum`` reduces: deterministic, no atomics.
Accumulation in float32 (float64 for float64 maps); results cast once, at the
store. Offsets within a sample are 32-bit (nasops.ops routes samples of 2^31
elements or more to PyTorch), the sample's base 64-bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nasops.backend import triton_interpreting
from nasops.ops._layout import is_nchw, kernel_channels_last, memory_format
from nasops.triton import define_op, on_device

# Elements of a program's tile. The interpreter runs each program instance in Python: bigger tiles.
_TILE = 16384 if triton_interpreting() else 1024
# Channels of a channels_last tile at most (the rest of the tile is pixels).
_MAX_TILE_CHANNELS = 64
# 8 warps: 4 elements of a 1024-element tile per thread. The unrolled taps keep
# every tap's load in flight; at 8 elements a thread a 5x5 kernel took ~250
# registers on sm_90, and float64 spilled (tests/triton_sm90.py --full).
_NUM_WARPS = 8
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_SAMPLE = 2**31 - 1  # elements of one sample the 32-bit offsets allow


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@triton.jit
def _tile(C, P, n_cblocks, n_pblocks, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """(sample, channels, pixels) of this program; consecutive programs walk the
    layout's contiguous dimension (pixels for NCHW, channels for NHWC)."""
    pid = tl.program_id(0)
    per_sample = n_cblocks * n_pblocks
    b = pid // per_sample
    r = pid % per_sample
    if CL:
        cb = r % n_cblocks
        pb = r // n_cblocks
    else:
        cb = r // n_pblocks
        pb = r % n_pblocks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, c, p, pb, c < C, p < P


@triton.jit
def _offsets(c, row, col, C, H, W, CL: tl.constexpr):
    """[BLOCK_C, BLOCK_P] offsets of channels ``c`` at pixels (``row``, ``col``)
    within one sample of a (C, H, W) map."""
    if CL:
        return (row * W + col)[None, :] * C + c[:, None]
    return c[:, None] * (H * W) + (row * W + col)[None, :]


@triton.jit
def _relu(v):
    # Not tl.maximum: torch.relu keeps NaN, and maximum's NaN rule is the hardware's.
    return tl.where(v < 0, 0, v)


@triton.jit
def _input_tap(x_base, c, c_ok, oh, ow, p_ok, C, H, W, kh: tl.constexpr, kw: tl.constexpr,
               SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
               DH: tl.constexpr, DW: tl.constexpr, RELU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_C, BLOCK_P]: the input (ReLU applied) that output pixels (oh, ow) read
    through tap (kh, kw); 0 in the padding."""
    ih = oh * SH - PH + kh * DH
    iw = ow * SW - PW + kw * DW
    ok = c_ok[:, None] & (p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[None, :]
    v = tl.load(x_base + _offsets(c, ih, iw, C, H, W, CL), mask=ok, other=0).to(ACC)
    if RELU:
        v = _relu(v)
    return v


@triton.jit
def _depthwise_forward_kernel(x_ptr, w_ptr, y_ptr, C, H, W, OH, OW, n_cblocks, n_pblocks,
                              KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                              PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                              RELU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b, c, p, pb, c_ok, p_ok = _tile(C, OH * OW, n_cblocks, n_pblocks, CL, BLOCK_C, BLOCK_P)
    oh = p // OW
    ow = p % OW
    x_base = x_ptr + b.to(tl.int64) * C * H * W
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            v = _input_tap(x_base, c, c_ok, oh, ow, p_ok, C, H, W, kh, kw, SH, SW, PH, PW, DH, DW, RELU, CL, ACC)
            tap = tl.load(w_ptr + c * (KH * KW) + (kh * KW + kw), mask=c_ok, other=0).to(ACC)
            acc += v * tap[:, None]
    y_base = y_ptr + b.to(tl.int64) * C * OH * OW
    tl.store(y_base + _offsets(c, oh, ow, C, OH, OW, CL), acc.to(y_ptr.dtype.element_ty),
             mask=c_ok[:, None] & p_ok[None, :])


@triton.jit
def _depthwise_input_grad_kernel(g_ptr, x_ptr, w_ptr, gx_ptr, C, H, W, OH, OW, n_cblocks, n_pblocks,
                                 KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                                 PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                                 RELU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b, c, p, pb, c_ok, p_ok = _tile(C, H * W, n_cblocks, n_pblocks, CL, BLOCK_C, BLOCK_P)
    ih = p // W
    iw = p % W
    g_base = g_ptr + b.to(tl.int64) * C * OH * OW
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for kh in tl.static_range(KH):
        # Output row oh reads input row oh*SH - PH + kh*DH: the one that reads ih
        # through tap kh is (ih + PH - kh*DH) / SH, when that divides exactly.
        th = ih + PH - kh * DH
        oh = tl.where(th >= 0, th, 0) // SH
        row_ok = p_ok & (th >= 0) & (th % SH == 0) & (oh < OH)
        for kw in tl.static_range(KW):
            tw = iw + PW - kw * DW
            ow = tl.where(tw >= 0, tw, 0) // SW
            ok = c_ok[:, None] & (row_ok & (tw >= 0) & (tw % SW == 0) & (ow < OW))[None, :]
            g = tl.load(g_base + _offsets(c, oh, ow, C, OH, OW, CL), mask=ok, other=0).to(ACC)
            tap = tl.load(w_ptr + c * (KH * KW) + (kh * KW + kw), mask=c_ok, other=0).to(ACC)
            acc += g * tap[:, None]
    ok = c_ok[:, None] & p_ok[None, :]
    offsets = b.to(tl.int64) * C * H * W + _offsets(c, ih, iw, C, H, W, CL)
    if RELU:
        # Compared in ACC: the interpreter holds bfloat16 as raw bits.
        x = tl.load(x_ptr + offsets, mask=ok, other=0).to(ACC)
        acc = tl.where(x <= 0, 0, acc)
    tl.store(gx_ptr + offsets, acc.to(gx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _depthwise_weight_grad_kernel(g_ptr, x_ptr, partial_ptr, C, H, W, OH, OW, n_cblocks, n_pblocks,
                                  KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                                  PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                                  RELU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b, c, p, pb, c_ok, p_ok = _tile(C, OH * OW, n_cblocks, n_pblocks, CL, BLOCK_C, BLOCK_P)
    oh = p // OW
    ow = p % OW
    g = tl.load(g_ptr + b.to(tl.int64) * C * OH * OW + _offsets(c, oh, ow, C, OH, OW, CL),
                mask=c_ok[:, None] & p_ok[None, :], other=0).to(ACC)
    x_base = x_ptr + b.to(tl.int64) * C * H * W
    # partial[(b, pixel block), c, tap]: this program's sums over its pixels.
    row = partial_ptr + (b.to(tl.int64) * n_pblocks + pb) * (KH * KW) * C
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            v = _input_tap(x_base, c, c_ok, oh, ow, p_ok, C, H, W, kh, kw, SH, SW, PH, PW, DH, DW, RELU, CL, ACC)
            tl.store(row + c * (KH * KW) + (kh * KW + kw), tl.sum(g * v, axis=1), mask=c_ok)


def _on_device(t: torch.Tensor):
    return on_device(t, "depthwise_conv2d")


def _tiling(C: int, P: int, channels_last: bool) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_P, channel blocks, pixel blocks) of a (C, P pixels) sample:
    the tile's long side along the layout's contiguous dimension."""
    if channels_last:
        block_c = min(_next_pow2(C), _MAX_TILE_CHANNELS)
        block_p = min(_next_pow2(P), max(1, _TILE // block_c))
    else:
        block_p = min(_next_pow2(P), _TILE)
        block_c = min(_next_pow2(C), max(1, _TILE // block_p))
    return block_c, block_p, -(-C // block_c), -(-P // block_p)


def _geometry(x, weight, stride, padding, dilation, relu_input):
    """The kernels' compile-time constants (and warps), and the output size."""
    KH, KW = weight.shape[2], weight.shape[3]
    OH = (x.shape[2] + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (x.shape[3] + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    if x.shape[1] * max(x.shape[2] * x.shape[3], OH * OW) > MAX_SAMPLE:
        raise ValueError(f"x: a sample of x or y over {MAX_SAMPLE} elements exceeds the kernels' 32-bit offsets")
    consts = dict(KH=KH, KW=KW, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
                  DH=dilation[0], DW=dilation[1], RELU=bool(relu_input),
                  ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, num_warps=_NUM_WARPS)
    return consts, OH, OW


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"weight: expected shape ({x.shape[1] if x.dim() == 4 else 'C'}, 1, KH, KW) for x "
                         f"(B, C, H, W), got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"x, weight: expected one float dtype, got {x.dtype} and {weight.dtype}")


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x read in place when contiguous or channels_last-dense, else copied; and
    whether the kernels walk it channels_last."""
    channels_last = kernel_channels_last([x])
    if not channels_last and not is_nchw(x):
        x = x.contiguous()
    return x, channels_last


def depthwise_forward(x, weight, stride, padding, dilation, relu_input):
    _check(x, weight)
    x, channels_last = _layout(x)
    consts, OH, OW = _geometry(x, weight, stride, padding, dilation, relu_input)
    B, C, H, W = x.shape
    y = torch.empty((B, C, OH, OW), dtype=x.dtype, device=x.device, memory_format=memory_format(channels_last))
    if y.numel() == 0:
        return y
    block_c, block_p, n_c, n_p = _tiling(C, OH * OW, channels_last)
    with _on_device(x):
        _depthwise_forward_kernel[(B * n_c * n_p,)](x, weight.contiguous(), y, C, H, W, OH, OW, n_c, n_p,
                                                    CL=channels_last, BLOCK_C=block_c, BLOCK_P=block_p, **consts)
    return y


def depthwise_backward(grad, x, weight, stride, padding, dilation, relu_input, x_requires_grad,
                       weight_requires_grad):
    _check(x, weight)
    x, channels_last = _layout(x)
    consts, OH, OW = _geometry(x, weight, stride, padding, dilation, relu_input)
    B, C, H, W = x.shape
    if tuple(grad.shape) != (B, C, OH, OW) or grad.device != x.device:
        raise ValueError(f"grad: expected shape {(B, C, OH, OW)} on {x.device}, got {tuple(grad.shape)} "
                         f"on {grad.device}")
    # Autograd may hand the gradient over in another layout: one copy into x's.
    g = grad.to(x.dtype).contiguous(memory_format=memory_format(channels_last))
    w = weight.contiguous()
    gx = torch.empty_like(x, memory_format=memory_format(channels_last)) if x_requires_grad else x.new_empty(0)
    gw = x.new_empty(0)
    if weight_requires_grad and g.numel() == 0:
        gw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if g.numel() == 0:
        if x_requires_grad:
            gx.zero_()
        return gx, gw
    with _on_device(x):
        if x_requires_grad:
            block_c, block_p, n_c, n_p = _tiling(C, H * W, channels_last)
            _depthwise_input_grad_kernel[(B * n_c * n_p,)](g, x, w, gx, C, H, W, OH, OW, n_c, n_p, CL=channels_last,
                                                           BLOCK_C=block_c, BLOCK_P=block_p, **consts)
        if weight_requires_grad:
            block_c, block_p, n_c, n_p = _tiling(C, OH * OW, channels_last)
            KH, KW = weight.shape[2], weight.shape[3]
            partial = torch.empty((B * n_p, C, KH * KW), dtype=_acc(x.dtype), device=x.device)
            _depthwise_weight_grad_kernel[(B * n_c * n_p,)](g, x, partial, C, H, W, OH, OW, n_c, n_p,
                                                            CL=channels_last, BLOCK_C=block_c, BLOCK_P=block_p,
                                                            **consts)
            gw = partial.sum(0).reshape(C, 1, KH, KW).to(weight.dtype)
    return gx, gw


# ---- registration (same schemas as csrc/ops.cpp's depthwise_conv2d / _backward) ---------

define_op("depthwise_conv2d_triton", "(Tensor x, Tensor weight, int[] stride, int[] padding, int[] dilation, "
          "bool relu_input) -> Tensor", depthwise_forward)
define_op("depthwise_conv2d_backward_triton", "(Tensor grad, Tensor x, Tensor weight, int[] stride, "
          "int[] padding, int[] dilation, bool relu_input, bool x_requires_grad, "
          "bool weight_requires_grad) -> (Tensor, Tensor)", depthwise_backward)
