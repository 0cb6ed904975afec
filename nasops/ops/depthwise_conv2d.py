"""``depthwise_conv2d``: y = conv2d(relu(x) if relu_input else x, weight, groups=C).

Not one of SPEC 2's ops: it is the search step's own (issue 14). Every
SepConv and DilConv of a DARTS cell starts with ReLU -> depthwise conv, and
on the CPU those convolutions were the largest cost of a search step
(PyTorch's depthwise backward alone 31 % of the DARTS step, the forward 7 %,
the ReLUs ~5 %: 8 cells, C = 16, 32x32, batch 16, 2026-12-03). The kernels
compute the ReLU as they read x, so the ReLU's map is never written or kept
for the backward.

Where a kernel runs:
- backend 'cpu' (what 'auto' picks for CPU tensors): the C++ kernel
  (csrc/cpu/depthwise_conv2d.cpp) on float32/float64 maps in channels_last
  layout (the driver's default on the CPU), kernels up to 16x16, outside
  autocast; it returns channels_last.
- backend 'triton' (CUDA tensors; CPU tensors under the interpreter): the
  Triton kernels (nasops/triton/depthwise_conv2d.py) on float16, bfloat16,
  float32 and float64 maps, contiguous or channels_last (returned in x's
  layout), kernels up to 16x16, outside autocast. Not what 'auto' picks on
  CUDA: the kernels have not run on a GPU yet, and 'auto' keeps PyTorch's
  convolution there until a GPU measurement shows them faster
  (benchmarks/gpu_session.sh measures ``--backend triton`` beside the
  default; issue 16).
Everything else runs the PyTorch expression
(nasops.ops.reference.depthwise_conv2d), the same for every backend:
contiguous (NCHW) maps on the CPU, which the C++ kernel would have to copy;
half precision and autocast, which PyTorch's convolution handles; CUDA
tensors under 'auto' or 'cuda' (no CUDA C++ kernel). The ReLU's
gradient at x == 0 is 0, as torch.relu's.
"""
from __future__ import annotations

import torch

from nasops.backend import get_backend, resolve, triton_interpreting
from nasops.ops import reference
from nasops.ops._checks import check_same_device, check_tensor, first_order_only
from nasops.ops._layout import is_nhwc, layout_of
from nasops.ops._registry import kernel_for, variants

_KERNELS = variants("depthwise_conv2d", "depthwise_conv2d", "depthwise_conv2d_backward")
_KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64),
                  "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_MAX_KERNEL = 16  # csrc/cpu/depthwise_conv2d.cpp: kMaxKernel (and the Triton kernels' unrolled taps)
_MAX_SAMPLE = 2**31 - 1  # the Triton kernels' 32-bit offsets within a sample


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, *, stride=1, padding=0, dilation=1,
                     relu_input: bool = False, backend: str | None = None) -> torch.Tensor:
    """Depthwise 2-D convolution of ``x``, or of ``relu(x)`` with ``relu_input``.

    Args:
        x: (B, C, H, W) float maps.
        weight: (C, 1, KH, KW), x's dtype and device (an ``nn.Conv2d`` with
            ``groups=C``, ``bias=False``).
        stride, padding, dilation: an int or a pair (height, width), as for
            ``torch.nn.functional.conv2d``.
        relu_input: convolve relu(x) (DARTS' ReLU before the conv), without
            materialising it.
        backend: 'auto' (default), 'cpu', 'eager', 'cuda' or 'triton'; see the
            module docstring for where the kernel runs.

    Returns:
        (B, C, OH, OW): channels_last from the C++ kernel, x's layout from the
        Triton kernels, else PyTorch's layout.
    """
    stride, padding, dilation = _checked_geometry(x, weight, stride, padding, dilation)
    kernels = _kernels(backend, x, weight, stride, padding, dilation)
    return _convolve(kernels, (stride, padding, dilation, relu_input), x, weight)


def _convolve(kernels, geometry, x, weight):
    """The convolution with autograd: ``kernels`` (forward, backward), or PyTorch's
    expression where they are None; ``geometry`` (stride, padding, dilation, relu_input)."""
    if kernels is None:
        return reference.depthwise_conv2d(x, weight, *geometry)
    fwd, bwd = kernels
    if torch.compiler.is_compiling():
        # The registered op: traced as one node, with the fake and autograd rules below.
        return fwd(x, weight, *geometry)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _DepthwiseConv2d.apply(kernels, geometry, x, weight)
    with torch._C._AutoDispatchBelowAutograd():
        return fwd(x, weight, *geometry)


