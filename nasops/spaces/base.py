"""The interface every search network of ``nasops.spaces`` implements."""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

import nasops.ops
from nasops.ops._checks import first_order_only


class RecomputableEdge(nn.Module):
    """A mixed edge whose op outputs may be recomputed in the backward.

    A subclass computes the edge in ``_mix(x, weights, kept=(), shared=None)`` (and leaves
    ``forward`` alone: :func:`set_recompute_edges` counts only edges whose
    forward is this one, so an edge that bypasses it is never reported as
    recomputing). ``_mix`` returns a tensor or a tuple of tensors. With
    ``recompute`` on (off by default; :func:`set_recompute_edges`) the edge
    keeps its input and weights for the backward and computes its ops' outputs
    again there (:class:`_RecomputedEdge`), so none of those outputs and their
    intermediates stays alive between the forward and the backward. A subclass
    may exempt some ops (``_kept_ops``): they run once, as without
    recomputation, and ``_mix`` gets their outputs back as ``kept``. BatchNorm
    layers would update their running statistics twice, once per forward; the
    recomputation restores them, so a run with recomputation equals one without
    (the tests check losses, gradients and running statistics). The gradient of
    a recomputing edge is once differentiable (no double backward through it).
    """

    recompute = False

    def forward(self, x, weights=None, shared=None):
        """The edge on ``x``. ``shared``: a dict that a cell passes to every edge
        reading the same state, through which they share the outputs of the ops
        they share (:func:`share_ops`, :class:`SharedReLU`); ``None``: the edge
        computes all its ops. A recomputing edge shares only its kept ops' outputs:
        a ReLU shared with other edges would be kept for the backward, outside the
        recomputation."""
        kept = None if shared is None else self._kept_outputs(x, shared)
        if self.recompute and torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                # Dynamo cannot trace _RecomputedEdge's nested autograd.grad;
                # AOTAutograd recomputes a checkpointed region from the traced
                # graph and applies buffer mutations once, in the forward.
                from torch.utils.checkpoint import checkpoint  # imports torch._dynamo: seconds
                return checkpoint(self._mix, x, weights, kept or (), use_reentrant=False)
            if kept is None:
                kept = self._kept_outputs(x, None)
            return _RecomputedEdge.apply(self, len(kept), x, weights, *kept, *self.parameters())
        return self._mix(x, weights, kept or (), shared)

    def _kept_ops(self) -> list[nn.Module]:
        """The ops a recomputing edge does not recompute: they run once, in the
        forward, recorded by autograd as without recomputation, and ``_mix`` gets
        their outputs (on the edge's input, in this order) as ``kept``. None by default."""
        return []

    def _kept_outputs(self, x, shared) -> list[torch.Tensor]:
        """The outputs of :meth:`_kept_ops` on ``x`` (``shared``: see :meth:`forward`;
        an edge with ops to share overrides this)."""
        return [op(x) for op in self._kept_ops()]

    def _mix(self, x, weights, kept=(), shared=None):
        raise NotImplementedError


