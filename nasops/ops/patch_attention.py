"""Patchwise softmax attention over architecture weights: the MIDAS edge (SPEC 2.2).

Public ops:
- ``patch_pool(x, grid)``: the mean of each patch of SPEC 2.1's mosaic, (B, P, C);
- ``patch_softmax_attention(q, k, prior, tau)``: w = softmax_k((q.k_k/sqrt(D) + prior_k)/tau);
- ``patch_attention_mixed_op(x, outputs, Wq, Wk, grid, prior, tau, zero_key=...)``:
  the fused edge, returning ``(y, w)``.

The fused op, with N = B*C*H*W elements per op output, K live ops and
N_x = x.numel() (everything else is (B, P, ·)-sized and tiny):

forward  (1) ``patch_pool`` of x: read N_x;
         (2) ``patch_pool`` of the K live outputs in one launch, each read in
             place: read K*N (pass 1 over the outputs);
         (3) q = pooled_x @ Wq and u = q @ Wk^T with torch.matmul, then
             ``patch_softmax_attention`` of u against the pooled outputs
             themselves (see _attention_inputs): tiny;
         (4) y = mixed_op(outputs, w, grid): read K*N, write N (pass 2).
backward (5) grad w = per-patch sum of g * o_k (``mixed_op_backward`` for the
             weights only): read N + K*N;
         (6) ``patch_softmax_attention_backward`` (which yields the pooled
             outputs' gradient directly), then the matmul gradients (Wq, Wk,
             pooled x, zero key): tiny;
         (7) ``patch_attention_outputs_backward``: one pass that writes
             grad o_k = w_k * g + grad_pooled_k / |patch| for every k: read N,
             write K*N; ``patch_pool_backward`` writes grad x: N_x.
Total over the outputs: 2 reads forward; 1 read + 1 write backward, plus 2 reads
of g. Steps (5) and (7) cannot share a read of g: (7) needs the gradient of the
keys, which needs grad w from all of (5) through the softmax.

Steps (4) and (5) are the ``mixed_op`` kernels of the same backend
(``torch.ops.nasops.mixed_op``, ``mixed_op_backward`` or their ``_triton`` twins).

Choices where SPEC is silent:
- Feature maps (B, C, H, W) only; x may have another channel count and size
  than the outputs (a stride-2 edge): each map is pooled with the same grid
  over its own size.
- ``zero_key`` (D,) is the learned constant key of Zero (``None``) ops, shared
  by all of them; ``zero_key=None`` means a zero key, i.e. a Zero op's logit is
  its prior alone.
- ``w`` is returned in the accumulation dtype (float32; float64 for float64
  inputs): it is what the weighted sum used, and what decoding averages. ``y``
  has the outputs' dtype. Wq, Wk, prior and zero_key share one dtype (the
  parameters'), which may differ from the activations' (x, outputs).
- Tensors are computed in the accumulation dtype; gradients come back in each
  input's dtype.
- Layouts: x and the outputs may be contiguous or channels_last (x may differ
  from the outputs); the kernels read them in place, y and the outputs'
  gradients take the outputs' layout, x's gradient x's (nasops.ops._layout;
  live outputs in mixed layouts are first brought to the majority's).
- Autocast is switched off inside the op (forward and backward): its small
  matmuls would otherwise run in half precision and hand the kernels mixed
  dtypes. Under autocast the op behaves as without it on the same inputs.

Limits: the CUDA kernels take at most 16 ops (``MAX_OPS``; the other backends
any K: ``auto`` passes over ``cuda`` above that); the fused backward is not itself
differentiable (no double backward).
"""
from __future__ import annotations

import contextlib

from collections.abc import Sequence

import torch

from nasops.backend import resolve
from nasops.ops import reference
from nasops.ops._layout import common_layout, kernel_channels_last, layout_of, memory_format
from nasops.ops._checks import (accumulation_dtype, check_grid, check_op_outputs, check_same_device, check_tau,
                                check_tensor, first_order_only)
from nasops.ops._registry import kernel_for, unique_variants, variants
from nasops.ops.mixed_op import _KERNELS as _MIX_KERNELS  # backend -> (mixed_op, mixed_op_backward)

_KERNELS = variants("patch_attention", "patch_pool", "patch_pool_backward",
                    "patch_softmax_attention", "patch_softmax_attention_backward",
                    "patch_attention_outputs_backward")
