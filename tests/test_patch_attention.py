"""Patchwise softmax attention (SPEC 2.2): every backend against an independent
float64 composition written here (one-hot mosaic matrices, explicit softmax),
gradcheck, opcheck, torch.compile and the argument errors."""
from __future__ import annotations

import random

import pytest
import torch

from helpers import DEVICE, assert_close, available_backends, kernel_backends
from nasops.ops import patch_attention_mixed_op, patch_pool, patch_softmax_attention
from nasops.ops._registry import unique_variants
from nasops.ops import reference
from nasops.ops.patch_attention import _KERNELS, MAX_OPS

BACKENDS = available_backends()
KERNEL_BACKENDS = kernel_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---- the independent float64 composition -------------------------------------------

def mosaic_matrix(H, W, grid):
    """(H*W, P) one-hot: pixel (h, w) -> patch floor(h*gh/H)*gw + floor(w*gw/W)."""
    gh, gw = grid
    m = torch.zeros(H * W, gh * gw, dtype=torch.float64, device=DEVICE)
    for h in range(H):
        for w in range(W):
            m[h * W + w, (h * gh // H) * gw + (w * gw // W)] = 1.0
    return m


def pool64(x, grid):
    B, C, H, W = x.shape
    m = mosaic_matrix(H, W, grid)
    return (x.double().reshape(B, C, H * W) @ (m / m.sum(0))).transpose(1, 2)  # (B, P, C)


def attention64(q, k, prior, tau):
    logits = (q.double()[:, :, None, :] * k.double()).sum(-1) / q.shape[-1] ** 0.5
    if prior is not None:
        logits = logits + prior.double()
    a = logits / tau
    e = torch.exp(a - a.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def fused64(x, outputs, Wq, Wk, grid, prior, tau, zero_key):
    q = pool64(x, grid) @ Wq.double()
    B, P, D = q.shape
    keys = [pool64(o, grid) @ Wk.double() if o is not None
            else (zero_key.double().expand(B, P, D) if zero_key is not None else q.new_zeros(B, P, D))
            for o in outputs]
    w = attention64(q, torch.stack(keys, 2), prior, tau)
    ref = next(o for o in outputs if o is not None)
    H, W = ref.shape[2:]
    w_pix = torch.einsum("bpk,np->bkn", w, mosaic_matrix(H, W, grid)).reshape(B, len(outputs), 1, H, W)
    y = sum(w_pix[:, k] * o.double() for k, o in enumerate(outputs) if o is not None)
    return y, w


def leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_(True)


def grads_of(loss, tensors):
    gs = torch.autograd.grad(loss, [t for t in tensors if t is not None], allow_unused=True)
    it = iter(gs)
    return [next(it) if t is not None else None for t in tensors]


def make_edge(B, Cx, Hx, Wx, C, H, W, K, D, zero_at=(), dtype=torch.float32, param_dtype=None,
              with_prior=True, with_zero_key=True):
    param_dtype = param_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    x = leaf(torch.randn(B, Cx, Hx, Wx, device=DEVICE), dtype)
    outputs = [None if k in zero_at else leaf(torch.randn(B, C, H, W, device=DEVICE), dtype)
               for k in range(K)]
    Wq = leaf(torch.randn(Cx, D, device=DEVICE), param_dtype)
    Wk = leaf(torch.randn(C, D, device=DEVICE), param_dtype)
    prior = leaf(torch.randn(K, device=DEVICE), param_dtype) if with_prior else None
    zero_key = leaf(torch.randn(D, device=DEVICE), param_dtype) if with_zero_key else None
    return x, outputs, Wq, Wk, prior, zero_key


def check_fused(backend, dtype, shape, grid, K, D, zero_at, tau, with_prior=True, with_zero_key=True):
    B, Cx, Hx, Wx, C, H, W = shape
    x, outputs, Wq, Wk, prior, zero_key = make_edge(B, Cx, Hx, Wx, C, H, W, K, D, zero_at, dtype,
                                                    with_prior=with_prior, with_zero_key=with_zero_key)
    y, w = patch_attention_mixed_op(x, outputs, Wq, Wk, grid, prior, tau, zero_key=zero_key,
                                    backend=backend)
    assert y.dtype == dtype and y.shape == (B, C, H, W)
    assert w.shape == (B, grid[0] * grid[1], K)
    y64, w64 = fused64(x, outputs, Wq, Wk, grid, prior, tau, zero_key)
    assert_close(w, w64, dtype, scale=4, what=f"{backend} w")
    assert_close(y, y64, dtype, scale=4, what=f"{backend} y")

    gy = torch.randn_like(y64)
    gw = torch.randn_like(w64)
    inputs = [x, Wq, Wk, prior, zero_key] + outputs
    got = grads_of((y.double() * gy).sum() + (w.double() * gw).sum(), inputs)
    want = grads_of((y64 * gy).sum() + (w64 * gw).sum(), inputs)
    names = ["x", "Wq", "Wk", "prior", "zero_key"] + [f"outputs[{k}]" for k in range(K)]
    for name, t, g, e in zip(names, inputs, got, want):
        if t is None:
            continue
        if e is None:  # unused (a zero_key without Zero ops): no gradient, or zeros
            assert g is None or not g.any(), f"{backend}: nonzero gradient for unused {name}"
            continue
        assert g is not None, f"{backend}: no gradient for {name}"
        assert g.dtype == t.dtype, f"{backend}: grad {name} dtype {g.dtype} != {t.dtype}"
        # Half-precision inputs feed logits that sum C*HW products: widen.
        scale = 8 if dtype == torch.float32 else 16
        assert_close(g, e, dtype, scale=scale * max(1.0, e.abs().max().item()), what=f"{backend} grad {name}")


# ---- patch_pool -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (3, 2), (5, 7)])
def test_patch_pool(backend, dtype, grid):
    x = leaf(torch.randn(2, 3, 5, 7, device=DEVICE), dtype)
    got = patch_pool(x, grid, backend=backend)
    assert got.dtype == dtype and got.shape == (2, grid[0] * grid[1], 3)
    want = pool64(x, grid)
    assert_close(got, want, dtype, what=f"{backend} pool")
    g = torch.randn_like(want)
    (gx,) = torch.autograd.grad((got.double() * g).sum(), x)
    (ex,) = torch.autograd.grad((want * g).sum(), x)
    assert_close(gx, ex, dtype, what=f"{backend} pool grad")


def test_patch_pool_hand_computed():
    # 1 x 1 x 3 x 3 map, grid 2x2: patches rows [0,1],[2] x cols [0,1],[2] (floor(h*2/3)).
    x = torch.arange(9, dtype=torch.float32, device=DEVICE).reshape(1, 1, 3, 3)
    for backend in BACKENDS:
        got = patch_pool(x, (2, 2), backend=backend)
        want = torch.tensor([[[(0 + 1 + 3 + 4) / 4], [(2 + 5) / 2], [(6 + 7) / 2], [8.0]]])
        torch.testing.assert_close(got.cpu(), want, msg=backend)


# Map shapes and grids that walk every path of the compiled map kernels: uniform
# patch widths 1, 2, 4 and 8 (compile-time in the C++ kernels), 3 and uneven
# widths (runtime), 1 to 5 rows per patch, and channel counts that end in a
# partial block of channels (70 > 64, and one-pixel patches of a 33x33 map,
# whose many patches shrink the block).
MAP_CASES = [((16, 16), (8, 8), 70), ((12, 16), (12, 4), 5), ((15, 16), (3, 2), 3), ((9, 7), (3, 7), 4),
             ((8, 12), (2, 4), 3), ((7, 10), (2, 3), 66), ((33, 33), (33, 33), 70)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("size, grid, C", MAP_CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_compiled_map_kernels(dtype, size, grid, C, channels_last):
    if "cpu" not in _KERNELS:
        pytest.skip("the compiled extension is not built")
    pool, pool_backward, _, _, outputs_backward = _KERNELS["cpu"]
    (H, W), B, K = size, 2, 3
    P = grid[0] * grid[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    maps = [torch.randn(B, C, H, W, device=DEVICE).to(dtype).contiguous(memory_format=fmt) for _ in range(K)]
    got = pool(maps, list(grid))
    assert got.shape == (B, P, K, C)
    assert_close(got, torch.stack([pool64(m, grid) for m in maps], 2), dtype, what="patch_pool")

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad = torch.randn(B, C, H, W, device=DEVICE).to(dtype).contiguous(memory_format=fmt)
    w = torch.softmax(torch.randn(B, P, K, device=DEVICE), -1).to(acc)
    grad_pooled = torch.randn(B, P, K, C, device=DEVICE).to(acc)
    mosaic = mosaic_matrix(H, W, grid)
    patch_of_pixel = mosaic.argmax(1)
    per_pixel = (grad_pooled.double() / mosaic.sum(0)[:, None, None])[:, patch_of_pixel]  # (B, HW, K, C)
    w_pixel = w.double()[:, patch_of_pixel]  # (B, HW, K)
    got = outputs_backward(grad, w, grad_pooled, list(grid))
    for k in range(K):
        add = per_pixel[:, :, k].permute(0, 2, 1).reshape(B, C, H, W)
        want = w_pixel[:, :, k].reshape(B, 1, H, W) * grad.double() + add
        assert got[k].dtype == dtype and got[k].is_contiguous(memory_format=fmt)
        assert_close(got[k], want, dtype, what=f"patch_attention_outputs_backward[{k}]")

    grad_means = grad_pooled[:, :, 0].contiguous()  # (B, P, C)
    got = pool_backward(grad_means, list(grid), H, W, dtype, channels_last)
    want = (grad_means.double() / mosaic.sum(0)[:, None])[:, patch_of_pixel]  # (B, HW, C)
    assert got.dtype == dtype and got.is_contiguous(memory_format=fmt)
    assert_close(got, want.permute(0, 2, 1).reshape(B, C, H, W), dtype, what="patch_pool_backward")


# ---- patch_softmax_attention --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_prior", [True, False])
@pytest.mark.parametrize("D", [6, 19])  # shorter than, and 2 lane groups + a tail of, the CPU dot
def test_patch_softmax_attention(backend, dtype, with_prior, D):
    B, P, K = 3, 5, 7
    q = leaf(torch.randn(B, P, D, device=DEVICE), dtype)
    k = leaf(torch.randn(B, P, K, D, device=DEVICE), dtype)
    prior = leaf(torch.randn(K, device=DEVICE), torch.float32) if with_prior else None
    got = patch_softmax_attention(q, k, prior, 0.6, backend=backend)
    want = attention64(q, k, prior, 0.6)
    assert got.dtype == dtype
    assert_close(got, want, dtype, what=f"{backend} w")
    g = torch.randn_like(want)
    inputs = [q, k, prior]
    for t, a, e in zip(inputs, grads_of((got.double() * g).sum(), inputs), grads_of((want * g).sum(), inputs)):
        if t is not None:
            assert_close(a, e, dtype, scale=2, what=f"{backend} attention grad")


def test_softmax_hand_computed():
    # q.k = (0, 2) / sqrt(1); prior (0, ln 2); tau 2 -> logits (0, 1 + ln2/2).
    q = torch.ones(1, 1, 1, device=DEVICE)
    k = torch.tensor([[[[0.0], [2.0]]]], device=DEVICE)
    prior = torch.tensor([0.0, 0.6931471805599453], device=DEVICE)
    e = torch.tensor([1.0, 2.0 ** 0.5 * 2.718281828459045 ** 1.0])
    for backend in BACKENDS:
        w = patch_softmax_attention(q, k, prior, 2.0, backend=backend)
        torch.testing.assert_close(w.cpu().reshape(2), e / e.sum(), msg=backend)


# ---- the fused op ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matches_composition(backend, dtype):
    # Stride-2 edge (x twice the size, other channels), a grid that divides neither map
    # evenly, Zero ops in the middle and at the end.
    check_fused(backend, dtype, (2, 3, 10, 12, 4, 5, 6), (2, 4), K=5, D=6, zero_at=(1, 4), tau=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid", [(1, 1), (5, 6)])
def test_fused_extreme_grids(backend, grid):
    check_fused(backend, torch.float32, (2, 3, 5, 6, 4, 5, 6), grid, K=3, D=4, zero_at=(), tau=1.0,
                with_prior=False, with_zero_key=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_k16_zero_key_none(backend):
    check_fused(backend, torch.float32, (1, 2, 4, 4, 2, 4, 4), (2, 2), K=16, D=3,
                zero_at=(0, 7, 15), tau=2.0, with_zero_key=False)


# On a GPU the CUDA kernels with their real bound; here the CPU kernels, bounded
# for the test, stand in for them.
BOUNDED = "cuda" if DEVICE == "cuda" else "cpu"


@pytest.mark.skipif(BOUNDED not in KERNEL_BACKENDS, reason=f"needs the compiled {BOUNDED} kernels")
def test_op_count_limit_reaches_the_backend_choice(monkeypatch):
    """Both attention ops ask with their K: a backend bounded below it is refused
    by name and passed over by auto."""
    monkeypatch.delenv("NASOPS_BACKEND", raising=False)
    if BOUNDED == "cpu":
        monkeypatch.setitem(MAX_OPS, "cpu", 4)
    limit = MAX_OPS[BOUNDED]
    B, P, K, D = 2, 3, limit + 1, 4
    q, k = torch.randn(B, P, D, device=DEVICE), torch.randn(B, P, K, D, device=DEVICE)
    with pytest.raises(ValueError, match=rf"^k \(K keys per patch\): backend='{BOUNDED}' takes at most "
                                         rf"{limit} .* got {K}"):
        patch_softmax_attention(q, k, backend=BOUNDED)
    assert_close(patch_softmax_attention(q, k), attention64(q, k, None, 1.0), torch.float32, what="auto w")
    x, outputs, Wq, Wk, prior, zero_key = make_edge(B, 3, 4, 4, 3, 4, 4, K, D, zero_at=(1,))
    with pytest.raises(ValueError, match=rf"^outputs \(K ops\): backend='{BOUNDED}' takes at most {limit} "
                                         rf".* got {K}"):
        patch_attention_mixed_op(x, outputs, Wq, Wk, (2, 2), prior, zero_key=zero_key, backend=BOUNDED)
    calls = []
    monkeypatch.setattr(reference, "patch_attention_mixed_op",
                        lambda *a, _ref=reference.patch_attention_mixed_op: calls.append(1) or _ref(*a))
    y, w = patch_attention_mixed_op(x, outputs, Wq, Wk, (2, 2), prior, zero_key=zero_key)
    if BOUNDED == "cpu":  # on CUDA auto takes Triton when it is there
        assert calls == [1]  # auto ran the eager reference
    y64, w64 = fused64(x, outputs, Wq, Wk, (2, 2), prior, 1.0, zero_key)
    assert_close(y, y64, torch.float32, scale=4, what="auto y")
    calls.clear()
    patch_attention_mixed_op(x, outputs[:limit], Wq, Wk, (2, 2), prior[:limit], zero_key=zero_key)
    assert calls == []  # K = the bound: the bounded backend's kernels again


def test_fused_property_loop():
    """Seeded random shapes, grids, K, Zero positions, temperatures and backends."""
    rng = random.Random(1234)
    for _ in range(12):
        B, C, Cx = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 4)
        H, W = rng.randint(1, 7), rng.randint(1, 7)
        stride = rng.choice([1, 2])
        grid = (rng.randint(1, H), rng.randint(1, W))
        K = rng.randint(1, 16)
        zero_at = tuple(k for k in range(K) if rng.random() < 0.3)
        if len(zero_at) == K:
            zero_at = zero_at[1:]
        check_fused(rng.choice(BACKENDS), torch.float32, (B, Cx, H * stride, W * stride, C, H, W), grid,
                    K=K, D=rng.randint(1, 5), zero_at=zero_at, tau=rng.uniform(0.3, 3.0),
                    with_prior=rng.random() < 0.5, with_zero_key=rng.random() < 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_zero_batch(backend):
    x, outputs, Wq, Wk, prior, zero_key = make_edge(0, 2, 4, 4, 3, 4, 4, 3, 2, zero_at=(1,))
    y, w = patch_attention_mixed_op(x, outputs, Wq, Wk, (2, 2), prior, zero_key=zero_key, backend=backend)
    assert y.shape == (0, 3, 4, 4) and w.shape == (0, 4, 3)
    (y.sum() + w.sum()).backward()
    assert x.grad.shape == x.shape and Wq.grad.abs().sum() == 0


def test_fused_strided_inputs():
    x, outputs, Wq, Wk, prior, zero_key = make_edge(2, 3, 6, 5, 4, 6, 5, 3, 4, dtype=torch.float64)
    xt = x.detach().transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    ot = [o.detach().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for o in outputs]
    for backend in KERNEL_BACKENDS:
        y, w = patch_attention_mixed_op(xt, ot, Wq, Wk, (3, 2), prior, backend=backend)
        y64, w64 = fused64(x, outputs, Wq, Wk, (3, 2), prior, 1.0, None)
        assert_close(y, y64, torch.float64, what=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_under_autocast_equals_the_same_call_without(backend):
    """A MIDAS edge runs under --amp: autocast must not cast the op's own matmuls
    down (it did: w came back in bfloat16 from eager and the C++ kernel refused
    the mixed dtypes). Half-precision activations, float32 parameters."""
    device = torch.device(DEVICE)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    x, outputs, Wq, Wk, prior, zero_key = make_edge(2, 3, 6, 6, 4, 3, 3, 4, 5, zero_at=(0,), dtype=half)
    results = []
    for autocast in (True, False):
        with torch.autocast(device.type, dtype=half, enabled=autocast):
            y, w = patch_attention_mixed_op(x, outputs, Wq, Wk, (2, 2), prior, 0.9, zero_key=zero_key,
                                            backend=backend)
            loss = (y.float() ** 2).sum() + (w * torch.arange(4.0, device=device)).sum()
        grads = torch.autograd.grad(loss, [x, Wq, Wk, prior, zero_key, *outputs[1:]])  # as training does
        assert w.dtype == torch.float32 and y.dtype == half
        results.append((y, w, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- gradcheck, opcheck, torch.compile ---------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck(backend):
    x, outputs, Wq, Wk, prior, zero_key = make_edge(1, 2, 2, 3, 2, 2, 3, 3, 2, zero_at=(1,),
                                                    dtype=torch.float64)
    live = [o for o in outputs if o is not None]

    def fused(x, Wq, Wk, prior, zero_key, o0, o2):
        y, w = patch_attention_mixed_op(x, [o0, None, o2], Wq, Wk, (2, 2), prior, 0.7,
                                        zero_key=zero_key, backend=backend)
        return y, w

    # The Triton interpreter costs milliseconds per launch: fast_mode probes a
    # random projection of the Jacobian instead of every column.
    fast = backend == "triton"
    assert torch.autograd.gradcheck(fused, (x, Wq, Wk, prior, zero_key, *live), eps=1e-6, atol=1e-5,
                                    fast_mode=fast)
    assert torch.autograd.gradcheck(lambda t: patch_pool(t, (2, 2), backend=backend), (x,), fast_mode=fast)
    q = leaf(torch.randn(1, 3, 2, device=DEVICE), torch.float64)
    k = leaf(torch.randn(1, 3, 4, 2, device=DEVICE), torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, p: patch_softmax_attention(q, k, p, 0.5, backend=backend), (q, k, prior[:1].repeat(4)),
        fast_mode=fast)


def _op_samples():
    x = torch.randn(2, 3, 5, 4, device=DEVICE)
    o = [torch.randn(2, 3, 5, 4, device=DEVICE) for _ in range(2)]
    q = torch.randn(2, 4, 3, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 4, 2, 3, device=DEVICE, requires_grad=True)
    prior = torch.randn(2, device=DEVICE, requires_grad=True)
    w = torch.softmax(torch.randn(2, 4, 2, device=DEVICE), -1)
    return x, o, q, k, prior, w


@pytest.mark.parametrize("variant", range(len(unique_variants(_KERNELS))))
def test_opcheck(variant):
    pool, pool_bwd, att, att_bwd, out_bwd = unique_variants(_KERNELS)[variant]
    x, o, q, k, prior, w = _op_samples()
    torch.library.opcheck(pool, ([x.requires_grad_(), o[0].requires_grad_()], [2, 2]))
    torch.library.opcheck(pool_bwd, (torch.randn(2, 4, 3, device=DEVICE), [2, 2], 5, 4, torch.float16))
    torch.library.opcheck(att, (q, k, prior, 0.5))
    torch.library.opcheck(att, (q, k, None, 2.0))
    torch.library.opcheck(att_bwd, (torch.randn(2, 4, 2, device=DEVICE), w, q.detach(), k.detach(), 0.5, True))
    torch.library.opcheck(out_bwd, (x.detach(), w, torch.randn(2, 4, 2, 3, device=DEVICE), [2, 2]))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, outputs, Wq, Wk, prior, zero_key = make_edge(2, 3, 8, 8, 3, 4, 4, 3, 4, zero_at=(0,))

    def edge(x, o1, o2, Wq, Wk, prior, zero_key):
        y, w = patch_attention_mixed_op(x, [None, o1, o2], Wq, Wk, (2, 2), prior, 0.5, zero_key=zero_key)
        return y.square().sum() + w.mean() + patch_pool(x, 2).sum()

    args = (x, outputs[1], outputs[2], Wq, Wk, prior, zero_key)
    compiled = torch.compile(edge, fullgraph=True, backend="aot_eager")
    loss = compiled(*args)
    got = torch.autograd.grad(loss, args)
    loss_ref = edge(*args)
    want = torch.autograd.grad(loss_ref, args)
    torch.testing.assert_close(loss, loss_ref)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", kernel_backends())
def test_edge_input_as_an_op_output_compiles_and_sums_its_gradients(backend):
    """A skip op returns the edge's input itself, so x enters the op twice: once
    as x, once as an output. torch.compile refuses an autograd.Function with a
    duplicate tensor input; the op passes each tensor once, and x's gradient is
    the sum of both uses (checked against the float64 reference with a copy of x
    as the skip output, whose gradient is then added by hand)."""
    torch._dynamo.reset()
    x, outputs, Wq, Wk, prior, zero_key = make_edge(2, 3, 8, 8, 3, 8, 8, 3, 4, zero_at=(0,))
    o2 = outputs[2]

    def edge(x, o2, Wq, Wk):
        y, w = patch_attention_mixed_op(x, [None, x, o2], Wq, Wk, (2, 2), prior, 0.5,
                                        zero_key=zero_key, backend=backend)
        return y.square().sum() + w.mean()

    args = (x, o2, Wq, Wk)
    got = torch.autograd.grad(torch.compile(edge, fullgraph=True, backend="aot_eager")(*args), args)
    eager = torch.autograd.grad(edge(*args), args)

    def reference(x, skip, o2, Wq, Wk):
        y, w = patch_attention_mixed_op(x, [None, skip, o2], Wq, Wk, (2, 2), prior.double(), 0.5,
                                        zero_key=zero_key.double(), backend="eager")
        return y.square().sum() + w.mean()

    ref_args = [t.detach().double().requires_grad_() for t in (x, x, o2, Wq, Wk)]
    gx, gskip, *want = torch.autograd.grad(reference(*ref_args), ref_args)
    want = [gx + gskip, *want]
    for g_compiled, g_eager, g_ref in zip(got, eager, want):
        torch.testing.assert_close(g_compiled, g_eager)
        torch.testing.assert_close(g_eager.double(), g_ref, rtol=1e-4, atol=1e-5)


# ---- errors ---------------------------------------------------------------------------

def test_errors():
    x, outputs, Wq, Wk, prior, zero_key = make_edge(2, 3, 8, 8, 4, 4, 4, 3, 5)
    x, Wq, Wk, prior, zero_key = (t.detach() for t in (x, Wq, Wk, prior, zero_key))
    outputs = [o.detach() for o in outputs]

    def call(**kw):
        args = dict(x=x, outputs=outputs, Wq=Wq, Wk=Wk, grid=(2, 2), prior=prior, tau=1.0, zero_key=zero_key)
        args.update(kw)
        return patch_attention_mixed_op(**args)

    with pytest.raises(ValueError, match="grid"):
        call(grid=(5, 2))  # larger than the 4x4 outputs
    with pytest.raises(ValueError, match="grid"):
        patch_pool(x, (9, 1))
    with pytest.raises(TypeError, match="grid"):
        call(grid=(2.0, 2))
    with pytest.raises(ValueError, match="Wk"):
        call(Wk=torch.randn(4, 6))  # D mismatch
    with pytest.raises(ValueError, match="Wq"):
        call(Wq=torch.randn(2, 5))  # Cx mismatch
    with pytest.raises(ValueError, match="Wq: expected D >= 1"):
        call(Wq=torch.randn(3, 0), Wk=torch.randn(4, 0), zero_key=None)  # the logits divide by sqrt(D)
    with pytest.raises(ValueError, match="q: expected a query dimension D >= 1"):
        patch_softmax_attention(torch.randn(1, 2, 0), torch.randn(1, 2, 4, 0))
    with pytest.raises(ValueError, match="Wk"):
        call(Wk=torch.randn(3, 5))  # C mismatch
    with pytest.raises(ValueError, match="prior"):
        call(prior=torch.randn(4))  # K mismatch
    with pytest.raises(ValueError, match="tau"):
        call(tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        patch_softmax_attention(torch.randn(1, 2, 3), torch.randn(1, 2, 4, 3), tau=-1.0)
    with pytest.raises(ValueError, match="k"):
        patch_softmax_attention(torch.randn(1, 2, 3), torch.randn(1, 2, 4, 2))
    with pytest.raises(ValueError, match="prior"):
        patch_softmax_attention(torch.randn(1, 2, 3), torch.randn(1, 2, 4, 3), torch.randn(3))
    with pytest.raises(TypeError, match="k"):
        patch_softmax_attention(torch.randn(1, 2, 3), torch.randn(1, 2, 4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"outputs\[1\]"):
        call(outputs=[outputs[0], outputs[1].half(), outputs[2]])
    with pytest.raises(TypeError, match="Wk"):
        call(Wk=Wk.double())
    with pytest.raises(TypeError, match="zero_key"):
        call(zero_key=zero_key.double())
    with pytest.raises(ValueError, match="zero_key"):
        call(zero_key=torch.randn(4))
    with pytest.raises(TypeError, match="x"):
        call(x=x.long())
    with pytest.raises(ValueError, match="outputs"):
        call(outputs=[None, None, None])
    with pytest.raises(ValueError, match=r"outputs\[2\]"):
        call(outputs=[outputs[0], None, torch.randn(2, 4, 4, 5)])
    with pytest.raises(ValueError, match="x"):
        call(x=torch.randn(3, 3, 8, 8))
    with pytest.raises(ValueError, match="x"):
        call(x=torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="Wq"):
        call(Wq=torch.randn(3, 5, device="meta"))  # another device
