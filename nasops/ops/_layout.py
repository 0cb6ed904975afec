"""Memory layouts of (B, C, H, W) maps: contiguous (NCHW) or channels_last (NHWC).

Every kernel of nasops reads the maps it is given in place when they are all
contiguous or all channels_last, and returns its results (and, backward, the
gradients of those maps) in that same layout; any other strides are made
contiguous first. :func:`kernel_channels_last` is that rule, shared by the
Triton launchers and the fake (meta) implementations; the C++ and CUDA kernels
apply the same rule (``channels_last_order`` in csrc/layout.h).

The public ops call :func:`common_layout` first, so that a list of maps in
mixed layouts (a channels_last network whose odd op returns a contiguous
tensor, e.g. RobustDARTS's noise) reaches the kernels in one layout: the
majority's, with a copy of each odd one out (a differentiable copy, so its
gradient comes back in its own layout).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def is_nchw(t: torch.Tensor) -> bool:
    return t.is_contiguous()


def is_nhwc(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def kernel_channels_last(maps: Sequence[torch.Tensor]) -> bool:
    """Whether the kernels walk ``maps`` (one shape) in channels_last order: all of
    them are channels_last-dense and not all are contiguous too (both hold when
    C == 1 or H*W == 1, where the two orders are the same memory).

    Lists, not generators, inside all(): torch.compile 2.14 fails a fullgraph
    trace that leaves a generator unfinished (all() stops at the first False)
    once an autograd.Function was traced ("generator already executing")."""
    return all([is_nhwc(t) for t in maps]) and not all([is_nchw(t) for t in maps])


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def layout_of(maps: Sequence[torch.Tensor]) -> torch.memory_format:
    """The memory format the kernels give their results for ``maps``."""
    return memory_format(kernel_channels_last(maps))


def empty_like_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An empty tensor of ``t``'s shape, dtype and device in the given layout
    (``torch.empty_like``'s preserve_format would keep arbitrary dense strides)."""
    return torch.empty_like(t, memory_format=memory_format(channels_last))


def common_layout(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """``maps`` (4-D, one shape) in one layout the kernels read in place.

    The layout is the one most of the maps already have (channels_last or
    contiguous; on a tie, that of the first map having either); maps in the
    other layout, or with other strides, are copied into it. Nothing is copied
    when the maps already agree.
    """
    if kernel_channels_last(maps) or all([is_nchw(t) for t in maps]):  # lists: kernel_channels_last
        return maps
    nhwc = sum(is_nhwc(t) and not is_nchw(t) for t in maps)
    nchw = sum(is_nchw(t) and not is_nhwc(t) for t in maps)
    if nhwc == nchw:
        first = next(iter([t for t in maps if is_nhwc(t) != is_nchw(t)]), None)
        channels_last = first is not None and is_nhwc(first)
    else:
        channels_last = nhwc > nchw
    fmt = memory_format(channels_last)
    return [t.contiguous(memory_format=fmt) for t in maps]