# The most ops (keys per patch) a backend's kernels take in one call: the CUDA
# kernels keep a patch's logits in registers (csrc/cuda/patch_attention.cuh, kPatchMaxOps).
MAX_OPS = {"cuda": 16}


# ---- public functions ----------------------------------------------------------------

def patch_pool(x: torch.Tensor, grid, *, backend: str | None = None) -> torch.Tensor:
    """Mean of each patch of the (gh, gw) mosaic of SPEC 2.1: (B, C, H, W) -> (B, P, C).

    A grid that does not divide the map gives unequal patches (pixel row h is in
    patch row floor(h*gh/H)); each patch is averaged over its own pixels.
    Accumulates in float32; returns x's dtype. x may be channels_last (read in
    place; its gradient comes back channels_last).
    """
    check_tensor(x, "x", ndim=4)
    grid = check_grid(grid, x.shape[2], x.shape[3])
    name = resolve(backend, x.device)
    if name == "eager":
        return reference.patch_pool(x, grid)
    pool = kernel_for(_KERNELS, name, "patch_attention")[0]
    return pool([x], list(grid)).squeeze(2).to(x.dtype)


def patch_softmax_attention(q: torch.Tensor, k: torch.Tensor, prior: torch.Tensor | None = None,
                            tau: float = 1.0, *, backend: str | None = None) -> torch.Tensor:
    """w[b, p] = softmax_k((q[b, p] . k[b, p, k] / sqrt(D) + prior_k) / tau).

    Args:
        q: (B, P, D) queries; k: (B, P, K, D) keys of q's dtype and device.
        prior: optional (K,) static logits (e.g. the DARTS alphas), any float dtype.
        tau: softmax temperature, > 0.
    Returns:
        w (B, P, K) in q's dtype, computed in float32 (float64 for float64).
    """
    check_tensor(q, "q", ndim=3)
    check_tensor(k, "k", ndim=4)
    check_same_device("k", k, q, "q")
    if k.dtype != q.dtype:
        raise TypeError(f"k: expected dtype {q.dtype} (that of q), got {k.dtype}")
    B, P, D = q.shape
    if D < 1:  # the logits divide by sqrt(D)
        raise ValueError(f"q: expected a query dimension D >= 1, got shape {tuple(q.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != D:
        raise ValueError(f"k: expected shape (B, P, K, D) = ({B}, {P}, K, {D}) to match q, "
                         f"got {tuple(k.shape)}")
    if k.shape[2] < 1:
        raise ValueError(f"k: expected K >= 1 keys, got shape {tuple(k.shape)}")
    K = k.shape[2]
    if prior is not None:
        _check_prior(prior, K, q)
    tau = check_tau(tau)
    name = resolve(backend, q.device, count=K, limits=MAX_OPS, what="k (K keys per patch)")
    with _without_autocast(q.device):
        if name == "eager":
            return reference.patch_softmax_attention(q, k, prior, tau)
        attention = kernel_for(_KERNELS, name, "patch_attention")[2]
        acc = accumulation_dtype(q.dtype)
        w = attention(q.to(acc), k.to(acc), None if prior is None else prior.to(acc), tau)
    return w.to(q.dtype)


def patch_attention_mixed_op(x: torch.Tensor, outputs: Sequence[torch.Tensor | None],
                             Wq: torch.Tensor, Wk: torch.Tensor, grid,
                             prior: torch.Tensor | None = None, tau: float = 1.0, *,
                             zero_key: torch.Tensor | None = None,
                             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MIDAS mixed edge: per-patch attention weights over the K ops, then their mix.

    q = patch_pool(x) @ Wq (B, P, D); k_k = patch_pool(o_k) @ Wk (B, P, K, D);
    w = softmax_k((q . k_k / sqrt(D) + prior_k) / tau); y = mixed_op(outputs, w, grid).

    Args:
        x: (B, Cx, Hx, Wx), the edge's input; it may differ in channels and size
            from the outputs (stride-2 edges): it is pooled with the same grid
            over its own size.
        outputs: K >= 1 op outputs (B, C, H, W), one shape, dtype (x's) and
            device; ``None`` for a Zero op. At least one must be a tensor.
        Wq: (Cx, D) query projection; Wk: (C, D) key projection.
        grid: (gh, gw) or an int; 1x1 (one attention per sample) up to one
            patch per pixel of both x and the outputs.
        prior: optional (K,) static logits added before the softmax.
        tau: softmax temperature, > 0.
        zero_key: (D,) the learned key of the Zero ops; None = a zero key
            (a Zero op's logit is then its prior alone).
        backend: 'auto' (default), 'cuda', 'triton', 'cpu' or 'eager'.
    Wq, Wk, prior and zero_key share one float dtype and x's device.

    Returns:
        y (B, C, H, W) in the outputs' dtype, and w (B, P, K) in float32
        (float64 for float64 inputs).
    """
    live, shape = _check_edge(x, outputs)
    B, C, H, W = shape
    gh, gw = check_grid(grid, H, W)
    check_grid((gh, gw), x.shape[2], x.shape[3], name="grid (on x)")
    check_tensor(Wq, "Wq", ndim=2)
    check_tensor(Wk, "Wk", ndim=2)
    for name, t in (("Wq", Wq), ("Wk", Wk)):
        check_same_device(name, t, x, "x")
    if Wk.dtype != Wq.dtype:
        raise TypeError(f"Wk: expected dtype {Wq.dtype} (that of Wq), got {Wk.dtype}")
    if Wq.shape[0] != x.shape[1]:
        raise ValueError(f"Wq: expected {x.shape[1]} rows (x's channels Cx), got shape {tuple(Wq.shape)}")
    if Wk.shape[0] != C:
        raise ValueError(f"Wk: expected {C} rows (the outputs' channels C), got shape {tuple(Wk.shape)}")
    D = Wq.shape[1]
    if D < 1:  # the logits divide by sqrt(D)
        raise ValueError(f"Wq: expected D >= 1 columns (the query dimension), got shape {tuple(Wq.shape)}")
    if Wk.shape[1] != D:
        raise ValueError(f"Wk: expected D={D} columns (that of Wq), got shape {tuple(Wk.shape)}")
    K = len(outputs)
    if prior is not None:
        _check_prior(prior, K, Wq)
        if prior.dtype != Wq.dtype:
            raise TypeError(f"prior: expected dtype {Wq.dtype} (that of Wq), got {prior.dtype}")
    if zero_key is not None:
        check_tensor(zero_key, "zero_key", ndim=1)
        check_same_device("zero_key", zero_key, x, "x")
        if zero_key.dtype != Wq.dtype:
            raise TypeError(f"zero_key: expected dtype {Wq.dtype} (that of Wq), got {zero_key.dtype}")
        if zero_key.shape[0] != D:
            raise ValueError(f"zero_key: expected shape ({D},) (D of Wq), got {tuple(zero_key.shape)}")
    tau = check_tau(tau)
    name = resolve(backend, x.device, count=K, limits=MAX_OPS, what="outputs (K ops)")
    with _without_autocast(x.device):
        if name == "eager":
            return reference.patch_attention_mixed_op(x, outputs, Wq, Wk, (gh, gw), prior, tau, zero_key)
        kernels = kernel_for(_KERNELS, name, "patch_attention")
        live_index = [k for k, _ in live]
        mix = kernel_for(_MIX_KERNELS, name, "mixed_op")
        slots, distinct = _distinct_outputs(x, common_layout([o for _, o in live]))
        y, w = _PatchAttentionMixedOp.apply(kernels, mix, (gh, gw), tau, K, live_index, slots,
                                            x, Wq, Wk, prior, zero_key, *distinct)
    return y, w


def _distinct_outputs(x, live_outputs):
    """(slots, distinct): each tensor once. ``distinct`` are the live outputs that
    are not ``x`` and not an earlier output (a skip op returns the edge's input
    itself); ``slots[j]`` says where live output j is: 0 = x, i >= 1 =
    distinct[i - 1]. torch.compile refuses an autograd.Function that gets one
    tensor twice ("duplicate tensor input"), so MIDAS's skip edges need this."""
    slots, distinct, seen = [], [], {id(x): 0}
    for o in live_outputs:
        if id(o) not in seen:
            distinct.append(o)
            seen[id(o)] = len(distinct)
        slots.append(seen[id(o)])
    return tuple(slots), distinct


def _below_autograd():
    """The kernels of the eager path straight to their CPU/CUDA/Triton
    implementation: inside the autograd Function nothing needs their
    registered (Python) autograd, whose layers cost ~0.3-0.5 ms per edge and
    step on the CPU (profile of a MIDAS step, 2026-12-03). Not while dynamo
    traces the Function: it takes the registered ops as they are."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def _without_autocast(device: torch.device):
    """The op's own arithmetic is in the accumulation dtype: autocast must not cast
    its matmuls down (see the module docstring)."""
    return torch.autocast(device.type, enabled=False)


# ---- checks ------------------------------------------------------------------------

def _check_prior(prior, K, ref):
    check_tensor(prior, "prior", ndim=1)
    check_same_device("prior", prior, ref, "the other tensors")
    if prior.shape[0] != K:
        raise ValueError(f"prior: expected shape ({K},) (one logit per op, K={K}), "
                         f"got {tuple(prior.shape)}")


def _check_edge(x, outputs):
    check_tensor(x, "x", ndim=4)
    live, shape = check_op_outputs(outputs, ndim=4)
    ref_k, ref = live[0]
    check_same_device("x", x, ref, f"outputs[{ref_k}]")
    if x.dtype != ref.dtype:
        raise TypeError(f"x: expected dtype {ref.dtype} (that of outputs[{ref_k}]), got {x.dtype}")
    if x.shape[0] != shape[0]:
        raise ValueError(f"x: expected batch size {shape[0]} (that of the outputs), got shape "
                         f"{tuple(x.shape)}")
    return live, shape


# ---- the fused op's attention inputs ----------------------------------------------------

def _as_index(indices: list[int]):
    """Op indices as a slice when they are a run (Zero first, as in DARTS and
    NB201: a view, no index tensor built from the list), else the list."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return slice(indices[0], indices[-1] + 1)
    return indices


def _attention_inputs(q, pooled_o, Wk, zero_key, K, live_index):
    """(query, keys) for ``patch_softmax_attention`` such that its logits are
    q . k_k / sqrt(D) with k_k = pooled_o_k @ Wk (a Zero op's k_k = zero_key, or 0).

    q . (pooled_o_k @ Wk) = pooled_o_k . (q @ Wk^T): projecting the query once per
    patch, u = q @ Wk^T (B, P, C), costs B*P*C*D multiply-adds, K times fewer than
    projecting the K keys, and the pooled outputs serve as keys as they are, so
    the attention backward yields their gradient directly. With Zero ops the keys
    get one more coordinate: 0 for live ops, 1 for Zero ops, against q . zero_key
    in the query. The kernel divides by sqrt(keys' width), so the query is scaled
    by sqrt(width / D) to keep the 1 / sqrt(D) of SPEC 2.2.
    """
    B, P, D = q.shape
    C = Wk.shape[0]
    u = q @ Wk.T  # (B, P, C)
    if len(live_index) == K:
        return u * (C / D) ** 0.5, pooled_o
    keys = pooled_o.new_zeros(B, P, K, C + 1)
    keys[:, :, _as_index(live_index), :C] = pooled_o
    keys[:, :, _as_index([k for k in range(K) if k not in live_index]), C] = 1
    zero_logit = q @ zero_key.to(q.dtype) if zero_key is not None else q.new_zeros(B, P)
    return torch.cat([u, zero_logit.unsqueeze(-1)], dim=-1) * ((C + 1) / D) ** 0.5, keys


# ---- the fused op's autograd -----------------------------------------------------------

class _PatchAttentionMixedOp(torch.autograd.Function):
    """Forward and backward of the fused op as the passes of the module docstring."""

    @staticmethod
    def forward(ctx, kernels, mix, grid, tau, K, live_index, slots, x, Wq, Wk, prior, zero_key,
                *distinct_outputs):
        with _below_autograd():
            return _PatchAttentionMixedOp._forward(ctx, kernels, mix, grid, tau, K, live_index, slots, x, Wq,
                                                   Wk, prior, zero_key, distinct_outputs)

    @staticmethod
    def _forward(ctx, kernels, mix, grid, tau, K, live_index, slots, x, Wq, Wk, prior, zero_key,
                 distinct_outputs):
        live_outputs = [(x, *distinct_outputs)[i] for i in slots]
        pool, _, attention, _, _ = kernels
        acc = accumulation_dtype(x.dtype)
        grid_list = list(grid)
        pooled_x = pool([x], grid_list).squeeze(2)  # (B, P, Cx)
        pooled_o = pool(list(live_outputs), grid_list)  # (B, P, K_live, C)
        q = pooled_x @ Wq.to(acc)  # (B, P, D)
        query, keys = _attention_inputs(q, pooled_o, Wk.to(acc), zero_key, K, live_index)
        w = attention(query, keys, None if prior is None else prior.to(acc), tau)
        live = _as_index(live_index)
        w_live = w if len(live_index) == K else w[:, :, live].contiguous()
        y = mix[0](list(live_outputs), w_live, grid_list)

        ctx.kernels, ctx.mix, ctx.grid, ctx.tau, ctx.K = kernels, mix, grid, tau, K
        ctx.live_index, ctx.live, ctx.slots = live_index, live, slots
        ctx.x_meta = (x.shape[2], x.shape[3], x.dtype, kernel_channels_last([x]))
        ctx.has_prior = prior is not None
        ctx.param_dtype = Wq.dtype
        ctx.save_for_backward(pooled_x, q, query, keys, w, Wq, Wk, zero_key, *live_outputs)
        ctx.set_materialize_grads(False)
        return y, w

    @staticmethod
    @first_order_only("nasops.patch_attention_mixed_op's kernels")
    def backward(ctx, grad_y, grad_w_out):
        # saved_tensors read once: each read unpacks every saved tensor again (and
        # under torch.utils.checkpoint's saved-tensor hooks a second read is an error).
        saved = ctx.saved_tensors
        with _without_autocast(saved[0].device), _below_autograd():
            return _PatchAttentionMixedOp._backward(ctx, saved, grad_y, grad_w_out)

    @staticmethod
    def _backward(ctx, saved, grad_y, grad_w_out):
        _, pool_backward, _, attention_backward, outputs_backward = ctx.kernels
        pooled_x, q, query, keys, w, Wq, Wk, zero_key, *live_outputs = saved
        needs = ctx.needs_input_grad
        need_x, need_Wq, need_Wk, need_prior, need_zero_key = needs[7:12]
        need_distinct = (need_x, *needs[12:])  # indexed by slot: 0 = x
        need_outputs = [need_distinct[i] for i in ctx.slots]
        live_index, live, K, grid = ctx.live_index, ctx.live, ctx.K, ctx.grid
        acc = w.dtype
        B, P, D = q.shape
        C = Wk.shape[0]
        w_live = w if len(live_index) == K else w[:, :, live].contiguous()
        # d loss / d w: through the weighted sum (live ops only), plus any use of
        # the returned w. Out of place: autograd's incoming gradients are not ours.
        grad_w = None if grad_w_out is None else grad_w_out.to(acc)
        if grad_y is not None:
            mix_grad = ctx.mix[1](grad_y, live_outputs, w_live, list(grid), False, True)[1]
            if len(live_index) < K:  # Zero ops' weights get gradient only through the softmax
                full = w.new_zeros(B, P, K)
                full[:, :, live] = mix_grad
                mix_grad = full
            grad_w = mix_grad if grad_w is None else grad_w + mix_grad
        if grad_w is None:
            grad_w = torch.zeros_like(w)
        grad_query, grad_keys, grad_prior = attention_backward(
            grad_w.contiguous(), w, query, keys, ctx.tau, bool(need_prior))
        # Undo _attention_inputs: query = [u, q . zero_key] * scale.
        scale = (keys.shape[-1] / D) ** 0.5
        grad_u = grad_query[..., :C] * scale  # (B, P, C)
        grad_q = grad_u @ Wk.to(acc)  # (B, P, D)
        grad_x = grad_Wq = grad_Wk = grad_zero_key = None
        if len(live_index) < K and zero_key is not None:
            grad_zero_logit = grad_query[..., C] * scale  # (B, P): sum over the Zero ops
            grad_q = grad_q + grad_zero_logit.unsqueeze(-1) * zero_key.to(acc)
            if need_zero_key:
                grad_zero_key = (grad_zero_logit.reshape(-1) @ q.reshape(-1, D)).to(ctx.param_dtype)
        if need_Wq:
            grad_Wq = (pooled_x.reshape(-1, pooled_x.shape[-1]).T @ grad_q.reshape(-1, D)).to(Wq.dtype)
        if need_Wk:
            grad_Wk = (grad_u.reshape(-1, C).T @ q.reshape(-1, D)).to(Wk.dtype)
        if need_x:
            height, width, dtype, x_channels_last = ctx.x_meta
            grad_x = pool_backward(grad_q @ Wq.to(acc).T, list(grid), height, width, dtype, x_channels_last)
        grad_prior = grad_prior.to(ctx.param_dtype) if need_prior and ctx.has_prior else None

        grad_outputs = [None] * len(live_outputs)
        if any(need_outputs):
            grad_pooled = (grad_keys if len(live_index) == K
                           else grad_keys[:, :, live, :C].contiguous())  # (B, P, K_live, C)
            # The kernel writes the gradients in grad_y's layout: the outputs' one.
            outputs_layout = layout_of(live_outputs)
            if grad_y is None:
                grad_y = torch.zeros_like(live_outputs[0], memory_format=outputs_layout)
            grads = outputs_backward(grad_y.contiguous(memory_format=outputs_layout), w_live,
                                     grad_pooled, list(grid))
            grad_outputs = [g if need else None for g, need in zip(grads, need_outputs)]
        # A tensor that came in more than once (x as a skip op's output) gets its uses' sum.
        grad_distinct = [grad_x] + [None] * (len(needs) - 12)
        for i, g in zip(ctx.slots, grad_outputs):
            if g is not None:
                grad_distinct[i] = g if grad_distinct[i] is None else grad_distinct[i] + g
        return (None, None, None, None, None, None, None, grad_distinct[0], grad_Wq, grad_Wk, grad_prior,
                grad_zero_key, *grad_distinct[1:])


# ---- registration: fake (meta) implementations and autograd of the kernel ops ------------

def _fake_pool(maps, grid):
    B, C = maps[0].shape[:2]
    return maps[0].new_empty(B, grid[0] * grid[1], len(maps), C,
                             dtype=accumulation_dtype(maps[0].dtype))


def _fake_pool_backward(grad, grid, height, width, dtype, channels_last=False):
    return torch.empty(grad.shape[0], grad.shape[2], height, width, dtype=dtype, device=grad.device,
                       memory_format=memory_format(channels_last))


def _fake_attention(q, k, prior, tau):
    return q.new_empty(k.shape[:3])


def _fake_attention_backward(grad_w, w, q, k, tau, prior_requires_grad):
    grad_prior = q.new_empty(k.shape[2]) if prior_requires_grad else q.new_empty(0)
    # Every kernel returns grad q and grad k contiguous, whatever the strides of q and k.
    return q.new_empty(q.shape), k.new_empty(k.shape), grad_prior


def _fake_outputs_backward(grad, weights, grad_pooled, grid):
    return [torch.empty_like(grad, memory_format=layout_of([grad])) for _ in range(weights.shape[2])]


def _pool_setup_context(ctx, inputs, output):
    maps, grid = inputs
    ctx.grid = grid
    ctx.shapes = [(m.shape[2], m.shape[3], m.dtype) for m in maps]
    ctx.channels_last = kernel_channels_last(maps)  # the layout the kernel read them in


def _make_pool_backward(pool_backward):
    @first_order_only("nasops.patch_pool's kernels")
    def backward(ctx, grad):
        grads = [pool_backward(grad[:, :, m].contiguous(), ctx.grid, h, w, dtype, ctx.channels_last)
                 if need else None
                 for m, ((h, w, dtype), need) in enumerate(zip(ctx.shapes, ctx.needs_input_grad[0]))]
        return grads, None
    return backward


def _attention_setup_context(ctx, inputs, output):
    q, k, prior, tau = inputs
    ctx.tau = tau
    ctx.has_prior = prior is not None
    ctx.save_for_backward(q, k, output)


def _make_attention_backward(attention_backward):
    @first_order_only("nasops.patch_softmax_attention's kernels")
    def backward(ctx, grad_w):
        q, k, w = ctx.saved_tensors
        need_prior = ctx.has_prior and ctx.needs_input_grad[2]
        grad_q, grad_k, grad_prior = attention_backward(grad_w.contiguous(), w, q, k, ctx.tau, need_prior)
        return (grad_q if ctx.needs_input_grad[0] else None,
                grad_k if ctx.needs_input_grad[1] else None,
                grad_prior if need_prior else None, None)
    return backward


for _pool, _pool_bwd, _att, _att_bwd, _out_bwd in unique_variants(_KERNELS):
    torch.library.register_fake(_pool)(_fake_pool)
    torch.library.register_fake(_pool_bwd)(_fake_pool_backward)
    torch.library.register_fake(_att)(_fake_attention)
    torch.library.register_fake(_att_bwd)(_fake_attention_backward)
    torch.library.register_fake(_out_bwd)(_fake_outputs_backward)
    torch.library.register_autograd(_pool, _make_pool_backward(_pool_bwd),
                                    setup_context=_pool_setup_context)
    torch.library.register_autograd(_att, _make_attention_backward(_att_bwd),
                                    setup_context=_attention_setup_context)

__all__ = ["patch_pool", "patch_softmax_attention", "patch_attention_mixed_op"]
