"""mixed_op benchmark (SPEC 2.1): the DARTS mixed edge y = sum_k w_k * o_k.

Shapes: DARTS edge (64,16,32,32), a deeper DARTS edge (64,64,16,16) and ViT
tokens (64,197,768); K = 8 ops; every weight granularity: (K,) per edge,
(B,K) per sample, (B,P,K) per patch (grid 4x4 on feature maps, per token on
tokens); forward and forward+backward. Providers: eager as a paper's code
writes it, torch.compile of that, nasops per usable backend (harness.py).

    pytest benchmarks/bench_mixed_op.py                     # pytest-benchmark groups
    python benchmarks/report.py --ops mixed_op              # side-by-side table in RESULTS.md
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nasops
from harness import BENCH_PROVIDERS, MODES, Case, Inputs, OpBenchmark, benchmark_step

K = 8
GRID = (4, 4)
SHAPES = {
    "darts-edge": (64, 16, 32, 32),
    "darts-deep": (64, 64, 16, 16),
    "vit-tokens": (64, 197, 768),
}
GRANULARITIES = ("(K,)", "(B,K)", "(B,P,K)")


# ---- eager, as DARTS-family code writes it ----------------------------------------------

def eager_per_edge(args):
    # DARTS: sum(w * op(x) for w, op in zip(weights, self._ops))
    return sum(w * o for w, o in zip(args["weights"], args["outputs"]))


def eager_per_sample(args):
    outputs, weights = args["outputs"], args["weights"]
    shape = (-1,) + (1,) * (outputs[0].dim() - 1)
    return sum(weights[:, k].view(shape) * o for k, o in enumerate(outputs))


def eager_per_patch(args):
    """Per-patch weights painted onto the map with nearest upsampling (its bins
    are the SPEC's mosaic), or per token."""
    outputs, weights = args["outputs"], args["weights"]
    if outputs[0].dim() == 3:  # tokens (B, N, C), weights (B, N, K)
        return sum(weights[:, :, k:k + 1] * o for k, o in enumerate(outputs))
    B, H, W = outputs[0].shape[0], outputs[0].shape[2], outputs[0].shape[3]
    gh, gw = args["grid"]
    wmap = F.interpolate(weights.transpose(1, 2).reshape(B, -1, gh, gw), size=(H, W), mode="nearest")
    return sum(wmap[:, k:k + 1] * o for k, o in enumerate(outputs))


EAGER = {"(K,)": eager_per_edge, "(B,K)": eager_per_sample, "(B,P,K)": eager_per_patch}


def nasops_mixed_op(args, backend):
    return nasops.ops.mixed_op(args["outputs"], args["weights"], grid=args["grid"], backend=backend)


# ---- cases ----------------------------------------------------------------------------------

def _make_inputs(shape, granularity):
    def make(device, dtype):
        gen = torch.Generator(device="cpu").manual_seed(0)
        outputs = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
                   for _ in range(K)]
        B = shape[0]
        grid = None
        if granularity == "(K,)":
            w = torch.randn(K, generator=gen)
        elif granularity == "(B,K)":
            w = torch.randn(B, K, generator=gen)
        elif len(shape) == 3:
            w = torch.randn(B, shape[1], K, generator=gen)
        else:
            grid = GRID
            w = torch.randn(B, GRID[0] * GRID[1], K, generator=gen)
        # Architecture weights stay float32 (softmax output) whatever the outputs' dtype.
        weights = w.softmax(-1).to(device).requires_grad_()
        grad_out = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        return Inputs(args={"outputs": outputs, "weights": weights, "grid": grid},
                      leaves=[*outputs, weights], grad_out=grad_out)
    return make


def _floor_bytes(shape):
    """SPEC 2.1 traffic floor: fwd reads K*N, writes N; bwd reads N + K*N, writes K*N."""
    def floor(mode, dtype):
        n = 1
        for s in shape:
            n *= s
        e = torch.empty((), dtype=dtype).element_size()
        if mode == "fwd":
            return (K * n * e, n * e)
        return ((2 * K + 1) * n * e, (K + 1) * n * e)
    return floor


def cases(quick: bool = False) -> list[Case]:
    found = []
    for shape_name, shape in SHAPES.items():
        for granularity in GRANULARITIES:
            grid = "" if granularity != "(B,P,K)" else (
                " per token" if len(shape) == 3 else f" grid {GRID[0]}x{GRID[1]}")
            found.append(Case(
                group=f"mixed_op {shape_name} {tuple(shape)} K={K} w={granularity}{grid}",
                make_inputs=_make_inputs(shape, granularity),
                eager=EAGER[granularity],
                nasops=nasops_mixed_op,
                floor_bytes=_floor_bytes(shape),
                params={"shape": shape_name, "granularity": granularity},
            ))
    return found


BENCHMARK = OpBenchmark(
    op="mixed_op",
    cases=cases,
    description="y = sum_k w_k * o_k over K = 8 op outputs (SPEC 2.1); eager is "
                "`sum(w * o for ...)` with the weights broadcast (nearest-upsampled "
                "for per-patch weights).",
)


# ---- pytest-benchmark ---------------------------------------------------------------------

_CASES = cases()


def _case_id(case):  # e.g. darts-edge-wBPK: selectable with -k
    return f"{case.params['shape']}-w" + "".join(ch for ch in case.params["granularity"] if ch.isalpha())


@pytest.mark.parametrize("provider", BENCH_PROVIDERS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.replace("+", "_"))
@pytest.mark.parametrize("case", _CASES, ids=_case_id)
def test_mixed_op(benchmark, case, mode, provider):
    benchmark_step(benchmark, case, mode, provider)
