"""--recompute-depthwise (nasops.spaces.operations): a SepConv or DilConv keeps
its input for the backward, not its depthwise convolutions' outputs, and
computes the same values and gradients as without it, on every depthwise path
(the C++ kernel, the Triton kernels, PyTorch's convolution), under autocast and
under torch.compile; it takes only the gradients a backward asks for."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nasops
from nasops.spaces.operations import make_darts_op, set_recompute_depthwise, use_depthwise_backend
from helpers import DEVICE, assert_close, kernel_backends, triton_launches

SEPARABLE_OPS = ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
# (depthwise backend, layout): the C++ kernel reads channels_last maps; PyTorch's
# convolution runs for 'eager' (and for NCHW maps on the CPU); the Triton kernels
# read both layouts (on CUDA, or in the interpreter).
PATHS = ([("cpu", "nhwc")] if "cpu" in kernel_backends("cpu") and DEVICE == "cpu" else []) + \
    [("eager", "nchw"), ("eager", "nhwc")] + \
    [("triton", layout) for layout in ("nchw", "nhwc") if "triton" in kernel_backends(DEVICE)]
# Maps the depthwise convolutions write per op: SepConv two, DilConv one.
DEPTHWISE_MAPS = {"sep": 2, "dil": 1}


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


def _pair(op_name, stride, backend, dtype=torch.float64):
    """(plain op, the same op recomputing its depthwise outputs), on ``backend``'s depthwise path."""
    torch.manual_seed(0)
    plain = make_darts_op(op_name, 4, stride).to(DEVICE, dtype).train()
    use_depthwise_backend(plain, backend)
    recompute = copy.deepcopy(plain)
    assert set_recompute_depthwise(recompute) == 1
    return plain, recompute


@pytest.mark.parametrize("path", PATHS, ids="-".join)
@pytest.mark.parametrize("op_name", SEPARABLE_OPS)
@pytest.mark.parametrize("stride", [1, 2])
def test_same_values_gradients_and_statistics(path, op_name, stride):
    backend, layout = path
    plain, recompute = _pair(op_name, stride, backend)
    x = _layout(torch.randn(2, 4, 7, 7, dtype=torch.float64, device=DEVICE), layout).requires_grad_()
    results = []
    for op in (plain, recompute):
        with triton_launches() as launches:
            y = op(x)
            dy = torch.randn(y.shape, dtype=y.dtype, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
            grads = torch.autograd.grad(y, [x, *op.parameters()], dy)
        depthwise_launches = len([name for name, *_ in launches if name.startswith("_depthwise")])
        results.append((y, grads, {n: b.clone() for n, b in op.named_buffers()}, depthwise_launches))
    (y_a, g_a, b_a, launches_a), (y_b, g_b, b_b, launches_b) = results
    assert_close(y_b, y_a, torch.float64, what="y")
    for name, got, want in zip(["x"] + [n for n, _ in plain.named_parameters()], g_b, g_a):
        assert_close(got, want, torch.float64, what=f"grad {name}")
    for name in b_a:  # running statistics moved once, by the forward
        assert torch.equal(b_a[name], b_b[name]), name
    if backend == "triton":  # forward, then backward: the recomputation and the gradient
        maps = DEPTHWISE_MAPS[op_name[:3]]
        assert (launches_a, launches_b) == (3 * maps, 4 * maps)
    with torch.no_grad():  # no backward to come: the plain forward
        assert_close(recompute(x), y_a, torch.float64, what="y without grad")


def _saved_maps(op, x) -> int:
    """How many distinct storages of x's size autograd keeps for the backward of ``op(x)``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(x)
    return sum(1 for n in storages.values() if n == x.untyped_storage().nbytes())


@pytest.mark.parametrize("op_name", ["sep_conv_3x3", "dil_conv_5x5"])
@pytest.mark.parametrize("path", PATHS, ids="-".join)
def test_keeps_no_depthwise_output(op_name, path):
    """Recomputing, an op keeps its input and its BatchNorms' outputs (SepConv
    3 maps, DilConv 2); the plain op keeps the depthwise outputs too (and on
    PyTorch's path, where the ReLU is its own op, the ReLUs' outputs)."""
    backend, layout = path
    plain, recompute = _pair(op_name, 1, backend, torch.float32)
    x = _layout(torch.randn(2, 4, 6, 6, device=DEVICE), layout).requires_grad_()
    kept, kept_recompute = _saved_maps(plain, x), _saved_maps(recompute, x)
    maps = DEPTHWISE_MAPS[op_name[:3]]
    assert kept_recompute == 1 + maps, (kept, kept_recompute)
    relu_maps = maps if backend == "eager" else 0  # the kernels apply the ReLU as they read x
    assert kept == 1 + 2 * maps + relu_maps - (1 if relu_maps else 0), (kept, kept_recompute)


class _ConvolutionBackwards(TorchDispatchMode):
    """Records which gradients every aten.convolution_backward computes (its output_mask)."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(tuple(args[-1]))
        return func(*args, **(kwargs or {}))


