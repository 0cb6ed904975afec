"""What is specific to the Triton kernels of mixed_op (nasops/triton/mixed_op.py).

The ops are called directly in their canonical form (csrc/ops.cpp: K outputs
(B, C, H, W), weights (Bw, gh*gw, K)) and compared with the float64 eager
reference (nasops.ops.reference.mixed_op, differentiated by torch autograd).
On a machine without a GPU they run through TRITON_INTERPRET=1 (tests/conftest.py),
so shapes are tiny. The all-backend tests of the public function live in
tests/test_mixed_op.py.
"""
from __future__ import annotations

import pytest
import torch

import nasops
from nasops.ops import reference
from helpers import DEVICE, assert_close, available_backends

pytestmark = pytest.mark.skipif("triton" not in available_backends(),
                                reason=f"Triton is not usable here: {nasops.backends()['triton']['reason']}")

import nasops.triton.mixed_op  # noqa: E402,F401  (registers the ops)

forward = torch.ops.nasops.mixed_op_triton.default
backward = torch.ops.nasops.mixed_op_backward_triton.default

# (B, C, H, W), K, grid, per-sample weights (Bw = B) or shared ones (Bw = 1)
CASES = {
    "edge-K1": ((3, 4, 5, 6), 1, (1, 1), False),
    "edge-K8": ((2, 3, 8, 8), 8, (1, 1), False),
    "sample-K16": ((3, 2, 5, 7), 16, (1, 1), True),
    "sample-K20": ((2, 2, 4, 4), 20, (1, 1), True),
    "patch-divides": ((2, 3, 8, 8), 4, (2, 2), True),
    "patch-uneven": ((2, 3, 7, 5), 3, (3, 2), True),
    "patch-uneven-K17": ((2, 2, 9, 7), 17, (4, 3), True),
    "patch-shared": ((3, 2, 6, 6), 5, (3, 3), False),
    "patch-per-row": ((2, 1, 6, 40), 4, (6, 1), True),  # the per-token view (B, 1, N, C)
    "patch-per-pixel": ((2, 2, 3, 4), 2, (3, 4), True),
}


def make_inputs(shape, K, grid, per_sample, dtype, weight_dtype=None):
    B = shape[0]
    weight_dtype = weight_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    outs = [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(K)]
    w = torch.randn(B if per_sample else 1, grid[0] * grid[1], K, device=DEVICE, dtype=weight_dtype)
    return outs, w


