"""depthwise_conv2d (the search step's ReLU -> depthwise conv) against PyTorch's
own convolution in float64, on the compiled CPU kernel and on the paths that
fall back to PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nasops.ops import depthwise_conv2d
from helpers import assert_close, kernel_backends

needs_cpu_kernel = pytest.mark.skipif("cpu" not in kernel_backends("cpu"),
                                      reason="needs the compiled CPU kernel")


def expected(x, w, stride, padding, dilation, relu_input):
    """float64, written with torch's convolution (no nasops code)."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = F.conv2d(x64.relu() if relu_input else x64, w64, stride=stride, padding=padding,
                 dilation=dilation, groups=x.shape[1])
    return x64, w64, y


def nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


# (C, H, W, kernel, stride, padding, dilation): DARTS' sep/dil convs and pool, then
# channel tails (7, 24, 35 = 16-lane blocks + 8-lane block + single lanes),
# rectangular kernels, strides and maps, and paddings beyond d*(K-1) (the
# strided input-gradient path at stride 1).
GEOMETRIES = [
    (16, 8, 8, (3, 3), 1, 1, 1),
    (16, 8, 8, (5, 5), 1, 2, 1),
    (8, 9, 9, (3, 3), 1, 2, 2),
    (8, 8, 8, (5, 5), 1, 4, 2),
    (16, 8, 8, (3, 3), 2, 1, 1),
    (16, 9, 7, (5, 5), 2, 2, 1),
    (8, 9, 9, (5, 5), 2, 4, 2),
    (7, 6, 5, (3, 3), 1, 1, 1),
    (24, 5, 6, (3, 5), (1, 2), (1, 2), 1),
    (35, 7, 4, (5, 3), (2, 1), (0, 1), (1, 2)),
    (3, 6, 6, (3, 3), 1, 3, 1),
    (2, 5, 5, (1, 1), 1, 0, 1),
    (4, 3, 3, (5, 5), 1, 2, 1),  # every output pixel is a border pixel
]


@needs_cpu_kernel
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("relu_input", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_torch_in_float64(geometry, relu_input, dtype):
    C, H, W, kernel, stride, padding, dilation = geometry
    torch.manual_seed(0)
    x = nhwc(torch.randn(3, C, H, W, dtype=dtype)).requires_grad_()
    w = torch.randn(C, 1, *kernel, dtype=dtype, requires_grad=True)
    y = depthwise_conv2d(x, w, stride=stride, padding=padding, dilation=dilation, relu_input=relu_input,
                         backend="cpu")
    x64, w64, want = expected(x, w, stride, padding, dilation, relu_input)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, want, dtype, what="y")
    g = torch.randn_like(want)
    gx, gw = torch.autograd.grad(y, (x, w), g.to(dtype))
    gx_want, gw_want = torch.autograd.grad(want, (x64, w64), g)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    assert_close(gx, gx_want, dtype, what="grad x")
    assert_close(gw, gw_want, dtype, scale=y[:, 0].numel() ** 0.5, what="grad weight")


@needs_cpu_kernel
def test_gradcheck_float64():
    x = nhwc(torch.randn(2, 3, 5, 4, dtype=torch.float64)).requires_grad_()
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    for stride in (1, 2):
        assert torch.autograd.gradcheck(
            lambda a, b: depthwise_conv2d(a, b, stride=stride, padding=1, relu_input=True, backend="cpu"),
            (x, w))


@needs_cpu_kernel
def test_relu_keeps_nan_and_has_no_gradient_at_zero():
    x = torch.randn(1, 16, 4, 4)
    x[0, 3, 1, 1] = float("nan")
    x[0, 5] = 0.0
    x = nhwc(x).requires_grad_()
    w = torch.randn(16, 1, 3, 3, requires_grad=True)
    y = depthwise_conv2d(x, w, padding=1, relu_input=True, backend="cpu")
    want = F.conv2d(x.relu(), w, padding=1, groups=16)
    assert torch.equal(y.isnan(), want.isnan()) and y.isnan().any()
    g = torch.randn_like(y)
    gx = torch.autograd.grad(y, x, g)[0]
    gx_want = torch.autograd.grad(want, x, g)[0]
    assert (gx[0, 5] == 0).all()
    torch.testing.assert_close(gx[0, 5], gx_want[0, 5])


