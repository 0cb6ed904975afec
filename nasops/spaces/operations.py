"""Candidate operations of the DARTS, RobustDARTS and NAS-Bench-201 cells.

The DARTS ops follow ``darts/cnn/operations.py`` of the DARTS paper code (Liu et
al., 2019): ReLU-Conv-BN order, separable convs applied twice, dilated convs
once, ``skip_connect`` = identity or FactorizedReduce on stride-2 edges. The
NB201 ops follow ``xautodl/models/cell_operations.py`` (Dong & Yang, 2020).

The Zero op (``none``) has no module here: a cell passes ``None`` to
:func:`nasops.ops.mixed_op` for it, so nothing is computed for it at all
(``make_darts_op`` / ``make_nb201_op`` return ``None``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import nasops.ops
from nasops.backend import check_backend_name, extension_loaded, get_backend
from nasops.ops import reference
from nasops.ops._checks import first_order_only
from nasops.ops.depthwise_conv2d import PlannedDepthwiseConv2d
from nasops.spaces.base import RecomputableEdge, _autocast, _autocast_state, _wanted_input_grads

DARTS_OPS = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
# RobustDARTS S4 adds a harmful op: the search must learn to avoid it.
RDARTS_EXTRA_OPS = ("noise",)

NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")


def batch_norm(C: int, affine: bool) -> nn.BatchNorm2d:
    """The BatchNorm of an op: ``nn.BatchNorm2d`` with affine parameters (a
    trained network's), :class:`AffineFreeBatchNorm2d` without (a search network's)."""
    return nn.BatchNorm2d(C) if affine else AffineFreeBatchNorm2d(C)


class AffineFreeBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d(C, affine=False)`` whose training backward keeps its
    output instead of its input.

    Why: without affine parameters the output y *is* the normalised input
    the backward needs (dx = invstd * (dy - mean(dy) - y * mean(dy * y))), and
    the op after a BatchNorm keeps y anyway (the next depthwise conv in a
    SepConv, the mixed sum after an op's last BatchNorm), while PyTorch's
    BatchNorm keeps its input, the pointwise conv's output, for nothing else.
    Keeping y frees that map: 6 of the 18 maps a DARTS edge's convolutions keep
    for the backward (benchmarks/RESULTS.md, "seventh round").

    The op ``torch.ops.nasops.affine_free_batch_norm`` (csrc/batch_norm.cpp, a
    C++ autograd node: a Python autograd.Function cost ~30 us a call, 2-3 % of
    a CPU search step). Same forward (``native_batch_norm``, the kernel
    F.batch_norm calls for an affine-free layer on the CPU and on CUDA, where
    cuDNN's needs affine parameters), same state dict, same running
    statistics. The backward is ``native_batch_norm_backward`` on y with zero
    mean, unit invstd and invstd as the weight: the same formula, with x^ read
    from y instead of recomputed from x (equal up to rounding; under autocast
    y has the half-precision input's dtype, as x had). Used when the layer
    trains on an input that needs a gradient, outside torch.compile (whose
    partitioner decides itself what a compiled graph keeps), with ``nasops._C``
    built and a backend other than ``eager`` (plain PyTorch, as a NAS paper's
    code runs it); everything else is ``nn.BatchNorm2d``'s forward. No double
    backward: its derivative in x would need invstd's, which the backward does
    not have (the op refuses one by name; the eager backend's is PyTorch's).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 track_running_stats: bool = True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False,
                         track_running_stats=track_running_stats)

    def forward(self, x):
        if (not (self.training and torch.is_grad_enabled() and x.requires_grad)
                or torch.compiler.is_compiling() or not extension_loaded() or get_backend() == "eager"):
            return super().forward(x)
        self._check_input_dim(x)
        # nn.BatchNorm2d's update rule (momentum None: a cumulative average)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return torch.ops.nasops.affine_free_batch_norm(x, *running, momentum, self.eps)


def use_torch_batch_norm(net: nn.Module) -> int:
    """Replace every :class:`AffineFreeBatchNorm2d` in ``net`` by ``nn.BatchNorm2d(affine=False)``
    with the same state: the search network as it ran before them, for comparisons
    (benchmarks/bench_search_step.py's ``nasops-torch-bn``, the tests). Returns the
    number of layers replaced."""
    replaced = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not AffineFreeBatchNorm2d:
                continue
            torch_bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, affine=False,
                                      track_running_stats=child.track_running_stats)
            if child.running_mean is not None:  # the statistics' device and dtype
                torch_bn.to(child.running_mean)
            torch_bn.load_state_dict(child.state_dict())
            torch_bn.train(child.training)
            setattr(module, name, torch_bn)
            replaced += 1
    return replaced


class ReLUConvBN(nn.Module):
    """ReLU -> Conv -> BN (the DARTS preprocessing and conv building block).
    ``relu``: the input's ReLU shared with other ops (nasops.spaces.base.SharedReLU)."""

    takes_shared_relu = True

    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True, conv_bias=False):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=conv_bias),
            batch_norm(C_out, affine),
        )

    def forward(self, x, relu=None):
        if relu is None:
            return self.op(x)
        _, conv, bn = self.op
        return bn(conv(relu()))


