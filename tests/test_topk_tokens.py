"""topk_tokens, gather_rows, scatter_rows (SPEC 2.3) against the literal DASViT
formula, for every available backend.

The reference below is written as the paper states it (the full N x N matrix
q @ k.T / sqrt(D), its mean over j, a top-k with ties to the lower index, a
gather) in float64 and shares no code with nasops. Parity inputs are built so
that every score is exact in every dtype (small integers, key column sums
divisible by N, D = 4): ties planted in the reference are ties in every kernel,
and the indices must agree exactly.
"""
import functools
import importlib
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import DEVICE, assert_close, available_backends, kernel_backends, subprocess_env
from nasops.ops import gather_rows, scatter_rows, topk_tokens

BACKENDS = available_backends()
GATES = ("none", "straight_through", "sigmoid")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- the literal DASViT formula ----------------------------------------------------

def literal_scores(q, k):
    attention = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, N, N), on purpose
    return attention.mean(dim=-1)


def literal_select(s, keep, keep_cls):
    """Kept token mask by rank: rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}."""
    B, N = s.shape
    candidate = torch.ones(N, dtype=torch.bool)
    if keep_cls:
        candidate[0] = False
    si, sj = s[:, :, None], s[:, None, :]
    lower = torch.arange(N)[None, :] < torch.arange(N)[:, None]  # [i, j]: j < i
    beats = ((sj > si) | ((sj == si) & lower)) & candidate[None, None, :]
    rank = beats.sum(-1)
    wanted = keep - int(keep_cls)
    kept = candidate & (rank < wanted)
    if keep_cls:
        kept[:, 0] = True
    idx = torch.stack([row.nonzero().squeeze(1) for row in kept]) if B else \
        torch.empty(0, keep, dtype=torch.long)
    # torch.topk must agree on the kept values (it may order ties differently).
    if B and wanted:
        top = torch.topk(s[:, int(keep_cls):], wanted, dim=1).values
        kept_values = torch.gather(s, 1, idx)[:, int(keep_cls):]
        torch.testing.assert_close(kept_values.sort(1, descending=True).values, top, rtol=0, atol=0)
    return idx


def literal_topk_tokens(x, q, k, keep, keep_cls, gate):
    """On the CPU in float64, results moved back to the inputs' device."""
    device = x.device
    x, q, k = x.double().cpu(), q.double().cpu(), k.double().cpu()
    s = literal_scores(q, k)
    idx = literal_select(s.detach(), keep, keep_cls)
    x_sel = x[torch.arange(x.shape[0])[:, None], idx]
    s_sel = torch.gather(s, 1, idx).unsqueeze(-1)
    if gate == "straight_through":
        x_sel = x_sel * (1 + s_sel - s_sel.detach())
    elif gate == "sigmoid":
        x_sel = x_sel * torch.sigmoid(s_sel)
    return x_sel.to(device), idx.to(device), s.to(device)


def exact_inputs(B, N, C, dtype, D=4, ties=True):
    """Random x; integer q and k whose scores are exact in every dtype.

    k's column sums are made multiples of N (so mean_j k_j is an integer) and
    D is a square of a power of two (so / sqrt(D) is exact). ``ties`` copies
    query rows to plant equal scores.
    """
    x = torch.randn(B, N, C).to(dtype)
    q = torch.randint(-3, 4, (B, N, D))
    if ties and N >= 8:
        q[:, 5] = q[:, 2]
        q[:, 6] = q[:, 2]
        q[:, N - 1] = q[:, 3]
    k = torch.randint(-3, 4, (B, N, D))
    k[:, -1] -= k.sum(1) % N
    return x.to(DEVICE), q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE)


def run_with_grads(fn, x, q, k, grad_x_sel=None, grad_s=None):
    """(x_sel, idx, s, grad_x, grad_q, grad_k) for a random upstream gradient."""
    x, q, k = (t.detach().clone().requires_grad_() for t in (x, q, k))
    x_sel, idx, s = fn(x, q, k)
    loss = (x_sel.double() * grad_x_sel).sum() + (s.double() * grad_s).sum()
    grads = torch.autograd.grad(loss, (x, q, k))
    return (x_sel.detach(), idx, s.detach()) + grads


