"""mixed_op (SPEC 2.1) on every backend available here, against an independent
float64 formula: the weights painted onto the pixels with float arithmetic,
the K outputs stacked and contracted with einsum."""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

import nasops
import nasops.ops.reference
from nasops.ops import mixed_op
from helpers import DEVICE, assert_close, available_backends, kernel_backends, subprocess_env

MIXED_OP = importlib.import_module("nasops.ops.mixed_op")
BACKENDS = available_backends()
KERNELS = kernel_backends()


def expected_mixed(outputs, weights, grid=None):
    """float64 y = sum_k w_k o_k, written without nasops code."""
    live = [k for k, o in enumerate(outputs) if o is not None]
    o = torch.stack([outputs[k].double() for k in live])  # (K', B, ...)
    w = weights.double()[..., live]
    if w.dim() == 1:
        return torch.einsum("k,k...->...", w, o)
    if w.dim() == 2:
        return torch.einsum("bk,kb...->b...", w, o)
    if o.dim() == 4:  # tokens (K', B, N, C), per-token weights (B, N, K')
        return torch.einsum("bnk,kbnc->bnc", w, o)
    B, C, H, W = o.shape[1:]
    gh, gw = grid
    rows = [math.floor(h * gh / H) for h in range(H)]
    cols = [math.floor(x * gw / W) for x in range(W)]
    patch = torch.tensor([[r * gw + c for c in cols] for r in rows], device=o.device)
    wmap = w[:, patch]  # (B, H, W, K')
    return torch.einsum("bhwk,kbchw->bchw", wmap, o)


def make_case(layout, granularity, K, B=2, dtype=torch.float32, grid=None, none_at=(), device=DEVICE,
              requires_grad=True):
    shape = {"nchw": (B, 3, 7, 10), "tokens": (B, 5, 6)}[layout]
    outputs = [None if k in none_at else
               torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
               for k in range(K)]
    if granularity == "edge":
        w = torch.randn(K, device=device)
    elif granularity == "sample":
        w = torch.randn(B, K, device=device)
    elif layout == "tokens":
        w = torch.randn(B, shape[1], K, device=device)
    else:
        w = torch.randn(B, grid[0] * grid[1], K, device=device)
    w = w.softmax(-1).requires_grad_(requires_grad)
    return outputs, w


