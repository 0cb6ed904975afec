"""AffineFreeBatchNorm2d: nn.BatchNorm2d(affine=False) whose backward keeps its output."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import nasops.spaces
from nasops.backend import extension_loaded
from nasops.spaces.operations import AffineFreeBatchNorm2d, make_darts_op, make_nb201_op, use_torch_batch_norm

# The layer is the compiled op affine_free_batch_norm (csrc/batch_norm.cpp); without
# nasops._C it is nn.BatchNorm2d, which these tests would compare with itself.
pytestmark = pytest.mark.skipif(not extension_loaded(), reason="nasops._C is not built")

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _maps(layout, dtype=torch.float64, shape=(4, 6, 5, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=g, dtype=dtype) + 1).contiguous(memory_format=LAYOUTS[layout])


def _lean_backward(y: torch.Tensor) -> bool:
    return y.grad_fn is not None and "BatchNormKeepingOutput" in y.grad_fn.name()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
def test_equals_torch_batch_norm(layout, momentum, track):
    """Three training steps: the same outputs (bitwise), input gradients (to
    rounding), running statistics and batch counter as nn.BatchNorm2d."""
    lean = AffineFreeBatchNorm2d(6, momentum=momentum, track_running_stats=track).double()
    torch_bn = nn.BatchNorm2d(6, affine=False, momentum=momentum, track_running_stats=track).double()
    for step in range(3):
        x = _maps(layout, seed=step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = lean(x), torch_bn(x_ref)
        assert _lean_backward(y)
        assert torch.equal(y, y_ref)
        assert y.is_contiguous(memory_format=LAYOUTS[layout])
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
        assert x.grad.is_contiguous(memory_format=LAYOUTS[layout])
    assert lean.state_dict().keys() == torch_bn.state_dict().keys()
    for key, value in torch_bn.state_dict().items():
        assert torch.equal(lean.state_dict()[key], value), key


def test_gradcheck():
    bn = AffineFreeBatchNorm2d(3).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bn, (x,))


def _saved_storages(fn, *args):
    """{data_ptr: nbytes} of every tensor autograd saves while ``fn(*args)`` runs
    (one entry per storage, however many nodes save it), and fn's result."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return saved, out


@pytest.mark.parametrize("bn_class", [AffineFreeBatchNorm2d, nn.BatchNorm2d])
def test_keeps_its_output_not_its_input(bn_class):
    """conv -> BatchNorm: the lean layer keeps y, not the conv's output (which
    nn.BatchNorm2d keeps: the control that shows the check can fail)."""
    conv = nn.Conv2d(4, 6, 1, bias=False).double()
    bn = bn_class(6, affine=False).double() if bn_class is nn.BatchNorm2d else bn_class(6).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    inner = {}

    def net(x):
        c = conv(x)
        inner["c"] = c.untyped_storage().data_ptr()
        return bn(c)

    saved, y = _saved_storages(net, x)
    if bn_class is AffineFreeBatchNorm2d:
        assert inner["c"] not in saved and y.untyped_storage().data_ptr() in saved
    else:
        assert inner["c"] in saved


@pytest.mark.parametrize("case", ["eval", "no_grad", "input_needs_no_grad"])
def test_torch_path_where_nothing_is_kept(case):
    """Where no backward will read x^, the layer is nn.BatchNorm2d's forward."""
    lean, torch_bn = AffineFreeBatchNorm2d(6).double(), nn.BatchNorm2d(6, affine=False).double()
    x = _maps("nhwc").requires_grad_(case != "input_needs_no_grad")
    if case == "eval":
        for m in (lean, torch_bn):
            m.running_mean.fill_(0.5)
            m.eval()
    with torch.set_grad_enabled(case != "no_grad"):
        y = lean(x)
        assert not _lean_backward(y)
        assert torch.equal(y, torch_bn(x))


def test_autocast_bfloat16_matches_torch_batch_norm():
    """Under autocast a bfloat16 input keeps its dtype (as in nn.BatchNorm2d), and
    the gradient, read from the bfloat16 output, is as close to float64's as
    nn.BatchNorm2d's, read from the bfloat16 input."""
    exact = _maps("nhwc", shape=(8, 6, 6, 6)).requires_grad_()
    dy = torch.randn_like(exact)
    AffineFreeBatchNorm2d(6).double()(exact).backward(dy)
    errors = {}
    for cls in (AffineFreeBatchNorm2d, nn.BatchNorm2d):
        bn = cls(6) if cls is AffineFreeBatchNorm2d else cls(6, affine=False)
        x = exact.detach().bfloat16().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = bn(x)
        assert y.dtype == torch.bfloat16
        y.backward(dy.bfloat16())
        errors[cls] = float((x.grad.double() - exact.grad).norm() / exact.grad.norm())
    assert errors[AffineFreeBatchNorm2d] < 2 * errors[nn.BatchNorm2d] + 1e-3, errors