# ---- parity --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("keep_cls", (True, False))
def test_matches_literal_dasvit(backend, dtype, gate, keep_cls):
    B, N, C, keep = 3, 13, 6, 0.5
    x, q, k = exact_inputs(B, N, C, dtype)
    n_keep = 6
    grad_x_sel = torch.randn(B, n_keep, C, dtype=torch.float64, device=DEVICE)
    grad_s = torch.randn(B, N, dtype=torch.float64, device=DEVICE)
    got = run_with_grads(lambda *a: topk_tokens(*a, keep, keep_cls=keep_cls, gate=gate, backend=backend),
                         x, q, k, grad_x_sel, grad_s)
    want = run_with_grads(lambda *a: literal_topk_tokens(*a, n_keep, keep_cls, gate),
                          x, q, k, grad_x_sel, grad_s)
    x_sel, idx, s, gx, gq, gk = got
    assert idx.dtype == torch.int64 and x_sel.dtype == dtype and s.dtype == dtype
    assert gx.dtype == gq.dtype == gk.dtype == dtype
    assert torch.equal(idx.cpu(), want[1].cpu()), f"indices differ:\n{idx}\n{want[1]}"
    if gate != "sigmoid":  # the forward is a gather: bit for bit
        assert torch.equal(x_sel, x[torch.arange(B, device=x.device)[:, None], idx])
    for name, a, b, scale in (("x_sel", x_sel, want[0], 1), ("s", s, want[2], 1),
                              ("grad_x", gx, want[3], 1), ("grad_q", gq, want[4], 8),
                              ("grad_k", gk, want[5], 8)):
        assert_close(a, b, dtype, scale=scale, what=f"{backend} {gate} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", (16, 1, 0.7, 5))
