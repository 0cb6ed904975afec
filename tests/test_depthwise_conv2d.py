"""depthwise_conv2d (the search step's ReLU -> depthwise conv) against PyTorch's
own convolution in float64, on the compiled CPU kernel, on the Triton kernels
(through the interpreter here: tests/conftest.py) and on the paths that fall
back to PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nasops
from nasops.ops import depthwise_conv2d
from helpers import DEVICE, assert_close, kernel_backends, triton_launches

needs_cpu_kernel = pytest.mark.skipif("cpu" not in kernel_backends("cpu"),
                                      reason="needs the compiled CPU kernel")
# (backend, layout) pairs whose kernels run here: the C++ kernel reads channels_last
# maps; the Triton kernels read both layouts (on CUDA, or in the interpreter).
KERNELS = ([("cpu", "nhwc")] if "cpu" in kernel_backends("cpu") else []) + \
    [("triton", layout) for layout in ("nchw", "nhwc") if "triton" in kernel_backends(DEVICE)]
KERNEL_DEVICE = {"cpu": "cpu", "triton": DEVICE}


def expected(x, w, stride, padding, dilation, relu_input):
    """float64, written with torch's convolution (no nasops code)."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = F.conv2d(x64.relu() if relu_input else x64, w64, stride=stride, padding=padding,
                 dilation=dilation, groups=x.shape[1])
    return x64, w64, y


def nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def in_layout(t, layout):
    return nhwc(t) if layout == "nhwc" else t.contiguous()


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


@pytest.mark.parametrize("kernel", KERNELS, ids="-".join)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("relu_input", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_torch_in_float64(kernel, geometry, relu_input, dtype):
    backend, layout = kernel
    C, H, W, size, stride, padding, dilation = geometry
    torch.manual_seed(0)
    x = in_layout(torch.randn(3, C, H, W, dtype=dtype), layout).to(KERNEL_DEVICE[backend]).requires_grad_()
    w = torch.randn(C, 1, *size, dtype=dtype).to(x.device).requires_grad_()
    y = depthwise_conv2d(x, w, stride=stride, padding=padding, dilation=dilation, relu_input=relu_input,
                         backend=backend)
    x64, w64, want = expected(x, w, stride, padding, dilation, relu_input)
    # The C++ kernel returns channels_last, the Triton kernels x's layout: here the same.
    format = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert y.is_contiguous(memory_format=format)
    assert_close(y, want, dtype, what="y")
    g = torch.randn_like(want)
    gx, gw = torch.autograd.grad(y, (x, w), g.to(dtype))
    gx_want, gw_want = torch.autograd.grad(want, (x64, w64), g)
    assert gx.is_contiguous(memory_format=format)
    assert_close(gx, gx_want, dtype, what="grad x")
    assert_close(gw, gw_want, dtype, scale=y[:, 0].numel() ** 0.5, what="grad weight")


@pytest.mark.parametrize("kernel", KERNELS, ids="-".join)
def test_gradcheck_float64(kernel):
    backend, layout = kernel
    # Small: the numerical Jacobian runs the forward twice per element (each a launch in the interpreter).
    x = in_layout(torch.randn(1, 3, 4, 3, dtype=torch.float64), layout).to(KERNEL_DEVICE[backend])
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64, device=x.device, requires_grad=True)
    for stride in (1, 2):
        assert torch.autograd.gradcheck(
            lambda a, b: depthwise_conv2d(a, b, stride=stride, padding=1, relu_input=True, backend=backend),
            (x.requires_grad_(), w))


@pytest.mark.parametrize("kernel", KERNELS, ids="-".join)
def test_relu_keeps_nan_and_has_no_gradient_at_zero(kernel):
    backend, layout = kernel
    x = torch.randn(1, 16, 4, 4)
    x[0, 3, 1, 1] = float("nan")
    x[0, 5] = 0.0
    x = in_layout(x, layout).to(KERNEL_DEVICE[backend]).requires_grad_()
    w = torch.randn(16, 1, 3, 3, device=x.device, requires_grad=True)
    y = depthwise_conv2d(x, w, padding=1, relu_input=True, backend=backend)
    want = F.conv2d(x.relu(), w, padding=1, groups=16)
    assert torch.equal(y.isnan(), want.isnan()) and y.isnan().any()
    g = torch.randn_like(y)
    gx = torch.autograd.grad(y, x, g)[0]
    gx_want = torch.autograd.grad(want, x, g)[0]
    assert (gx[0, 5] == 0).all()
    torch.testing.assert_close(gx[0, 5], gx_want[0, 5])