class _RecomputedEdge(torch.autograd.Function):
    """``edge._mix(x, weights, kept)`` run without autograd, and again with it in the backward.

    ``kept``: the outputs of the edge's kept ops (``_kept_ops``), computed
    before with autograd; the recomputation reads them again, and their
    gradients flow back through their own graph.

    Not torch.utils.checkpoint (non-reentrant), which runs the forward with
    autograd recording a graph whose saved tensors it then drops, and hooks
    every saved tensor twice: on the CPU that bookkeeping cost about as much as
    the recomputation itself (benchmarks/RESULTS.md, "Whole search steps (#14),
    third round"). Here the forward records nothing, and the backward
    differentiates the recomputed edge with one autograd.grad, for the inputs
    the running backward wants (:func:`_wanted_input_grads`). The edge's
    parameters are inputs of this Function, so their gradients flow back
    through the graph like any other (they reach ``torch.autograd.grad(loss,
    params)`` callers, not only ``.grad``), and saving them catches an in-place
    update between the forward and the backward. The recomputation runs under
    the forward's autocast and RNG states (a dropout draws the same mask).
    """

    @staticmethod
    def forward(ctx, edge, n_kept, x, weights, *kept_and_params):
        ctx.set_materialize_grads(False)  # an unused output (MIDAS' w) gets no zeros
        ctx.edge, ctx.n_kept = edge, n_kept
        ctx.autocast = _autocast_state(x.device.type)
        ctx.rng = rng_state(x.device)
        ctx.save_for_backward(x, weights, *kept_and_params)
        out = edge._mix(x, weights, kept_and_params[:n_kept])  # grad mode is off in a Function's forward
        ctx.returns_tuple = isinstance(out, tuple)
        return out

    @staticmethod
    @first_order_only("a recomputing edge (--recompute-edges, set_recompute_edges)",
                      "run it without recomputing its edges")
    def backward(ctx, *grads):
        x, weights, *saved = ctx.saved_tensors  # unpacking checks the parameters' versions
        kept = saved[:ctx.n_kept]
        tensor_args = [i for i, t in enumerate((x, weights, *saved), start=2) if t is not None]
        need = _wanted_input_grads(ctx, tensor_args)[2:]  # x, weights, *kept, *params
        if not any(need):
            return (None,) * (len(need) + 2)
        # The running statistics are restored after the grad: BatchNorm's
        # backward checks the versions of the buffers it was given.
        with (torch.enable_grad(), _autocast(ctx.autocast), forked_rng(ctx.rng),
              _restored_buffers(ctx.edge, skip=ctx.edge._kept_ops()),
              _detached_parameters(ctx.edge, need[2 + ctx.n_kept:]) as params):
            x = x.detach().requires_grad_(need[0])
            weights = None if weights is None else weights.detach().requires_grad_(need[1])
            kept = [k.detach().requires_grad_(n) for k, n in zip(kept, need[2:])]
            inputs = [t for t, n in zip((x, weights, *kept, *params), need) if n]
            out = ctx.edge._mix(x, weights, kept)
            outs = out if ctx.returns_tuple else (out,)
            used = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            if not used:
                return (None,) * (len(need) + 2)
            found = iter(torch.autograd.grad([o for o, _ in used], inputs, [g for _, g in used],
                                             allow_unused=True))
        return (None, None, *(next(found) if n else None for n in need))


@contextlib.contextmanager
def _detached_parameters(edge: nn.Module, need: list[bool]):
    """Run the recomputation on detached aliases of ``edge``'s parameters (same
    storage and version counter), yielded in ``edge.parameters()`` order.

    The nested grad then differentiates the aliases: hooks registered on a
    parameter run once, when its gradient reaches it through this Function, not
    a second time inside the recomputation.
    """
    aliases, swapped = {}, []
    for module in edge.modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in aliases:
                aliases[id(p)] = p.detach().requires_grad_(need[len(aliases)])
            module._parameters[name] = aliases[id(p)]
            swapped.append((module, name, p))
    try:
        yield list(aliases.values())
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _wanted_input_grads(ctx, tensor_args: list[int]) -> list[bool]:
    """Which inputs of this backward node the running backward wants gradients of
    (``tensor_args``: the positions of the tensor inputs, those ``ctx.next_functions`` lists).

    ``ctx.needs_input_grad`` says which inputs require grad; a call like DARTS'
    architecture step, ``autograd.grad(loss, alphas)``, wants only the paths to
    the alphas, and autograd prunes the rest of a plain graph. The nested grad
    would not see that pruning and would compute every weight gradient of the
    edge (a third more backward work at batch 64), so ask the engine which of
    this node's next nodes it will run, as torch.autograd.graph's
    register_multi_grad_hook does.
    """
    will_run = getattr(torch._C, "_will_engine_execute_node", None)
    if will_run is None:  # a PyTorch without it: everything that requires grad
        return list(ctx.needs_input_grad)
    wanted = [False] * len(ctx.needs_input_grad)
    for i, (node, _) in zip(tensor_args, ctx.next_functions):
        if ctx.needs_input_grad[i] and node is not None:
            try:
                wanted[i] = will_run(node)
            except RuntimeError:  # a leaf that autograd.grad asked for: the engine does not say
                wanted[i] = True
    return wanted


def _autocast_state(device_type: str):
    """The autocast states a recomputation runs under again (:func:`_autocast`):
    that of the tensors' device type and the CPU's, as torch.utils.checkpoint keeps."""
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                 for d in dict.fromkeys((device_type, "cpu")))


@contextlib.contextmanager
def _autocast(state):
    """Run a block under the autocast states of ``state`` (:func:`_autocast_state`);
    enters nothing when they are the running ones (the common case)."""
    if state == _autocast_state(state[0][0]):
        yield
        return
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in state:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        yield


