"""What the Triton launchers hand their kernels (issue #10, items 2 and 3), for
every op, forward and backward, on the float64 path.

- A Python float argument becomes a float32 kernel parameter on a GPU (the
  interpreter keeps it a Python float, which hid the loss of precision): every
  float must go to a parameter annotated ``tl.float64``.
- The patch-attention launchers read and write K maps in place: the maps must
  arrive as tensors (a tuple), not as a table of pointers built on the host,
  which costs a host-to-device copy per call and breaks CUDA-graph capture.
"""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, available_backends, triton_launches
from nasops.ops import (gather_rows, mixed_op, patch_attention_mixed_op, patch_pool,
                        patch_softmax_attention, scatter_rows, topk_tokens)

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="needs Triton")


def _leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, device=DEVICE, requires_grad=True)


def _run_every_op():
    """Forward and backward of every op on the Triton backend, float64, with the
    arguments that reach every launcher (prior, tau, Zero ops, every gate)."""
    kw = {"backend": "triton"}
    outs = [_leaf(2, 3, 6, 5), None, _leaf(2, 3, 6, 5)]
    for weights, grid in ((_leaf(3), None), (_leaf(2, 3), None), (_leaf(2, 6, 3), (3, 2))):
        mixed_op(outs, weights, grid=grid, **kw).sum().backward()
    x = _leaf(2, 4, 6, 5)
    y, w = patch_attention_mixed_op(x, outs, _leaf(4, 3), _leaf(3, 3), (2, 2), prior=_leaf(3), tau=0.3,
                                    zero_key=_leaf(3), **kw)
    (y.sum() + w.square().sum()).backward()
    patch_pool(x, (3, 2), **kw).sum().backward()
    patch_softmax_attention(_leaf(2, 4, 5), _leaf(2, 4, 3, 5), prior=_leaf(3), tau=0.7, **kw).square().sum().backward()
    for gate in ("none", "straight_through", "sigmoid"):
        xs, qs, ks = _leaf(2, 9, 4), _leaf(2, 9, 3), _leaf(2, 9, 3)
        x_sel, _, s = topk_tokens(xs, qs, ks, 4, gate=gate, **kw)
        (x_sel.square().sum() + s.sum()).backward()
    rows = _leaf(5, 3)
    idx = torch.tensor([4, 1], device=DEVICE)
    scatter_rows(gather_rows(rows, idx, **kw), idx, 5, **kw).sum().backward()


@pytest.fixture(scope="module")
def launches():
    with triton_launches() as recorded:
        _run_every_op()
    return recorded


def test_every_kernel_is_launched(launches):
    names = {name for name, _, _ in launches}
    for expected in ("_pool_kernel", "_outputs_backward_kernel", "_attention_kernel",
                     "_attention_backward_kernel", "_pool_backward_kernel", "_select_kernel",
                     "_gather_kernel", "_rows_backward_kernel", "_qk_backward_kernel",
                     "_copy_rows_kernel", "_forward_flat", "_forward_patch"):
        assert expected in names, sorted(names)


def test_no_python_float_reaches_a_float32_parameter(launches):
    wrong = sorted({(name, param) for name, values, annotations in launches
                    for param, value in values.items()
                    if isinstance(value, float) and "constexpr" not in annotations[param]
                    and "float64" not in annotations[param]})
    assert not wrong, f"Python floats passed as float32 kernel parameters: {wrong}"


def test_patch_attention_maps_arrive_as_tensors_not_pointer_tables(launches):
    patch_kernels = [(name, values) for name, values, _ in launches
                     if name in ("_pool_kernel", "_outputs_backward_kernel")]
    assert patch_kernels
    for name, values in patch_kernels:
        int_tensors = [p for p, v in values.items() if isinstance(v, torch.Tensor) and not v.is_floating_point()]
        assert not int_tensors, f"{name}: integer tensor arguments {int_tensors} (a pointer table?)"
        tuples = [v for v in values.values() if isinstance(v, tuple)]
        assert len(tuples) == 1 and all(isinstance(t, torch.Tensor) for t in tuples[0]), name


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA-graph capture needs a GPU")
def test_patch_attention_triton_captures_in_a_cuda_graph():
    x = torch.randn(2, 4, 6, 6, device="cuda")
    outs = [torch.randn(2, 3, 6, 6, device="cuda") for _ in range(3)]
    Wq, Wk = torch.randn(4, 5, device="cuda"), torch.randn(3, 5, device="cuda")
    run = lambda: patch_attention_mixed_op(x, outs, Wq, Wk, (2, 3), backend="triton")  # noqa: E731
    want = run()  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run()
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.skipif(DEVICE == "cuda", reason="about Triton's CPU interpreter")
def test_the_interpreter_skips_only_discarded_overflow_checks():
    """conftest.skip_discarded_overflow_checks: with this Triton the interpreter's
    overflow checks are off, and they were discarded anyway: an int32 product
    that overflows gives the same (wrapped) values and no error with the checks
    on and off (its ``device_assert`` only acts with ``debug``)."""
    import dataclasses

    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    from conftest import skip_discarded_overflow_checks

    builder = interpreter.interpreter_builder
    assert not builder.options.sanitize_overflow and not builder.options.debug
    assert not skip_discarded_overflow_checks()  # already off: nothing to switch

    @triton.jit
    def scaled(x_ptr, y_ptr, factor, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i) * factor)

    x = torch.tensor([1, 3, 2**20, -(2**20)], dtype=torch.int32)
    wrapped = (x.to(torch.int64) * 2**12 + 2**31) % 2**32 - 2**31  # int32 arithmetic wraps
    results = []
    for sanitize in (True, False):
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=sanitize)
        try:
            y = torch.empty_like(x)
            scaled[(1,)](x, y, 2**12, BLOCK=4)
            results.append(y)
        finally:
            builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    torch.testing.assert_close(results[0], wrapped.to(torch.int32))
    torch.testing.assert_close(results[1], results[0])