@pytest.mark.parametrize("kernel", KERNELS, ids="-".join)
def test_only_x_or_only_weight_needs_grad(kernel):
    backend, layout = kernel
    x = in_layout(torch.randn(2, 8, 6, 6), layout).to(KERNEL_DEVICE[backend])
    w = torch.randn(8, 1, 3, 3, device=x.device)
    y = depthwise_conv2d(x.requires_grad_(), w, padding=1, relu_input=True, backend=backend)
    gx = torch.autograd.grad(y.sum(), x)[0]
    assert_close(gx, torch.autograd.grad(F.conv2d(x.relu(), w, padding=1, groups=8).sum(), x)[0], torch.float32)
    x.requires_grad_(False)
    y = depthwise_conv2d(x, w.requires_grad_(), padding=1, relu_input=True, backend=backend)
    gw = torch.autograd.grad(y.sum(), w)[0]
    assert_close(gw, torch.autograd.grad(F.conv2d(x.relu(), w, padding=1, groups=8).sum(), w)[0], torch.float32,
                 scale=6)


@pytest.mark.parametrize("path", KERNELS + [("eager", "nchw"), ("eager", "nhwc")], ids="-".join)
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "x", "weight"])
def test_planned_convolution_and_its_vjp_equal_the_op(path, needs):
    """PlannedDepthwiseConv2d (what --recompute-depthwise runs again in a backward):
    its output and vector-Jacobian product are the op's and its autograd's, on the
    kernels (called straight) and on PyTorch's path (differentiated by autograd),
    with None for an input that wants no gradient."""
    from nasops.ops.depthwise_conv2d import PlannedDepthwiseConv2d
    backend, layout = path
    torch.manual_seed(0)
    x = in_layout(torch.randn(2, 8, 7, 6, dtype=torch.float64), layout).to(KERNEL_DEVICE.get(backend, DEVICE))
    w = torch.randn(8, 1, 3, 3, dtype=torch.float64, device=x.device)
    geometry = dict(stride=2, padding=2, dilation=2, relu_input=True)
    plan = PlannedDepthwiseConv2d(x, w, **geometry, backend=backend)
    assert (plan.kernels is None) == (backend == "eager")
    want = depthwise_conv2d(x.requires_grad_(), w.requires_grad_(), **geometry, backend=backend)
    g = torch.randn_like(want)
    grads_want = torch.autograd.grad(want, (x, w), g)
    x, w = x.detach(), w.detach()
    assert_close(plan(x, w), want, torch.float64, what="y")
    y, vjp = plan.vjp(x, w, *needs)
    assert not y.requires_grad
    assert_close(y, want, torch.float64, what="vjp's y")
    for name, got, expect, need in zip(("x", "weight"), vjp(g), grads_want, needs):
        if need:
            assert_close(got, expect, torch.float64, what=f"grad {name}")
        else:
            assert got is None, name


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
    """(backend, forward op, backward op) of every compiled and Triton variant, and
    the layouts its kernel reads in place."""
    from nasops.ops.depthwise_conv2d import _KERNELS
    return [(backend, layout, *_KERNELS[backend]) for backend, layout in KERNELS]


@pytest.mark.parametrize("backend,layout,forward,backward", registered_ops(),
                         ids=lambda v: v if isinstance(v, str) else v.name())
