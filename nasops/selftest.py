"""``python -m nasops.selftest``: check every op on every kernel backend of this
machine against the eager reference, once after installing.

Each op runs on small, deliberately odd shapes (sizes that no block or vector
width divides, mosaics that do not divide the map, Zero ops, every gate) in
each dtype, forward and backward (the gradient of every input for a random
upstream gradient), on every available kernel backend of the device (``cuda``
and ``triton`` on a GPU; ``cpu``, and ``triton`` under TRITON_INTERPRET=1, on
the CPU). The reference is the ``eager`` backend run in float64 on the same
(rounded) inputs, so a result's error is the kernel's own.

The error of a tensor is max |result - reference| / max |reference| (0 when
both are 0); it must stay within the tolerance of the inputs' dtype times the
case's factor (reductions over many terms and half-precision intermediates get
more). Token indices and moved rows must match exactly. The table lists every
check; the last line says PASS or FAIL; the exit status is 1 on any failure or
when this machine has no kernel backend to test.

From Python: ``nasops.selftest.main(["--dtypes", "float32"])`` returns the exit
status.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import nasops
from nasops import ops
from nasops.backend import resolve
from nasops.ops._checks import accumulation_dtype

# Max-normalized error allowed per input dtype (before the case's factor): a few
# units of the dtype's rounding of an output.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Case:
    """One op call: ``make(dtype, device, generator)`` builds the inputs,
    ``run(inputs, backend)`` calls the op and returns its outputs (a tuple)."""
    op: str
    name: str
    make: Callable
    run: Callable
    factor: float = 1.0  # tolerance factor of this case (sums over many terms)
    exact: tuple[int, ...] = ()  # outputs that must match exactly (indices)


@dataclass
class Check:
    op: str
    case: str
    backend: str
    dtype: str
    forward: float = 0.0
    backward: float = 0.0
    tolerance: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


# ---- the cases ----------------------------------------------------------------------

def _randn(gen, *shape, dtype, device, grad=True):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def _mixed_edge(per):
    def make(dtype, device, gen):
        B, C, H, W = 3, 5, 7, 9
        outs = [_randn(gen, B, C, H, W, dtype=dtype, device=device), None,
                _randn(gen, B, C, H, W, dtype=dtype, device=device)]
        shape = {"edge": (3,), "sample": (B, 3), "patch": (B, 6, 3)}[per]
        return {"outputs": outs, "weights": _randn(gen, *shape, dtype=accumulation_dtype(dtype), device=device)}

    def run(i, backend):
        grid = (2, 3) if per == "patch" else None
        return (ops.mixed_op(i["outputs"], i["weights"], grid=grid, backend=backend),)
    return make, run


def _mixed_tokens_make(dtype, device, gen):
    B, N, C = 2, 13, 6
    return {"outputs": [_randn(gen, B, N, C, dtype=dtype, device=device) for _ in range(3)],
            "weights": _randn(gen, B, N, 3, dtype=accumulation_dtype(dtype), device=device)}


def _attention_edge_make(dtype, device, gen):
    B = 2
    return {"x": _randn(gen, B, 4, 7, 9, dtype=dtype, device=device),
            "outputs": [_randn(gen, B, 3, 7, 9, dtype=dtype, device=device), None,
                        _randn(gen, B, 3, 7, 9, dtype=dtype, device=device)],
            "Wq": _randn(gen, 4, 6, dtype=accumulation_dtype(dtype), device=device),
            "Wk": _randn(gen, 3, 6, dtype=accumulation_dtype(dtype), device=device),
            "prior": _randn(gen, 3, dtype=accumulation_dtype(dtype), device=device),
            "zero_key": _randn(gen, 6, dtype=accumulation_dtype(dtype), device=device)}


def _attention_edge_run(i, backend):
    return ops.patch_attention_mixed_op(i["x"], i["outputs"], i["Wq"], i["Wk"], (3, 2), prior=i["prior"],
                                        tau=0.7, zero_key=i["zero_key"], backend=backend)


def _softmax_make(dtype, device, gen):
    return {"q": _randn(gen, 2, 5, 6, dtype=dtype, device=device),
            "k": _randn(gen, 2, 5, 3, 6, dtype=dtype, device=device),
            "prior": _randn(gen, 3, dtype=accumulation_dtype(dtype), device=device)}


def _tokens_make(dtype, device, gen):
    """Integer q and k whose scores are exact in every dtype (k's column sums are
    multiples of N, D = 4): the kernels must pick the reference's tokens, ties
    included (to the lower index)."""
    B, N, C, D = 3, 11, 5, 4
    q = torch.randint(-3, 4, (B, N, D), generator=gen)
    q[:, 6] = q[:, 2]  # a tie
    k = torch.randint(-3, 4, (B, N, D), generator=gen)
    k[:, -1] -= k.sum(1) % N
    return {"x": _randn(gen, B, N, C, dtype=dtype, device=device),
            "q": q.to(device=device, dtype=dtype).requires_grad_(),
            "k": k.to(device=device, dtype=dtype).requires_grad_()}


def _tokens_run(gate):
    def run(i, backend):
        return ops.topk_tokens(i["x"], i["q"], i["k"], 5, gate=gate, backend=backend)
    return run


def _rows_make(dtype, device, gen):
    return {"x": _randn(gen, 7, 3, 5, dtype=dtype, device=device),
            "idx": torch.tensor([6, 0, 3, 4], device=device)}


def _rows_run(i, backend):
    kept = ops.gather_rows(i["x"], i["idx"], backend=backend)
    return kept, ops.scatter_rows(kept * 2, i["idx"], 9, backend=backend)


def _depthwise_make(layout):
    # channels_last: the layout the CPU kernel runs on (contiguous maps run PyTorch's convolution
    # there); the Triton kernels run both (contiguous: the driver's layout on CUDA).
    def make(dtype, device, gen):
        x = _randn(gen, 3, 19, 7, 9, dtype=dtype, device=device, grad=False)
        return {"x": x.contiguous(memory_format=layout).requires_grad_(),
                "weight": _randn(gen, 19, 1, 5, 3, dtype=dtype, device=device)}
    return make


def _depthwise_run(stride, padding, dilation):
    def run(i, backend):
        return (ops.depthwise_conv2d(i["x"], i["weight"], stride=stride, padding=padding, dilation=dilation,
                                     relu_input=True, backend=backend),)
    return run


def cases() -> list[Case]:
    # Factors: gradients sum over many products (weights over B*C*H*W) and the
    # softmax's take differences of nearly equal terms; half-precision inputs
    # round intermediate values (pooled maps, logits) too. Measured on the CPU
    # backends, every error stays 5-10x below its tolerance.
    return [
        Case("mixed_op", "per edge, Zero op, 3x5x7x9", *_mixed_edge("edge"), factor=2),
        Case("mixed_op", "per sample", *_mixed_edge("sample"), factor=2),
        Case("mixed_op", "per patch, grid 2x3 of 7x9", *_mixed_edge("patch"), factor=2),
        Case("mixed_op", "per token, N=13", _mixed_tokens_make,
             lambda i, b: (ops.mixed_op(i["outputs"], i["weights"], backend=b),), factor=2),
        Case("patch_pool", "grid 3x2 of 7x9", lambda d, dev, g: {"x": _randn(g, 2, 5, 7, 9, dtype=d, device=dev)},
             lambda i, b: (ops.patch_pool(i["x"], (3, 2), backend=b),), factor=2),
        Case("patch_softmax_attention", "K=3, D=6, prior, tau 0.7", _softmax_make,
             lambda i, b: (ops.patch_softmax_attention(i["q"], i["k"], i["prior"], 0.7, backend=b),), factor=4),
        Case("patch_attention_mixed_op", "grid 3x2, Zero op + zero_key", _attention_edge_make,
             _attention_edge_run, factor=4),
        *[Case("topk_tokens", f"gate {gate}, N=11, keep 5", _tokens_make, _tokens_run(gate), factor=2, exact=(1,))
          for gate in ("none", "straight_through", "sigmoid")],
        Case("gather_rows/scatter_rows", "(7, 3, 5), 4 rows", _rows_make, _rows_run, factor=1),
        Case("depthwise_conv2d", "ReLU, 5x3, C=19, 7x9", _depthwise_make(torch.channels_last),
             _depthwise_run(1, (2, 1), 1), factor=4),
        Case("depthwise_conv2d", "ReLU, 5x3 dilated, stride 2", _depthwise_make(torch.channels_last),
             _depthwise_run((2, 1), (4, 1), (2, 1)), factor=4),
        Case("depthwise_conv2d", "ReLU, 5x3 dilated, stride 2, contiguous", _depthwise_make(torch.contiguous_format),
             _depthwise_run((2, 1), (4, 1), (2, 1)), factor=4),
    ]


# ---- running and comparing -------------------------------------------------------------

def _leaves(inputs):
    """(name, tensor) of every input that takes a gradient."""
    found = []
    for name, value in inputs.items():
        for j, t in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                found.append((f"{name}[{j}]" if isinstance(value, list) else name, t))
    return found


def _as_reference(inputs):
    """float64 copies of the floating inputs (same values), as fresh leaves."""
    def convert(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        return t.detach().double().requires_grad_(t.requires_grad)
    return {k: [convert(t) for t in v] if isinstance(v, list) else convert(v) for k, v in inputs.items()}


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return math.inf
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    if math.isnan(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


def _outputs_and_grads(case, inputs, backend, upstream):
    outputs = case.run(inputs, backend)
    floating = [o for o in outputs if o.is_floating_point()]
    if upstream is None:
        upstream = [torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
                    .to(o.device) for o in floating]
    loss = sum((o.double() * g).sum() for o, g in zip(floating, upstream))
    leaves = _leaves(inputs)
    grads = torch.autograd.grad(loss, [t for _, t in leaves], allow_unused=True)
    return outputs, dict(zip([n for n, _ in leaves], grads)), upstream


def check_case(case: Case, backend: str, dtype: torch.dtype, device: torch.device, seed: int) -> Check:
    result = Check(case.op, case.name, backend, str(dtype).replace("torch.", ""))
    result.tolerance = TOLERANCE[dtype] * case.factor
    inputs = case.make(dtype, device, torch.Generator().manual_seed(seed))
    reference_inputs = _as_reference(inputs)
    want, want_grads, upstream = _outputs_and_grads(case, reference_inputs, "eager", None)
    try:
        got, got_grads, _ = _outputs_and_grads(case, inputs, backend, upstream)
    except Exception as exc:  # a kernel that raises fails its check, the others still run
        result.forward = result.backward = math.inf
        result.failures.append(f"raised {type(exc).__name__}: {exc}")
        return result
    for j, (g, w) in enumerate(zip(got, want)):
        if j in case.exact or not w.is_floating_point():
            if not torch.equal(g.cpu(), w.cpu()):
                result.forward = math.inf
                result.failures.append(f"output {j} differs from the reference")
            continue
        result.forward = max(result.forward, _error(g, w))
    for name, w in want_grads.items():
        g = got_grads.get(name)
        if w is None or g is None:
            if (w is None) != (g is None or not g.any()):
                result.backward = math.inf
                result.failures.append(f"gradient of {name}: {'missing' if g is None else 'unexpected'}")
            continue
        result.backward = max(result.backward, _error(g, w))
    if result.forward > result.tolerance:
        result.failures.append(f"forward error {result.forward:.3g} > {result.tolerance:.3g}")
    if result.backward > result.tolerance:
        result.failures.append(f"backward error {result.backward:.3g} > {result.tolerance:.3g}")
    return result


def kernel_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The kernel backends that run on ``device`` here, and why the others do not
    (nasops.backend decides, as for every op call)."""
    usable, missing = [], {}
    for name in ("cuda", "triton", "cpu"):
        try:
            resolve(name, device)
        except ValueError as exc:
            missing[name] = str(exc)
        else:
            usable.append(name)
    return usable, missing