def rng_state(device: torch.device):
    """The RNG states a recomputation (or DARTS' forward at w-, after the one at
    w+) runs under again (:func:`forked_rng`); None while a CUDA graph is captured
    (--cuda-graphs), which forbids reading them: there the recomputation draws
    anew. What the graphed methods' edges recompute draws nothing: convolutions
    and BatchNorm (DARTS), linear layers, attention and LayerNorm (DASViT's token
    edges)."""
    if _graph_capturing(device):
        return None
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), device, cuda


def _graph_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def forked_rng(state):
    if state is None:  # captured in a CUDA graph (rng_state)
        yield
        return
    cpu, device, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else [], device_type="cuda"):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def set_recompute_edges(module: nn.Module, enabled: bool = True, *, cells: int | None = None) -> int:
    """Switch recomputation on (or off) for every :class:`RecomputableEdge` in
    ``module`` (any network: a search network, or one that wraps it). Returns
    the number of edges switched.

    ``cells``: only the edges of the first ``cells`` cells of the one
    :class:`SearchNetwork` in ``module`` (:meth:`SearchNetwork.edge_cells`).
    Why: a CNN's first cells hold its largest maps, so their edges free the most
    memory per second of recomputation; the small maps of the last cells cost
    about as much to recompute per call and free little (benchmarks/RESULTS.md,
    "--recompute-edges on the first cells" and the "tenth round", where
    :func:`~nasops.spaces.operations.set_recompute_depthwise` takes the other
    cells). ``None``: every edge.
    """
    if cells is not None:
        nets = [m for m in module.modules() if isinstance(m, SearchNetwork)]
        if len(nets) != 1:
            raise ValueError(f"cells: the first cells of a network need one SearchNetwork in module; "
                             f"{type(module).__name__} holds {len(nets)}")
        edge_cells = nets[0].edge_cells()
        if isinstance(cells, bool) or not isinstance(cells, int) or not 1 <= cells <= len(edge_cells):
            raise ValueError(f"cells: expected a number of cells from 1 to {len(edge_cells)} (the "
                             f"{type(nets[0]).__name__}'s cells with mixed edges), got {cells!r}")
        return sum(set_recompute_edges(cell, enabled) for cell in edge_cells[:cells])
    edges = [m for m in module.modules()
             if isinstance(m, RecomputableEdge) and type(m).forward is RecomputableEdge.forward]
    for m in edges:
        m.recompute = enabled
    return len(edges)


# Ops whose output is a function of the edge's input alone (no parameters, no random
# draws; an affine-free BatchNorm after a pool normalises with the batch's statistics):
# the edges that read one state can share them (share_ops). The identity costs nothing
# to repeat, and the noise op must draw for every edge.
SHARED_OPS = ("max_pool_3x3", "avg_pool_3x3")


def share_ops(edges, sources) -> None:
    """Let the edges that read the same state share their :data:`SHARED_OPS`:
    ``sources[e]`` is the state edge ``e`` reads. Every edge after the first of a
    state gets the first one's module for each shared op (the state dict keeps
    every edge's keys, on one module), and with the ``shared`` dict of
    :meth:`RecomputableEdge.forward` the op runs once per state and forward, not
    once per edge. The modules replaced must compute the same function (same
    op, channels and stride: a cell's edges from one state have the same
    stride); a replaced module must hold no parameters.

    Why: a DARTS cell has 14 edges but reads 5 states, so its pools (and their
    BatchNorm) ran 2.8 times as often as needed, in time and in what the
    backward keeps. Same values: the pools and the affine-free BatchNorm
    after them see the same input, batch statistics included.
    """
    first = {}
    for edge, src in zip(edges, sources):
        for i, (name, zero) in enumerate(zip(edge.op_names, edge._is_zero)):
            if name not in SHARED_OPS or zero:
                continue
            if (src, name) not in first:
                first[(src, name)] = edge.ops[i]
                continue
            if next(edge.ops[i].parameters(), None) is not None:
                raise ValueError(f"edges: op {name!r} has parameters; it cannot be shared")
            if repr(edge.ops[i]) != repr(first[(src, name)]):
                raise ValueError(f"edges: op {name!r} of the edges from state {src} differs between "
                                 f"edges ({edge.ops[i]!r} vs {first[(src, name)]!r}); it cannot be shared")
            edge.ops[i] = first[(src, name)]