class ReLUDepthwiseConv2d(nn.Conv2d):
    """ReLU -> depthwise conv (no bias), DARTS' ``nn.ReLU`` + ``nn.Conv2d(C, C, k,
    groups=C, bias=False)`` as one op: :func:`nasops.ops.depthwise_conv2d` with
    ``relu_input``, which never materialises the ReLU's map (on the CPU and Triton kernels).
    The same weight, initialisation and values as the two modules.

    ``backend``: the op's backend for this layer alone (None: the process's
    choice, ``nasops.set_backend`` or 'auto'); :func:`use_depthwise_backend`
    sets it on a whole network."""

    backend: str | None = None

    def __init__(self, C, kernel_size, stride=1, padding=0, dilation=1):
        super().__init__(C, C, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=C,
                         bias=False)

    def forward(self, x, relu=None):
        """``relu``: x's ReLU shared with other ops (nasops.spaces.base.SharedReLU),
        convolved where PyTorch's convolution runs; a nasops kernel reads x."""
        if relu is None:
            return nasops.ops.depthwise_conv2d(x, self.weight, stride=self.stride, padding=self.padding,
                                               dilation=self.dilation, relu_input=True, backend=self.backend)
        planned = self.planned(x)  # checked once, whichever path runs
        if planned.kernels is None:
            stride, padding, dilation, _ = planned.geometry
            return reference.depthwise_conv2d(relu(), self.weight, stride, padding, dilation, relu_input=False)
        return planned.apply(x, self.weight)

    def planned(self, x) -> PlannedDepthwiseConv2d:
        """The layer's convolution planned for tensors like ``x``."""
        return PlannedDepthwiseConv2d(x, self.weight, stride=self.stride, padding=self.padding,
                                      dilation=self.dilation, relu_input=True, backend=self.backend)


def use_depthwise_backend(net: nn.Module, backend: str | None) -> int:
    """Run every :class:`ReLUDepthwiseConv2d` of ``net`` on ``backend`` (None: the
    process's choice again), the other ops as they are: e.g. the Triton depthwise
    kernels, which 'auto' does not pick on CUDA, beside the CUDA mixed sums
    (benchmarks/bench_search_step.py's ``nasops-graphs-triton-dw``). Returns the
    number of layers set."""
    if backend is not None:
        check_backend_name(backend, "backend")
    layers = [m for m in net.modules() if isinstance(m, ReLUDepthwiseConv2d)]
    for m in layers:
        m.backend = backend
    return len(layers)


