"""--cuda-graphs: a search network's forward and backward replayed as CUDA graphs.

Why: on a GPU the DARTS search step is bound by the host. The first GPU session
(H200, batch 64; benchmarks/RESULTS.md, "First GPU session") measured 0.89 s a
step with nasops' kernels against 1.00 s for eager PyTorch, while the step's
arithmetic and traffic take a few tens of milliseconds: the time goes to
~120,000 ATen calls a step, a few microseconds of Python and dispatch each, and
kernels cannot remove that. A CUDA graph records the kernels of one forward and
one backward once and replays them with one launch each. ``--compile``
(mode="reduce-overhead") graphs too, but compiling the supernet took 24-38
minutes on this project's CPU; capturing takes a few eager steps.

How: :func:`torch.cuda.make_graphed_callables` on the whole network at its
first training calls (:class:`GraphedForward`). What a user should know:

- Graphed are the calls that train: grad mode on, the network in training
  mode, a CUDA input of the shape, strides and dtype of the first such call
  (the driver's loaders drop incomplete batches, so a search sees one shape)
  that needs no gradient itself, no autocast. Every other call (evaluation,
  another shape) runs the network's own forward, as without graphs.
- One pair of graphs per set of trainable parameters that need grad at the
  call and ``variant`` that a method names (MIDAS: whether its edges record
  their op weights; the pair is the call's "signature"), captured at the first
  call with that signature: the backward computes exactly those gradients, as
  eager autograd would. DARTS'
  architecture step freezes the weights, its weight step the alphas: two
  pairs, so the architecture step's backward skips the weights' gradients
  (device work; on the H200 the graphed step was bound by the device,
  benchmarks/RESULTS.md "Second GPU session"). The second-order step adds a
  third (both). At most ``MAX_GRAPHS`` signatures are captured; further ones
  run eagerly.
- The graphs share one memory pool (one forward's activations, not one per
  signature), which is safe because each graphed forward is differentiated
  before the next graphed call (a forward replay of one pair may overwrite what
  another pair's forward saved for its backward): a caller that runs two
  graphed forwards and then both backwards must not use --cuda-graphs.
  Memory: the pool, plus, while a pair is captured, its warm-ups' eager
  activations (the cached blocks they leave are given back to the device after
  each capture); ``torch.cuda.max_memory_allocated`` counts neither the pool's
  free blocks nor the cache, ``max_memory_reserved`` does.
- The outputs of a replay and the gradients its backward returns (also a
  ``.grad`` that autograd set from them) are views of the graphs' static
  buffers, valid until the next replay of any pair, forward or backward (a
  later pair's buffers may sit in memory an earlier pair's replay writes, and
  a pair's forward may reuse its own gradients' memory): a caller keeping them
  longer must clone them (DARTS' unrolled step does: ``Darts._kept_grad``).
- A replay runs no Python: what a forward does besides computing tensors
  (setting an attribute, branching on a flag) happened at the capture only. A
  forward that hands values out besides its output writes them in place into
  tensors it keeps from the capture on (MIDAS' recorded op weights,
  ``MidasEdge.recording``), and a Python switch that changes what the forward
  computes is part of the signature (``variant``).
- The capture runs the network a few times (warm-up, on a side stream); the
  buffers (BatchNorm running statistics) are put back afterwards, so a graphed
  search equals an eager one up to the order of floating-point sums. Random
  draws inside the network (RobustDARTS S4's noise op) come from the graph's
  own Philox offsets, not the eager sequence.
- With ``--recompute-edges`` the graphs hold recomputing edges: the forward
  graph keeps what a recomputing forward keeps, the backward graph recomputes.
  A capture forbids reading the RNG state, so there the recomputation does not
  replay the forward's random draws (``nasops.spaces.base.rng_state``); what
  the graphed methods' edges recompute draws nothing.
- Parameters must stay where they are (optimizer steps and ``load_state_dict``
  write in place; ``Module.to`` to another layout after the capture would not).
"""
from __future__ import annotations

import gc

import torch
import torch.nn as nn


MAX_GRAPHS = 4  # signatures captured per network (DARTS' steps use 2, its second order 3)


