"""MIDAS (Subbotko, 2026; ``../shared/seeds/000``): input-specific, patchwise
architecture weights and a parameter-free topology (SPEC 2.2 and 4.2).

The network
-----------
The space's own network (``nasops.spaces.build``: stem, cells, candidate ops,
head) with MIDAS cells in place of the space's cells (the ``cell=`` seam) and
no alpha tables unless ``--midas-prior``:

- Every mixed edge is a :class:`MidasEdge`: one
  ``nasops.ops.patch_attention_mixed_op`` call computes per-sample, per-patch
  op weights ``w (B, P, K) = softmax_k((q . k_k / sqrt(D) + prior_k) / tau)``
  with ``q = patch_pool(x) @ Wq`` from the edge's input and
  ``k_k = patch_pool(o_k) @ Wk`` from each op's output (a learned ``zero_key``
  for the Zero op), and mixes the ops with them patch by patch.
- darts/rdarts: every intermediate node keeps two incoming edges (SPEC 2.2's
  topology rule). Edge strength ``s_e = log(1 - mean_p w_e[none])``, per
  sample; pair weights ``pi_(a,b) = softmax over the node's pairs of
  s_a + s_b``; node output ``sum_pairs pi_(a,b) (y_a + y_b)``. nb201 keeps
  every edge (its nodes sum their edges, as the space does).
- Architecture parameters (``arch_parameters()``, trained on the validation
  half by the DARTS loop unchanged: first or second order, DDP averaging,
  AMP, checkpoints): per edge ``Wq (C, D)``, ``Wk (C, D)``, ``zero_key (D,)``
  (edges with a Zero op), and with ``--midas-prior`` the space's alpha tables
  as the static prior (shared by all cells of a type, like DARTS's alphas).

Choices where SPEC 2.2 and the paper's abstract are silent
------------------------------------------------------------
- Parameters per edge *per cell*: the edges of cells of one type see different
  channel counts (C, 2C, 4C), so Wq and Wk cannot be shared across cells the
  way DARTS shares its alphas.
- Initialisation: Wq, Wk ~ N(0, (INIT_SCALE^2) / C), zero key 0 (the Zero op's
  logit starts at its prior). The logits are bilinear in the features: their
  standard deviation is about INIT_SCALE^2 * rms(pooled x) * rms(pooled o_k),
  and the features of deep cells are large (NB201's cells sum their edges
  with no normalisation after them). With INIT_SCALE = 1 (the usual 1/C
  variance) the weights of the last NB201 stage started saturated at 0 and 1,
  the weight gradient was 4.7x DARTS's, and neither the NB201 nor the DARTS
  supernet trained on the digits (loss 2.3 after 2 epochs, against 0.27 for
  DARTS); with 0.1 (or 0.03, or 0.01) the logits start near zero, i.e. nearly
  uniform weights as DARTS's 1e-3 N(0, 1) alphas, and the supernet trains as
  DARTS's does (0.50 after 2 epochs). Not zero: Wq = Wk = 0 is a saddle where
  both gradients vanish.
- The prior enters as ``log softmax(alphas)``: the space network hands its
  cells softmax(alphas), and log softmax differs from the alphas by one
  constant per edge, which the attention softmax ignores. The prior is thus
  the alpha table itself, with DARTS's initialisation (1e-3 N(0, 1)).
- Edge strength without a Zero op (rdarts S1, S2, S4): SPEC's "log of the
  summed non-Zero weight" is log 1 = 0 for every edge, which cannot choose;
  we use the log of the largest mean non-Zero weight (the issue's rule). With
  a Zero op the summed non-Zero weight is used (= 1 - w[none] exactly, but
  without the cancellation when w[none] is close to 1).
- A node with two inputs has one pair (pi = 1): its output is the plain sum.
  Larger nodes are one ``nasops.ops.mixed_op`` over their edges' outputs with
  the per-sample weights beta_e = sum of pi over the pairs that contain e
  (the pair-weighted sum, regrouped; the tests check it against the sum over
  pairs).
- The grid (``--midas-grid``) is clipped per edge to the edge's output map
  (reduction cells and the 8x8 digits have small maps).
- Decoding (SPEC: "the mean of w over patches and over the validation set"):
  the mean is also over the cells of one type (one genotype per cell type, as
  in DARTS): per sample the mean over patches, then over the type's cells;
  then the mean over samples. darts/rdarts then apply the topology rule to
  these means (the kept pair of each node is argmax pi, the op of a kept edge
  its best non-Zero op); nb201 takes every edge's argmax over all ops, Zero
  included (NB201's rule). Ties go to the first op / the first pair / the
  lower input, as in nasops.spaces.
- The decoding pass (``finish``): one pass without gradients over the
  validation half (all its full batches, or ``--midas-decode-batches``),
  epoch 0's order, the network in training mode - BatchNorm normalises with the
  batch's statistics, as in every architecture step of the search (the
  running statistics of a search network are poor) - and its buffers restored
  afterwards, so the pass leaves the network as the checkpoint holds it.
  Under DDP each rank decodes its shard and the sums are all-reduced (the
  loader pads the shards by wrapping around: a few samples count twice).
- Per-epoch ``describe()`` (metrics.jsonl) decodes from running means gathered
  during the epoch's architecture steps (the validation batch's forward; at
  the virtual weights w' with ``--second-order``), all-reduced over ranks: no
  extra pass.
- Unimodality of an edge: the share of validation samples whose own
  distribution (mean over patches and the type's cells) has its argmax at the
  decoded op; the argmax is over the ops decoding may choose (darts/rdarts:
  the non-Zero ops; nb201: all).
- Mosaic: the first ``MOSAIC_IMAGES`` images of the decoding pass's first batch
  (rank 0), each patch coloured by the argmax over all ops (Zero included: a
  patch that prefers no connection says so) of its weights on the chosen edge
  (``--midas-mosaic-edge``) in the first cell of that type.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import nasops.ops
from nasops import spaces
from nasops.methods.darts import Darts, RunContext
from nasops.runtime import write_text
from nasops.spaces import darts as darts_space
from nasops.spaces import nb201 as nb201_space
from nasops.spaces.base import MixedEdge, one_dtype

SPACES = ("darts", "rdarts-s1", "rdarts-s2", "rdarts-s3", "rdarts-s4", "nb201")
ZERO_OP = "none"
MOSAIC_IMAGES = 8
# Floor of a summed weight before its log: a strength of log(1e-30) = -69 already
# loses every pair against any edge that is used at all.
_TINY = 1e-30
# Standard deviation of Wq and Wk is INIT_SCALE / sqrt(C): see the module docstring.
INIT_SCALE = 0.1


# ---- flags ------------------------------------------------------------------------------

def parse_grid(text: str) -> tuple[int, int]:
    """``"GHxGW"`` or ``"G"`` (G x G) -> (gh, gw), positive integers."""
    parts = str(text).lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        gh, gw = (int(parts[0]), int(parts[-1]))
        return gh, gw
    raise ValueError(f"--midas-grid: expected GHxGW or G with positive integers (e.g. 2x2, 4, 2x3), "
                     f"got {text!r}")


def _space_edges(space: str) -> tuple[tuple[str, ...], list[str]]:
    """(cell types, edge names) of ``space``'s cells with the driver's 4 nodes."""
    if space == "nb201":
        ends = nb201_space.edge_ends(4)
        types = nb201_space.NB201SearchNetwork.cell_types
    else:
        ends = darts_space.edge_ends(4)
        types = darts_space.DartsSearchNetwork.cell_types
    return types, [f"{s}->{d}" for s, d in ends]


def _cell_types_present(space: str, layers: int) -> list[str]:
    """The cell types the network of ``space`` with ``layers`` has, in network order."""
    if space == "nb201":
        return ["normal"]
    reductions = darts_space.reduction_cells(layers)
    return list(dict.fromkeys("reduce" if i in reductions else "normal" for i in range(layers)))


def parse_mosaic_edge(text: str | None, space: str, layers: int) -> tuple[str, str]:
    """``"[TYPE:]SRC->DST"`` -> (cell type, edge name); None -> the first edge of the first cell."""
    types, edges = _space_edges(space)
    present = _cell_types_present(space, layers)
    if text is None:
        return present[0], edges[0]
    cell_type, sep, edge = str(text).rpartition(":")
    cell_type = cell_type if sep else present[0]
    edge = edge.replace(" ", "")
    if cell_type not in types or edge not in edges:
        raise ValueError(f"--midas-mosaic-edge: expected [TYPE:]SRC->DST with TYPE in {', '.join(types)} "
                         f"and an edge of the {space} cell ({', '.join(edges)}), got {text!r}")
    if cell_type not in present:
        raise ValueError(f"--midas-mosaic-edge: the {space} network of --layers {layers} has no "
                         f"{cell_type} cell (it has {', '.join(present)}), got {text!r}")
    return cell_type, edge


# ---- the network ------------------------------------------------------------------------

class MidasEdge(MixedEdge):
    """A mixed edge whose op weights come from its input, per sample and patch
    (SPEC 2.2): ``forward(x, prior=None) -> (y, w)``, ``w (B, P, K)`` in float32.

    Built from a space's :class:`MixedEdge` (:meth:`replacing`), keeping its op
    modules. ``channels`` is the edge's channel count C (input and output: the
    DARTS cell preprocesses its inputs to C; a stride-2 edge halves the map,
    not the channels). While ``record`` is set, a forward copies its ``w`` for
    the method's statistics: :meth:`recording` reads it back.
    """

    def __init__(self, op_names, ops, channels: int, *, dim: int, grid: tuple[int, int], tau: float):
        super().__init__(op_names, ops)
        self.grid = tuple(grid)
        self.tau = float(tau)
        std = INIT_SCALE * channels ** -0.5
        self.Wq = nn.Parameter(std * torch.randn(channels, dim))
        self.Wk = nn.Parameter(std * torch.randn(channels, dim))
        self.zero_key = nn.Parameter(torch.zeros(dim)) if any(self._is_zero) else None
        self.zero_index = self.op_names.index(ZERO_OP) if ZERO_OP in self.op_names else None
        self.record = False
        # w's shape -> (the last recorded w, (output height, width, grid)). Written in
        # place and never dropped: under --cuda-graphs a replay writes the copy into the
        # buffer that the capture's forward used, without running this code.
        self._recordings: dict[torch.Size, tuple[torch.Tensor, tuple[int, int, tuple[int, int]]]] = {}

    @classmethod
    def replacing(cls, edge: MixedEdge, channels: int, **config) -> "MidasEdge":
        """The MIDAS edge over ``edge``'s op modules (same modules, same names)."""
        ops = [None if zero else op for op, zero in zip(edge.ops, edge._is_zero)]
        return cls(edge.op_names, ops, channels, **config)

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.Wq, self.Wk] + ([self.zero_key] if self.zero_key is not None else [])

    def _mix(self, x, prior=None, kept=(), shared=None):
        # forward (RecomputableEdge's): this, or its recomputing Function under --recompute-edges
        outputs = self.op_outputs(x, kept, shared)
        ref = next(o for o in outputs if o is not None)
        grid = (min(self.grid[0], ref.shape[2]), min(self.grid[1], ref.shape[3]))
        # x itself when no cast is needed: the op then sees that the skip op's output
        # is x (under torch.compile, x.to(same dtype) would be another tensor to it)
        x = x if x.dtype == ref.dtype else x.to(ref.dtype)
        y, w = nasops.ops.patch_attention_mixed_op(x, outputs, self.Wq, self.Wk, grid, prior,
                                                   self.tau, zero_key=self.zero_key)
        if self.record:
            if w.shape not in self._recordings:
                self._recordings[w.shape] = (torch.empty_like(w, memory_format=torch.contiguous_format),
                                             (ref.shape[2], ref.shape[3], grid))
            self._recordings[w.shape][0].copy_(w.detach())
        return y, w

    def recording(self, batch: int) -> tuple[torch.Tensor, tuple[int, int, tuple[int, int]]]:
        """(``w`` (B, P, K), (output height, width, grid)) of the last forward of a
        batch of ``batch`` samples while ``record`` was set. One map size per batch
        size: which of two recordings is the last, a graph replay would not tell."""
        found = [kept for shape, kept in self._recordings.items() if shape[0] == batch]
        if len(found) != 1:
            raise ValueError(f"batch: {len(found)} recordings of {batch} samples (shapes "
                             f"{[tuple(s) for s in self._recordings]}); expected one")
        return found[0]