CASES = [
    ("nchw", "edge", None), ("nchw", "sample", None), ("nchw", "patch", (1, 1)),
    ("nchw", "patch", (2, 2)), ("nchw", "patch", (3, 4)), ("nchw", "patch", (7, 10)),
    ("tokens", "edge", None), ("tokens", "sample", None), ("tokens", "patch", None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,granularity,grid", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_gradients_match_float64(backend, layout, granularity, grid, dtype):
    K = 4
    outputs, w = make_case(layout, granularity, K, dtype=dtype, grid=grid, none_at=(2,))
    y = mixed_op(outputs, w, grid=grid if layout == "nchw" and granularity == "patch" else None,
                 backend=backend)
    assert y.dtype == dtype and y.shape == outputs[0].shape
    ref_in = [None if o is None else o.detach().double().requires_grad_() for o in outputs]
    ref_w = w.detach().double().requires_grad_()
    ref = expected_mixed(ref_in, ref_w, grid)
    assert_close(y, ref, dtype, what="y")

    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    for k, (o, r) in enumerate(zip(outputs, ref_in)):
        if o is not None:
            assert_close(o.grad, r.grad, dtype, what=f"grad outputs[{k}]")
    # grad w sums up to C*H*W products: widen the tolerance with the term count.
    terms = outputs[0][0].numel() / (1 if granularity != "patch" else w.shape[1])
    assert_close(w.grad, ref_w.grad, dtype, scale=math.sqrt(terms), what="grad weights")
    assert w.grad[..., 2].abs().max() == 0  # the Zero op's weight gets no gradient


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("K", [1, 16, 17])
def test_many_and_few_ops(backend, K):
    outputs, w = make_case("nchw", "patch", K, grid=(2, 3))
    y = mixed_op(outputs, w, grid=(2, 3), backend=backend)
    ref_in = [o.detach().double().requires_grad_() for o in outputs]
    ref_w = w.detach().double().requires_grad_()
    ref = expected_mixed(ref_in, ref_w, (2, 3))
    assert_close(y, ref, torch.float32, what="y")
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    for k, (o, r) in enumerate(zip(outputs, ref_in)):
        assert_close(o.grad, r.grad, torch.float32, what=f"grad outputs[{k}]")
    assert_close(w.grad, ref_w.grad, torch.float32, scale=10, what="grad weights")


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_inputs(backend):
    base = [torch.randn(2, 10, 7, 3, device=DEVICE) for _ in range(3)]
    outputs = [b.permute(0, 3, 2, 1) for b in base]  # (2, 3, 7, 10), channels-last-like strides
    assert not outputs[0].is_contiguous()
    w = torch.randn(2, 6, 3, device=DEVICE).softmax(-1)
    y = mixed_op(outputs, w, grid=(2, 3), backend=backend)
    assert_close(y, expected_mixed(outputs, w, (2, 3)), torch.float32, what="y")
    tokens = [torch.randn(2, 8, 6, device=DEVICE)[:, ::2] for _ in range(2)]  # (2, 4, 6), strided
    wt = torch.randn(2, 4, 2, device=DEVICE)
    assert_close(mixed_op(tokens, wt, backend=backend), expected_mixed(tokens, wt), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["edge", "sample", "patch"])
def test_empty_batch(backend, granularity):
    outputs, w = make_case("nchw", granularity, 3, B=0, grid=(2, 2))
    y = mixed_op(outputs, w, grid=(2, 2) if granularity == "patch" else None, backend=backend)
    assert y.shape == (0, 3, 7, 10)
    y.sum().backward()
    assert outputs[0].grad.shape == outputs[0].shape and w.grad.shape == w.shape


@pytest.mark.parametrize("backend", KERNELS)
def test_only_weights_or_only_outputs_need_grad(backend):
    outputs, w = make_case("nchw", "patch", 3, grid=(2, 2), requires_grad=False)
    w.requires_grad_(True)
    mixed_op(outputs, w, grid=(2, 2), backend=backend).sum().backward()
    ref_w = w.detach().double().requires_grad_()
    expected_mixed(outputs, ref_w, (2, 2)).sum().backward()
    assert_close(w.grad, ref_w.grad, torch.float32, scale=10, what="grad weights")

    outputs[1].requires_grad_(True)
    w2 = w.detach()
    mixed_op(outputs, w2, grid=(2, 2), backend=backend).sum().backward()
    assert outputs[0].grad is None
    ref_o = outputs[1].detach().double().requires_grad_()
    expected_mixed([outputs[0], ref_o, outputs[2]], w2, (2, 2)).sum().backward()
    assert_close(outputs[1].grad, ref_o.grad, torch.float32, what="grad outputs[1]")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout,granularity,grid", [("nchw", "edge", None), ("nchw", "sample", None),
                                                      ("nchw", "patch", (2, 3)), ("tokens", "patch", None)])
def test_gradcheck_float64(backend, layout, granularity, grid):
    # Tiny maps: every gradcheck column is a kernel launch, and the Triton
    # interpreter costs milliseconds per launch (fast_mode probes a random
    # direction instead of every column there).
    outputs, w = make_case(layout, granularity, 3, B=2, dtype=torch.float64, grid=grid, none_at=(1,))
    outputs = [None if o is None else o.detach()[..., :3].contiguous().requires_grad_() for o in outputs]
    w = w.detach().double().requires_grad_()
    if layout == "nchw" and granularity == "patch":
        grid = (2, 3)

    def f(a, b, weights):
        return mixed_op([a, None, b], weights, grid=grid, backend=backend)

    assert torch.autograd.gradcheck(f, (outputs[0], outputs[2], w), fast_mode=backend == "triton")


def registered_variants():
    from nasops.ops.mixed_op import _KERNELS
    from nasops.ops._registry import unique_variants
    return unique_variants({b: ops for b, ops in _KERNELS.items() if b in KERNELS})


@pytest.mark.parametrize("ops", registered_variants(), ids=lambda ops: ops[0].name())
def test_opcheck(ops):
    forward, backward = ops
    outputs = [torch.randn(2, 3, 5, 6, device=DEVICE, requires_grad=True) for _ in range(3)]
    w = torch.randn(2, 4, 3, device=DEVICE).softmax(-1).requires_grad_()
    torch.library.opcheck(forward, (outputs, w, [2, 2]))
    g = torch.randn(2, 3, 5, 6, device=DEVICE)
    torch.library.opcheck(backward, (g, [o.detach() for o in outputs], w.detach(), [2, 2], True, True))
    torch.library.opcheck(backward, (g, [o.detach() for o in outputs], w.detach(), [2, 2], False, True))