def reference_result(outs, w, grid, g):
    """float64 y, grad w and grad o_k from the eager reference and torch autograd."""
    B = outs[0].shape[0]
    od = [o.double().requires_grad_() for o in outs]
    wd = w.double().requires_grad_()
    if grid[0] * grid[1] > 1:
        y = reference.mixed_op(od, wd.expand(B, -1, -1), tuple(grid))
    else:
        y = reference.mixed_op(od, wd[:, 0] if wd.shape[0] == B else wd[0, 0], None)
    grads = torch.autograd.grad(y, [wd] + od, g.double())
    return y.detach(), grads[0], grads[1:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_parity_with_float64_reference(case, dtype):
    shape, K, grid, per_sample = CASES[case]
    outs, w = make_inputs(shape, K, grid, per_sample, dtype)
    g = torch.randn(shape, device=DEVICE).to(dtype)
    y_ref, gw_ref, go_ref = reference_result(outs, w, grid, g)

    y = forward(outs, w, list(grid))
    assert y.dtype == dtype and y.shape == shape and y.is_contiguous()
    assert_close(y, y_ref, dtype, scale=K ** 0.5, what="y")

    grad_outs, grad_w = backward(g, outs, w, list(grid), True, True)
    assert grad_w.dtype == w.dtype and grad_w.shape == w.shape
    # grad w sums up to B*C*H*W float32 products: the float32 tolerance, scaled.
    assert_close(grad_w, gw_ref, torch.float32, scale=100, what="grad weights")
    assert len(grad_outs) == K
    for k, (got, want) in enumerate(zip(grad_outs, go_ref)):
        assert got.dtype == dtype
        assert_close(got, want, dtype, what=f"grad outputs[{k}]")


@pytest.mark.parametrize("case", ["edge-K8", "sample-K16", "patch-uneven", "patch-per-row", "patch-shared"])
def test_many_programs_per_sample(case, monkeypatch):
    """Small blocks and tiles: partial sums over many programs, channel blocks and
    segment chunks (at the default sizes these tiny shapes need one program each)."""
    import nasops.triton.mixed_op as kernels
    monkeypatch.setattr(kernels, "_MAX_TILE", 16)
    shape, K, grid, per_sample = CASES[case]
    outs, w = make_inputs(shape, K, grid, per_sample, torch.float32)
    g = torch.randn(shape, device=DEVICE)
    y_ref, gw_ref, go_ref = reference_result(outs, w, grid, g)
    assert_close(forward(outs, w, list(grid)), y_ref, torch.float32, what="y")
    grad_outs, grad_w = backward(g, outs, w, list(grid), True, True)
    assert_close(grad_w, gw_ref, torch.float32, scale=100, what="grad weights")
    for got, want in zip(grad_outs, go_ref):
        assert_close(got, want, torch.float32, what="grad outputs")


def test_forward_many_blocks_per_sample():
    """A sample larger than the forward block (4096 under the interpreter)."""
    shape, K = (2, 3, 40, 40), 2
    outs, w = make_inputs(shape, K, (1, 1), True, torch.float32)
    y_ref, _, _ = reference_result(outs, w, (1, 1), torch.zeros(shape, device=DEVICE))
    assert_close(forward(outs, w, [1, 1]), y_ref, torch.float32, what="y")


def test_float64_parity_and_determinism():
    shape, K, grid = (2, 3, 7, 5), 6, (3, 2)
    outs, w = make_inputs(shape, K, grid, True, torch.float64)
    g = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    y_ref, gw_ref, go_ref = reference_result(outs, w, grid, g)
    assert_close(forward(outs, w, list(grid)), y_ref, torch.float64, what="y")
    first = backward(g, outs, w, list(grid), True, True)
    assert_close(first[1], gw_ref, torch.float64, what="grad weights")
    # No atomics: the grad-weights reduction is bitwise reproducible.
    again = backward(g, outs, w, list(grid), True, True)
    assert torch.equal(first[1], again[1])


@pytest.mark.parametrize("grid", [(1, 1), (2, 3)], ids=str)
@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "shared"])
def test_gradcheck_float64(grid, per_sample):
    shape, K = (2, 2, 4, 5), 3
    outs, w = make_inputs(shape, K, grid, per_sample, torch.float64)
    outs = [o.requires_grad_() for o in outs]
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda w, *o: forward(list(o), w, list(grid)), (w, *outs), fast_mode=True)


@pytest.mark.parametrize("need_outputs,need_weights", [(True, False), (False, True), (False, False)])
def test_backward_honours_requires_grad_flags(need_outputs, need_weights):
    shape, K, grid = (2, 2, 4, 4), 3, (2, 2)
    outs, w = make_inputs(shape, K, grid, True, torch.float32)
    g = torch.randn(shape, device=DEVICE)
    _, gw_ref, go_ref = reference_result(outs, w, grid, g)
    grad_outs, grad_w = backward(g, outs, w, list(grid), need_outputs, need_weights)
    if need_outputs:
        for got, want in zip(grad_outs, go_ref):
            assert_close(got, want, torch.float32)
    else:
        assert grad_outs == []
    if need_weights:
        assert_close(grad_w, gw_ref, torch.float32, scale=100)
    else:
        assert grad_w.shape == (0,)