@needs_cpu_kernel
def test_only_x_or_only_weight_needs_grad():
    x = nhwc(torch.randn(2, 8, 6, 6))
    w = torch.randn(8, 1, 3, 3)
    gx = torch.autograd.grad(depthwise_conv2d(x.requires_grad_(), w, padding=1, relu_input=True).sum(), x)[0]
    assert_close(gx, torch.autograd.grad(F.conv2d(x.relu(), w, padding=1, groups=8).sum(), x)[0], torch.float32)
    x.requires_grad_(False)
    gw = torch.autograd.grad(depthwise_conv2d(x, w.requires_grad_(), padding=1, relu_input=True).sum(), w)[0]
    assert_close(gw, torch.autograd.grad(F.conv2d(x.relu(), w, padding=1, groups=8).sum(), w)[0], torch.float32,
                 scale=6)


@needs_cpu_kernel
def test_weight_gradient_independent_of_threads():
    x = nhwc(torch.randn(6, 24, 9, 9))
    w = torch.randn(24, 1, 5, 5, requires_grad=True)
    g = torch.randn(6, 24, 9, 9)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y = depthwise_conv2d(x, w, padding=2, relu_input=True, backend="cpu")
            grads.append(torch.autograd.grad(y, w, g)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], other) for other in grads[1:])


@pytest.mark.parametrize("case", ["nchw", "bfloat16", "autocast", "eager"])
def test_other_inputs_run_pytorch(case):
    """Contiguous maps, half precision, autocast and the eager backend run
    PyTorch's convolution: its layout, dtype and values."""
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(8, 1, 3, 3)
    backend = "eager" if case == "eager" else None
    if case == "bfloat16":
        x, w = x.bfloat16(), w.bfloat16()
    elif case in ("autocast", "eager"):
        x = nhwc(x)
    want = F.conv2d(x.relu(), w, padding=1, groups=8)
    if case == "autocast":  # x arrives in bfloat16 from an autocast layer, the weight stays float32
        x = x.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = depthwise_conv2d(x, w, padding=1, relu_input=True)
            want = F.conv2d(x.relu(), w, padding=1, groups=8)
        assert y.dtype == torch.bfloat16
    else:
        y = depthwise_conv2d(x, w, padding=1, relu_input=True, backend=backend)
    assert torch.equal(y, want) and y.stride() == want.stride()


def registered_ops():
    from nasops.ops.depthwise_conv2d import _KERNELS
    return [_KERNELS["cpu"]] if "cpu" in _KERNELS else []


@pytest.mark.parametrize("ops", registered_ops(), ids=lambda ops: ops[0].name())
def test_opcheck(ops):
    forward, backward = ops
    x = nhwc(torch.randn(2, 5, 6, 7)).requires_grad_()
    w = torch.randn(5, 1, 3, 3, requires_grad=True)
    torch.library.opcheck(forward, (x, w, [1, 2], [1, 1], [1, 1], True))
    g = nhwc(torch.randn(2, 5, 6, 4))
    torch.library.opcheck(backward, (g, x.detach(), w.detach(), [1, 2], [1, 1], [1, 1], True, True, True))
    torch.library.opcheck(backward, (g, x.detach(), w.detach(), [1, 2], [1, 1], [1, 1], True, False, True))