class MixedEdge(RecomputableEdge):
    """One DARTS mixed edge: ``sum_k w_k * op_k(x)`` through :func:`nasops.ops.mixed_op`.

    ``ops`` holds one module per candidate, ``None`` for the Zero op: its output
    is passed to ``mixed_op`` as ``None`` and never computed. ``op_names`` keeps
    the candidates' names in the order of the weights.

    Recomputation (:class:`RecomputableEdge`) recomputes the candidates with
    parameters (the convolutions); those without (pools, identity, noise) keep
    their outputs and what their backward needs, as without recomputation. On a
    DARTS edge the pools hold about a quarter of what the edge keeps for the
    backward and take a sixth of its forward time. Keeping them, the DARTS
    search step with recomputation took a median 1.39x the plain step's time at
    batch 16 (1.44-1.62x recomputing everything) for 52 % less peak memory
    instead of 70 %, and 1.17-1.34x at batch 64 for 63 % less instead of 83 %
    (1.20x against 1.25x side by side; CPU, 2026-12-04; benchmarks/RESULTS.md,
    "fourth round").
    """

    def __init__(self, op_names, ops):
        super().__init__()
        self.op_names = list(op_names)
        self.ops = nn.ModuleList([op if op is not None else nn.Identity() for op in ops])
        self._is_zero = [op is None for op in ops]
        # Candidates that start with a ReLU of the edge's input and take it shared (SharedReLU).
        self._takes_relu = [getattr(op, "takes_shared_relu", False) for op in ops]
        # Recomputing, the parameter-free candidates keep their outputs (see the class docstring).
        self._kept = [op is not None and next(op.parameters(), None) is None for op in ops]
        # Per kept candidate: its name if the edges of one state share it (share_ops), else None.
        self._kept_share_keys = [name if name in SHARED_OPS else None
                                 for name, keep in zip(self.op_names, self._kept) if keep]

    def _kept_ops(self):
        return [op for op, keep in zip(self.ops, self._kept) if keep]

    def _kept_outputs(self, x, shared):
        """The kept ops' outputs on ``x``; a shared op (:func:`share_ops`) runs only
        if no edge on this state ran it before: ``shared`` maps its name to the
        module that ran and its output (another module of that name, not shared
        with this edge, runs again)."""
        outs = []
        for key, op in zip(self._kept_share_keys, self._kept_ops()):
            hit = shared.get(key) if key and shared is not None else None
            if hit is not None and hit[0] is op:
                outs.append(hit[1])
                continue
            out = op(x)
            if key and shared is not None:
                shared[key] = (op, out)
            outs.append(out)
        return outs

    def op_outputs(self, x, kept=(), shared=None) -> list[torch.Tensor | None]:
        """The candidates' outputs on ``x`` in one dtype (``None`` for the Zero op);
        ``kept``: those of the kept candidates (:meth:`_kept_ops`), computed before;
        ``shared``: see :meth:`RecomputableEdge.forward`."""
        reuse, kept = bool(kept), iter(kept)  # without recomputation nothing was computed before
        relu = self._shared_relu(x, shared)
        outs = [None if zero else next(kept) if keep and reuse else op(x, relu) if takes_relu else op(x)
                for op, zero, keep, takes_relu in zip(self.ops, self._is_zero, self._kept, self._takes_relu)]
        return one_dtype(outs, x.device.type)

    def _shared_relu(self, x, shared) -> SharedReLU | None:
        """The :class:`SharedReLU` of ``x`` for this edge's candidates: that of
        every edge reading ``x`` (kept in ``shared``) while autograd records,
        which keeps the ReLU's map for the backward anyway; otherwise this
        edge's own, so that no map outlives the edge without a reason."""
        if not any(self._takes_relu):
            return None
        if shared is None or not torch.is_grad_enabled():
            return SharedReLU(x)
        relu = shared.get(SharedReLU)
        if relu is None or relu.x is not x:
            relu = shared[SharedReLU] = SharedReLU(x)
        return relu

    def _mix(self, x, weights, kept=(), shared=None):
        return nasops.ops.mixed_op(self.op_outputs(x, kept, shared), weights)