class PlannedDepthwiseConv2d:
    """:func:`depthwise_conv2d` with its arguments checked and its kernel chosen
    once, for tensors like ``x`` and ``weight`` (device, dtype, layout, autocast
    state): for a caller that runs the same convolution again in a backward
    (``--recompute-depthwise``, nasops.spaces.operations) without checking its
    arguments and resolving the backend again, or that asks first whether a kernel
    runs (``kernels`` None: PyTorch's expression, which computes ``relu_input``'s
    ReLU as a map of its own; nasops.spaces.base.SharedReLU). With autograd:
    :meth:`apply`; without: :meth:`__call__` gives the output, :meth:`vjp` the
    output and its vector-Jacobian product. Arguments as for :func:`depthwise_conv2d`.
    """

    __slots__ = ("geometry", "kernels")

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, *, stride=1, padding=0, dilation=1,
                 relu_input: bool = False, backend: str | None = None):
        stride, padding, dilation = _checked_geometry(x, weight, stride, padding, dilation)
        self.geometry = (stride, padding, dilation, relu_input)
        self.kernels = _kernels(backend, x, weight, stride, padding, dilation)

    def apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The convolution as :func:`depthwise_conv2d` computes it, autograd included."""
        return _convolve(self.kernels, self.geometry, x, weight)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The convolution's output, recorded by no autograd graph."""
        if self.kernels is None:
            with torch.no_grad():
                return reference.depthwise_conv2d(x, weight, *self.geometry)
        with torch._C._AutoDispatchBelowAutograd():
            return self.kernels[0](x, weight, *self.geometry)

    def vjp(self, x: torch.Tensor, weight: torch.Tensor, x_requires_grad: bool, weight_requires_grad: bool):
        """``(y, vjp)`` as ``torch.func.vjp`` gives them: ``vjp(grad)`` returns
        ``(grad_x, grad_weight)``, None for an input whose ``*_requires_grad`` is
        False. A kernel's backward runs straight away; PyTorch's expression is
        differentiated with ``torch.autograd.grad``."""
        if self.kernels is None:
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_(need)
                          for t, need in ((x, x_requires_grad), (weight, weight_requires_grad))]
                y = reference.depthwise_conv2d(*inputs, *self.geometry)
            wanted = [t for t in inputs if t.requires_grad]

            def reference_vjp(grad):
                found = iter(torch.autograd.grad(y, wanted, grad) if wanted else ())
                return tuple(next(found) if t.requires_grad else None for t in inputs)
            return y.detach(), reference_vjp
        bwd = self.kernels[1]
        y = self(x, weight)

        def kernel_vjp(grad):
            with torch._C._AutoDispatchBelowAutograd():
                gx, gw = bwd(grad, x, weight, *self.geometry, x_requires_grad, weight_requires_grad)
            return (gx if x_requires_grad else None), (gw if weight_requires_grad else None)
        return y, kernel_vjp


def _kernels(backend: str | None, x, weight, stride, padding, dilation):
    """(forward, backward) of the kernel that runs ``depthwise_conv2d`` on these
    tensors under ``backend``; None where PyTorch's expression runs."""
    name = _backend_for(backend, x.device)
    if not _kernel_applies(name, x, weight, stride, padding, dilation):
        return None
    return kernel_for(_KERNELS, name, "depthwise_conv2d")


def _backend_for(backend: str | None, device: torch.device) -> str:
    """resolve(), except that 'auto' does not take the Triton kernels for CUDA
    tensors (it would where nasops._C has no CUDA kernels): PyTorch's convolution
    runs there until a GPU measurement says otherwise (module docstring)."""
    name = resolve(backend, device)
    if name == "triton" and torch.device(device).type == "cuda" and (backend or get_backend()) == "auto":
        return "eager"
    return name