class _ReadsUnfusedStateDicts(nn.Module):
    """Loads state dicts written before ReLU and depthwise conv were fused
    (nasops before 2026-12-03), whose ``op`` Sequential held a parameter-free
    ``nn.ReLU`` in front of each depthwise conv: their ``op.<i>`` keys are
    renumbered (``UNFUSED_INDEX``: old index -> new), so checkpoints of
    searches started before still resume."""

    UNFUSED_INDEX: dict[int, int] = {}
    UNFUSED_MARK = -1  # an op index only the old layout has

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = f"{prefix}op.{self.UNFUSED_MARK}."
        if any(k.startswith(old) for k in state_dict):
            for old_index, new_index in sorted(self.UNFUSED_INDEX.items()):
                head = f"{prefix}op.{old_index}."
                for key in [k for k in state_dict if k.startswith(head)]:
                    state_dict[f"{prefix}op.{new_index}.{key[len(head):]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _SeparableOp(_ReadsUnfusedStateDicts):
    """An op whose ``op`` Sequential holds (ReLUDepthwiseConv2d, 1x1 conv) pairs:
    SepConv and DilConv.

    ``recompute_depthwise`` (off by default; :func:`set_recompute_depthwise`,
    ``--recompute-depthwise``): each pair keeps its input for the backward, not
    the depthwise convolution's output, which the pointwise convolution would
    keep, and computes that output again in the backward
    (:class:`_DepthwisePointwise`). Why: the depthwise outputs are half the maps
    a SepConv keeps (b1 and b2 of b1, d, b2, g; DilConv: b of b, g), and a
    depthwise convolution is the cheapest layer of the op to compute again (no
    pointwise convolution or BatchNorm runs twice, unlike ``--recompute-edges``,
    which recomputes whole edges). Same values and gradients. The pairs' modules
    are not called then (their forward hooks do not run); their parameters and
    the depthwise layer's ``backend`` are used as they are.
    """

    recompute_depthwise = False
    takes_shared_relu = True

    def forward(self, x, relu=None):
        """``relu``: x's ReLU shared with other ops (nasops.spaces.base.SharedReLU),
        for the first depthwise layer; unused when recomputing (the pairs keep x)."""
        if self.recompute_depthwise and torch.is_grad_enabled():
            return _run_recomputing_depthwise(self.op, x)
        if relu is None:
            return self.op(x)
        layers = iter(self.op)
        x = next(layers)(x, relu)
        for layer in layers:
            x = layer(x)
        return x


def set_recompute_depthwise(net: nn.Module, enabled: bool = True) -> int:
    """Switch ``recompute_depthwise`` on for every SepConv and DilConv in ``net``
    (see :class:`_SeparableOp`) outside the edges that recompute as a whole
    (:func:`~nasops.spaces.base.set_recompute_edges`, switched on before this):
    those recompute their depthwise convolutions with the rest, and inside them
    the flag would only run each convolution a third time. Off: every one.
    Returns the number of ops switched."""
    recomputing = [m for m in net.modules() if enabled and isinstance(m, RecomputableEdge) and m.recompute]
    inside = {id(op) for edge in recomputing for op in edge.modules()}
    ops = [m for m in net.modules() if isinstance(m, _SeparableOp) and id(m) not in inside]
    for m in ops:
        m.recompute_depthwise = enabled
    return len(ops)


def _run_recomputing_depthwise(layers: nn.Sequential, x):
    """``layers(x)`` with each (ReLUDepthwiseConv2d, 1x1 conv) pair run by
    :class:`_DepthwisePointwise`; under torch.compile, each pair checkpointed
    instead (dynamo cannot trace that Function's backward, which computes outside
    autograd; AOTAutograd recomputes a checkpointed region from the traced graph)."""
    layers = list(layers)
    i = 0
    while i < len(layers):
        depthwise = layers[i]
        if not isinstance(depthwise, ReLUDepthwiseConv2d):
            x = depthwise(x)
            i += 1
            continue
        pointwise = layers[i + 1]
        if torch.compiler.is_compiling():
            from torch.utils.checkpoint import checkpoint  # imports torch._dynamo: seconds
            x = checkpoint(lambda t: pointwise(depthwise(t)), x, use_reentrant=False)
        elif x.requires_grad or depthwise.weight.requires_grad or pointwise.weight.requires_grad:
            x = _DepthwisePointwise.apply(depthwise.planned(x), x, depthwise.weight, pointwise.weight)
        else:
            x = pointwise(depthwise(x))
        i += 2
    return x


class _DepthwisePointwise(torch.autograd.Function):
    """``conv2d(depthwise(x), pointwise_weight)`` (``depthwise``: a
    :class:`PlannedDepthwiseConv2d`; the pointwise convolution 1x1, stride 1, no
    bias) that keeps x and the weights for the backward, not the depthwise
    output: the backward computes that output again (under the forward's
    autocast state) for the pointwise convolution's gradients
    (``aten.convolution_backward``), frees it, and takes the depthwise
    convolution's gradients. Computes only the gradients the running backward
    wants (``autograd.grad(loss, alphas)`` skips the weight gradients, as
    autograd prunes a plain graph). No double backward.
    """

    @staticmethod
    def forward(ctx, depthwise, x, depthwise_weight, pointwise_weight):
        ctx.depthwise = depthwise
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, depthwise_weight, pointwise_weight)
        return F.conv2d(depthwise(x, depthwise_weight), pointwise_weight)

    @staticmethod
    @first_order_only("a recomputing separable convolution (--recompute-depthwise, set_recompute_depthwise)",
                      "run it without recomputing its depthwise convolutions")
    def backward(ctx, grad):
        x, depthwise_weight, pointwise_weight = ctx.saved_tensors
        _, need_x, need_depthwise, need_pointwise = _wanted_input_grads(ctx, [1, 2, 3])
        if not (need_x or need_depthwise or need_pointwise):
            return None, None, None, None
        with _autocast(ctx.autocast):
            hidden, depthwise_vjp = ctx.depthwise.vjp(x, depthwise_weight, need_x, need_depthwise)
        if hidden.dtype != pointwise_weight.dtype:
            # Under autocast the forward's conv2d ran in hidden's dtype; the engine
            # casts the weight's gradient back to the weight's dtype.
            grad, pointwise_weight = grad.to(hidden.dtype), pointwise_weight.to(hidden.dtype)
        with torch._C._AutoDispatchBelowAutograd():  # a backward records nothing
            grad_hidden, grad_pointwise, _ = torch.ops.aten.convolution_backward(
                grad, hidden, pointwise_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [need_x or need_depthwise, need_pointwise, False])
        del hidden  # its memory can hold the depthwise gradient
        grad_x, grad_depthwise = depthwise_vjp(grad_hidden) if need_x or need_depthwise else (None, None)
        return None, grad_x, grad_depthwise, grad_pointwise if need_pointwise else None