def edge_strength(mean_weights: torch.Tensor, zero_index: int | None) -> torch.Tensor:
    """s_e from an edge's op weights averaged over patches (``(..., K)`` -> ``(...)``).

    With a Zero op: log of the summed non-Zero weight (= log(1 - w[none])).
    Without (SPEC's rule would give log 1 = 0 for every edge): log of the
    largest weight.
    """
    if zero_index is None:
        used = mean_weights.max(dim=-1).values
    else:
        # The live columns' sum, not 1 - w[none]: no cancellation when w[none] ~ 1.
        live = _live_columns(mean_weights.shape[-1], zero_index, mean_weights.device)
        used = mean_weights.index_select(-1, live).sum(dim=-1)
    return torch.log(used.clamp_min(_TINY))


@functools.lru_cache(maxsize=None)
def _live_columns(K: int, zero_index: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([k for k in range(K) if k != zero_index], device=device)


def node_strengths(weights: list[torch.Tensor], zero_indices: list[int | None]) -> torch.Tensor:
    """(B, n): the strengths of a node's n edges from their weights (B, P, K) each.

    Edges alike (one Zero position, one mosaic: every node of our spaces) go
    through :func:`edge_strength` together, a handful of ops per node rather
    than per edge (measured: the per-edge form was most of the 3.5 ms that a
    DARTS cell's nodes added to a default-network step, forward and backward).
    """
    if len(set(zero_indices)) == 1 and len({w.shape for w in weights}) == 1:
        return edge_strength(torch.stack(weights, dim=1).mean(dim=2), zero_indices[0])  # (B, n, K) -> (B, n)
    return torch.stack([edge_strength(w.mean(dim=1), z) for w, z in zip(weights, zero_indices)], dim=-1)


def node_pairs(n_inputs: int) -> list[tuple[int, int]]:
    """The pairs (a, b), a < b, of a node's inputs, in lexicographic order."""
    return list(itertools.combinations(range(n_inputs), 2))


@functools.lru_cache(maxsize=None)
def _pair_index(n_inputs: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first inputs, second inputs) of :func:`node_pairs`, as index tensors on ``device``
    (cached: no host-to-device copy per node and step)."""
    pairs = node_pairs(n_inputs)
    return (torch.tensor([a for a, _ in pairs], device=device),
            torch.tensor([b for _, b in pairs], device=device))


def pair_weights(strengths: torch.Tensor) -> torch.Tensor:
    """pi = softmax over the pairs (a, b) of s_a + s_b: ``(..., n)`` -> ``(..., n(n-1)/2)``
    in :func:`node_pairs` order."""
    first, second = _pair_index(strengths.shape[-1], strengths.device)
    return torch.softmax(strengths[..., first] + strengths[..., second], dim=-1)


def pair_weighted_node(outputs: list[torch.Tensor], strengths: torch.Tensor) -> torch.Tensor:
    """sum over pairs of pi_(a,b) (y_a + y_b), per sample, ``strengths (B, n)``.

    Regrouped as sum_e beta_e y_e, beta_e = the pi of the pairs that contain e:
    one ``nasops.ops.mixed_op`` with per-sample weights (B, n), not n(n-1)/2
    sums. Two inputs are one pair with pi = 1: their plain sum.
    """
    if len(outputs) == 2:
        return outputs[0] + outputs[1]
    pi = pair_weights(strengths)  # (B, pairs)
    first, second = _pair_index(len(outputs), strengths.device)
    beta = pi.new_zeros(strengths.shape).index_add(1, first, pi).index_add(1, second, pi)  # (B, n)
    outputs = one_dtype(outputs, outputs[0].device.type)
    return nasops.ops.mixed_op(outputs, beta)


def _prior(weights, e, edge: MidasEdge):
    # The space network hands its cells softmax(alphas); its log is the alphas up
    # to a constant per edge, which the attention softmax ignores.
    return None if weights is None else weights[e].to(edge.Wq.dtype).log()


class MidasDartsCell(darts_space.DartsCell):
    """A DARTS/RobustDARTS cell with MIDAS edges and pair-weighted nodes."""

    def __init__(self, edge_ops, nodes, C_prev_prev, C_prev, C, reduction, reduction_prev, *,
                 dim, grid, tau):
        super().__init__(edge_ops, nodes, C_prev_prev, C_prev, C, reduction, reduction_prev)
        self.edges = nn.ModuleList(MidasEdge.replacing(edge, C, dim=dim, grid=grid, tau=tau)
                                   for edge in self.edges)

    def forward(self, s0, s1, weights):
        """``weights``: softmax(alphas) of this cell type (E, K) with the prior, else None."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        shared = [{}, {}]  # per state: the outputs its edges share (spaces.base.share_ops)
        e = 0
        for _ in range(self.nodes):
            edges = self.edges[e:e + len(states)]
            mixed = [edge(h, _prior(weights, e + j, edge), memo)
                     for j, (edge, h, memo) in enumerate(zip(edges, states, shared))]
            outputs = [y for y, _ in mixed]
            if len(states) == 2:  # one pair: pi = 1, no strengths needed
                states.append(pair_weighted_node(outputs, None))
            else:
                strengths = node_strengths([w for _, w in mixed], [edge.zero_index for edge in edges])
                states.append(pair_weighted_node(outputs, strengths))
            shared.append({})
            e += len(edges)
        return torch.cat(states[2:], dim=1)


class MidasNB201Cell(nb201_space.NB201Cell):
    """An NB201 cell with MIDAS edges; nodes sum all their edges (NB201 keeps every edge)."""

    def __init__(self, C, nodes, *, dim, grid, tau):
        super().__init__(C, nodes)
        self.edges = nn.ModuleList(MidasEdge.replacing(edge, C, dim=dim, grid=grid, tau=tau)
                                   for edge in self.edges)

    def edge_output(self, e: int, x, weights, shared=None):
        edge = self.edges[e]
        return edge(x, _prior(weights, e, edge), shared)[0]


def build_network(space: str, *, in_channels: int, num_classes: int, C: int, layers: int,
                  dim: int = 16, grid=(2, 2), tau: float = 1.0, prior: bool = False):
    """The MIDAS search network of ``space`` (one of :data:`SPACES`)."""
    if space not in SPACES:
        raise ValueError(f"space: MIDAS searches {', '.join(SPACES)}; got {space!r}")
    cell_class = MidasNB201Cell if space == "nb201" else MidasDartsCell
    cell = functools.partial(cell_class, dim=dim, grid=tuple(grid), tau=tau)
    return spaces.build(space, in_channels=in_channels, num_classes=num_classes, C=C, layers=layers,
                        cell=cell, alphas=prior)


# ---- decoding ---------------------------------------------------------------------------

def _first_max(values) -> int:
    values = list(values)
    return values.index(max(values))


def best_op(weights, op_names, allow_zero: bool) -> int:
    """Index of the heaviest op (the first of ties), the Zero op excluded unless allowed."""
    candidates = [(w, k) for k, (w, name) in enumerate(zip(weights, op_names)) if allow_zero or name != ZERO_OP]
    if not candidates:
        raise ValueError(f"op_names: edge {list(op_names)} has only the Zero op")
    return max(candidates, key=lambda c: (c[0], -c[1]))[1]


def decode_darts_cell(distributions, op_names, nodes: int) -> tuple[list[list], list[dict]]:
    """The topology rule on one cell type's decoded distributions.

    Args:
        distributions: per edge (DARTS edge order), the mean weight of each op.
        op_names: per edge, its ops' names.
        nodes: intermediate nodes.
    Returns:
        genes ``[[op, input], ...]`` (two per node, the stronger edge first) and
        per node ``{"node", "pairs", "weights", "chosen"}`` (pi over its pairs).
    """
    genes, nodes_info = [], []
    start = 0
    for i in range(nodes):
        n_in = 2 + i
        rows = [torch.as_tensor(distributions[start + j], dtype=torch.float64) for j in range(n_in)]
        names = [list(op_names[start + j]) for j in range(n_in)]
        strengths = torch.stack([edge_strength(row, names[j].index(ZERO_OP) if ZERO_OP in names[j] else None)
                                 for j, row in enumerate(rows)])
        pi = pair_weights(strengths).tolist()
        pairs = node_pairs(n_in)
        a, b = pairs[_first_max(pi)]
        order = sorted((a, b), key=lambda j: -strengths[j].item())  # stable: lower input on ties
        genes += [[names[j][best_op(rows[j].tolist(), names[j], allow_zero=False)], j] for j in order]
        nodes_info.append({"node": i, "pairs": [list(p) for p in pairs], "weights": pi, "chosen": [a, b]})
        start += n_in
    return genes, nodes_info


def decoded_ops(space: str, distributions, op_names) -> list[int]:
    """Per edge, the op decoding picks: best non-Zero op (darts/rdarts), argmax (nb201)."""
    allow_zero = space == "nb201"
    return [best_op(row, names, allow_zero) for row, names in zip(distributions, op_names)]


def decode(space: str, nodes: int, distributions: dict, op_names: dict) -> dict:
    """``{"genotype", "genotype_str", "pair_weights"}`` from per-cell-type distributions (E, K)."""
    if space == "nb201":
        arch = nb201_space.derive_arch(distributions["normal"], op_names["normal"][0], nodes)
        return {"genotype": {"arch": arch}, "genotype_str": arch, "pair_weights": {}}
    genotype, pairs = {}, {}
    for t, table in distributions.items():
        genotype[t], pairs[t] = decode_darts_cell(table, op_names[t], nodes)
        genotype[f"{t}_concat"] = list(range(2, 2 + nodes))
    text = " ".join(f"{t}={darts_space.genes_str(genotype[t], nodes)}" for t in distributions)
    return {"genotype": genotype, "genotype_str": text, "pair_weights": pairs}


# ---- the method -------------------------------------------------------------------------

class Midas(Darts):
    """MIDAS on the DARTS bilevel loop (see the module docstring).

    Beyond :class:`Darts`: ``decode_batches`` (batches of the decoding pass,
    None = all) and ``mosaic_edge`` ((cell type, edge name) of the mosaic).
    """

    name = "midas"
    spaces = SPACES
    output_patterns = ("cell_*.png", "weights_*.png", "midas_*.json", "midas_*.png")

    def __init__(self, model, *, decode_batches: int | None = None, mosaic_edge: tuple[str, str] | None = None,
                 **darts_kwargs):
        super().__init__(model, **darts_kwargs)
        self._cells = {t: [] for t in model.cell_types}
        for cell in model.cells:
            if isinstance(cell, (MidasDartsCell, MidasNB201Cell)):
                self._cells["reduce" if getattr(cell, "reduction", False) else "normal"].append(cell)
        if not any(self._cells.values()):
            raise TypeError(f"model: expected a MIDAS search network (midas.build_network), got "
                            f"{type(model).__name__} without MIDAS cells")
        self._edges = [edge for cells in self._cells.values() for cell in cells for edge in cell.edges]
        self.decode_batches = decode_batches
        self.mosaic_edge = mosaic_edge or (next(t for t in model.cell_types if self._cells[t]),
                                           model.edge_names(model.cell_types[0])[0])
        self._running = self._zero_sums()
        self._final: dict | None = None

    # ---- what the driver asks of a method -------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("midas (--method midas)")
        g.add_argument("--midas-grid", default="2x2", metavar="GHxGW",
                       help="patch mosaic of the attention, GHxGW or G (clipped per edge to its map)")
        g.add_argument("--midas-dim", type=int, default=16, metavar="D", help="query/key width D")
        g.add_argument("--midas-tau", type=float, default=1.0, help="softmax temperature of the attention")
        g.add_argument("--midas-prior", action="store_true",
                       help="add a learned static alpha table (one per cell type) to the logits")
        g.add_argument("--midas-decode-batches", type=int, default=None, metavar="N",
                       help="batches of the validation half that the final decoding averages over "
                            "(default: all)")
        g.add_argument("--midas-mosaic-edge", default=None, metavar="[TYPE:]SRC->DST",
                       help="the edge of the mosaic picture, e.g. normal:0->2 (default: the first edge "
                            "of the first cell)")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        parse_grid(args.midas_grid)
        if args.midas_dim < 1:
            raise ValueError(f"--midas-dim: expected >= 1, got {args.midas_dim}")
        if not (args.midas_tau > 0 and math.isfinite(args.midas_tau)):
            raise ValueError(f"--midas-tau: expected a positive number, got {args.midas_tau}")
        if args.midas_decode_batches is not None and args.midas_decode_batches < 1:
            raise ValueError(f"--midas-decode-batches: expected >= 1, got {args.midas_decode_batches}")
        from nasops.search import default_layers  # the driver imports the methods

        layers = args.layers if args.layers is not None else default_layers(args.space)
        parse_mosaic_edge(args.midas_mosaic_edge, args.space, layers)

    @classmethod
    def build_model(cls, args: argparse.Namespace, data) -> torch.nn.Module:
        return build_network(args.space, in_channels=data.in_channels, num_classes=data.num_classes,
                             C=args.init_channels, layers=args.layers, dim=args.midas_dim,
                             grid=parse_grid(args.midas_grid), tau=args.midas_tau, prior=args.midas_prior)

    @classmethod
    def from_args(cls, model, args, *, device, amp) -> "Midas":
        return cls(model, epochs=args.epochs, device=device, amp=amp,
                   decode_batches=args.midas_decode_batches,
                   mosaic_edge=parse_mosaic_edge(args.midas_mosaic_edge, args.space, args.layers),
                   **cls.hyperparameters(args))

    def begin_epoch(self, epoch: int) -> None:
        self._running = self._zero_sums()

    def describe(self) -> dict:
        """The architecture decoded from this epoch's architecture steps' running
        means (all ranks'), with the decoded distributions as ``edge_weights``."""
        sums = self._all_reduce(self._running)
        distributions = self._distributions(sums["total"], sums["count"])
        decoded = decode(self.model.space, self.model.nodes, distributions, self._op_names())
        return {**decoded, "edge_weights": self._edge_table(distributions)}

    def finish(self, run: RunContext) -> dict:
        """Decodes from one pass over the validation half (see the module docstring)."""
        sums, mosaic = self._decoding_pass(run)
        sums = self._all_reduce(sums)
        distributions = self._distributions(sums["total"], sums["count"])
        op_names = self._op_names()
        decoded = decode(self.model.space, self.model.nodes, distributions, op_names)
        unimodality = {}
        for t, table in distributions.items():
            chosen = decoded_ops(self.model.space, table, op_names[t])
            count = max(int(sums["count"][t]), 1)
            unimodality[t] = [{"edge": edge, "op": names[k], "share": sums["argmax"][t][e, k].item() / count}
                              for e, (edge, names, k) in enumerate(zip(self.model.edge_names(t), op_names[t],
                                                                       chosen))]
        self._final = {"sums": sums, "distributions": distributions, "mosaic": mosaic,
                       "num_classes": run.data.num_classes}
        return {**decoded, "edge_weights": self._edge_table(distributions), "unimodality": unimodality,
                "decode_samples": int(sums["count"][self.model.cell_types[0]]),
                "mosaic": mosaic["summary"] if mosaic else None}

    def write_outputs(self, out: Path, result: dict) -> None:
        """cell_<type>.png, weights_<type>.png (decoded distributions),
        midas_class_weights.json + midas_class_weights_<type>.png,
        midas_unimodality.png, midas_mosaic.png."""
        from nasops.methods import midas_plots
        from nasops.spaces import plot

        if self._final is None:
            raise RuntimeError("write_outputs: call finish() first (it computes what is written)")
        for t, table in result["edge_weights"].items():
            plot.plot_cell(result["genotype"], t, str(out / f"cell_{t}.png"))
            plot.plot_edge_weights(table, str(out / f"weights_{t}.png"),
                                   f"{result['space']} {t} cell: MIDAS op weights (validation mean)")
        classes = self.class_weights()
        write_text(out / "midas_class_weights.json", json.dumps(classes, indent=1) + "\n")
        for t, edges in classes["cells"].items():
            midas_plots.plot_class_weights(edges, classes["samples_per_class"], out / f"midas_class_weights_{t}.png",
                                           f"{result['space']} {t} cell: mean op weights per class")
        midas_plots.plot_unimodality(result["unimodality"], out / "midas_unimodality.png",
                                     f"{result['space']}: share of validation samples whose argmax is the "
                                     f"decoded op")
        mosaic = self._final["mosaic"]
        if mosaic is not None:
            midas_plots.plot_mosaic(mosaic, out / "midas_mosaic.png")

    # ---- statistics ------------------------------------------------------------------------

    def class_weights(self) -> dict:
        """Per cell type, per edge: the mean op weights of the validation samples of
        each class (rows for classes without samples are None)."""
        sums = self._final["sums"]
        counts = sums["class_count"][self.model.cell_types[0]]
        cells = {}
        for t in self.model.cell_types:
            per_class = sums["class_total"][t]  # (classes, E, K)
            rows = []
            for e, (edge, names) in enumerate(zip(self.model.edge_names(t), self._op_names()[t])):
                weights = [(per_class[c, e] / counts[c]).tolist() if counts[c] > 0 else None
                           for c in range(per_class.shape[0])]
                rows.append({"edge": edge, "ops": names, "weights": weights})
            cells[t] = rows
        return {"classes": list(range(len(counts))), "samples_per_class": [int(c) for c in counts.tolist()],
                "cells": cells}

    def _op_names(self) -> dict[str, list[list[str]]]:
        return {t: self.model.op_names(t) for t in self.model.cell_types}

    def _zero_sums(self, num_classes: int = 0) -> dict:
        """Float64 sums on the method's device, per cell type: ``count`` (samples),
        ``total`` (E, K) (their weights); with classes also ``class_total``
        (classes, E, K), ``class_count`` (classes,) and ``argmax`` (E, K) (samples
        whose argmax is each op). Kept on the device: no host sync per step."""
        sums = {"count": {}, "total": {}}
        if num_classes:
            sums.update(class_total={}, class_count={}, argmax={})
        zeros = functools.partial(torch.zeros, dtype=torch.float64, device=self.device)
        for t in self.model.cell_types:
            E, K = len(self.model.edge_names(t)), len(self.model.op_names(t)[0])
            sums["count"][t] = zeros(())
            sums["total"][t] = zeros(E, K)
            if num_classes:
                sums["class_total"][t] = zeros(num_classes, E, K)
                sums["class_count"][t] = zeros(num_classes)
                sums["argmax"][t] = zeros(E, K)
        return sums

    def _per_sample(self, cell_type: str, batch: int) -> torch.Tensor | None:
        """(B, E, K) float64: the recorded weights of each sample of the last batch of
        ``batch`` samples, averaged over patches and over the cells of ``cell_type``;
        None if the type has no cells."""
        cells = self._cells[cell_type]
        if not cells:
            return None
        per_cell = [torch.stack([edge.recording(batch)[0].mean(dim=1) for edge in cell.edges], dim=1)
                    for cell in cells]
        return torch.stack(per_cell).mean(dim=0).double()

    def graph_variant(self) -> bool:
        """--cuda-graphs: whether the edges record their op weights (the architecture
        step switches it on in Python; a recording edge copies its weights into a
        buffer it keeps, which the replay of the recording graphs writes again)."""
        return self._edges[0].record  # _recording switches every edge

    @contextlib.contextmanager
    def _recording(self):
        for edge in self._edges:
            edge.record = True
        try:
            yield
        finally:
            for edge in self._edges:
                edge.record = False

    def _val_loss(self, x, y, dtype=None):
        with self._recording():
            result = super()._val_loss(x, y, dtype)
            for t in self.model.cell_types:
                self._running["count"][t] += len(y)
                per_sample = self._per_sample(t, len(y))
                if per_sample is not None:
                    self._running["total"][t] += per_sample.sum(dim=0)
        return result

    def _decoding_pass(self, run: RunContext) -> tuple[dict, dict | None]:
        model = self.model
        sums = self._zero_sums(run.data.num_classes)
        eligible = {t: torch.tensor([model.space == "nb201" or name != ZERO_OP for name in names[0]],
                                    device=self.device)
                    for t, names in self._op_names().items()}
        mosaic = None
        mosaic_type, mosaic_edge = self.mosaic_edge
        mosaic_index = model.edge_names(mosaic_type).index(mosaic_edge)
        buffers = [b.detach().clone() for b in model.buffers()]
        was_training = model.training
        model.train()  # BatchNorm with batch statistics, as in the search (module docstring)
        try:
            with torch.no_grad(), self._recording():
                batches = run.val_loader.epoch(0)
                if self.decode_batches is not None:
                    batches = itertools.islice(batches, self.decode_batches)
                for b, (x, y) in enumerate(batches):
                    labels = y.to(self.device, non_blocking=True)
                    with self._autocast():
                        model(x.to(self.device, non_blocking=True))
                    for t in model.cell_types:
                        sums["count"][t] += len(y)
                        sums["class_count"][t] += torch.bincount(labels, minlength=run.data.num_classes)
                        per_sample = self._per_sample(t, len(y))
                        if per_sample is None:
                            continue
                        sums["total"][t] += per_sample.sum(dim=0)
                        sums["class_total"][t].index_add_(0, labels, per_sample)
                        masked = per_sample.masked_fill(~eligible[t], -math.inf)
                        sums["argmax"][t] += F.one_hot(masked.argmax(dim=-1), masked.shape[-1]).sum(dim=0)
                    if b == 0 and run.rank == 0:
                        mosaic = self._mosaic(x, y, mosaic_type, mosaic_index)
        finally:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
            model.train(was_training)
        return sums, mosaic

    def _mosaic(self, x, y, cell_type, edge_index) -> dict:
        edge = self._cells[cell_type][0].edges[edge_index]
        recorded, (height, width, grid) = edge.recording(len(y))
        picks = recorded[:MOSAIC_IMAGES].float().cpu().argmax(dim=-1)  # (n, P)
        names = edge.op_names
        summary = {"edge": f"{cell_type}:{self.model.edge_names(cell_type)[edge_index]}", "cell_type": cell_type,
                   "grid": list(grid), "map_size": [height, width],
                   "samples": [{"label": int(label), "patch_ops": [names[k] for k in row.tolist()]}
                               for label, row in zip(y[:MOSAIC_IMAGES].tolist(), picks)]}
        return {"summary": summary, "images": x[:MOSAIC_IMAGES].float().cpu(), "picks": picks,
                "op_names": list(names)}

    def _distributions(self, total: dict, count: dict) -> dict[str, list[list[float]]]:
        """Mean weights per cell type, (E, K) as lists; uniform for a type without
        cells in the network (darts with --layers < 3 has no normal cell) or samples."""
        out = {}
        for t in self.model.cell_types:
            if self._cells[t] and count[t] > 0:
                out[t] = (total[t] / count[t]).tolist()
            else:
                E, K = total[t].shape
                out[t] = [[1.0 / K] * K for _ in range(E)]
        return out

    def _edge_table(self, distributions) -> dict[str, list[dict]]:
        return {t: [{"edge": edge, "ops": dict(zip(names, row))}
                    for edge, names, row in zip(self.model.edge_names(t), self.model.op_names(t), table)]
                for t, table in distributions.items()}

    def _all_reduce(self, sums: dict) -> dict:
        """``sums`` summed over the ranks (one all-reduce), as new CPU tensors."""
        leaves = [(key, t) for key, per_type in sums.items() for t in per_type]
        flat = torch.cat([sums[key][t].reshape(-1) for key, t in leaves])
        if self.world_size > 1:
            dist.all_reduce(flat)
        flat = flat.cpu()
        out, offset = {key: {} for key in sums}, 0
        for key, t in leaves:
            ref = sums[key][t]
            out[key][t] = flat[offset:offset + ref.numel()].view_as(ref).clone()
            offset += ref.numel()
        return out