def test_opcheck(backend, layout, forward, backward):
    device = KERNEL_DEVICE[backend]
    x = in_layout(torch.randn(2, 5, 6, 7), layout).to(device).requires_grad_()
    w = torch.randn(5, 1, 3, 3, device=device, requires_grad=True)
    torch.library.opcheck(forward, (x, w, [1, 2], [1, 1], [1, 1], True))
    g = in_layout(torch.randn(2, 5, 6, 4), layout).to(device)
    torch.library.opcheck(backward, (g, x.detach(), w.detach(), [1, 2], [1, 1], [1, 1], True, True, True))
    torch.library.opcheck(backward, (g, x.detach(), w.detach(), [1, 2], [1, 1], [1, 1], True, False, True))


needs_triton = pytest.mark.skipif("triton" not in kernel_backends(DEVICE), reason="Triton is not usable here")


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_triton_launches_its_kernels_and_no_copy_of_dense_maps(layout):
    """backend='triton' runs the three kernels (a fallback to PyTorch would match
    the values too), walks channels_last maps in that order and contiguous ones
    in theirs (results in x's layout), and copies any other strides once, to
    contiguous."""
    x = torch.randn(2, 8, 6, 12, device=DEVICE)
    x = x[..., ::2] if layout == "strided" else in_layout(x[..., :6], layout)
    x.requires_grad_()
    w = torch.randn(8, 1, 3, 3, device=DEVICE, requires_grad=True)
    with triton_launches() as launches:
        y = depthwise_conv2d(x, w, padding=1, relu_input=True, backend="triton")
        gx, gw = torch.autograd.grad(y, (x, w), torch.randn_like(y))
    assert [name for name, *_ in launches] == ["_depthwise_forward_kernel", "_depthwise_input_grad_kernel",
                                               "_depthwise_weight_grad_kernel"]
    assert launches[0][1]["CL"] == (layout == "nhwc")
    format = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert y.is_contiguous(memory_format=format) and gx.is_contiguous(memory_format=format)
    x64, w64, want = expected(x, w, 1, 1, 1, True)
    assert_close(y, want, torch.float32, what="y")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    """Half-precision maps run the Triton kernels (float32 accumulation, one
    rounding at the store), within half-precision tolerance of float64."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 7, device=DEVICE).to(dtype).requires_grad_()
    w = torch.randn(8, 1, 5, 5, device=DEVICE).to(dtype).requires_grad_()
    with triton_launches() as launches:
        y = depthwise_conv2d(x, w, padding=4, dilation=2, relu_input=True, backend="triton")
    assert len(launches) == 1 and y.dtype == dtype
    x64, w64, want = expected(x, w, 1, 4, 2, True)
    assert_close(y, want, dtype, scale=4, what="y")
    g = torch.randn_like(want)
    gx, gw = torch.autograd.grad(y, (x, w), g.to(dtype))
    gx_want, gw_want = torch.autograd.grad(want, (x64, w64), g)
    assert gx.dtype == gw.dtype == dtype
    assert_close(gx, gx_want, dtype, scale=4, what="grad x")
    assert_close(gw, gw_want, dtype, scale=y[:, 0].numel() ** 0.5, what="grad weight")


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_triton_many_programs_per_sample(layout, monkeypatch):
    """Tiles of a few channels and pixels (the GPU's tiles on a big map, here on
    a tiny one): channel and pixel blocks, their tails, and the weight
    gradient's partial sums over many programs."""
    import nasops.triton.depthwise_conv2d as kernels
    monkeypatch.setattr(kernels, "_TILE", 16)
    monkeypatch.setattr(kernels, "_MAX_TILE_CHANNELS", 4)
    torch.manual_seed(1)
    x = in_layout(torch.randn(2, 7, 6, 5, dtype=torch.float64, device=DEVICE), layout).requires_grad_()
    w = torch.randn(7, 1, 3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with triton_launches() as launches:
        y = depthwise_conv2d(x, w, stride=(2, 1), padding=(1, 2), relu_input=True, backend="triton")
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), g)
    assert len(launches) == 3
    for _, params, _ in launches:  # several channel blocks or several pixel blocks per sample
        assert params["BLOCK_C"] * params["BLOCK_P"] <= 16 and params["BLOCK_C"] < 7
    x64, w64, want = expected(x, w, (2, 1), (1, 2), 1, True)
    gx_want, gw_want = torch.autograd.grad(want, (x64, w64), g)
    assert_close(y, want, torch.float64, what="y")
    assert_close(gx, gx_want, torch.float64, what="grad x")
    assert_close(gw, gw_want, torch.float64, what="grad weight")


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


