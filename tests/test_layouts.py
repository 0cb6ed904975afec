"""channels_last (NHWC) maps on every backend: mixed_op and the patch-attention
ops read them in place and return results and gradients in the maps' layout.

Every case compares with the independent float64 formulas of
tests/test_mixed_op.py and tests/test_patch_attention.py, for each layout and
weight shape, forward and backward; the kernels' outputs' strides are checked
against the fake (meta) implementations', and the compiled CPU kernels must
not copy anything (no aten copy under the profiler).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import DEVICE, assert_close, available_backends, kernel_backends
from nasops.ops import mixed_op, patch_attention_mixed_op, patch_pool
from nasops.ops import _layout
from nasops.ops._registry import unique_variants
from nasops.ops.mixed_op import _KERNELS as MIX_KERNELS
from nasops.ops.patch_attention import _KERNELS as PATCH_KERNELS
from test_mixed_op import expected_mixed
from test_patch_attention import fused64, grads_of, pool64

BACKENDS = available_backends()
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
GRID = (3, 4)


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=LAYOUTS[layout]).detach().requires_grad_(t.requires_grad)


def has_layout(t: torch.Tensor, layout: str) -> bool:
    return t.is_contiguous(memory_format=LAYOUTS[layout])


def make_weights(shape: str, B: int, K: int) -> torch.Tensor:
    size = {"(K,)": (K,), "(B,K)": (B, K), "(B,P,K)": (B, GRID[0] * GRID[1], K)}[shape]
    return torch.randn(size, device=DEVICE).softmax(-1).requires_grad_()


# ---- mixed_op ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weights_shape", ["(K,)", "(B,K)", "(B,P,K)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_op_layout_forward_backward(backend, layout, weights_shape, dtype):
    B, K = 2, 4
    # C = 5 channels: a channels_last row is W*C = 50 elements whose patch
    # columns (W = 10 cut in 4) start at pixels 0, 3, 5, 8: elements 0, 15, 25, 40.
    outputs = [None if k == 1 else
               in_layout(torch.randn(B, 5, 7, 10, device=DEVICE).to(dtype).requires_grad_(), layout)
               for k in range(K)]
    w = make_weights(weights_shape, B, K)
    grid = GRID if weights_shape == "(B,P,K)" else None
    y = mixed_op(outputs, w, grid=grid, backend=backend)
    assert y.dtype == dtype and has_layout(y, layout), y.stride()

    ref_in = [None if o is None else o.detach().double().requires_grad_() for o in outputs]
    ref_w = w.detach().double().requires_grad_()
    ref = expected_mixed(ref_in, ref_w, grid)
    assert_close(y, ref, dtype, what="y")

    g = torch.randn_like(ref)
    y.backward(in_layout(g.to(dtype), layout))
    ref.backward(g)
    for k, (o, r) in enumerate(zip(outputs, ref_in)):
        if o is not None:
            assert has_layout(o.grad, layout), f"grad outputs[{k}] strides {o.grad.stride()}"
            assert_close(o.grad, r.grad, dtype, what=f"grad outputs[{k}]")
    terms = outputs[0][0].numel() / (w.shape[1] if weights_shape == "(B,P,K)" else 1)
    assert_close(w.grad, ref_w.grad, dtype, scale=math.sqrt(terms), what="grad weights")
    assert w.grad[..., 1].abs().max() == 0  # the Zero op


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_op_gradient_in_the_other_layout(backend):
    # autograd decides the incoming gradient's layout; the outputs' wins.
    outputs = [in_layout(torch.randn(2, 6, 5, 8, device=DEVICE).requires_grad_(), "nhwc") for _ in range(3)]
    w = make_weights("(B,P,K)", 2, 3)
    y = mixed_op(outputs, w, grid=GRID, backend=backend)
    g = torch.randn(y.shape, device=DEVICE)  # contiguous
    y.backward(g)
    ref_in = [o.detach().double().requires_grad_() for o in outputs]
    ref_w = w.detach().double().requires_grad_()
    expected_mixed(ref_in, ref_w, GRID).backward(g.double())
    for o, r in zip(outputs, ref_in):
        assert has_layout(o.grad, "nhwc")
        assert_close(o.grad, r.grad, torch.float32, what="grad outputs")
    assert_close(w.grad, ref_w.grad, torch.float32, scale=4, what="grad weights")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layouts,expected", [
    (("nhwc", "nhwc", "nchw"), "nhwc"),   # the majority wins, the odd one is copied
    (("nchw", "nhwc", "nchw"), "nchw"),
    (("nhwc", "nchw"), "nhwc"),           # a tie: the first map's layout
    (("strided", "nhwc"), "nhwc"),        # other strides count for neither
])
def test_mixed_op_mixed_layouts(backend, layouts, expected):
    def make(layout):
        if layout == "strided":  # (2, 4, 6, 5) seen through a transpose: neither layout
            return torch.randn(2, 4, 5, 6, device=DEVICE).transpose(2, 3).requires_grad_()
        return in_layout(torch.randn(2, 4, 6, 5, device=DEVICE).requires_grad_(), layout)

    leaves = [make(layout) for layout in layouts]
    outputs = [t for t in leaves]
    w = make_weights("(B,K)", 2, len(outputs))
    y = mixed_op(outputs, w, backend=backend)
    assert has_layout(y, expected), y.stride()
    ref_in = [o.detach().double().requires_grad_() for o in outputs]
    ref = expected_mixed(ref_in, w.detach().double())
    assert_close(y, ref, torch.float32, what="y")
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    for o, r in zip(leaves, ref_in):
        assert_close(o.grad, r.grad, torch.float32, what="grad outputs")


def test_common_layout_copies_only_the_odd_ones_out():
    a, b = (torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last) for _ in range(2))
    c = torch.randn(2, 3, 4, 5)
    out = _layout.common_layout([a, b, c])
    assert out[0] is a and out[1] is b and out[2] is not c and has_layout(out[2], "nhwc")
    assert _layout.common_layout([a, b])[0] is a and _layout.common_layout([c, c])[1] is c
    # C == 1: both layouts are the same memory; nothing is copied, the order is NCHW.
    d = torch.randn(2, 1, 4, 5)
    assert _layout.common_layout([d, d.contiguous(memory_format=torch.channels_last)])[0] is d
    assert not _layout.kernel_channels_last([d, d.contiguous(memory_format=torch.channels_last)])


@pytest.mark.skipif("cpu" not in kernel_backends(), reason="needs the compiled CPU kernels")
def test_compiled_cpu_kernels_copy_nothing():
    outputs = [in_layout(torch.randn(4, 16, 8, 8).requires_grad_(), "nhwc") for _ in range(5)]
    x = in_layout(torch.randn(4, 8, 16, 16).requires_grad_(), "nhwc")
    Wq, Wk = torch.randn(8, 4, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    w_edge = make_weights("(K,)", 4, 5)
    w_patch = torch.randn(4, 4, 5).softmax(-1).requires_grad_()
    g = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        mixed_op(outputs, w_edge, backend="cpu").backward(g)
        mixed_op(outputs, w_patch, grid=(2, 2), backend="cpu").backward(g)
        y, w = patch_attention_mixed_op(x, outputs, Wq, Wk, (2, 2), backend="cpu")
        y.backward(g)
        patch_pool(x, (4, 4), backend="cpu").sum().backward()
    names = {e.name for e in prof.events()}
    assert "nasops::mixed_op" in names and "nasops::patch_attention_outputs_backward" in names
    # Small (B, P, .) tensors may be copied; a map never.
    copies = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
              and any(len(shape) == 4 for shape in e.input_shapes)]
    assert not copies, f"hidden copies of maps: {copies}"


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_triton_launcher_reads_channels_last_in_place():
    from nasops.triton import mixed_op as triton_mixed_op
    outputs = [torch.randn(2, 5, 7, 10, device=DEVICE).contiguous(memory_format=torch.channels_last)
               for _ in range(3)]
    w = torch.rand(2, 12, 3, device=DEVICE)
    outs, _, shape, _, pixel, channels_last, _ = triton_mixed_op._canonical(outputs, w, [3, 4])
    assert all(a is b for a, b in zip(outs, outputs))
    assert channels_last and pixel == 5 and shape == (2, 1, 7, 50)


# ---- fake implementations agree with the kernels on the layout -------------------------------

def _same_strides(op, args):
    """Run ``op`` on real tensors and under FakeTensorMode; their outputs' strides must agree."""
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        def fake(a):
            if isinstance(a, list):
                return [fake(t) for t in a]
            return mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
        fake_args = [fake(a) for a in args]
        fake = op(*fake_args)
    flat_real = [t for r in (real if isinstance(real, (tuple, list)) else [real])
                 for t in (r if isinstance(r, list) else [r])]
    flat_fake = [t for r in (fake if isinstance(fake, (tuple, list)) else [fake])
                 for t in (r if isinstance(r, list) else [r])]
    for r, f in zip(flat_real, flat_fake):
        assert r.shape == f.shape and r.stride() == f.stride(), (op, r.stride(), f.stride())
    return real