@pytest.mark.parametrize("keep_cls", (True, False))
def test_keep_counts_and_ratios(backend, keep, keep_cls):
    B, N, C = 2, 16, 5
    x, q, k = exact_inputs(B, N, C, torch.float32)
    n_keep = keep if isinstance(keep, int) else math.floor(keep * N)
    x_sel, idx, s = topk_tokens(x, q, k, keep, keep_cls=keep_cls, gate="none", backend=backend)
    assert x_sel.shape == (B, n_keep, C) and idx.shape == (B, n_keep) and s.shape == (B, N)
    want = literal_topk_tokens(x, q, k, n_keep, keep_cls, "none")
    assert torch.equal(idx.cpu(), want[1].cpu())
    assert torch.equal(x_sel.double(), want[0])
    if keep_cls:
        assert (idx[:, 0] == 0).all()
    if n_keep == N:
        assert torch.equal(idx.cpu(), torch.arange(N).expand(B, N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_shapes(backend):
    """Small random configurations, edge sizes included (N = 1, C = 0, keep = N)."""
    rng = random.Random(torch.seed())  # fresh each run, like the tensors
    configs = [(1, 1, 3, 1, 1, True), (2, 5, 0, 4, 5, False), (3, 2, 4, 16, 1, False)]
    for _ in range(5):
        N = rng.randint(1, 40)
        configs.append((rng.randint(1, 3), N, rng.randint(0, 8), rng.choice((1, 4, 16)),
                        rng.randint(1, N), rng.random() < 0.5))
    for B, N, C, D, keep, keep_cls in configs:
        x, q, k = exact_inputs(B, N, C, torch.float32, D=D, ties=N >= 8)
        grad_x_sel = torch.randn(B, keep, C, dtype=torch.float64, device=DEVICE)
        grad_s = torch.randn(B, N, dtype=torch.float64, device=DEVICE)
        got = run_with_grads(lambda *a: topk_tokens(*a, keep, keep_cls=keep_cls, gate="sigmoid",
                                                    backend=backend), x, q, k, grad_x_sel, grad_s)
        want = run_with_grads(lambda *a: literal_topk_tokens(*a, keep, keep_cls, "sigmoid"),
                              x, q, k, grad_x_sel, grad_s)
        config = f"B={B} N={N} C={C} D={D} keep={keep} keep_cls={keep_cls}"
        assert torch.equal(got[1].cpu(), want[1].cpu()), config
        for a, b in zip(got[:1] + got[2:], want[:1] + want[2:]):
            assert_close(a, b, torch.float32, scale=8, what=config)


def planted_near_ties(dtype, rows_per_kind=6, D=3):
    """(q, k, expected scores) with near-ties that only the score's rounding decides.

    Every key is (1, 0, ..), so mean_j k_j = (1, 0, ..) and token i's dot is its
    query's first entry a_i, exactly, in any summation order. Tokens 1 and 2 of a
    row get adjacent floats a < a' whose scores dot / sqrt(D) (D = 3: not exact)
    tie when computed as specified (both steps correctly rounded) but not as
    dot * (1 / sqrt(D)), or the reverse: a backend that scales differently keeps
    a different token. Tokens 0 and 3 score lower. The expected scores come from
    numpy's IEEE division and square root, not from nasops.
    """
    np_dtype, bits = (np.float32, np.uint32) if dtype == torch.float32 else (np.float64, np.uint64)
    start = np.array(1.8, np_dtype).view(bits)
    a = (start + np.arange(1 << 12, dtype=bits)).view(np_dtype)
    specified = a / np.sqrt(np_dtype(D))
    reciprocal = a * np_dtype(1 / np.sqrt(np.float64(D)))
    tie_specified = specified[:-1] == specified[1:]
    tie_reciprocal = reciprocal[:-1] == reciprocal[1:]
    firsts = np.concatenate([np.flatnonzero(tie_specified & ~tie_reciprocal)[:rows_per_kind],
                             np.flatnonzero(~tie_specified & tie_reciprocal)[:rows_per_kind]])
    dots = np.stack([np.full_like(a[firsts], 0.5), a[firsts], a[firsts + 1],
                     np.full_like(a[firsts], 0.25)], axis=1)  # (B, N = 4)
    q = torch.zeros(len(firsts), 4, D, dtype=dtype)
    q[:, :, 0] = torch.from_numpy(dots)
    k = torch.zeros(len(firsts), 4, D, dtype=dtype)
    k[:, :, 0] = 1
    expected = torch.from_numpy(dots / np.sqrt(np_dtype(D)))
    return q.to(DEVICE), k.to(DEVICE), expected


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_near_ties_select_the_same_tokens_on_every_backend(dtype):
    """Issue #10 item 6: every backend computes a score as dot / sqrt(D), bit for bit."""
    q, k, expected = planted_near_ties(dtype)
    x = torch.randn(q.shape[0], 4, 2, dtype=dtype, device=DEVICE)
    tied = expected[:, 1] == expected[:, 2]
    assert 0 < int(tied.sum()) < len(tied)  # both kinds of rows are there
    best = torch.where(tied, 1, 2)  # ties to the lower index
    for backend in BACKENDS:
        for keep, keep_cls, want in ((1, False, best[:, None]),
                                     (2, True, torch.stack([torch.zeros_like(best), best], 1))):
            _, idx, s = topk_tokens(x, q, k, keep, keep_cls=keep_cls, gate="none", backend=backend)
            assert torch.equal(s.cpu(), expected), (backend, (s.cpu() - expected).abs().max())
            assert torch.equal(idx.cpu(), want), (backend, keep_cls, idx.cpu().tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_cls_by_hand(backend):
    # D = 1, k = 1 everywhere: s_i = q_i. Scores 5, 1, 3, 3, 0, 3, 9, 3.
    q = torch.tensor([5., 1., 3., 3., 0., 3., 9., 3.]).reshape(1, 8, 1)
    k = torch.ones(1, 8, 1)
    x = torch.arange(8.).reshape(1, 8, 1)
    cases = {(3, False): [0, 2, 6], (4, False): [0, 2, 3, 6], (4, True): [0, 2, 3, 6],
             (2, True): [0, 6], (1, True): [0], (1, False): [6], (5, False): [0, 2, 3, 5, 6]}
    q[0, 0] = 5
    for (keep, cls), expected in cases.items():
        x_sel, idx, s = topk_tokens(x.to(DEVICE), q.to(DEVICE), k.to(DEVICE), keep, keep_cls=cls,
                                    gate="none", backend=backend)
        assert idx.tolist() == [expected], (keep, cls)
        assert x_sel.flatten().tolist() == [float(i) for i in expected]
    # CLS with the lowest score is still kept and counts toward keep.
    q[0, 0] = -100
    _, idx, _ = topk_tokens(x.to(DEVICE), q.to(DEVICE), k.to(DEVICE), 3, keep_cls=True, backend=backend)
    assert idx.tolist() == [[0, 2, 6]]
    # All scores equal: the first tokens win.
    _, idx, _ = topk_tokens(x.to(DEVICE), torch.ones(1, 8, 1, device=DEVICE), k.to(DEVICE), 3,
                            keep_cls=False, backend=backend)
    assert idx.tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_special_scores(backend, dtype):
    """NaN ranks above every number (as torch.sort(descending=True) puts it), -0 ties +0."""
    nan, inf = float("nan"), float("inf")
    q = torch.tensor([1., nan, 3., -0.0, 0.0, inf, -inf, nan], dtype=dtype).reshape(1, 8, 1)
    k = torch.ones(1, 8, 1, dtype=dtype)
    x = torch.arange(8, dtype=dtype).reshape(1, 8, 1)
    cases = {(5, False): [0, 1, 2, 5, 7], (6, False): [0, 1, 2, 3, 5, 7], (7, False): [0, 1, 2, 3, 4, 5, 7],
             (3, True): [0, 1, 7], (8, True): list(range(8))}
    for (keep, cls), expected in cases.items():
        _, idx, _ = topk_tokens(x.to(DEVICE), q.to(DEVICE), k.to(DEVICE), keep, keep_cls=cls,
                                gate="none", backend=backend)
        assert idx.tolist() == [expected], (keep, cls)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_straight_through_forward_is_the_gather_for_non_finite_values(backend, dtype):
    """Kept tokens scored +-inf or NaN, and a kept row holding an inf (a float16
    overflow): the straight-through forward is still the plain gather (SPEC 2.3); the
    eager reference gave NaN rows here when it wrote the gate as x + x * (s - s)."""
    nan, inf = float("nan"), float("inf")
    x = torch.arange(18, dtype=dtype).reshape(1, 6, 3)
    x[0, 4, 0] = inf
    q = torch.tensor([inf, 0., nan, -inf, 5., 1.], dtype=dtype).reshape(1, 6, 1)
    k = torch.ones(1, 6, 1, dtype=dtype)
    x_sel, idx, _ = topk_tokens(x.to(DEVICE), q.to(DEVICE), k.to(DEVICE), 4, keep_cls=True,
                                gate="straight_through", backend=backend)
    assert idx.tolist() == [[0, 2, 4, 5]]  # CLS (+inf), NaN, then 5 and 1
    assert torch.equal(x_sel.cpu(), x[:, [0, 2, 4, 5]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", (785, 4096))
def test_many_tokens_one_row(backend, N):
    """224/8 patches + CLS, and N = 4096: a whole row selected in one program."""
    x, q, k = exact_inputs(1, N, 3, torch.float32)
    keep = N // 2 + 7
    x_sel, idx, s = topk_tokens(x, q, k, keep, backend=backend)
    want = literal_topk_tokens(x, q, k, keep, True, "straight_through")
    assert torch.equal(idx.cpu(), want[1].cpu())
    assert torch.equal(x_sel.double(), want[0].detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, q, k = (torch.randn(0, 7, c, device=DEVICE, requires_grad=True) for c in (5, 4, 4))
    x_sel, idx, s = topk_tokens(x, q, k, 3, gate="sigmoid", backend=backend)
    assert x_sel.shape == (0, 3, 5) and idx.shape == (0, 3) and s.shape == (0, 7)
    (x_sel.sum() + s.sum()).backward()
    assert x.grad.shape == x.shape and q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    x, q, k = exact_inputs(2, 12, 5, torch.float32)
    xt, qt, kt = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (x, q, k))
    assert not xt.is_contiguous()
    got = topk_tokens(xt, qt, kt, 5, backend=backend)
    want = literal_topk_tokens(x, q, k, 5, True, "none")
    assert torch.equal(got[1].cpu(), want[1].cpu()) and torch.equal(got[0].double(), want[0])


@pytest.mark.skipif("cpu" not in available_backends(), reason="needs the compiled CPU kernels")
def test_large_outputs_cpu():
    """grad_x of 64 MiB: fresh pages that the backward maps before writing them."""
    B, N, C, keep = 2, 4, (32 << 20) // 4 // 4, 3  # grad_x (2, 4, 2 Mi) float32: 64 MiB, x_sel 48 MiB
    x = torch.randn(B, N, C, requires_grad=True)
    q = torch.tensor([[[1.0], [3.0], [2.0], [4.0]], [[4.0], [1.0], [3.0], [2.0]]], requires_grad=True)
    k = torch.ones(B, N, 1)
    x_sel, idx, s = topk_tokens(x, q, k, keep, keep_cls=True, gate="straight_through", backend="cpu")
    assert idx.tolist() == [[0, 1, 3], [0, 2, 3]]
    assert torch.equal(x_sel, x.detach()[torch.arange(B)[:, None], idx])
    grad_out = torch.randn(B, keep, C)
    x_sel.backward(grad_out)
    want = torch.zeros(B, N, C)
    want[torch.arange(B)[:, None], idx] = grad_out
    assert torch.equal(x.grad, want)


# ---- autograd machinery ----------------------------------------------------------------

@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("gate", ("none", "sigmoid"))
def test_gradcheck(backend, gate):
    # The straight-through gradient is not the derivative of its forward (by
    # design), so finite differences cannot check it: test_matches_literal_dasvit does.
    B, N, C, D = 2, 6, 3, 4
    x, q, k = (torch.randn(B, N, c, dtype=torch.float64, device=DEVICE, requires_grad=True)
               for c in (C, D, D))

    def fn(x, q, k):
        x_sel, _, s = topk_tokens(x, q, k, 3, keep_cls=True, gate=gate, backend=backend)
        return x_sel, s

    # fast_mode: a few random directions instead of every input element (the
    # interpreter runs each forward in Python).
    assert torch.autograd.gradcheck(fn, (x, q, k), eps=1e-6, atol=1e-6, fast_mode=backend == "triton")


def _registered_variants():
    # importlib: the package attribute nasops.ops.topk_tokens is the function.
    rows_module = importlib.import_module("nasops.ops.rows")
    topk_module = importlib.import_module("nasops.ops.topk_tokens")
    found = []
    for backend, ops in topk_module._KERNELS.items():
        if backend in kernel_backends():
            found.append((backend, ops, rows_module._KERNELS[backend]))
    return found


@pytest.mark.parametrize("backend,topk_ops,row_ops", _registered_variants(),
                         ids=[v[0] for v in _registered_variants()])
def test_opcheck(backend, topk_ops, row_ops):
    forward, backward = topk_ops
    x, q, k = (torch.randn(2, 9, c, device=DEVICE, requires_grad=True) for c in (5, 4, 4))
    for gate in GATES:
        torch.library.opcheck(forward, (x, q, k, 4, True, gate))
    with torch.no_grad():
        _, idx, _, k_mean, pos = forward(x, q, k, 4, False, "sigmoid")
    args = (torch.randn(2, 4, 5, device=DEVICE), torch.randn(2, 9, device=DEVICE), x.detach(),
            q.detach(), k.detach(), idx, k_mean, pos, "sigmoid", True, True)
    torch.library.opcheck(backward, args)
    gather, scatter = row_ops
    rows = torch.randn(6, 3, 2, device=DEVICE, requires_grad=True)
    perm = torch.tensor([4, 0, 2], device=DEVICE)
    torch.library.opcheck(gather, (rows, perm))
    torch.library.opcheck(scatter, (rows[:3].detach().requires_grad_(), perm, 6))


def test_torch_compile_fullgraph():
    def step(x, q, k):
        x_sel, idx, s = topk_tokens(x, q, k, 0.5, gate="sigmoid")
        kept = gather_rows(x_sel, torch.tensor([1, 0], device=x.device))
        return kept.square().sum() + s.sum()

    compiled = torch.compile(step, fullgraph=True)
    x, q, k = exact_inputs(2, 10, 4, torch.float32)
    for t in (x, q, k):
        t.requires_grad_()
    loss = compiled(x, q, k)
    grads = torch.autograd.grad(loss, (x, q, k))
    want_loss = step(x, q, k)
    want = torch.autograd.grad(want_loss, (x, q, k))
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


# ---- gather_rows / scatter_rows --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7,), (7, 5), (7, 3, 4, 2)], ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
def test_rows_round_trip_and_adjoint(backend, shape, dtype):
    n = shape[0]
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE).to(dtype)
    idx = torch.randperm(n, device=DEVICE)[:4]
    got = gather_rows(x, idx, backend=backend)
    assert torch.equal(got, torch.stack([x[i] for i in idx.tolist()]))
    back = scatter_rows(got, idx, n, backend=backend)
    mask = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    mask[idx] = True
    expected = torch.where(mask.reshape((n,) + (1,) * (len(shape) - 1)), x, torch.zeros_like(x))
    assert torch.equal(back, expected)
    assert torch.equal(gather_rows(back, idx, backend=backend), got)
    # Adjoint: <gather(x), y> == <x, scatter(y)>, and the gradients are each other.
    xg = x.double().requires_grad_()
    y = torch.randn((4,) + shape[1:], dtype=torch.float64, device=DEVICE, requires_grad=True)
    lhs = (gather_rows(xg, idx, backend=backend) * y).sum()
    rhs = (xg * scatter_rows(y, idx, n, backend=backend)).sum()
    torch.testing.assert_close(lhs, rhs)
    gx, = torch.autograd.grad(lhs, xg)
    gy, = torch.autograd.grad(rhs, y)
    assert torch.equal(gx, _scatter_by_hand(y.detach(), idx, n))
    assert torch.equal(gy, torch.stack([xg.detach()[i] for i in idx.tolist()]))


def _scatter_by_hand(y, idx, n):
    out = torch.zeros((n,) + tuple(y.shape[1:]), dtype=y.dtype, device=y.device)
    for r, i in enumerate(idx.tolist()):
        out[i] = y[r]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_integer_and_empty(backend):
    labels = torch.arange(10, device=DEVICE) * 3
    idx = torch.tensor([9, 2, 5], dtype=torch.int32, device=DEVICE)
    assert gather_rows(labels, idx, backend=backend).tolist() == [27, 6, 15]
    assert scatter_rows(labels[:3], idx, 10, backend=backend).tolist() == \
        [0, 0, 3, 0, 0, 6, 0, 0, 0, 0]
    none = torch.empty(0, dtype=torch.long, device=DEVICE)
    x = torch.randn(5, 3, device=DEVICE, requires_grad=True)
    empty = gather_rows(x, none, backend=backend)
    assert empty.shape == (0, 3)
    assert torch.equal(scatter_rows(empty, none, 5, backend=backend), torch.zeros(5, 3, device=DEVICE))
    empty.sum().backward()
    assert torch.equal(x.grad, torch.zeros(5, 3, device=DEVICE))
    assert scatter_rows(torch.randn(0, 2, device=DEVICE), none, 0, backend=backend).shape == (0, 2)
    strided = torch.randn(3, 7, device=DEVICE).t()  # (7, 3), not contiguous
    pick = torch.tensor([6, 0, 3], device=DEVICE)
    assert torch.equal(gather_rows(strided, pick, backend=backend), strided[[6, 0, 3]])
    assert torch.equal(scatter_rows(strided[:3], pick, 7, backend=backend)[[6, 0, 3]], strided[:3])


# ---- bad indices inside a compiled graph, and on the device (issue #10, item 1) ---------------

# On CUDA a graph's idx check is a device-side assert, after which the process can
# use CUDA no more: there each refusal runs in a child process, which must die of it.
_REFUSAL_SCRIPT = """
import torch
from nasops.ops import gather_rows, scatter_rows
x = torch.arange(12.0, device="cuda").reshape(4, 3)
f = torch.compile(lambda x, i: {call}, fullgraph=True, backend={compiler!r})
f({arg}, torch.tensor({idx}, device="cuda"))
torch.cuda.synchronize()
"""


@functools.cache
def compiled_rows(call: str, compiler: str):
    """``lambda x, i: <call>`` compiled fullgraph by ``compiler`` (once per call and compiler)."""
    return torch.compile(eval(f"lambda x, i: {call}"), fullgraph=True, backend=compiler)


def assert_graph_refuses(call: str, arg: str, idx: list[int], match: str, compiler: str) -> None:
    """``compiled_rows(call, compiler)`` must refuse ``idx`` when run on ``arg`` (an
    expression in x = arange(12).reshape(4, 3)): on the CPU with a RuntimeError
    matching ``match``; on CUDA the child process running the same must fail with a
    device-side assert (its message stays on the device)."""
    if DEVICE == "cpu":
        x = torch.arange(12.0).reshape(4, 3)
        with pytest.raises(RuntimeError, match=match):
            compiled_rows(call, compiler)(eval(arg), torch.tensor(idx))
        return
    script = _REFUSAL_SCRIPT.format(call=call, compiler=compiler, arg=arg, idx=idx)
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "device-side assert" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in BACKENDS])
def test_rows_compiled_graph_refuses_bad_idx(backend):
    """Under torch.compile the host checks cannot run (they would be data-dependent
    guards); the graph checks idx on the device and raises when it runs."""
    torch._dynamo.reset()
    x = torch.arange(12.0, device=DEVICE).reshape(4, 3)
    gather_call = f"gather_rows(x, i, backend={backend!r})"
    scatter_call = f"scatter_rows(x, i, 4, backend={backend!r})"
    gather, scatter = compiled_rows(gather_call, "aot_eager"), compiled_rows(scatter_call, "aot_eager")
    assert torch.equal(gather(x, torch.tensor([2, 0], device=DEVICE)), x[[2, 0]])
    assert torch.equal(scatter(x[:2], torch.tensor([3, 1], device=DEVICE)),
                       _scatter_by_hand(x[:2], torch.tensor([3, 1]), 4))
    for bad in ([0, 4, 5], [-1, 2]):
        assert_graph_refuses(gather_call, "x", bad, r"idx: expected entries in \[0, x.shape\[0\]\)",
                             "aot_eager")
    assert_graph_refuses(scatter_call, "x[:2]", [0, 4], r"idx: expected entries in \[0, n\)", "aot_eager")
    assert_graph_refuses(scatter_call, "x[:2]", [1, 1], "idx: expected distinct entries", "aot_eager")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_rows_inductor_graph_refuses_bad_idx():
    """The issue's reproduction: inductor, fullgraph, Triton rows, idx past the end."""
    torch._dynamo.reset()
    assert_graph_refuses('gather_rows(x, i, backend="triton")', "x", [0, 4, 5], "idx: expected entries in",
                         "inductor")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_rows_triton_kernel_never_touches_a_row_outside_the_tensor():
    """Called past nasops.ops' checks, the kernel reads no row outside x (the row
    comes out zero) and writes none outside the output (the row is dropped)."""
    rows_triton = importlib.import_module("nasops.triton.rows")
    x = torch.arange(12.0, device=DEVICE).reshape(4, 3)
    got = torch.ops.nasops.gather_rows_triton(x, torch.tensor([1, 4, -3], device=DEVICE))
    zeros = torch.zeros(3, device=DEVICE)
    assert torch.equal(got, torch.stack([x[1], zeros, zeros]))
    # Scatter into the first 4 rows of a 6-row buffer: rows 4 and 5 are guards.
    buffer = torch.full((6, 3), 7.0, device=DEVICE)
    buffer[:4] = 0
    rows_triton._launch(rows_triton._as_words(x[:3]), rows_triton._as_words(buffer)[:4],
                        torch.tensor([2, 4, 5], device=DEVICE), 3, 4, scatter=True)
    assert torch.equal(buffer[:4], torch.stack([zeros, zeros, x[0], zeros]))
    assert torch.equal(buffer[4:], torch.full((2, 3), 7.0, device=DEVICE))


@pytest.mark.skipif("triton" not in BACKENDS or DEVICE != "cpu", reason="needs the Triton interpreter")
def test_rows_triton_device_assert_fires_in_debug_mode(monkeypatch):
    """tl.device_assert runs only in debug mode (TRITON_DEBUG=1; the interpreter's
    builder option here): then a bad entry stops the kernel."""
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.interpreter_builder, "options",
                        interpreter.InterpreterOptions(debug=True))
    x = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(torch.ops.nasops.gather_rows_triton(x, torch.tensor([3, 0])), x[[3, 0]])
    with pytest.raises(Exception, match="idx entry is outside"):
        torch.ops.nasops.gather_rows_triton(x, torch.tensor([0, 4]))
    with pytest.raises(Exception, match="idx entry is outside"):
        torch.ops.nasops.scatter_rows_triton(x[:2], torch.tensor([0, 4]), 4)


# ---- wide rows: Triton's grid axis 1 is capped and strided over (issue #10, item 5) -----------

@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_rows_triton_grid_fits_cuda_limits_and_wide_rows_are_strided(monkeypatch):
    rows_triton = importlib.import_module("nasops.triton.rows")
    # A 16 GiB row of bytes (2^34 words) still launches at most 65535 programs on axis 1.
    for rows, W in ((1, 2 ** 34), (3, 2 ** 27 + 5), (70000, 1)):
        grid, _, _ = rows_triton._launch_shape(rows, W)
        assert grid[1] <= 65535 and grid[0] <= 2 ** 31 - 1, (rows, W, grid)
    # Few column programs for a row of many blocks: each program strides over the row.
    monkeypatch.setattr(rows_triton, "_MAX_COLUMN_PROGRAMS", 2)
    x = torch.randint(0, 255, (3, 7 * 16384 + 5), dtype=torch.uint8, device=DEVICE)
    (grid, _, block_w) = rows_triton._launch_shape(3, x.shape[1])
    assert grid[1] == 2 and x.shape[1] > 4 * block_w  # several strides per program
    idx = torch.tensor([2, 0], device=DEVICE)
    assert torch.equal(gather_rows(x, idx, backend="triton"), x[[2, 0]])
    assert torch.equal(scatter_rows(x[:2], idx, 3, backend="triton"), _scatter_by_hand(x[:2], idx, 3))


# ---- errors ------------------------------------------------------------------------------

def test_topk_tokens_errors():
    x, q, k = torch.randn(2, 8, 5), torch.randn(2, 8, 4), torch.randn(2, 8, 4)
    for keep, err in ((0, ValueError), (9, ValueError), (-1, ValueError), (0.0, ValueError),
                      (1.5, ValueError), (True, TypeError), ("half", TypeError)):
        with pytest.raises(err, match="keep"):
            topk_tokens(x, q, k, keep)
    with pytest.raises(ValueError, match="q"):
        topk_tokens(x, torch.randn(3, 8, 4), k, 4)
    with pytest.raises(ValueError, match="k"):
        topk_tokens(x, q, torch.randn(2, 7, 4), 4)
    with pytest.raises(ValueError, match="k"):
        topk_tokens(x, q, torch.randn(2, 8, 3), 4)
    with pytest.raises(ValueError, match="x"):
        topk_tokens(torch.randn(2, 8), q, k, 4)
    with pytest.raises(ValueError, match="gate"):
        topk_tokens(x, q, k, 4, gate="hard")
    with pytest.raises(TypeError, match="q"):
        topk_tokens(x, q.double(), k, 4)
    with pytest.raises(TypeError, match="x"):
        topk_tokens(x.long(), q, k, 4)
    with pytest.raises(ValueError, match="k"):
        topk_tokens(x, q, k.to("meta"), 4)
    with pytest.raises(TypeError, match="keep_cls"):
        topk_tokens(x, q, k, 4, keep_cls=1)
    with pytest.raises(ValueError, match="backend"):
        topk_tokens(x, q, k, 4, backend="tpu")


def test_rows_errors():
    x = torch.randn(6, 3)
    with pytest.raises(TypeError, match="idx"):
        gather_rows(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="idx"):
        gather_rows(x, [0, 1])
    with pytest.raises(ValueError, match="idx"):
        gather_rows(x, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="idx"):
        gather_rows(x, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="idx"):
        gather_rows(x, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="idx"):
        gather_rows(x, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="idx"):
        scatter_rows(x[:2], torch.tensor([3, 3]), 6)
    with pytest.raises(ValueError, match="idx"):
        scatter_rows(x[:2], torch.tensor([3]), 6)
    with pytest.raises(ValueError, match="idx"):
        scatter_rows(x[:2], torch.tensor([3, 6]), 6)
    with pytest.raises(ValueError, match="n"):
        scatter_rows(x[:2], torch.tensor([0, 1]), -1)
    with pytest.raises(ValueError, match="idx"):
        gather_rows(x, torch.tensor([0, 1], device="meta"))
    with pytest.raises(ValueError, match="x"):
        gather_rows(torch.tensor(1.0), torch.tensor([0]))