def test_takes_only_the_gradients_the_backward_asks_for():
    """autograd.grad(y, x) (as DARTS' architecture step asks for the alphas'
    path only) computes no weight gradient of the pointwise convolutions, nor of
    the depthwise ones (PyTorch's, NCHW); a plain backward computes them."""
    _, recompute = _pair("sep_conv_3x3", 1, "eager", torch.float32)
    x = torch.randn(2, 4, 6, 6, device=DEVICE, requires_grad=True)
    with _ConvolutionBackwards() as mode:
        torch.autograd.grad(recompute(x).sum(), [x])
    assert len(mode.masks) == 4 and all(not mask[1] for mask in mode.masks), mode.masks
    with _ConvolutionBackwards() as mode:
        recompute(x).sum().backward()
    assert len(mode.masks) == 4 and all(mask[1] for mask in mode.masks), mode.masks


def test_under_autocast_same_as_plain():
    """Under autocast the recomputation runs in the forward's half precision
    again; the weights' gradients come back in their own dtype."""
    plain, recompute = _pair("sep_conv_5x5", 1, None, torch.float32)
    x = torch.randn(2, 4, 6, 6, device=DEVICE, requires_grad=True)
    results = []
    for op in (plain, recompute):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = op(x)
        results.append((y, torch.autograd.grad(y.float().sum(), [x, *op.parameters()])))
    (y_a, g_a), (y_b, g_b) = results
    assert y_a.dtype == y_b.dtype == torch.bfloat16
    torch.testing.assert_close(y_b, y_a)
    for (name, p), a, b in zip(plain.named_parameters(), g_a[1:], g_b[1:]):
        assert b.dtype == p.dtype, name
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2, msg=name)
    torch.testing.assert_close(g_b[0], g_a[0], rtol=2e-2, atol=2e-2)


def test_torch_compile_fullgraph_checkpoints_the_pairs():
    """Under torch.compile the pairs are checkpointed (dynamo cannot trace the
    recomputing Function's backward): one graph, the plain op's values and gradients."""
    plain, recompute = _pair("dil_conv_3x3", 1, None, torch.float32)
    x = torch.randn(2, 4, 6, 6, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(recompute, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    grads = torch.autograd.grad(y.sum(), [x, *recompute.parameters()])
    y_want = plain(x)
    grads_want = torch.autograd.grad(y_want.sum(), [x, *plain.parameters()])
    torch.testing.assert_close(y, y_want)
    for got, want in zip(grads, grads_want):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # sums in another order


def test_switch_counts_the_separable_ops_and_turns_off():
    net = nasops.spaces.build("darts", in_channels=3, num_classes=5, C=4, layers=2)
    # 2 cells x 14 edges x (2 SepConv + 2 DilConv)
    assert set_recompute_depthwise(net) == 2 * 14 * 4
    assert set_recompute_depthwise(net, False) == 2 * 14 * 4
    assert not any(getattr(m, "recompute_depthwise", False) for m in net.modules())
    assert set_recompute_depthwise(nasops.spaces.build("nb201", in_channels=3, num_classes=5, C=4, layers=1)) == 0
