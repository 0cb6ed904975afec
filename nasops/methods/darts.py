"""DARTS (Liu et al., ICLR 2019): the bilevel loop every method builds on (SPEC 4.1).

Per step, as in the reference implementation (``train_search.py``): first one
architecture step on a validation batch, then one weight step on a training
batch.

- Weights: SGD, lr 0.025 cosine-annealed to 0.001 over the epochs (one value per
  epoch), momentum 0.9, weight decay 3e-4, gradient norm clipped to 5.
- Architecture: Adam, lr 3e-4, betas (0.5, 0.999), weight decay 1e-3.
- First order (default): the architecture gradient is ∇α L_val(w, α).
- Second order: the unrolled step. With ξ = the current weight lr, the virtual
  step is the SGD step the weight optimizer would take,
  ``w' = w − ξ (m·v + ∇w L_train(w, α) + λ w)`` (v its momentum buffer, λ its weight
  decay — as the reference ``architect.py`` does; with no momentum yet and λ = 0
  this is the paper's ``w − ξ ∇w L_train``). Then
  ``∇α = ∇α L_val(w', α) − ξ (∇α L_train(w+, α) − ∇α L_train(w−, α)) / (2ε)`` with
  ``w± = w ± ε ∇w' L_val(w', α)`` and ``ε = 0.01 / ‖∇w' L_val(w', α)‖``. The
  virtual step is taken in place on the network's weights and undone afterwards
  (no model copy).

Data parallel (torch.distributed initialised): every gradient the loop uses —
weights, architecture, and the intermediate ones of the unrolled step — is
averaged over the ranks with one all-reduce of a flattened buffer. We do this by
hand rather than through ``DistributedDataParallel`` because the unrolled step
differentiates at perturbed weights, outside DDP's one-backward-per-forward
contract; the result equals DDP's averaging, and every rank, starting from the
same initialisation (same seed, broadcast from rank 0), takes identical steps
and ends with identical architecture parameters.

Mixed precision: ``amp`` is the autocast dtype (bfloat16 on CPU, float16 on
CUDA) or None. float16 uses a gradient scaler for the weight step and for the
first-order architecture step; the second-order architecture step, whose
finite difference would not survive float16 underflow, runs under bfloat16
autocast instead.
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nasops import cuda_graphs, spaces
from nasops.spaces.base import forked_rng, rng_state


@dataclass
class RunContext:
    """What the driver hands a method at the end of a search (:meth:`Darts.finish`):
    the parsed flags, the data set, the loaders of both halves, and where it runs."""

    args: argparse.Namespace
    data: object  # nasops.data.ImageDataset
    train_loader: object  # nasops.data.ShardedLoader over the weights' half
    val_loader: object  # ... over the architecture's half
    device: torch.device
    rank: int
    world_size: int


@dataclass
class StepStats:
    """Sums over one step's batches (loss summed over samples, so epoch means are
    exact). The loss and correct-answer sums are 0-d tensors on the method's device,
    not numbers: reading them back makes the host wait for the step's kernels, so
    the driver sums them on the device and reads once an epoch (``float(s.val_loss)``
    reads one)."""

    train_loss: torch.Tensor
    train_correct: torch.Tensor
    train_count: int
    val_loss: torch.Tensor
    val_correct: torch.Tensor
    val_count: int


class Darts:
    """The DARTS bilevel optimiser around a search network (see the module docstring).

    ``model`` has ``arch_parameters()`` and ``weight_parameters()`` and maps a batch
    of images to logits.

    The driver (:mod:`nasops.search`) talks to a method only through the class
    attributes and methods under "what the driver asks of a method"; a new method
    subclasses ``Darts`` and overrides those it needs.
    """

    name = "darts"
    # Spaces the method searches (None: every space of nasops.spaces.SPACES).
    spaces: tuple[str, ...] | None = None
    # Files (glob patterns, in --out) the method writes besides genotype.json,
    # metrics.jsonl and checkpoint.pt: a new run refuses an --out holding them.
    output_patterns: tuple[str, ...] = ("cell_*.png", "weights_*.png")
    # Flags that an evaluation of a finished run (``evaluation_checkpoint``) takes
    # from its own command line; every other setting comes from the checkpoint.
    evaluation_keys: tuple[str, ...] = ()
    # --cuda-graphs (nasops.cuda_graphs) may replay every method's training calls
    # from CUDA graphs: a step calls the network (DARTS, DASViT, MIDAS: self.model(x);
    # hard exit: graph_network's module), each training forward is followed by its
    # backward before the next forward, what a backward returns is used before the
    # next one overwrites it, or copied (_kept_grad: the unrolled step), and a Python
    # switch that changes what the forward computes is a graph_variant (MIDAS').
    # DASViT's new stage's network is graphed anew by the driver.
    graphed = None  # its GraphedForward once graph_network ran

    def __init__(self, model: torch.nn.Module, *, epochs: int, device: torch.device,
                 amp: torch.dtype | None = None, lr: float = 0.025, lr_min: float = 0.001,
                 momentum: float = 0.9, weight_decay: float = 3e-4, grad_clip: float = 5.0,
                 arch_lr: float = 3e-4, arch_betas: tuple[float, float] = (0.5, 0.999),
                 arch_weight_decay: float = 1e-3, second_order: bool = False):
        self.model = model
        self.device = torch.device(device)
        self.amp = amp
        self.grad_clip = grad_clip
        self.second_order = second_order
        self.weights = [p for p in model.weight_parameters() if p.requires_grad]
        self.alphas = list(model.arch_parameters())
        self.w_opt = torch.optim.SGD(self.weights, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.a_opt = torch.optim.Adam(self.alphas, lr=arch_lr, betas=tuple(arch_betas),
                                      weight_decay=arch_weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, T_max=epochs, eta_min=lr_min)
        scale = amp == torch.float16
        self.w_scaler = torch.amp.GradScaler(self.device.type, enabled=scale)
        self.a_scaler = torch.amp.GradScaler(self.device.type, enabled=scale)
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    # ---- what the driver asks of a method -------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the method's own flags (an argument group named after it). Only the
        flags a method adds here (and the common ones) enter its run's config."""

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Reject flag values the method cannot run with: ValueError naming the flag."""

    @classmethod
    def search_split(cls, args: argparse.Namespace, train_idx: torch.Tensor,
                     val_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples the search trains on: (weights' indices, architecture's
        indices). The driver passes ``nasops.data.split(len(data),
        args.train_portion, args.seed)``; a method may hold samples out of them
        (for its own evaluation in :meth:`finish`). Must depend on ``args`` alone."""
        return train_idx, val_idx

    @classmethod
    def evaluation_checkpoint(cls, args: argparse.Namespace) -> str | None:
        """A finished run's checkpoint to evaluate instead of searching; None (the
        default): search. The driver then takes every setting from the checkpoint's
        config except :attr:`evaluation_keys` and the runtime flags, restores the
        network and the method state, runs no epoch, and calls :meth:`finish` and
        :meth:`write_outputs` (default ``--out``: the checkpoint's folder)."""
        return None

    @classmethod
    def build_model(cls, args: argparse.Namespace, data) -> torch.nn.Module:
        """The search network for ``args`` (flags) and ``data`` (an ImageDataset)."""
        return spaces.from_args(args, data)

    @classmethod
    def from_args(cls, model: torch.nn.Module, args: argparse.Namespace, *, device: torch.device,
                  amp: torch.dtype | None) -> "Darts":
        """The method for the driver's flags."""
        return cls(model, epochs=args.epochs, device=device, amp=amp, **cls.hyperparameters(args))

    @staticmethod
    def hyperparameters(args: argparse.Namespace) -> dict:
        """The keyword arguments of ``__init__`` that the common flags set."""
        return dict(lr=args.lr, lr_min=args.lr_min, momentum=args.momentum,
                    weight_decay=args.weight_decay, grad_clip=args.grad_clip, arch_lr=args.arch_lr,
                    arch_betas=args.arch_betas, arch_weight_decay=args.arch_weight_decay,
                    second_order=args.second_order)

    def begin_epoch(self, epoch: int) -> None:
        """Called before each epoch (0-based), also the first one after a resume.
        A method may change its network here (``self.model``), e.g. a stage of a
        progressive search; it must then depend on ``epoch`` alone."""

    def compile_network(self, **options) -> None:
        """--compile: compile, in place, what a step calls of ``self.model``
        (``options``: torch.compile's). The driver calls it once per network, also
        after a :meth:`begin_epoch` that built a new one. DARTS' step calls
        ``self.model(x)``: Module.compile, which keeps the state dict's keys and
        leaves deep copies uncompiled. A method whose step calls another entry
        point compiles that one."""
        self.model.compile(**options)

    def graph_network(self, module: torch.nn.Module | None = None):
        """--cuda-graphs: replay the training calls of ``self.model`` (or of ``module``,
        which runs it: hard exit's) from CUDA graphs (:mod:`nasops.cuda_graphs`), one
        pair per set of parameters a step trains (alphas, weights, both); the driver
        calls it once per network, as :meth:`compile_network`.
        ``self.graphed`` holds the :class:`~nasops.cuda_graphs.GraphedForward`; that of
        a network replaced since (a new stage's) is released first."""
        if self.graphed is not None:
            self.graphed.release()
        self.graphed = cuda_graphs.graph_network(self.model if module is None else module,
                                                 self.weights + self.alphas, variant=self.graph_variant)
        return self.graphed

    def graph_variant(self):
        """What, besides the trained parameters, selects a call's graphs under
        --cuda-graphs (a hashable): a Python-side switch of the network that changes
        what its forward computes, which a replay would not see. DARTS has none."""
        return None

    def arch_penalty(self) -> torch.Tensor | None:
        """A regulariser added to the architecture loss of every architecture step
        (a function of the alphas alone, e.g. DASViT's fairness loss), or None.
        Its gradient joins the alphas' after the all-reduce of the validation
        gradient (it is the same on every rank)."""
        return None

    def describe(self) -> dict:
        """The architecture as it stands: ``genotype``, ``genotype_str`` and the
        per-edge op weights ``edge_weights``; a method may add entries (they go
        into every epoch's metrics record)."""
        return {"genotype": self.model.genotype(), "genotype_str": self.model.genotype_str(),
                "edge_weights": self.model.edge_weights()}

    def finish(self, run: RunContext) -> dict:
        """Called on every rank after the last epoch; returns entries for the result
        (genotype.json). The default is :meth:`describe` without the edge weights."""
        return {k: v for k, v in self.describe().items() if k != "edge_weights"}

    def write_outputs(self, out: Path, result: dict) -> None:
        """Rank 0 writes the method's files into ``out`` (the driver writes
        genotype.json; ``result`` is its content plus ``metrics``, the epoch
        records): by default a picture and an op-weight heatmap per cell type."""
        from nasops.spaces import plot
        for cell_type, table in self.model.edge_weights().items():
            plot.plot_cell(result["genotype"], cell_type, str(out / f"cell_{cell_type}.png"))
            plot.plot_edge_weights(table, str(out / f"weights_{cell_type}.png"),
                                   f"{result['space']} {cell_type} cell: op weights")

    # ---- the step and its state ---------------------------------------------------------

    @property
    def lr(self) -> float:
        return self.w_opt.param_groups[0]["lr"]

    def step(self, train_batch, val_batch) -> StepStats:
        xv, yv = (t.to(self.device, non_blocking=True) for t in val_batch)
        xt, yt = (t.to(self.device, non_blocking=True) for t in train_batch)
        if self.second_order:
            val_loss, val_correct = self._arch_step_unrolled(xt, yt, xv, yv)
        else:
            val_loss, val_correct = self._arch_step(xv, yv)
        train_loss, train_correct = self._weight_step(xt, yt)
        return StepStats(train_loss.double() * len(yt), train_correct, len(yt),
                         val_loss.double() * len(yv), val_correct, len(yv))

    def end_epoch(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict:
        """Optimizers, schedule, scalers (the driver saves the network's own state)."""
        return {"w_opt": self.w_opt.state_dict(), "a_opt": self.a_opt.state_dict(),
                "scheduler": self.scheduler.state_dict(), "w_scaler": self.w_scaler.state_dict(),
                "a_scaler": self.a_scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. The driver calls it before it loads the network's
        state into ``self.model``, so a method may rebuild its network here first."""
        self.w_opt.load_state_dict(state["w_opt"])
        self.a_opt.load_state_dict(state["a_opt"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.w_scaler.load_state_dict(state["w_scaler"])
        self.a_scaler.load_state_dict(state["a_scaler"])

    # ---- the steps ----------------------------------------------------------------------

    def _autocast(self, dtype: torch.dtype | None = None):
        dtype = dtype or self.amp
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _loss(self, x, y, dtype=None):
        with self._autocast(dtype):
            logits = self.model(x)
        logits = logits.float()
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).sum()

    def _val_loss(self, x, y, dtype=None):
        """:meth:`_loss` of the architecture step's validation batch (first order: at
        w; second order: at the virtual weights w'). A method that watches what the
        network does on validation data (MIDAS's op-weight statistics) overrides it."""
        return self._loss(x, y, dtype)

    def _weight_step(self, x, y):
        # Alphas need no gradient here: switching it off spares the mixed-op
        # kernels the weight-gradient reduction.
        with _frozen(self.alphas):
            self.w_opt.zero_grad(set_to_none=True)
            loss, correct = self._loss(x, y)
            self.w_scaler.scale(loss).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.weights]
        for p, g in zip(self.weights, self._average(grads)):
            p.grad = g
        self.w_scaler.unscale_(self.w_opt)
        torch.nn.utils.clip_grad_norm_(self.weights, self.grad_clip)
        self.w_scaler.step(self.w_opt)
        self.w_scaler.update()
        return loss.detach(), correct

    def _arch_step(self, x, y):
        self.a_opt.zero_grad(set_to_none=True)
        # Only the alphas' gradient is taken: frozen weights let a graphed network
        # (--cuda-graphs) replay a backward without the weights' gradients.
        with _frozen(self.weights):
            loss, correct = self._val_loss(x, y)
        grads = self._average(_grad(self.a_scaler.scale(loss), self.alphas))
        penalty = self.arch_penalty()
        if penalty is not None:
            grads = [g + p for g, p in zip(grads, _grad(self.a_scaler.scale(penalty), self.alphas))]
        for a, g in zip(self.alphas, grads):
            a.grad = g
        self.a_scaler.step(self.a_opt)
        self.a_scaler.update()
        return loss.detach(), correct

    def _arch_step_unrolled(self, xt, yt, xv, yv):
        dtype = torch.bfloat16 if self.amp is not None else None
        xi = self.lr
        group = self.w_opt.param_groups[0]
        backup = [p.detach().clone() for p in self.weights]

        # Virtual step w' = w - xi * (momentum * v + grad + wd * w).
        with _frozen(self.alphas):
            loss_t, _ = self._loss(xt, yt, dtype)
            g_train = self._average(_grad(loss_t, self.weights))
        with torch.no_grad():
            for p, g in zip(self.weights, g_train):
                step = g + group["weight_decay"] * p
                buf = self.w_opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    step = step + group["momentum"] * buf
                p.sub_(xi * step)

        loss_v, correct = self._val_loss(xv, yv, dtype)
        grads = self._average(self._kept_grad(loss_v, self.alphas + self.weights))
        d_alpha, d_w = grads[: len(self.alphas)], grads[len(self.alphas):]

        # Finite-difference Hessian-vector product around the real weights w.
        # A 0-d device tensor, not a number: reading it would make the host wait.
        eps = 0.01 / torch.sqrt(sum((g.float() ** 2).sum() for g in d_w)).clamp_min(1e-12).double()
        alpha_grads = []
        # w- draws w+'s random numbers again (a stochastic op: rdarts-s4's noise):
        # independent draws, divided by 2 eps, would swamp the curvature.
        draws = rng_state(self.device)
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, b, g in zip(self.weights, backup, d_w):
                    p.copy_(b + sign * eps * g)
            with _frozen(self.weights), (forked_rng(draws) if sign < 0 else contextlib.nullcontext()):
                loss_p, _ = self._loss(xt, yt, dtype)
                alpha_grads.append(self._kept_grad(loss_p, self.alphas))
        with torch.no_grad():
            for p, b in zip(self.weights, backup):
                p.copy_(b)
        hvp = self._average([(gp - gn) / (2 * eps) for gp, gn in zip(*alpha_grads)])

        penalty = self.arch_penalty()
        if penalty is not None:
            d_alpha = [g + p for g, p in zip(d_alpha, _grad(penalty, self.alphas))]
        self.a_opt.zero_grad(set_to_none=True)
        for a, g, h in zip(self.alphas, d_alpha, hvp):
            a.grad = g - xi * h
        self.a_opt.step()
        return loss_v.detach(), correct

    def _kept_grad(self, loss, params) -> list[torch.Tensor]:
        """:func:`_grad` for gradients kept across a later forward or backward (the
        unrolled step's): under --cuda-graphs a backward returns views of the
        graphs' buffers, which the next replay may overwrite, so they are copied."""
        grads = _grad(loss, params)
        return [g.clone() for g in grads] if self.graphed is not None else grads

    def _average(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Mean over the ranks, one all-reduce for the whole list."""
        if self.world_size == 1:
            return tensors
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()
        return out


def _grad(loss, params):
    """d loss / d params; zeros for a parameter the loss does not reach."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@contextlib.contextmanager
def _frozen(params):
    """Switch requires_grad off for ``params`` while the block builds its graph."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