class GraphedForward:
    """The forward of ``model`` with its training calls replayed from CUDA graphs
    (see the module docstring); installed as ``model.forward`` by :func:`graph_network`.

    ``trainable``: the parameters whose gradients a graphed backward may compute;
    a call's signature is which of them need grad then (at least one must) and
    what ``variant()`` returns (a hashable: how a method has set the network's
    Python-side switches, which a replay cannot see; default None), and each
    signature gets its own graphs. ``pool``: the memory-pool handle they
    share (default: a new one at the first capture). ``capture`` (with
    ``make_graphed_callables``' signature) and ``device_type``: the tests'
    stand-ins, which run on the CPU. Counters ``captures``, ``replayed`` and
    ``eager`` say what ran.
    """

    def __init__(self, model: nn.Module, trainable, capture=None, device_type: str = "cuda",
                 warmup: int = 3, pool=None, variant=None):
        self.model = model
        self.trainable = list(trainable)
        self.variant = variant or (lambda: None)
        self.capture = capture or torch.cuda.make_graphed_callables
        self.device_type = device_type
        self.warmup = warmup
        self.pool = pool
        self.key = None  # (shape, strides, dtype, device) of the captured input
        self.graphs = {}  # signature (requires_grad of each trainable, variant) -> graphed forward
        self.captures = self.replayed = self.eager = 0

    def __call__(self, x, *args, **kwargs):
        if args or kwargs or not self._trains(x):
            return self._eager(x, *args, **kwargs)
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)
        if self.key is None:
            self.key = key
        trained = tuple(p.requires_grad for p in self.trainable)
        signature = (trained, self.variant())
        graphed = self.graphs.get(signature)
        if key != self.key or not any(trained) or (graphed is None and len(self.graphs) >= MAX_GRAPHS):
            return self._eager(x)
        if graphed is None:
            graphed = self.graphs[signature] = self._capture(x)
        self.replayed += 1
        return graphed(x)

    def _trains(self, x) -> bool:
        return (isinstance(x, torch.Tensor) and torch.is_grad_enabled() and self.model.training
                and x.device.type == self.device_type and not x.requires_grad
                and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling())

    def __deepcopy__(self, memo):
        # The graphs replay this network's memory: a copy (copy.deepcopy of the
        # network) would replay them, not compute its own.
        raise TypeError(f"a network graphed for CUDA (--cuda-graphs) cannot be deep-copied; copy "
                        f"{type(self.model).__name__} before graph_network, or run it without graphs")

    def release(self) -> None:
        """Give the network its own forward back and drop the graphs, so that their
        memory returns to the allocator now (a new stage's network is graphed next),
        not whenever Python's cycle collector runs: the graphed callables and the
        network refer to each other."""
        if self.model.__dict__.get("forward") is self:
            del self.model.__dict__["forward"]
        self.graphs, self.key, self.pool = {}, None, None
        gc.collect()

    def _eager(self, *args, **kwargs):
        self.eager += 1
        return type(self.model).forward(self.model, *args, **kwargs)

    def _capture(self, x):
        """Capture the forward and backward of a call with ``x`` and the current
        requires_grad flags; returns the graphed forward."""
        model = self.model
        buffers = [(b, b.clone()) for b in model.buffers()]
        installed = model.__dict__.pop("forward")  # this object: the capture calls the module's own
        if self.pool is None and self.device_type == "cuda":
            self.pool = torch.cuda.graph_pool_handle()  # shared by every signature's graphs
        try:
            # allow_unused_input: a parameter the forward does not reach gets no gradient, as in eager.
            self.capture(model, (x.detach().clone(),), num_warmup_iters=self.warmup, allow_unused_input=True,
                         pool=self.pool)
            # make_graphed_callables replaced the module's forward with the graphed one
            # (in the training mode it saw); take it and put this object back.
            graphed = model.__dict__.pop("forward")
        except Exception as exc:  # an op that cannot be captured (a host sync, a CPU tensor...)
            model.__dict__.pop("forward", None)
            self._put_back(installed, buffers, failed=True)
            raise RuntimeError(f"CUDA graphs (--cuda-graphs): capturing the forward and backward of "
                               f"{type(model).__name__} failed; run it without graphs. "
                               f"{type(exc).__name__}: {exc}") from exc
        self._put_back(installed, buffers, failed=False)
        if self.device_type == "cuda":
            torch.cuda.empty_cache()  # the warm-ups' cached blocks: eager calls are rare from here on
        self.captures += 1
        return graphed

    def _put_back(self, installed, buffers, failed: bool) -> None:
        """Leave the network as the capture found it: this object as its forward,
        the buffers (the warm-up's running statistics and batch counts undone).
        After a failed capture the device may refuse the copies (a capture error
        can be sticky): the capture's error is the one to report then."""
        self.model.forward = installed
        try:
            with torch.no_grad():
                for b, value in buffers:
                    b.copy_(value)
        except RuntimeError:
            if not failed:
                raise


def graph_network(model: nn.Module, trainable, **options) -> GraphedForward:
    """Install :class:`GraphedForward` (``options``: its own) as ``model.forward``,
    what ``model(x)`` calls; the state dict and the parameters stay the module's
    own. Returns it."""
    if "forward" in model.__dict__:
        raise ValueError(f"model: its forward is already replaced ({model.__dict__['forward']!r})")
    graphed = GraphedForward(model, trainable, **options)
    model.forward = graphed
    return graphed