def mix_variants():
    return unique_variants({b: ops for b, ops in MIX_KERNELS.items() if b in kernel_backends()})


def patch_variants():
    return unique_variants({b: ops for b, ops in PATCH_KERNELS.items() if b in kernel_backends()})


@pytest.mark.parametrize("ops", mix_variants(), ids=lambda ops: ops[0].name())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_op_fake_strides_and_opcheck(ops, layout):
    forward, backward = ops
    outputs = [in_layout(torch.randn(2, 3, 5, 6, device=DEVICE).requires_grad_(), layout) for _ in range(3)]
    w = torch.randn(2, 4, 3, device=DEVICE).softmax(-1).requires_grad_()
    _same_strides(forward, [outputs, w, [2, 2]])
    g = in_layout(torch.randn(2, 3, 5, 6, device=DEVICE), layout)
    detached = [o.detach() for o in outputs]
    _same_strides(backward, [g, detached, w.detach(), [2, 2], True, True])
    torch.library.opcheck(forward, (outputs, w, [2, 2]))
    torch.library.opcheck(backward, (g, detached, w.detach(), [2, 2], True, True))


@pytest.mark.parametrize("ops", mix_variants(), ids=lambda ops: ops[0].name())
@pytest.mark.parametrize("batch", [2, 0])
def test_mixed_op_grad_w_is_contiguous_for_strided_weights(ops, batch):
    """Per-patch weights that are a view (a MIDAS edge could permute its logits) get a
    contiguous grad w from every kernel and from the fake: inductor checks a compiled
    backward's strides against the fake's (it failed on this before the fake agreed)."""
    forward, backward = ops
    outputs = [torch.randn(batch, 3, 5, 6, device=DEVICE) for _ in range(2)]
    w = torch.randn(2, 4, batch, device=DEVICE).permute(2, 1, 0)  # (B, P, K), strides (1, 2, 8)
    g = torch.randn(batch, 3, 5, 6, device=DEVICE)
    _, grad_w = _same_strides(backward, [g, outputs, w, [2, 2], True, True])
    assert grad_w.is_contiguous()
    torch.library.opcheck(backward, (g, outputs, w, [2, 2], True, True))


