"""Second derivatives (a backward with create_graph=True: Hessian-vector products
such as RobustDARTS' eigenvalue of the architecture Hessian, gradient penalties).

The eager backend and the search networks' default path are twice
differentiable; nasops' kernels and the recomputing Functions compute first
derivatives only and refuse a double backward by name: before, autograd.grad
with ``inputs`` skipped them and returned the second derivative without their
part (None, or 0 through a registered op), silently."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nasops
import nasops.ops as ops
from nasops.backend import extension_loaded
from nasops.spaces import build
from nasops.spaces.base import set_recompute_edges
from nasops.spaces.operations import AffineFreeBatchNorm2d, MaxPool3x3, set_recompute_depthwise, use_torch_batch_norm
from nasops.spaces.vit import VitSearchNetwork
from helpers import kernel_backends

REFUSED = r"has no double backward \(create_graph=True"


def _second_derivative(f, x, w):
    """d/dw |d f(x, w) / dx|^2: needs the double backward through f."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    (gx,) = torch.autograd.grad(f(x, w), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum(), w)[0]


def _op_calls(backend):
    """(name, f(x, w) -> scalar, x, w) per public op with kernels, on ``backend``."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    maps = [randn(2, 3, 4, 4) for _ in range(2)]
    q, k, mix, Wk = randn(2, 4, 5), randn(2, 4, 3, 5), randn(2, 4, 3), randn(3, 5)
    return [
        ("nasops.mixed_op's kernels",
         lambda x, w: ops.mixed_op([x, *maps], w.softmax(-1), backend=backend).pow(2).sum(), randn(2, 3, 4, 4),
         randn(3)),
        ("nasops.depthwise_conv2d's kernels",
         lambda x, w: ops.depthwise_conv2d(x, w, padding=1, backend=backend).pow(2).sum(),
         randn(2, 3, 4, 4).to(memory_format=torch.channels_last), randn(3, 1, 3, 3)),  # the CPU kernel's layout
        ("nasops.patch_softmax_attention's kernels",
         lambda x, w: (ops.patch_softmax_attention(x, k, w, backend=backend) * mix).pow(2).sum(), q,
         randn(3)),
        ("nasops.patch_attention_mixed_op's kernels",
         lambda x, w: ops.patch_attention_mixed_op(x, [x, x.flip(-1)], w, Wk, (2, 2),
                                                   backend=backend)[0].pow(2).sum(), randn(2, 3, 4, 4), randn(3, 5)),
        ("nasops.topk_tokens' kernels",
         # the sigmoid gate: the straight-through one is no derivative to check (by design)
         lambda x, w: ops.topk_tokens(x, x @ w, x @ w.T, 3, gate="sigmoid", backend=backend)[0].pow(2).sum(),
         randn(2, 6, 4), randn(4, 4)),
    ]


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_kernels_refuse_a_double_backward_by_name(backend):
    for name, f, x, w in _op_calls(backend):
        with pytest.raises(RuntimeError, match=f"{name} {REFUSED}.*backend='eager'"):
            _second_derivative(f, x, w)
        # a plain backward is untouched
        x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        f(x_, w_).backward()
        assert x_.grad is not None and w_.grad is not None


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_registered_ops_refuse_a_double_backward(backend):
    """The ops as torch.compile sees them (torch.ops.nasops.*): their autograd rule
    (a backward that is to create a graph is refused at once)."""
    op = torch.ops.nasops.mixed_op.default if backend != "triton" else torch.ops.nasops.mixed_op_triton.default
    maps = [torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    w = torch.randn(1, 1, 2, dtype=torch.float64, requires_grad=True)
    loss = op(maps, w, [1, 1]).pow(2).sum()
    with pytest.raises(RuntimeError, match=f"nasops.mixed_op's kernels {REFUSED}"):
        torch.autograd.grad(loss, maps[0], create_graph=True)
    assert torch.autograd.grad(loss, w)[0].abs().sum() > 0


def test_the_eager_backend_is_twice_differentiable():
    for name, f, x, w in _op_calls("eager"):
        assert torch.autograd.gradgradcheck(f, (x.clone().requires_grad_(), w.clone().requires_grad_())), name


def test_max_pool_finding_indices_again_has_torchs_second_derivatives():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    for stride in (1, 2):
        pool = MaxPool3x3(stride)
        torch.autograd.gradgradcheck(pool, (x,))
        g = torch.randn(2, 3, 6 // stride, 6 // stride, dtype=torch.float64, requires_grad=True)
        ours = torch.autograd.grad(pool(x), x, g, create_graph=True)[0]
        theirs = torch.autograd.grad(F.max_pool2d(x, 3, stride, 1), x, g, create_graph=True)[0]
        v = torch.randn_like(ours)
        assert torch.equal(torch.autograd.grad(ours, g, v)[0], torch.autograd.grad(theirs, g, v)[0])


@pytest.mark.skipif(not extension_loaded(), reason="nasops._C not built: no affine_free_batch_norm op")
def test_affine_free_batch_norm_refuses_a_double_backward_and_the_eager_backend_runs_torchs():
    """The search cells' BatchNorm: the C++ op keeps y, not x, so its backward
    cannot be differentiated in x (invstd's dependence is not there): it refuses;
    under the eager backend the layer is PyTorch's BatchNorm, second derivatives
    included."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    bn = AffineFreeBatchNorm2d(3).double()
    with pytest.raises(RuntimeError, match=f"nasops.affine_free_batch_norm {REFUSED}.*backend='eager'"):
        torch.autograd.grad(bn(x), x, g, create_graph=True)
    results = []
    for backend, layer in (("eager", bn), ("auto", torch.nn.BatchNorm2d(3, affine=False).double())):
        nasops.set_backend(backend)
        try:
            (gx,) = torch.autograd.grad(layer(x), x, g, create_graph=True)
            results.append(torch.autograd.grad((gx * v).sum(), (x, g)))
        finally:
            nasops.set_backend(None)
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)