def test_search_ops_use_it_and_trained_ops_do_not():
    """A search network's ops normalise without affine parameters (this layer);
    a found cell's ops, trained from scratch, keep nn.BatchNorm2d with them."""
    for op in (make_darts_op("sep_conv_3x3", 8, 1), make_darts_op("dil_conv_5x5", 8, 2),
               make_darts_op("max_pool_3x3", 8, 1), make_darts_op("skip_connect", 8, 2),
               make_nb201_op("nor_conv_3x3", 8)):
        norms = [m for m in op.modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and all(type(m) is AffineFreeBatchNorm2d for m in norms), op
    for op in (make_darts_op("sep_conv_3x3", 8, 1, search=False), make_nb201_op("nor_conv_3x3", 8, search=False)):
        assert all(type(m) is nn.BatchNorm2d and m.affine for m in op.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_search_network_keeps_less_for_the_same_gradients(space):
    """A search network's training forward keeps less for its backward (DARTS: a
    third of its edges' convolution maps, ~25 % of all it keeps) and gets the same
    gradients and running statistics as with nn.BatchNorm2d."""
    torch.manual_seed(0)
    lean = nasops.spaces.build(space, in_channels=3, num_classes=5, C=8, layers=1 if space == "nb201" else 3)
    lean = lean.double().to(memory_format=torch.channels_last).train()
    torch_bn = copy.deepcopy(lean)
    assert use_torch_batch_norm(torch_bn) > 0
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (4,))
    kept, grads = {}, {}
    for name, net in (("lean", lean), ("torch", torch_bn)):
        saved, logits = _saved_storages(net, x)
        kept[name] = sum(saved.values())
        torch.nn.functional.cross_entropy(logits, y).backward()
        grads[name] = {n: p.grad for n, p in net.named_parameters()}
    assert kept["lean"] <= (0.8 if space == "darts" else 0.9) * kept["torch"], kept
    assert not any(type(m) is AffineFreeBatchNorm2d for m in torch_bn.modules())
    for n in grads["torch"]:
        torch.testing.assert_close(grads["lean"][n], grads["torch"][n], rtol=1e-9, atol=1e-12, msg=n)
    torch_state = torch_bn.state_dict()
    for key, value in lean.state_dict().items():
        torch.testing.assert_close(value, torch_state[key], rtol=1e-12, atol=0, msg=key)


def test_op_without_autograd_is_the_forward():
    """Below autograd (inference mode) the op is native_batch_norm's training forward."""
    x = _maps("nhwc")
    mean, var = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    ref_mean, ref_var = mean.clone(), var.clone()
    with torch.inference_mode():
        y = torch.ops.nasops.affine_free_batch_norm(x, mean, var, 0.1, 1e-5)
    assert torch.equal(y, torch.nn.functional.batch_norm(x, ref_mean, ref_var, training=True))
    assert torch.equal(mean, ref_mean) and torch.equal(var, ref_var)


_FILLS = {torch.ops.aten.zeros_like, torch.ops.aten.ones_like, torch.ops.aten.zeros, torch.ops.aten.ones,
          torch.ops.aten.full, torch.ops.aten.fill_, torch.ops.aten.zero_, torch.ops.aten.new_zeros,
          torch.ops.aten.new_ones}


def _fills_in_backward(bn, x) -> int:
    """How many tensors of constants the layer's backward makes (fill-like ATen calls)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fills(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Fills.count += func.overloadpacket in _FILLS
            return func(*args, **(kwargs or {}))

    y = bn(x)
    dy = torch.randn_like(y)
    with Fills():
        torch.autograd.grad(y, x, dy)
    return Fills.count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_makes_its_zero_mean_and_unit_invstd_once(dtype):
    """The backward hands native_batch_norm_backward a mean of zeros and an invstd
    of ones (those of y). They are made once per device, dtype and channel count
    and kept, not by every backward: on a GPU each would be a kernel, ~3,000 a
    DARTS search step. 11 channels: a size no other test here uses."""
    bn = AffineFreeBatchNorm2d(11).to(dtype)
    x = torch.randn(3, 11, 4, 4, dtype=dtype, requires_grad=True)
    _fills_in_backward(bn, x)  # the first backward of this kind may make them
    assert _fills_in_backward(bn, x) == 0
    assert _fills_in_backward(AffineFreeBatchNorm2d(11).to(dtype), x) == 0  # any layer of the kind


def test_fake_tensors_never_meet_the_kept_statistics():
    """A backward traced with fake tensors (torch.compile, opcheck) makes its own
    statistics, and never keeps them: after it a real backward of the same size
    is right, and a fake one after a real one takes no real tensor (which
    FakeTensorMode would refuse)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    C = 13  # a size no other test here uses

    def grad(bn, x, dy):
        return torch.autograd.grad(bn(x), x, dy)[0]

    def fake_grad():
        with FakeTensorMode():
            x = torch.randn(2, C, 3, 3, dtype=torch.float64, requires_grad=True)
            assert grad(AffineFreeBatchNorm2d(C).double(), x, torch.randn_like(x)).shape == x.shape

    fake_grad()
    x = torch.randn(2, C, 3, 3, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    torch.testing.assert_close(grad(AffineFreeBatchNorm2d(C).double(), x, dy),
                               grad(nn.BatchNorm2d(C, affine=False).double(), x, dy), rtol=1e-12, atol=1e-12)
    fake_grad()
