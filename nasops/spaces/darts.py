"""The DARTS CNN search space (Liu et al., 2019) and its RobustDARTS variants.

A cell has two input states, ``c_{k-2}`` and ``c_{k-1}`` (the outputs of the
two previous cells, state indices 0 and 1), and ``nodes`` intermediate nodes
(state indices 2 .. nodes+1). Node ``i`` sums one mixed edge from every earlier
state, so the cell has ``2 + 3 + ... = 14`` edges for 4 nodes, in DARTS edge
order (node 0 <- states 0,1; node 1 <- 0,1,2; ...). The cell output
concatenates all intermediate nodes. Edge names in ``edge_weights()`` are
``"<src state>-><dst state>"``, e.g. ``"0->2"`` (c_{k-2} -> node 0).

The search network is DARTS' ``model_search.Network``: stem conv 3x3 to
``stem_multiplier * C`` channels + BN, ``layers`` cells with reduction cells
(stride-2 edges from the inputs, doubled channels) at ``layers // 3`` and
``2 * layers // 3``, global average pooling and a linear classifier. Normal
cells share one alpha table, reduction cells another.

Genotype rule (DARTS): per node keep the two incoming edges whose best non-Zero
op has the largest weight (ties: the lower input index), and on each the best
non-Zero op; genes are listed strongest edge first, as DARTS prints them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from nasops.spaces.base import MixedEdge, SearchNetwork, share_ops
from nasops.spaces.operations import DARTS_OPS, FactorizedReduce, ReLUConvBN, make_darts_op


def edge_ends(nodes: int) -> list[tuple[int, int]]:
    """(source state, destination state) of every edge, in DARTS edge order."""
    return [(src, 2 + i) for i in range(nodes) for src in range(2 + i)]


def derive_genes(weights: Sequence[Sequence[float]], op_names: Sequence[Sequence[str]],
                 nodes: int) -> list[list]:
    """The DARTS genotype of one cell type from its mixing weights.

    Args:
        weights: per edge (DARTS edge order), the weight of each candidate op.
        op_names: per edge, the candidates' names (``none`` = Zero, never chosen).
        nodes: the number of intermediate nodes.

    Returns:
        ``2 * nodes`` genes ``[op, input state]``, two per node.
    """
    genes = []
    start = 0
    for i in range(nodes):
        n_in = 2 + i
        best = []  # per input: (weight, op) of its best non-Zero op
        for j in range(n_in):
            candidates = [(w, op) for w, op in zip(weights[start + j], op_names[start + j])
                          if op != "none"]
            if not candidates:
                raise ValueError(f"op_names: edge {start + j} has only the Zero op")
            best.append(max(candidates, key=lambda c: c[0]))
        # sorted() is stable: among equally strong edges the lower input wins.
        strongest = sorted(range(n_in), key=lambda j: -best[j][0])[:2]
        genes += [[best[j][1], j] for j in strongest]
        start += n_in
    return genes


def genes_str(genes: Sequence[Sequence], nodes: int) -> str:
    """Compact form of one cell's genes, NB201-like: ``|op~input|op~input|+|...|``."""
    per_node = [genes[2 * i:2 * i + 2] for i in range(nodes)]
    return "+".join("|" + "|".join(f"{op}~{j}" for op, j in node) + "|" for node in per_node)