@needs_triton
@pytest.mark.parametrize("op_name", ["sep_conv_5x5", "dil_conv_3x3"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_triton_search_ops_equal_pytorch(op_name, layout):
    """A DARTS op (ReLU -> depthwise -> pointwise -> BatchNorm, twice for SepConv)
    with backend='triton' computes what it computes on PyTorch's convolution:
    output, input and parameter gradients, and it launches the Triton kernels."""
    from nasops.spaces.operations import make_darts_op
    torch.manual_seed(0)
    op = make_darts_op(op_name, 4, 1).double().to(DEVICE)
    x = in_layout(torch.randn(2, 4, 6, 6, dtype=torch.float64, device=DEVICE), layout).requires_grad_()
    dy = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=DEVICE)
    results = {}
    for backend in ("eager", "triton"):
        nasops.set_backend(backend)
        try:
            with triton_launches() as launches:
                y = op(x)
                grads = torch.autograd.grad(y, [x, *op.parameters()], dy)
        finally:
            nasops.set_backend(None)
        results[backend] = (y, grads, len([n for n, *_ in launches if n.startswith("_depthwise")]))
    (y_ref, g_ref, _), (y, g, depthwise_launches) = results["eager"], results["triton"]
    assert depthwise_launches == 3 * (2 if op_name.startswith("sep") else 1)
    assert_close(y, y_ref, torch.float64, what="y")
    for name, got, want in zip(["x"] + [n for n, _ in op.named_parameters()], g, g_ref):
        assert_close(got, want, torch.float64, what=f"grad {name}")


@needs_triton
def test_use_depthwise_backend_switches_only_the_depthwise_layers():
    """use_depthwise_backend runs a network's ReLU -> depthwise layers on one backend
    (the Triton kernels here), every other op on the process's choice, and None
    gives them back to it."""
    from nasops.spaces.operations import ReLUDepthwiseConv2d, make_darts_op, use_depthwise_backend
    torch.manual_seed(0)
    op = make_darts_op("sep_conv_3x3", 4, 1).to(DEVICE)
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    assert use_depthwise_backend(op, "triton") == 2
    assert all(m.backend == "triton" for m in op.modules() if isinstance(m, ReLUDepthwiseConv2d))
    with triton_launches() as launches:
        y = op(x)
    assert [name for name, *_ in launches] == ["_depthwise_forward_kernel"] * 2
    assert use_depthwise_backend(op, None) == 2
    with triton_launches() as launches:
        want = op(x)
    assert not [name for name, *_ in launches if name.startswith("_depthwise")]  # cpu / auto again
    assert_close(y, want, torch.float32, what="y")
    with pytest.raises(ValueError, match="backend: expected one of"):
        use_depthwise_backend(op, "nope")


def test_auto_keeps_pytorchs_convolution_on_cuda(monkeypatch):
    """Where nasops._C has no CUDA kernels, 'auto' resolves CUDA tensors to Triton
    for the other ops; the depthwise convolution keeps PyTorch's there (its
    Triton kernels are taken by name only, until a GPU measures them faster)."""
    import nasops.backend as backend
    from nasops.ops.depthwise_conv2d import _backend_for
    monkeypatch.delenv("NASOPS_BACKEND", raising=False)
    monkeypatch.setattr(backend, "_AVAILABILITY", {**backend._AVAILABILITY, "cuda": "not built", "triton": ""})
    cuda = torch.device("cuda")
    assert backend.resolve(None, cuda) == "triton"
    assert _backend_for(None, cuda) == "eager"
    assert _backend_for("triton", cuda) == "triton"
    nasops.set_backend("triton")
    try:
        assert _backend_for(None, cuda) == "triton"  # asked for by name, process-wide
    finally:
        nasops.set_backend(None)