def _arch_hvp(net, x, y, v):
    """The Hessian of the loss in the alphas times ``v`` (one per alpha tensor)."""
    alphas = net.arch_parameters()
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), alphas, create_graph=True)
    return torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, v)), alphas)


def _arch_grads(net, x, y):
    return torch.autograd.grad(F.cross_entropy(net(x), y), net.arch_parameters())


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_the_architecture_hessian_of_an_eager_network_is_pytorchs(monkeypatch, space):
    """RobustDARTS' diagnostic, the Hessian-vector product in the alphas, through
    every op of the cells, on the eager backend: the same as with PyTorch's own
    BatchNorm and max pool in place of nasops' (AffineFreeBatchNorm2d,
    MaxPool3x3's Function), and not zero. (Not a finite difference of the
    gradient: ReLU and max pool kinks make that of a ReLU network meaningless.)"""
    torch.manual_seed(0)
    net = build(space, in_channels=3, num_classes=5, C=4, layers=3 if space == "darts" else 1).double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    v = [torch.randn_like(a) for a in net.arch_parameters()]
    nasops.set_backend("eager")
    try:
        ours = _arch_hvp(net, x, y, v)
        assert use_torch_batch_norm(net) > 0
        monkeypatch.setattr(MaxPool3x3, "forward", lambda self, t: F.max_pool2d(t, 3, self.stride, 1))
        theirs = _arch_hvp(net, x, y, v)
    finally:
        nasops.set_backend(None)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert a.abs().max() > 1e-3


@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_a_network_on_kernels_refuses_the_architecture_hessian(backend):
    torch.manual_seed(0)
    # NB201: mixed_op kernels, no depthwise convolution (the Triton interpreter's slowest)
    net = build("nb201", in_channels=3, num_classes=5, C=4, layers=1)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))
    nasops.set_backend(backend)
    try:
        with pytest.raises(RuntimeError, match=f"{REFUSED}.*backend='eager'"):
            _arch_hvp(net, x, y, [torch.ones_like(a) for a in net.arch_parameters()])
    finally:
        nasops.set_backend(None)


@pytest.mark.parametrize("recompute", ["edges", "depthwise", "tokens"])
def test_recomputing_functions_refuse_a_double_backward_by_name(recompute):
    torch.manual_seed(0)
    if recompute == "tokens":
        net = VitSearchNetwork(in_channels=1, num_classes=4, embed_dim=16, depth=1, image_size=8, patch_size=2,
                               token_ratio=0.5)
        x, y, message = torch.randn(2, 1, 8, 8), torch.randint(0, 4, (2,)), "token selection.*--token-ratio 1"
    else:
        net = build("darts", in_channels=3, num_classes=5, C=4, layers=3)
        x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))
        if recompute == "edges":
            set_recompute_edges(net, True)
            message = "a recomputing edge.*without recomputing its edges"
        else:
            set_recompute_depthwise(net, True)
            message = "a recomputing separable convolution.*without recomputing its depthwise"
    nasops.set_backend("eager")
    try:
        with pytest.raises(RuntimeError, match=message):
            _arch_hvp(net, x, y, [torch.ones_like(a) for a in net.arch_parameters()])
        assert all(g is not None for g in _arch_grads(net, x, y))  # first derivatives as before
    finally:
        nasops.set_backend(None)
