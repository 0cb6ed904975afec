"""patch_attention_mixed_op benchmark (SPEC 2.2): the MIDAS edge.

Shapes: DARTS edges (64,16,32,32) and (64,64,16,16) (x of the outputs' shape,
a stride-1 edge), K = 8 live ops, D = 16, grids 1x1, 2x2, 4x4, 8x8; forward
and forward+backward (Wq, Wk, prior, x and every output are leaves).
Providers: eager as a plain-PyTorch MIDAS implementation writes it (adaptive
average pooling, matmul, softmax, patch weights broadcast over their pixels,
sum of w*o),
torch.compile of that, nasops per usable backend (harness.py). (Painting
the weights with F.interpolate(mode="nearest") instead of a broadcast hits an
Inductor CPU codegen assertion in torch 2.13 on the 1x1 grid's backward.)

    pytest benchmarks/bench_patch_attention.py                         # pytest-benchmark groups
    python benchmarks/report.py --ops patch_attention_mixed_op         # table in RESULTS.md
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nasops
from harness import BENCH_PROVIDERS, MODES, Case, Inputs, OpBenchmark, benchmark_step

K = 8
D = 16
TAU = 1.0
SHAPES = {"darts-edge": (64, 16, 32, 32), "darts-deep": (64, 64, 16, 16)}
GRIDS = ((1, 1), (2, 2), (4, 4), (8, 8))


# ---- eager, as a plain-PyTorch MIDAS edge writes it ------------------------------------------

def _patch_tokens(t, grid):
    return F.adaptive_avg_pool2d(t, grid).flatten(2).transpose(1, 2)  # (B, P, C)


def eager_midas(args):
    x, outputs, Wq, Wk, prior, grid = (args[n] for n in ("x", "outputs", "Wq", "Wk", "prior", "grid"))
    q = _patch_tokens(x, grid) @ Wq  # (B, P, D)
    keys = torch.stack([_patch_tokens(o, grid) @ Wk for o in outputs], dim=2)  # (B, P, K, D)
    logits = (q.unsqueeze(2) * keys).sum(-1) / Wq.shape[1] ** 0.5 + prior
    w = torch.softmax(logits / TAU, dim=-1)  # (B, P, K)
    # Paint each patch's weight over its pixels (the grids divide these maps).
    B, _, H, W = outputs[0].shape
    gh, gw = grid
    wmap = (w.transpose(1, 2).reshape(B, len(outputs), gh, 1, gw, 1)
            .expand(B, len(outputs), gh, H // gh, gw, W // gw).reshape(B, len(outputs), H, W))
    return sum(wmap[:, k:k + 1] * o for k, o in enumerate(outputs))


def nasops_midas(args, backend):
    y, _ = nasops.ops.patch_attention_mixed_op(args["x"], args["outputs"], args["Wq"], args["Wk"],
                                               args["grid"], args["prior"], TAU, backend=backend)
    return y


# ---- cases ----------------------------------------------------------------------------------

def _make_inputs(shape, grid):
    def make(device, dtype):
        gen = torch.Generator(device="cpu").manual_seed(0)

        def leaf(*size, scale=1.0):
            return (scale * torch.randn(size, generator=gen)).to(device=device, dtype=dtype).requires_grad_()

        C = shape[1]
        x = leaf(*shape)
        outputs = [leaf(*shape) for _ in range(K)]
        Wq, Wk = leaf(C, D, scale=C ** -0.5), leaf(C, D, scale=C ** -0.5)
        prior = leaf(K, scale=1e-3)
        grad_out = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        return Inputs(args={"x": x, "outputs": outputs, "Wq": Wq, "Wk": Wk, "prior": prior, "grid": grid},
                      leaves=[x, *outputs, Wq, Wk, prior], grad_out=grad_out)
    return make


def _floor_bytes(shape):
    """The fused op's floor (module docstring of nasops.ops.patch_attention), N elements
    per map: forward reads x and the K outputs twice (pool, then sum) and writes y;
    backward reads g and the outputs (grad w), g again, and writes grad x and K grads."""
    def floor(mode, dtype):
        n = 1
        for s in shape:
            n *= s
        e = torch.empty((), dtype=dtype).element_size()
        fwd = ((2 * K + 1) * n * e, n * e)
        if mode == "fwd":
            return fwd
        return (fwd[0] + (K + 2) * n * e, fwd[1] + (K + 1) * n * e)
    return floor


def cases(quick: bool = False) -> list[Case]:
    grids = ((1, 1), (8, 8)) if quick else GRIDS
    return [Case(group=f"patch_attention_mixed_op {name} {tuple(shape)} K={K} grid {g[0]}x{g[1]}",
                 make_inputs=_make_inputs(shape, g), eager=eager_midas, nasops=nasops_midas,
                 floor_bytes=_floor_bytes(shape), params={"shape": name, "grid": g})
            for name, shape in SHAPES.items() for g in grids]


BENCHMARK = OpBenchmark(
    op="patch_attention_mixed_op",
    cases=cases,
    description="The MIDAS edge (SPEC 2.2): per-patch attention weights over K = 8 ops "
                "(D = 16) and their weighted sum; x, the outputs, Wq, Wk and the prior all "
                "get gradients. Eager is adaptive_avg_pool2d + matmul + softmax + "
                "`sum(w * o)` with the patch weights broadcast over their pixels.",
)


# ---- pytest-benchmark ---------------------------------------------------------------------

_CASES = cases()


@pytest.mark.parametrize("provider", BENCH_PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", _CASES, ids=[f"{c.params['shape']} grid{c.params['grid'][0]}"
                                              for c in _CASES])
def test_patch_attention_mixed_op(benchmark, case, mode, provider):
    benchmark_step(benchmark, case, mode, provider)
