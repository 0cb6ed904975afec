"""topk_tokens benchmark (SPEC 2.3): DASViT token scores, top-k and gated gather.

Shapes: ViT-B tokens B=64, N in {197 (224/16 patches + CLS), 785 (224/8 + CLS)},
C=768, D=64; keep ratio in {0.5, 0.7}; the straight-through gate (forward is
the gather, backward reaches q and k); forward and forward+backward.

Providers (harness.py): every shape is two cases, so that the one report
mechanism shows all of them:
- ``literal``: eager = the DASViT formula as written (the N x N matrix
  q @ k.T / sqrt(D), its mean over j, topk, gather); compile = torch.compile of it;
- ``smart``: eager = the same maths with the mean-key trick in PyTorch
  (q @ mean_j k_j, O(N*D)); compile = torch.compile of that;
- nasops-<backend>: nasops.ops.topk_tokens (same numbers in both rows of a shape).

    pytest benchmarks/bench_topk_tokens.py                  # pytest-benchmark groups
    python benchmarks/report.py --ops topk_tokens           # side-by-side table in RESULTS.md
"""
from __future__ import annotations

import math

import pytest
import torch

import nasops
from harness import BENCH_PROVIDERS, MODES, Case, Inputs, OpBenchmark, benchmark_step

B, C, D = 64, 768, 64
TOKENS = (197, 785)
RATIOS = (0.5, 0.7)
GATE = "straight_through"


# ---- eager, as DASViT code writes it --------------------------------------------------

def _gather_gated(x, s, idx):
    x_sel = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    s_sel = torch.gather(s, 1, idx).unsqueeze(-1)
    return x_sel * (1 + s_sel - s_sel.detach())


def _top_tokens(s, keep):
    """CLS plus the keep - 1 best other tokens, ascending."""
    top = torch.topk(s[:, 1:], keep - 1, dim=1).indices + 1
    cls = torch.zeros_like(top[:, :1])
    return torch.sort(torch.cat([cls, top], dim=1), dim=1).values


def eager_literal(args):
    x, q, k, keep = args["x"], args["q"], args["k"], args["keep"]
    attention = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, N, N)
    s = attention.mean(dim=-1)
    return _gather_gated(x, s, _top_tokens(s.detach(), keep))


def eager_smart(args):
    x, q, k, keep = args["x"], args["q"], args["k"], args["keep"]
    s = (q @ k.mean(dim=1, keepdim=True).transpose(-2, -1)).squeeze(-1) / math.sqrt(q.shape[-1])
    return _gather_gated(x, s, _top_tokens(s.detach(), keep))


def nasops_topk_tokens(args, backend):
    return nasops.ops.topk_tokens(args["x"], args["q"], args["k"], args["keep"], keep_cls=True,
                                  gate=GATE, backend=backend)[0]


# ---- cases ----------------------------------------------------------------------------------

def _make_inputs(N, ratio):
    def make(device, dtype):
        gen = torch.Generator(device="cpu").manual_seed(0)
        x, q, k = (torch.randn(B, N, c, generator=gen).to(device=device, dtype=dtype).requires_grad_()
                   for c in (C, D, D))
        keep = math.floor(ratio * N)
        grad_out = torch.randn(B, keep, C, generator=gen).to(device=device, dtype=dtype)
        return Inputs(args={"x": x, "q": q, "k": k, "keep": keep}, leaves=[x, q, k], grad_out=grad_out)
    return make


def _floor_bytes(N, ratio):
    """Traffic floor. fwd: read q, k and the kept rows of x, write x_sel and s.
    bwd adds: read the upstream gradient and the kept rows of x (for d/ds), q;
    write grad_x (all N rows: zeros outside the kept ones), grad_q and grad_k."""
    keep = math.floor(ratio * N)

    def floor(mode, dtype):
        e = torch.empty((), dtype=dtype).element_size()
        qk, kept, s = B * N * D * e, B * keep * C * e, B * N * e
        read, write = 2 * qk + kept, kept + s + B * keep * 8
        if mode == "fwd+bwd":
            read += 2 * kept + qk
            write += B * N * C * e + 2 * qk
        return read, write
    return floor


def cases(quick: bool = False) -> list[Case]:
    found = []
    for N in TOKENS:
        for ratio in RATIOS:
            for name, eager in (("literal", eager_literal), ("smart", eager_smart)):
                found.append(Case(
                    group=f"topk_tokens B={B} N={N} C={C} D={D} keep={ratio} eager={name}",
                    make_inputs=_make_inputs(N, ratio),
                    eager=eager,
                    nasops=nasops_topk_tokens,
                    floor_bytes=_floor_bytes(N, ratio),
                    params={"N": N, "ratio": ratio, "eager": name},
                ))
    return found


BENCHMARK = OpBenchmark(
    op="topk_tokens",
    cases=cases,
    description="DASViT token selection (SPEC 2.3), straight-through gate, CLS kept. "
                "`eager=literal` rows: eager and compile are the paper's formula with the "
                "N x N score matrix; `eager=smart` rows: the mean-key trick in PyTorch "
                "(O(N*D)). nasops is the same call in both rows of a shape. Memory: the literal "
                "formula allocates the (B, N, N) score matrix (9.5 MiB at N=197, 150 MiB at "
                "N=785 in float32) and as much again for its gradient; nasops allocates O(B*N) "
                "besides its outputs.",
)


# ---- pytest-benchmark ---------------------------------------------------------------------

_CASES = cases()


@pytest.mark.parametrize("provider", BENCH_PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", _CASES, ids=[c.group.replace("topk_tokens ", "") for c in _CASES])
def test_topk_tokens(benchmark, case, mode, provider):
    benchmark_step(benchmark, case, mode, provider)