def _format(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nasops.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--backends", nargs="*", choices=("cuda", "triton", "cpu"),
                        help="test only these (default: every kernel backend available on the device)")
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--ops", nargs="*", help="test only these ops (names as in the table)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    usable, missing = kernel_backends(device)
    backends = [b for b in usable if args.backends is None or b in args.backends]
    print(f"nasops {nasops.__version__} selftest on {device} (torch {torch.__version__})")
    for name, why in missing.items():
        print(f"  not tested: {why}")
    if not backends:
        print(f"selftest: FAIL (no kernel backend to test on {device})")
        return 1
    selected = [c for c in cases() if args.ops is None or c.op in args.ops]
    if not selected:
        parser.error(f"--ops: expected names among {sorted({c.op for c in cases()})}, got {args.ops}")

    start = time.perf_counter()
    checks = [check_case(case, backend, DTYPES[dtype], device, args.seed)
              for case in selected for backend in backends for dtype in args.dtypes]
    seconds = time.perf_counter() - start

    header = ("op", "case", "backend", "dtype", "forward err", "backward err", "tolerance", "result")
    rows = [(c.op, c.case, c.backend, c.dtype, _format(c.forward), _format(c.backward), _format(c.tolerance),
             "ok" if c.ok else "FAIL: " + "; ".join(c.failures)) for c in checks]
    widths = [max(len(str(r[j])) for r in rows + [header]) for j in range(len(header) - 1)]
    for row in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + row[-1])
    failed = [c for c in checks if not c.ok]
    summary = f"{len(checks)} checks of {len(selected)} cases on {', '.join(backends)} in {seconds:.1f} s"
    if failed:
        print(f"selftest: FAIL ({len(failed)} of {summary} failed)")
        return 1
    print(f"selftest: PASS ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