def test_compiled_and_triton_schemas_agree():
    if not {"cpu", "triton"} <= set(KERNELS):
        pytest.skip("needs both the compiled extension and Triton")
    for name in ("mixed_op", "mixed_op_backward"):
        compiled = str(getattr(torch.ops.nasops, name).default._schema)
        twin = str(getattr(torch.ops.nasops, f"{name}_triton").default._schema)
        assert compiled.replace(f"nasops::{name}(", "(") == twin.replace(f"nasops::{name}_triton(", "(")


@pytest.mark.parametrize("backend", KERNELS)
def test_torch_compile_fullgraph(backend):
    class Edge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = torch.nn.Parameter(torch.randn(3) * 1e-3)

        def forward(self, x):
            outs = [torch.relu(x), None, x * 2]
            return mixed_op(outs, self.alpha.softmax(0), backend=backend)

    torch._dynamo.reset()
    edge = Edge().to(DEVICE)
    x = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    compiled = torch.compile(edge, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    w = edge.alpha.detach().softmax(0)
    assert_close(y, w[0] * x.detach().relu() + w[2] * 2 * x.detach(), torch.float32)
    assert edge.alpha.grad is not None and x.grad is not None


# ---- bad input -------------------------------------------------------------------

def _maps(n=3, shape=(2, 3, 4, 4), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(n)]


@pytest.mark.parametrize("call,error,match", [
    (lambda: mixed_op(_maps(), torch.randn(4)), ValueError, r"weights: expected last dimension K=3"),
    (lambda: mixed_op(_maps(), torch.randn(3, 3)), ValueError, r"weights: expected batch size 2"),
    (lambda: mixed_op(_maps(2) + [torch.randn(2, 3, 4, 5)], torch.randn(3)), ValueError,
     r"outputs\[2\]: expected shape"),
    (lambda: mixed_op(_maps(2) + [torch.randn(2, 3, 4, 4, dtype=torch.float64)], torch.randn(3)),
     TypeError, r"outputs\[2\]: expected dtype"),
    (lambda: mixed_op(_maps(), torch.randn(2, 25, 3), grid=(5, 5)), ValueError, r"grid: expected 1 <= gh"),
    (lambda: mixed_op(_maps(), torch.randn(2, 4, 3)), ValueError, r"grid: per-patch weights"),
    (lambda: mixed_op(_maps(), torch.randn(2, 6, 3), grid=(2, 2)), ValueError, r"weights: expected P = gh\*gw = 4"),
    (lambda: mixed_op(_maps(), torch.randn(3), grid=(2, 2)), ValueError, r"grid: only per-patch"),
    (lambda: mixed_op(_maps(shape=(2, 5, 6)), torch.randn(2, 4, 3)), ValueError, r"weights: per-token weights need P = N = 5"),
    (lambda: mixed_op([None, None], torch.randn(2)), ValueError, r"outputs: every entry is None"),
    (lambda: mixed_op(torch.randn(3, 2, 4, 4), torch.randn(3)), TypeError, r"outputs: expected a non-empty list"),
    (lambda: mixed_op([], torch.randn(0)), TypeError, r"outputs: expected a non-empty list"),
    (lambda: mixed_op(_maps(), torch.ones(3, dtype=torch.int64)), TypeError, r"weights: expected dtype"),
    (lambda: mixed_op(_maps(), torch.randn(3, dtype=torch.complex64)), TypeError, r"weights: expected dtype"),
    (lambda: mixed_op(_maps(shape=(2, 3)), torch.randn(3)), ValueError, r"outputs\[0\]: expected 3 or 4 dimensions"),
    (lambda: mixed_op(_maps(), torch.randn(3), backend="fast"), ValueError, r"backend: expected one of"),
    (lambda: mixed_op(_maps(), torch.randn(3), backend="cuda"), ValueError, r"backend='cuda'"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(DEVICE == "cpu", reason="needs a second device type")
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match=r"outputs\[1\]: expected device"):
        mixed_op([torch.randn(2, 3, 4, 4, device="cuda"), torch.randn(2, 3, 4, 4)], torch.randn(2, device="cuda"))


def test_weights_on_another_device_rejected():
    with pytest.raises(ValueError, match=r"weights: expected device"):
        mixed_op(_maps(), torch.randn(3, device="meta"))


# ---- backend selection (SPEC 2.4) --------------------------------------------------

def test_backends_report_says_why(monkeypatch):
    report = nasops.backends()
    assert set(report) == {"cuda", "triton", "cpu", "eager"}
    assert report["eager"]["available"]
    for info in report.values():
        assert info["available"] or info["reason"] != "ok"
    if not torch.cuda.is_available():
        assert not report["cuda"]["available"]


def test_auto_picks_compiled_cpu_when_built(monkeypatch):
    from nasops.backend import extension_loaded, resolve
    monkeypatch.delenv("NASOPS_BACKEND", raising=False)
    assert resolve(None, torch.device("cpu")) == ("cpu" if extension_loaded() else "eager")
    monkeypatch.setenv("NASOPS_BACKEND", "eager")
    assert resolve(None, torch.device("cpu")) == "eager"
    nasops.set_backend("cpu" if extension_loaded() else "eager")
    try:
        assert resolve(None, torch.device("cpu")) == ("cpu" if extension_loaded() else "eager")
        assert resolve("eager", torch.device("cpu")) == "eager"  # the call's argument wins
    finally:
        nasops.set_backend(None)
    with pytest.raises(ValueError, match="backend"):
        nasops.set_backend("gpu")


def test_auto_passes_over_a_backend_that_cannot_take_the_ops(monkeypatch):
    import nasops.backend as backend
    monkeypatch.delenv("NASOPS_BACKEND", raising=False)
    monkeypatch.setattr(backend, "_AVAILABILITY", {name: "" for name in backend.BACKENDS})
    cuda, limits = torch.device("cuda"), {"cuda": 64}
    assert backend.resolve(None, cuda, count=64, limits=limits, what="outputs") == "cuda"
    assert backend.resolve(None, cuda, count=65, limits=limits, what="outputs") == "triton"
    assert backend.resolve(None, cuda, count=65, limits={"cuda": 64, "triton": 8}, what="outputs") == "eager"
    with pytest.raises(ValueError, match=r"^outputs \(live ops\): backend='cuda' takes at most 64 in one call, "
                                         r"got 65 \(backend 'auto' picks one that takes them\)$"):
        backend.resolve("cuda", cuda, count=65, limits=limits, what="outputs (live ops)")


def test_a_triton_too_old_for_the_kernels_is_not_available(tmp_path):
    """An installed triton whose import fails for nasops' kernels: backends() says
    why, auto passes over it, and backend='triton' is a ValueError (not a
    RuntimeError from the kernel lookup)."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text('raise ImportError("this triton is too old")\n')
    script = (
        "import torch, nasops\n"
        "from nasops.ops import mixed_op\n"
        "print(nasops.backends()['triton'])\n"
        "print(mixed_op([torch.ones(1, 2, 3, 3)], torch.ones(1)).sum().item())\n"
        "try:\n"
        "    mixed_op([torch.ones(1, 2, 3, 3)], torch.ones(1), backend='triton')\n"
        "except ValueError as exc:\n"
        "    print('ValueError', exc)\n")
    env = subprocess_env(TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    reason = "nasops' Triton kernels do not import with the installed triton (this triton is too old)"
    assert lines[0] == str({"available": False, "reason": reason})
    assert lines[1] == "18.0"
    assert lines[2] == f"ValueError backend='triton' is not available: {reason}"


def test_cuda_op_limits_are_the_kernels():
    """The Python bounds mirror the constants the CUDA kernels are compiled with."""
    import re
    from pathlib import Path
    from nasops.ops.patch_attention import MAX_OPS

    csrc = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    for header, constant, limit in (("mixed_op.cuh", "kMixedOpMaxOps", MIXED_OP.MAX_LIVE_OPS["cuda"]),
                                    ("patch_attention.cuh", "kPatchMaxOps", MAX_OPS["cuda"])):
        found = re.search(rf"constexpr int {constant} = (\d+);", (csrc / header).read_text())
        assert found and int(found.group(1)) == limit, (header, constant)


@pytest.mark.skipif("cpu" not in kernel_backends(), reason="needs the compiled CPU kernel")
def test_op_count_limit_reaches_the_backend_choice(monkeypatch):
    """mixed_op asks with its live ops: a backend bounded below them is refused by
    name and passed over by auto (the CPU kernels, bounded here for the test,
    stand in for the CUDA ones on a machine without a GPU)."""
    monkeypatch.delenv("NASOPS_BACKEND", raising=False)
    monkeypatch.setitem(MIXED_OP.MAX_LIVE_OPS, "cpu", 2)
    outputs, w = make_case("nchw", "edge", 4, none_at=(1,), device="cpu")  # 3 live
    with pytest.raises(ValueError, match=r"outputs \(live ops\): backend='cpu' takes at most 2 .* got 3"):
        mixed_op(outputs, w, backend="cpu")
    calls = []
    monkeypatch.setattr(nasops.ops.reference, "mixed_op",
                        lambda *a, _ref=nasops.ops.reference.mixed_op: calls.append(1) or _ref(*a))
    y = mixed_op(outputs, w)
    assert calls == [1]  # auto ran the eager reference
    assert_close(y, expected_mixed(outputs, w), torch.float32, what="y")
    assert mixed_op(outputs[:2] + [None, None], w) is not None and calls == [1]  # 1 live: cpu again


# The CPU kernel has two per-patch paths: per-pixel weight maps when a patch row
# is shorter than 8 elements (W / gw < 8), bands of rows otherwise.
CPU_PATCH_SHAPES = [  # (B, C, H, W), grid, K
    ((1, 3, 7, 10), (3, 4), 1),     # maps, uneven grid, B = 1, K = 1
    ((2, 5, 9, 13), (4, 5), 17),    # maps, uneven grid, K = 17
    ((2, 3, 6, 7), (6, 7), 16),     # maps, one pixel per patch (gh = H, gw = W)
    ((2, 3, 7, 40), (3, 2), 3),     # bands (runs of 20), uneven rows
    ((1, 2, 5, 50), (5, 3), 17),    # bands, gh = H, uneven columns
    ((3, 600, 3, 8), (2, 2), 2),    # maps, several plane groups per sample
]


@pytest.mark.skipif("cpu" not in kernel_backends(), reason="needs the compiled CPU kernel")
@pytest.mark.parametrize("shape,grid,K", CPU_PATCH_SHAPES)
@pytest.mark.parametrize("requires", ["both", "outputs", "weights"])
def test_cpu_patch_paths_float64(shape, grid, K, requires):
    B = shape[0]
    # Non-contiguous outputs: a transposed buffer seen as (B, C, H, W).
    outputs = [torch.randn(shape[::-1], dtype=torch.float64).permute(3, 2, 1, 0)
               .requires_grad_(requires != "weights") for _ in range(K)]
    w = torch.randn(B, grid[0] * grid[1], K, dtype=torch.float64, requires_grad=requires != "outputs")
    g = torch.randn(shape, dtype=torch.float64)
    y = mixed_op(outputs, w, grid=grid, backend="cpu")
    leaves = [t for t in [*outputs, w] if t.requires_grad]
    got = torch.autograd.grad(y, leaves, g)
    ref = expected_mixed(outputs, w, grid)
    want = torch.autograd.grad(ref, leaves, g)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif("cpu" not in kernel_backends(), reason="needs the compiled CPU kernel")
@pytest.mark.parametrize("K", range(1, 10))  # the fp32 one-pass kernels take K <= 8, tiles beyond
@pytest.mark.parametrize("weights_shape", ["(K,)", "(B,K)"])
@pytest.mark.parametrize("requires", ["both", "outputs", "weights"])
def test_cpu_float32_runs(K, weights_shape, requires):
    # 3 * 5 * 7 = 105 elements per sample: 13 vectors of 8 and a tail of 1;
    # 20 * 33 * 30 = 19800: more than one work item (16384 elements) per sample.
    for shape in ((2, 3, 5, 7), (2, 20, 33, 30)):
        outputs = [torch.randn(shape, requires_grad=requires != "weights") for _ in range(K)]
        w = torch.randn(K if weights_shape == "(K,)" else (2, K), requires_grad=requires != "outputs")
        g = torch.randn(shape)
        y = mixed_op(outputs, w, backend="cpu")
        leaves = [t for t in [*outputs, w] if t.requires_grad]
        ref64 = expected_mixed([o.double() for o in outputs], w.double())
        assert_close(y, ref64, torch.float32, what="y")
        got = torch.autograd.grad(y, leaves, g)
        want = torch.autograd.grad(ref64, leaves, g.double())
        for a, b in zip(got, want):
            terms = y[0].numel() if a.shape == w.shape else 1  # grad w sums over a sample
            assert_close(a, b, torch.float32, scale=math.sqrt(terms), what=f"grad {tuple(a.shape)}")


@pytest.mark.skipif("cpu" not in kernel_backends(), reason="needs the compiled CPU kernel")
@pytest.mark.parametrize("shape,grid", [((4, 600, 3, 8), (2, 2)), ((2, 8, 7, 40), (3, 2)),
                                        ((4, 8, 300), None)])
def test_cpu_grad_weights_independent_of_threads(shape, grid):
    K = 5
    outputs = [torch.randn(shape) for _ in range(K)]
    w = torch.randn(shape[0], grid[0] * grid[1] if grid else 1, K).squeeze(1).requires_grad_()
    g = torch.randn(shape)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(mixed_op(outputs, w, grid=grid, backend="cpu"), w, g)[0])
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert torch.equal(grads[0], other)