@needs_cpu_kernel
def test_torch_compile_fullgraph():
    from nasops.spaces.operations import SepConv
    torch.manual_seed(0)
    op = SepConv(8, 8, 3, 1, 1, affine=False).to(memory_format=torch.channels_last)
    x = nhwc(torch.randn(2, 8, 6, 6)).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    # Not y.square().sum(): through the last BatchNorm its gradient is 0 up to
    # rounding (the BatchNorm's output has unit variance whatever its input's
    # scale), so only the rounding of the two BatchNorm backwards would be compared.
    dy = torch.randn(2, 8, 6, 6)
    y = compiled(x)
    (y * dy).sum().backward()
    grads = [p.grad.clone() for p in op.parameters()] + [x.grad.clone()]
    op.zero_grad()
    x.grad = None
    want = op(x)
    (want * dy).sum().backward()
    torch.testing.assert_close(y, want)
    for got, exp in zip(grads, [p.grad for p in op.parameters()] + [x.grad]):
        torch.testing.assert_close(got, exp)


def test_module_is_relu_then_depthwise_conv():
    """ReLUDepthwiseConv2d has nn.Conv2d's parameter, initialisation and values."""
    from nasops.spaces.operations import ReLUDepthwiseConv2d
    torch.manual_seed(3)
    fused = ReLUDepthwiseConv2d(16, 5, stride=2, padding=4, dilation=2)
    torch.manual_seed(3)
    conv = nn.Conv2d(16, 16, 5, stride=2, padding=4, dilation=2, groups=16, bias=False)
    assert torch.equal(fused.weight, conv.weight)
    assert [n for n, _ in fused.named_parameters()] == ["weight"]
    for x in (torch.randn(2, 16, 9, 9), nhwc(torch.randn(2, 16, 9, 9))):
        assert_close(fused(x), conv(x.relu()), torch.float32)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w: depthwise_conv2d(x[0], w), ValueError, "x: expected 4 dimensions"),
    (lambda x, w: depthwise_conv2d(x, w[:4]), ValueError, r"weight: expected shape \(8, 1, KH, KW\)"),
    (lambda x, w: depthwise_conv2d(x, w.double()), TypeError, "weight: expected dtype torch.float32"),
    (lambda x, w: depthwise_conv2d(x.long(), w), TypeError, "x: expected dtype"),
    (lambda x, w: depthwise_conv2d(x, w, stride=0), ValueError, "stride: expected an int >= 1"),
    (lambda x, w: depthwise_conv2d(x, w, padding=(1, 2, 3)), ValueError, "padding: expected"),
    (lambda x, w: depthwise_conv2d(x, w, dilation=1.5), ValueError, "dilation: expected"),
    (lambda x, w: depthwise_conv2d(x[..., :1, :1], w), ValueError, "weight: the dilated kernel"),
    (lambda x, w: depthwise_conv2d(x, w, backend="nope"), ValueError, "backend: expected one of"),
])
def test_bad_input_names_the_argument(call, error, match):
    x = nhwc(torch.randn(2, 8, 5, 5))
    w = torch.randn(8, 1, 3, 3)
    with pytest.raises(error, match=match):
        call(x, w)


@pytest.mark.parametrize("op_name", ["sep_conv_5x5", "dil_conv_3x3"])
def test_ops_load_state_dicts_from_before_the_fusion(op_name):
    """A SepConv/DilConv state dict written when the ReLUs were their own
    modules (op.0 ReLU, op.1 conv, ...) loads, key by key, into the fused op."""
    from nasops.spaces.operations import make_darts_op
    torch.manual_seed(0)
    op = make_darts_op(op_name, 8, 1)
    for m in op.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_()
    state = op.state_dict()
    # The old layout: a parameter-free ReLU before each depthwise conv.
    shift = {0: 1, 1: 2, 2: 3, 3: 5, 4: 6, 5: 7} if op_name.startswith("sep") else {0: 1, 1: 2, 2: 3}
    old = {}
    for key, value in state.items():
        index, rest = key.split(".", 2)[1:]
        old[f"op.{shift[int(index)]}.{rest}"] = value.clone()
    fresh = make_darts_op(op_name, 8, 1)
    fresh.load_state_dict(old)  # strict: every key found
    for (name, a), (_, b) in zip(op.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    # The new layout still loads as it is.
    make_darts_op(op_name, 8, 1).load_state_dict(state)