@pytest.mark.parametrize("ops", patch_variants(), ids=lambda ops: ops[0].name())
def test_patch_kernels_fake_strides_and_opcheck(ops):
    pool, pool_backward, _, attention_backward, outputs_backward = ops
    maps = [in_layout(torch.randn(2, 6, 7, 5, device=DEVICE).requires_grad_(), "nhwc") for _ in range(2)]
    _same_strides(pool, [maps, [3, 2]])
    torch.library.opcheck(pool, (maps, [3, 2]))
    grad = torch.randn(2, 6, 6, device=DEVICE)
    for channels_last in (False, True):
        out = _same_strides(pool_backward, [grad, [3, 2], 7, 5, torch.float32, channels_last])
        assert has_layout(out, "nhwc" if channels_last else "nchw")
    torch.library.opcheck(pool_backward, (grad, [3, 2], 7, 5, torch.float32, True))
    g = in_layout(torch.randn(2, 6, 7, 5, device=DEVICE), "nhwc")
    w = torch.randn(2, 6, 3, device=DEVICE).softmax(-1)
    gp = torch.randn(2, 6, 3, 6, device=DEVICE)
    _same_strides(outputs_backward, [g, w, gp, [3, 2]])
    torch.library.opcheck(outputs_backward, (g, w, gp, [3, 2]))
    # q and k as views (batch and patch dimensions swapped): grad q and grad k come back
    # contiguous from the kernels and the fake alike.
    q = torch.randn(6, 2, 4, device=DEVICE).transpose(0, 1)
    k = torch.randn(6, 2, 3, 4, device=DEVICE).transpose(0, 1)
    grad_q, grad_k, _ = _same_strides(attention_backward, [torch.randn(2, 6, 3, device=DEVICE), w, q, k, 0.5, True])
    assert grad_q.is_contiguous() and grad_k.is_contiguous()
    torch.library.opcheck(attention_backward, (torch.randn(2, 6, 3, device=DEVICE), w, q, k, 0.5, True))