class DartsCell(nn.Module):
    """A DARTS search cell with the given candidate ops per edge."""

    def __init__(self, edge_ops, nodes, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        self.nodes = nodes
        if reduction_prev:  # c_{k-2} has twice the resolution of c_{k-1}
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        for (src, _), names in zip(edge_ends(nodes), edge_ops):
            stride = 2 if reduction and src < 2 else 1
            self.edges.append(MixedEdge(names, [make_darts_op(n, C, stride) for n in names]))
        share_ops(self.edges, [src for src, _ in edge_ends(nodes)])

    def forward(self, s0, s1, weights):
        """``weights``: (edges, K) or per sample (B, edges, K)."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        shared = [{}, {}]  # per state: the outputs its edges share (share_ops)
        e = 0
        for i in range(self.nodes):
            node = None
            for h, memo in zip(states, shared):
                out = self.edges[e](h, weights[..., e, :], memo)
                node = out if node is None else node + out
                e += 1
            states.append(node)
            shared.append({})
        return torch.cat(states[2:], dim=1)


def reduction_cells(layers: int) -> tuple[int, int]:
    """The indices of a DARTS stack's two reduction cells: at 1/3 and 2/3 of ``layers``."""
    return layers // 3, 2 * layers // 3


def darts_stack(in_channels: int, C: int, layers: int, stem_multiplier: int, make_cell):
    """The DARTS macro-architecture, shared by the search network and the trained one
    (``nasops.spaces.discrete``): a 3x3 conv + BN stem of ``stem_multiplier * C``
    channels, then ``layers`` cells, those at 1/3 and 2/3 of the depth reduction
    cells that halve the map and double the channels.

    ``make_cell(cell_type, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)``
    builds one cell ("normal" or "reduce"; the channels of its two inputs and of each
    node) and returns ``(cell, its output channels)``. Returns ``(stem, cells, the
    output channels after each cell)``; modules are built in network order (the
    initialisation draws from the RNG in that order).
    """
    C_curr = stem_multiplier * C
    stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
    C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
    cells, channels = nn.ModuleList(), []
    reduction_prev = False
    for i in range(layers):
        reduction = i in reduction_cells(layers)
        if reduction:
            C_curr *= 2
        cell, C_out = make_cell("reduce" if reduction else "normal", C_prev_prev, C_prev, C_curr, reduction,
                                reduction_prev)
        cells.append(cell)
        channels.append(C_out)
        reduction_prev = reduction
        C_prev_prev, C_prev = C_prev, C_out
    return stem, cells, channels


class DartsSearchNetwork(SearchNetwork):
    """The DARTS search network over per-edge candidate op lists (see the module doc).

    Args:
        space: the space's name, e.g. "darts" or "rdarts-s2".
        edge_ops: {"normal": per-edge op lists, "reduce": per-edge op lists}; every
            edge of one cell type must have the same number of ops (one alpha table).
        cell: the cell module, called with :class:`DartsCell`'s arguments (default
            DartsCell; MIDAS passes its pair-weighted cell).
        alphas: False builds no alpha tables (see :class:`SearchNetwork`).
    """

    cell_types = ("normal", "reduce")

    def __init__(self, space, edge_ops, *, in_channels, num_classes, C=16, layers=8, nodes=4,
                 stem_multiplier=3, cell=DartsCell, alphas=True):
        super().__init__()
        self.space = space
        self.has_alphas = alphas
        self.nodes = nodes
        self._edge_ends = edge_ends(nodes)
        n_edges = len(self._edge_ends)
        self._edge_ops = {}
        for t in self.cell_types:
            ops = [tuple(names) for names in edge_ops[t]]
            if len(ops) != n_edges:
                raise ValueError(f"edge_ops[{t!r}]: expected {n_edges} edges for {nodes} nodes, "
                                 f"got {len(ops)}")
            if len({len(names) for names in ops}) != 1:
                raise ValueError(f"edge_ops[{t!r}]: every edge needs the same number of ops")
            self._edge_ops[t] = ops

        self.stem, self.cells, channels = darts_stack(
            in_channels, C, layers, stem_multiplier,
            lambda cell_type, *sizes: (cell(self._edge_ops[cell_type], nodes, *sizes), nodes * sizes[2]))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels[-1], num_classes)

        # DARTS initialises the alphas to 1e-3 * N(0, 1): nearly uniform mixing.
        for t in self.cell_types if alphas else ():
            k = len(self._edge_ops[t][0])
            setattr(self, f"alphas_{t}", nn.Parameter(1e-3 * torch.randn(n_edges, k)))

    def forward(self, x, weights=None):
        """Logits (B, num_classes); ``weights`` optionally overrides the mixing
        weights per cell type (see :meth:`SearchNetwork.mixing_weights`)."""
        mixing = self.mixing_weights(weights)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, mixing["reduce" if cell.reduction else "normal"])
        return self.classifier(self.global_pooling(s1).flatten(1))

    def genotype(self) -> dict:
        """``{"normal": [[op, input], ...], "normal_concat": [2..], "reduce": ..., "reduce_concat": ...}``."""
        result = {}
        concat = list(range(2, 2 + self.nodes))
        edge_weights = self.edge_weights()
        for t in self.cell_types:
            weights = [edge["ops"] for edge in edge_weights[t]]
            names = self.op_names(t)
            table = [[w[n] for n in edge_names] for w, edge_names in zip(weights, names)]
            result[t] = derive_genes(table, names, self.nodes)
            result[f"{t}_concat"] = concat
        return result

    def genotype_str(self) -> str:
        """``normal=|op~j|op~j|+|...| reduce=|...|`` (genes as in ``genotype()``)."""
        g = self.genotype()
        return " ".join(f"{t}={genes_str(g[t], self.nodes)}" for t in self.cell_types)


def build_darts(*, in_channels, num_classes, C=16, layers=8, nodes=4, stem_multiplier=3, cell=DartsCell,
                alphas=True):
    """The DARTS space: all 8 DARTS ops on every edge."""
    ops = [DARTS_OPS] * len(edge_ends(nodes))
    return DartsSearchNetwork("darts", {"normal": ops, "reduce": ops}, in_channels=in_channels,
                              num_classes=num_classes, C=C, layers=layers, nodes=nodes,
                              stem_multiplier=stem_multiplier, cell=cell, alphas=alphas)