class SharedReLU:
    """relu(x) for the candidates of the edges reading one cell state, computed
    when first asked for and handed out again after that (``__call__``).

    DARTS' SepConv, DilConv and FactorizedReduce and NB201's ReLUConvBN start with a
    ReLU of the edge's input, each its own, and every edge from one state reads
    the same input: a DARTS cell computed 56 ReLUs of its 5 states (64 in a
    reduction cell), an NB201 cell 12 of 3. Where PyTorch's convolution runs
    (CUDA under 'auto', channels-first maps on the CPU, ``--backend eager``),
    each of those ReLUs is a kernel in the forward and one in the backward, and
    its map is kept for the backward by the convolution after it. The
    candidates take this object (``op(x, relu)``, when their class sets
    ``takes_shared_relu``) and call it only where they need the map: nasops'
    depthwise kernels compute the ReLU as they read x (where
    :class:`~nasops.ops.depthwise_conv2d.PlannedDepthwiseConv2d` finds kernels),
    so on their path the ReLU never runs. The gradients of its uses meet before one ReLU backward
    instead of after several: the same values up to the order of a sum.
    """

    __slots__ = ("x", "_y")

    def __init__(self, x: torch.Tensor):
        self.x = x
        self._y = None

    def __call__(self) -> torch.Tensor:
        if self._y is None:
            self._y = torch.relu(self.x)
        return self._y


def one_dtype(outputs, device_type: str):
    """The op outputs (``None`` = Zero) in one dtype, as ``mixed_op`` needs them.

    Under autocast a conv or a linear layer returns half precision while an
    identity or a pool keeps its input's dtype: they meet in the autocast dtype.
    Otherwise mixed dtypes meet in their promoted type.
    """
    dtypes = {o.dtype for o in outputs if o is not None}
    if len(dtypes) <= 1:
        return outputs
    if torch.is_autocast_enabled(device_type):
        common = torch.get_autocast_dtype(device_type)
    else:
        common = functools.reduce(torch.promote_types, dtypes)
    return [o if o is None else o.to(common) for o in outputs]


_BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _restored_buffers(module: nn.Module, skip=()):
    """Run a block (a recomputation) that would update ``module``'s buffers — the
    BatchNorm running statistics and batch counters — and leave them as they
    were, also when the block raises. The modules in ``skip`` (kept ops, which
    the block does not run) are left alone: writing their buffers would fail
    the version check of their backward, still to come.

    BatchNorm layers run the block with momentum 0 and without a batch
    counter, so their update writes back what was there (0 * batch + 1 *
    running: exact for finite statistics; a batch with an infinite value
    leaves NaN instead of inf). Copying their statistics and putting them back
    cost ~2 % of a recomputing DARTS step on the CPU (2026-12-04). Other
    buffers are copied and put back.

    Not by switching BatchNorm's ``track_running_stats`` off for the block
    (tried 2026-12-04): without running statistics PyTorch's CPU batch norm
    takes another path for bfloat16 maps, ~1 ulp away from the forward's, so
    the recomputation would no longer equal the forward under autocast.

    Nor by normalising the recomputation with the forward's batch mean and
    invstd (an autograd Function calling ``native_batch_norm_backward``; tried
    2026-12-04): bitwise equal in float32 once the shift ``bias - mean *
    alpha`` is rounded once, as the CPU kernel's fused multiply-add does, and
    BatchNorm's forward took 33 instead of 113 us at batch 16, but the Python
    Function and its bookkeeping took most of that back: a recomputing DARTS
    edge's forward + backward was 1 % / 3 % faster at batch 16 / 64, and the
    search step not measurably (benchmarks/RESULTS.md, "fifth round").
    """
    skipped = {id(m) for op in skip for m in op.modules()}
    frozen, saved = [], []
    try:  # a failure half-way still puts back what was changed
        for m in module.modules():
            if not m._buffers or id(m) in skipped:
                continue
            others = m._buffers.items()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                # Straight to the attribute and the buffer dict: nn.Module.__setattr__
                # took more time than everything else here.
                frozen.append((m, m.momentum, m._buffers.get("num_batches_tracked")))
                object.__setattr__(m, "momentum", 0.0)
                m._buffers["num_batches_tracked"] = None
                others = [(n, b) for n, b in others if n not in _BATCHNORM_STATISTICS]
            saved.extend((b, b.clone()) for _, b in others if b is not None)
        yield
    finally:
        for m, momentum, count in frozen:
            object.__setattr__(m, "momentum", momentum)
            m._buffers["num_batches_tracked"] = count
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