@pytest.mark.parametrize("grid", [(1, 1), (2, 2)], ids=str)
def test_non_contiguous_inputs(grid):
    K, shape = 3, (2, 3, 6, 4)
    # Channels-last storage, a transposed view and a strided slice: all (2, 3, 6, 4).
    outs = [torch.randn(shape, device=DEVICE).contiguous(memory_format=torch.channels_last),
            torch.randn(2, 3, 4, 6, device=DEVICE).transpose(2, 3),
            torch.randn(2, 6, 6, 4, device=DEVICE)[:, ::2]]
    w = torch.randn(2, grid[0] * grid[1], 2 * K, device=DEVICE)[..., ::2]
    g = torch.randn(2, 3, 4, 6, device=DEVICE).transpose(2, 3)
    assert not any(t.is_contiguous() for t in outs + [w, g])
    y_ref, gw_ref, go_ref = reference_result(outs, w, grid, g)
    assert_close(forward(outs, w, list(grid)), y_ref, torch.float32, what="y")
    grad_outs, grad_w = backward(g, outs, w, list(grid), True, True)
    assert_close(grad_w, gw_ref, torch.float32, scale=100, what="grad weights")
    for got, want in zip(grad_outs, go_ref):
        assert_close(got, want, torch.float32, what="grad outputs")


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "shared"])
def test_empty_batch(per_sample):
    K, grid = 2, (2, 2)
    outs = [torch.randn(0, 3, 4, 4, device=DEVICE) for _ in range(K)]
    w = torch.randn(0 if per_sample else 1, 4, K, device=DEVICE)
    y = forward(outs, w, list(grid))
    assert y.shape == (0, 3, 4, 4)
    grad_outs, grad_w = backward(torch.randn(0, 3, 4, 4, device=DEVICE), outs, w, list(grid), True, True)
    assert [t.shape for t in grad_outs] == [(0, 3, 4, 4)] * K
    assert grad_w.shape == w.shape and not grad_w.any()


def test_rejects_non_canonical_arguments():
    outs = [torch.randn(2, 3, 4, 4, device=DEVICE) for _ in range(2)]
    with pytest.raises(ValueError, match="weights"):
        forward(outs, torch.randn(2, 1, 3, device=DEVICE), [1, 1])   # K = 3 for 2 outputs
    with pytest.raises(ValueError, match="weights"):
        forward(outs, torch.randn(2, 1, 2, device=DEVICE, dtype=torch.float64), [1, 1])
    with pytest.raises(ValueError, match="grid"):
        forward(outs, torch.randn(2, 25, 2, device=DEVICE), [5, 5])  # grid larger than the 4x4 map
    with pytest.raises(ValueError, match=r"outputs\[1\]"):
        forward([outs[0], outs[1][:, :2]], torch.randn(2, 1, 2, device=DEVICE), [1, 1])


@pytest.mark.parametrize("grid", [(1, 1), (2, 3)], ids=str)
def test_opcheck(grid):
    shape, K = (2, 2, 4, 6), 3
    outs, w = make_inputs(shape, K, grid, True, torch.float32)
    torch.library.opcheck(forward, ([o.requires_grad_() for o in outs], w.requires_grad_(), list(grid)))
    outs, w = make_inputs(shape, K, grid, True, torch.float32)
    g = torch.randn(shape, device=DEVICE)
    torch.library.opcheck(backward, (g, outs, w, list(grid), True, True))
    torch.library.opcheck(backward, (g, outs, w, list(grid), False, True))


def test_public_function_token_layout_and_zero_op():
    """Through nasops.ops.mixed_op: (B, N, C) tokens with per-token weights, one Zero op."""
    B, N, C, K = 2, 5, 12, 3
    outs = [torch.randn(B, N, C, device=DEVICE, requires_grad=True) for _ in range(K)]
    outs[1] = None
    w = torch.randn(B, N, K, device=DEVICE, requires_grad=True)
    y = nasops.ops.mixed_op(outs, w, backend="triton")
    g = torch.randn(B, N, C, device=DEVICE)
    y.backward(g)
    od = [None if o is None else o.detach().double().requires_grad_() for o in outs]
    wd = w.detach().double().requires_grad_()
    y_ref = reference.mixed_op(od, wd)
    y_ref.backward(g.double())
    assert_close(y, y_ref, torch.float32, what="y")
    assert_close(w.grad, wd.grad, torch.float32, scale=100, what="grad weights")
    assert not w.grad[..., 1].any()
    for k in (0, 2):
        assert_close(outs[k].grad, od[k].grad, torch.float32, what=f"grad outputs[{k}]")