def _checked_geometry(x, weight, stride, padding, dilation) -> tuple[list[int], list[int], list[int]]:
    """Check ``depthwise_conv2d``'s arguments; (stride, padding, dilation) as pairs."""
    check_tensor(x, "x", ndim=4)
    check_tensor(weight, "weight", ndim=4)
    check_same_device("weight", weight, x, "x")
    if weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(f"weight: expected shape ({x.shape[1]}, 1, KH, KW) for x with C={x.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):  # autocast casts both
        raise TypeError(f"weight: expected dtype {x.dtype} (that of x), got {weight.dtype}")
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    for name, (size, kernel, pad, dil) in {"height": (x.shape[2], weight.shape[2], padding[0], dilation[0]),
                                           "width": (x.shape[3], weight.shape[3], padding[1], dilation[1])}.items():
        if size + 2 * pad < dil * (kernel - 1) + 1:
            raise ValueError(f"weight: the dilated kernel ({dil * (kernel - 1) + 1}) is larger than x's padded "
                             f"{name} ({size} + 2*{pad})")
    return stride, padding, dilation


def _pair(value, name: str, minimum: int) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value) if isinstance(value, (tuple, list)) else None
    if (pair is None or len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair)
            or min(pair) < minimum):
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def _kernel_applies(backend: str, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> bool:
    if (x.numel() == 0 or x.dtype not in _KERNEL_DTYPES.get(backend, ()) or max(weight.shape[2:]) > _MAX_KERNEL
            or torch.is_autocast_enabled(x.device.type)):
        return False
    if backend == "cpu":
        return x.device.type == "cpu" and is_nhwc(x)
    # triton: CUDA tensors, or CPU tensors in the interpreter; samples within 32-bit offsets
    if not (x.is_cuda or triton_interpreting()):
        return False
    OH, OW = (_output_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(2))
    return x.shape[1] * max(x.shape[2] * x.shape[3], OH * OW) <= _MAX_SAMPLE


class _DepthwiseConv2d(torch.autograd.Function):
    """The eager path of the kernel: the registered autograd below, without a
    redispatch per call (as nasops.ops.mixed_op's _MixedOp)."""

    @staticmethod
    def forward(ctx, kernels, geometry, x, weight):
        fwd, bwd = kernels
        with torch._C._AutoDispatchBelowAutograd():
            y = fwd(x, weight, *geometry)
        ctx.bwd, ctx.geometry = bwd, geometry
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    @first_order_only("nasops.depthwise_conv2d's kernels")
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        with torch._C._AutoDispatchBelowAutograd():
            gx, gw = ctx.bwd(grad, x, weight, *ctx.geometry, need_x, need_w)
        return None, None, (gx if need_x else None), (gw if need_w else None)


# ---- registration: fake (meta) implementations and autograd --------------------

def _output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _fake_forward(layout):
    """The fake (meta) forward of a variant whose output is in ``layout(x)``."""
    def fake(x, weight, stride, padding, dilation, relu_input):
        B, C, H, W = x.shape
        OH = _output_size(H, weight.shape[2], stride[0], padding[0], dilation[0])
        OW = _output_size(W, weight.shape[3], stride[1], padding[1], dilation[1])
        return x.new_empty((B, C, OH, OW)).contiguous(memory_format=layout(x))
    return fake


def _fake_backward(layout):
    def fake(grad, x, weight, stride, padding, dilation, relu_input, x_requires_grad, weight_requires_grad):
        gx = torch.empty_like(x, memory_format=layout(x)) if x_requires_grad else x.new_empty(0)
        gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_requires_grad \
            else x.new_empty(0)
        return gx, gw
    return fake


def _setup_context(ctx, inputs, output):
    x, weight, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(x, weight)


def _make_backward(backward_op):
    @first_order_only("nasops.depthwise_conv2d's kernels")
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gw = backward_op(grad, x, weight, *ctx.geometry, need_x, need_w)
        return (gx if need_x else None), (gw if need_w else None), None, None, None, None
    return backward


# The C++ kernel returns channels_last; the Triton kernels return x's layout.
_OUTPUT_LAYOUT = {"cpu": lambda x: torch.channels_last, "triton": lambda x: layout_of([x])}
for _backend, (_fwd, _bwd) in _KERNELS.items():
    if _backend == "cuda":  # the compiled variant, registered under "cpu"
        continue
    torch.library.register_fake(_fwd)(_fake_forward(_OUTPUT_LAYOUT[_backend]))
    torch.library.register_fake(_bwd)(_fake_backward(_OUTPUT_LAYOUT[_backend]))
    torch.library.register_autograd(_fwd, _make_backward(_bwd), setup_context=_setup_context)