class SearchNetwork(nn.Module):
    """A one-shot search network: weights + architecture parameters (alphas).

    Subclasses register one alpha table per cell type (``alphas_<cell type>``,
    shape ``(edges, ops per edge)``) and implement ``forward`` and ``genotype``.

    A network built with ``alphas=False`` (see ``nasops.spaces.build``) has no
    alpha tables: its cells compute their op weights themselves (MIDAS, whose
    edges hold their own architecture parameters and define ``arch_parameters()``).
    Such a network hands its cells ``None`` as weights and cannot derive a
    genotype on its own (the method decodes it).

    Attributes:
        space: the space's name (one of ``nasops.spaces.SPACES``).
        cell_types: the cell types with their own alphas, e.g. ("normal", "reduce").
        has_alphas: whether the alpha tables exist.
    """

    space: str = ""
    cell_types: tuple[str, ...] = ()
    has_alphas: bool = True

    # ---- parameters -----------------------------------------------------------------
    def alphas(self, cell_type: str) -> nn.Parameter:
        """The architecture parameter table of ``cell_type``, shape (edges, ops per edge)."""
        self._check_cell_type(cell_type)
        if not self.has_alphas:
            raise ValueError(f"cell_type {cell_type!r}: this {self.space} network was built without "
                             f"alphas (its cells compute their own op weights)")
        return getattr(self, f"alphas_{cell_type}")

    def arch_parameters(self) -> list[nn.Parameter]:
        """The alphas, one table per cell type (in ``cell_types`` order), then the
        parameters of every submodule that declares its own (``arch_parameters()``,
        e.g. MIDAS's attention edges), in module order."""
        params = [self.alphas(t) for t in self.cell_types] if self.has_alphas else []
        seen = {id(p) for p in params}
        for module in self.modules():
            if module is not self and hasattr(module, "arch_parameters"):
                for p in module.arch_parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        return params

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an alpha (the supernet's weights)."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def mixing_weights(self, weights=None) -> dict[str, torch.Tensor]:
        """The weights the mixed edges use: softmax of each alpha table over its ops.

        ``weights`` may override them per cell type with a tensor of shape
        (edges, K) or, per sample, (B, edges, K) (e.g. input-adaptive methods).
        A network without alphas gives every cell type ``None``.
        """
        if not self.has_alphas:
            if weights:
                raise ValueError("weights: this network's cells compute their own op weights "
                                 "(built without alphas); no override is possible")
            return {t: None for t in self.cell_types}
        mixing = {t: F.softmax(self.alphas(t), dim=-1) for t in self.cell_types}
        if weights:
            for t, w in weights.items():
                self._check_cell_type(t)
                if w.shape[-2:] != mixing[t].shape:
                    raise ValueError(f"weights[{t!r}]: expected shape (..., {tuple(mixing[t].shape)}) "
                                     f"(edges, ops), got {tuple(w.shape)}")
                mixing[t] = w
        return mixing

    def set_recompute_edges(self, enabled: bool = True, *, cells: int | None = None) -> int:
        """:func:`set_recompute_edges` on this network."""
        return set_recompute_edges(self, enabled, cells=cells)

    def edge_cells(self) -> list[nn.Module]:
        """The modules that hold this network's mixed edges, one per cell, in the
        order the forward runs them (a CNN's largest maps first): ``self.cells``
        without the modules that hold no :class:`RecomputableEdge` (NB201's ResNet
        blocks). A network whose cells live elsewhere overrides this."""
        return [cell for cell in self.cells if any(isinstance(m, RecomputableEdge) for m in cell.modules())]

    # ---- description ----------------------------------------------------------------
    def op_names(self, cell_type: str) -> list[list[str]]:
        """The candidate ops of every edge of ``cell_type``, in alpha column order."""
        self._check_cell_type(cell_type)
        return [list(names) for names in self._edge_ops[cell_type]]

    def edge_names(self, cell_type: str) -> list[str]:
        """``"<src>-><dst>"`` of every edge, in alpha row order (state indices; see the space)."""
        self._check_cell_type(cell_type)
        return [f"{src}->{dst}" for src, dst in self._edge_ends]

    def edge_weights(self) -> dict[str, list[dict]]:
        """Per cell type, per edge: ``{"edge": "<src>-><dst>", "ops": {op: softmax weight}}``."""
        table = {}
        with torch.no_grad():
            for t in self.cell_types:
                probs = F.softmax(self.alphas(t).detach().float(), dim=-1).cpu().tolist()
                table[t] = [{"edge": edge, "ops": dict(zip(names, row))}
                            for edge, names, row in zip(self.edge_names(t), self.op_names(t), probs)]
        return table

    def genotype(self) -> dict:
        raise NotImplementedError

    def genotype_str(self) -> str:
        raise NotImplementedError

    def _check_cell_type(self, cell_type):
        if cell_type not in self.cell_types:
            raise ValueError(f"cell_type: expected one of {self.cell_types} for space "
                             f"{self.space!r}, got {cell_type!r}")