class DilConv(_SeparableOp):
    """ReLU -> dilated depthwise conv -> pointwise conv -> BN."""

    UNFUSED_INDEX = {1: 0, 2: 1, 3: 2}  # ReLU, dw, pw, BN -> ReLU+dw, pw, BN
    UNFUSED_MARK = 3

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            ReLUDepthwiseConv2d(C_in, kernel_size, stride, padding, dilation),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            batch_norm(C_out, affine),
        )


class SepConv(_SeparableOp):
    """Two stacked (ReLU -> depthwise -> pointwise -> BN) blocks, the first with the stride."""

    UNFUSED_INDEX = {1: 0, 2: 1, 3: 2, 5: 3, 6: 4, 7: 5}
    UNFUSED_MARK = 7

    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            ReLUDepthwiseConv2d(C_in, kernel_size, stride, padding),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            batch_norm(C_in, affine),
            ReLUDepthwiseConv2d(C_in, kernel_size, 1, padding),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            batch_norm(C_out, affine),
        )


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 stride-2 convs, the second on the map shifted by one pixel.

    DARTS slices ``x[:, :, 1:, 1:]`` for the shifted path, which only matches the
    first path for even sizes; we pad one zero row/column first, which gives the
    same result for even sizes and ``ceil(H/2)`` rows on both paths for odd sizes.
    """

    takes_shared_relu = True  # ``relu``: see ReLUConvBN

    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"C_out: FactorizedReduce needs an even channel count, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = batch_norm(C_out, affine)

    def forward(self, x, relu=None):
        x = self.relu(x) if relu is None else relu()
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class Noise(nn.Module):
    """RobustDARTS S4's ``noise`` op: standard normal noise shaped like its output.

    On a stride-2 edge the output has the subsampled shape ``x[:, :, ::2, ::2]``.
    The noise carries no gradient to ``x`` (it does not depend on it); its
    mixed weight still gets one through the mixed edge.
    """

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        shape = x[:, :, ::self.stride, ::self.stride].shape
        return torch.randn(shape, dtype=x.dtype, device=x.device)


class MaxPool3x3(nn.MaxPool2d):
    """``nn.MaxPool2d(3, stride, padding=1)`` that keeps its input for the backward
    instead of the int64 indices of the maxima, and finds them again there.

    Why: in a search network a pool's input is a cell state, which the edge's
    convolutions (and a recomputing edge) keep anyway, while the indices are a
    map of their own, twice the size of a float32 output: 4.5 % of what a DARTS
    step keeps for its backward, 25 % of what a ``--recompute-edges`` step keeps
    (benchmarks/RESULTS.md, "what is left to take"). Finding them again is one
    more 3x3 max pool in the backward. Values and gradients are PyTorch's
    (the same kernels; tested bitwise), the second derivatives too (a double
    backward differentiates PyTorch's pool backward, as for ``F.max_pool2d``).
    """

    def __init__(self, stride: int = 1):
        super().__init__(3, stride=stride, padding=1)

    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.max_pool2d(x, 3, self.stride, 1)
        return _MaxPoolFindingIndicesAgain.apply(x, self.stride)


class _MaxPoolFindingIndicesAgain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, stride):
        ctx.stride = stride
        ctx.save_for_backward(x)
        return F.max_pool2d(x, 3, stride, 1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            _, indices = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [ctx.stride] * 2, [1, 1])
        # differentiable in grad (create_graph=True): PyTorch's double backward of the pool
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, [3, 3], [ctx.stride] * 2, [1, 1], [1, 1], False, indices), None


class AvgPool3x3(nn.Module):
    """``nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)``, computed on
    the CPU as a depthwise 3x3 convolution with a ones kernel divided by the
    number of in-map pixels under the window.

    Why: PyTorch's CPU average pool with ``count_include_pad=False`` ran 3-4x
    slower (forward + backward) than that convolution on a DARTS/NB201 edge's maps
    (measured 2026-12-03, one thread: (64,16,32,32) 33 ms vs 8 ms in
    channels_last, 37 vs 9 ms channels-first; (64,16,8,8) 1.5 vs 0.5 ms), and
    every searched edge has this pool. Same values up to float rounding (tested).
    The convolution is :func:`nasops.ops.depthwise_conv2d` (nasops' CPU kernel
    on channels_last maps). CUDA tensors keep the pooling kernel (a direct
    stencil there).
    """

    def __init__(self, stride: int = 1):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if x.device.type != "cpu":
            return F.avg_pool2d(x, 3, self.stride, 1, count_include_pad=False)
        C = x.shape[1]
        ones = x.new_ones(C, 1, 3, 3)
        total = nasops.ops.depthwise_conv2d(x, ones, stride=self.stride, padding=1)
        count = F.conv2d(x.new_ones(1, 1, *x.shape[2:]), ones[:1], stride=self.stride, padding=1)
        return total / count

    def extra_repr(self):
        return f"stride={self.stride}"


def make_darts_op(name: str, C: int, stride: int, *, search: bool = True) -> nn.Module | None:
    """One op of a DARTS/RobustDARTS edge. Returns None for ``none`` (the Zero op).

    ``search=True`` (the one-shot network): BN without affine parameters, and
    pools followed by an affine-free BN, as DARTS' ``MixedOp`` does, so their
    scale matches the conv ops'. ``search=False`` (a found cell trained from
    scratch, DARTS' ``OPS[name](C, stride, affine=True)``): affine BN, bare pools.
    """
    affine = not search
    if name == "none":
        return None
    if name in ("max_pool_3x3", "avg_pool_3x3"):
        if name == "avg_pool_3x3":
            pool = AvgPool3x3(stride)
        else:  # the trained network: PyTorch's module, nothing of nasops in an exported graph
            pool = MaxPool3x3(stride) if search else nn.MaxPool2d(3, stride=stride, padding=1)
        return nn.Sequential(pool, AffineFreeBatchNorm2d(C)) if search else pool
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine)
    if name == "sep_conv_3x3":
        return SepConv(C, C, 3, stride, 1, affine=affine)
    if name == "sep_conv_5x5":
        return SepConv(C, C, 5, stride, 2, affine=affine)
    if name == "dil_conv_3x3":
        return DilConv(C, C, 3, stride, 2, 2, affine=affine)
    if name == "dil_conv_5x5":
        return DilConv(C, C, 5, stride, 4, 2, affine=affine)
    if name == "noise":
        return Noise(stride)
    raise ValueError(f"op: expected one of {DARTS_OPS + RDARTS_EXTRA_OPS}, got {name!r}")


def make_nb201_op(name: str, C: int, *, search: bool = True) -> nn.Module | None:
    """One op of an NB201 edge (stride 1, C in = C out). Returns None for ``none`` (the Zero op).

    ``search=True``, as NB201's search (``affine=False``): BN without affine
    parameters, and its ``ReLUConvBN`` then gives the conv a bias
    (``bias=not affine``). ``search=False``, as NB201's trained cells
    (``InferCell``, ``affine=True``): affine BN, conv without bias. The pool has
    no BN (unlike DARTS).
    """
    if name == "none":
        return None
    if name == "skip_connect":
        return nn.Identity()
    if name in ("nor_conv_1x1", "nor_conv_3x3"):
        k = 1 if name == "nor_conv_1x1" else 3
        return ReLUConvBN(C, C, k, 1, k // 2, affine=not search, conv_bias=search)
    if name == "avg_pool_3x3":
        return AvgPool3x3(1)
    raise ValueError(f"op: expected one of {NB201_OPS}, got {name!r}")


class ResNetBasicBlock(nn.Module):
    """NB201's reduction between stages: a stride-2 ResNet basic block (affine BN)."""

    def __init__(self, C_in, C_out, stride):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, stride, 1, affine=True)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1, affine=True)
        if stride == 2:
            self.downsample = nn.Sequential(nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
                                            nn.Conv2d(C_in, C_out, 1, bias=False))
        elif C_in != C_out:
            self.downsample = ReLUConvBN(C_in, C_out, 1, 1, 0, affine=True)
        else:
            self.downsample = None

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        return residual + self.conv_b(self.conv_a(x))