# ---- patch attention ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_patch_pool_layout(backend, layout):
    x = in_layout(torch.randn(2, 6, 7, 9, device=DEVICE).requires_grad_(), layout)
    got = patch_pool(x, (3, 4), backend=backend)
    want = pool64(x, (3, 4))
    assert_close(got, want, torch.float32, what="pool")
    g = torch.randn_like(want)
    got.backward(g.float())
    (ex,) = torch.autograd.grad((want * g).sum(), x)
    assert has_layout(x.grad, layout), x.grad.stride()
    assert_close(x.grad, ex, torch.float32, what="pool grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_layout,out_layout", [("nhwc", "nhwc"), ("nchw", "nhwc"), ("nhwc", "nchw")])
def test_patch_attention_mixed_op_layouts(backend, x_layout, out_layout):
    B, K, D = 2, 4, 3
    torch.manual_seed(0)
    x = in_layout(torch.randn(B, 6, 14, 20, device=DEVICE).requires_grad_(), x_layout)  # a stride-2 edge
    outputs = [None if k == 2 else in_layout(torch.randn(B, 8, 7, 10, device=DEVICE).requires_grad_(), out_layout)
               for k in range(K)]
    Wq = torch.randn(6, D, device=DEVICE, requires_grad=True)
    Wk = torch.randn(8, D, device=DEVICE, requires_grad=True)
    prior = torch.randn(K, device=DEVICE, requires_grad=True)
    zero_key = torch.randn(D, device=DEVICE, requires_grad=True)
    y, w = patch_attention_mixed_op(x, outputs, Wq, Wk, (3, 4), prior, 0.7, zero_key=zero_key,
                                    backend=backend)
    assert has_layout(y, out_layout), y.stride()
    y64, w64 = fused64(x, outputs, Wq, Wk, (3, 4), prior, 0.7, zero_key)
    assert_close(w, w64, torch.float32, scale=4, what="w")
    assert_close(y, y64, torch.float32, scale=4, what="y")
    gy = torch.randn_like(y64)
    inputs = [x, Wq, Wk, prior, zero_key] + outputs
    got = grads_of((y.double() * gy).sum() + w.double().sum(), inputs)
    want = grads_of((y64 * gy).sum() + w64.sum(), inputs)
    for name, t, a, e in zip(["x", "Wq", "Wk", "prior", "zero_key", "o0", "o1", "o2", "o3"], inputs, got, want):
        if t is None:
            continue
        # (The eager reference's pooling of x is plain PyTorch: its gradient's layout is torch's.)
        if t.dim() == 4 and not (backend == "eager" and name == "x"):
            assert has_layout(a, x_layout if name == "x" else out_layout), (name, a.stride())
        assert_close(a, e, torch.float32, scale=8 * max(1.0, e.abs().max().item()), what=f"grad {name}")
