"""The discrete networks of found cells, trained from scratch by ``nasops.train``.

- :class:`DartsNetwork` (spaces ``darts`` and ``rdarts-s1`` .. ``rdarts-s4``):
  DARTS' ``NetworkCIFAR`` (``darts/cnn/model.py``). Stem conv 3x3 to
  ``stem_multiplier * C`` channels + BN, ``layers`` cells built from the
  genotype's genes (the normal cell, or the reduction cell at ``layers // 3``
  and ``2 * layers // 3`` with doubled channels), global average pooling, a
  linear classifier; optionally the auxiliary head after cell ``2 * layers // 3``
  (:class:`AuxiliaryHead`). Ops are the search's (``make_darts_op``) in their
  training form: affine BN, bare pools (``search=False``). Drop-path
  (:func:`drop_path`) hits every op of a cell except the identity, with the
  probability ``drop_path_prob`` the trainer sets per epoch.
- :class:`NB201Network` (space ``nb201``): NAS-Bench-201's ``TinyNetwork`` with
  its ``InferCell``: stem conv 3x3 to C + BN, three stages of ``layers`` cells
  (C, 2C, 4C channels) separated by stride-2 ResNet basic blocks, BN-ReLU,
  global average pooling, a linear classifier. Affine BN, convs without bias.

``none`` genes are DARTS' / NB201's Zero op (:class:`Zero`: zeros of the
output's shape, no parameters). The genotypes are the JSON forms the search
writes (``genotype.json``'s ``genotype``); :func:`darts_cells` and
:func:`nasops.spaces.nb201.parse_arch` check them and say what is wrong.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nasops.spaces import nb201, rdarts
from nasops.spaces.darts import darts_stack, edge_ends, reduction_cells
from nasops.spaces.nb201 import parse_arch
from nasops.spaces.operations import DARTS_OPS, FactorizedReduce, ReLUConvBN, make_darts_op, make_nb201_op

DARTS_CELL_TYPES = ("normal", "reduce")
# DARTS V2 (second order), as printed in DARTS' cnn/genotypes.py: the paper's cell, for
# comparisons with a found one (the tests' parameter counts, benchmarks/bench_train_step.py).
DARTS_V2 = {
    "normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1], ["sep_conv_3x3", 0], ["sep_conv_3x3", 1],
               ["sep_conv_3x3", 1], ["skip_connect", 0], ["skip_connect", 0], ["dil_conv_3x3", 2]],
    "normal_concat": [2, 3, 4, 5],
    "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1], ["skip_connect", 2], ["max_pool_3x3", 1],
               ["max_pool_3x3", 0], ["skip_connect", 2], ["skip_connect", 2], ["max_pool_3x3", 1]],
    "reduce_concat": [2, 3, 4, 5],
}


def drop_path(x: torch.Tensor, drop_prob: float | torch.Tensor) -> torch.Tensor:
    """DARTS' drop-path: zero whole samples with probability ``drop_prob`` and
    scale the kept ones by ``1 / (1 - drop_prob)``, so the expectation is ``x``.

    One Bernoulli draw per sample from the global RNG of ``x``'s device (the
    trainer reseeds it per epoch). Out of place, unlike DARTS' ``div_``/``mul_``,
    so it is safe on any autograd graph.

    ``drop_prob`` may be a 0-d tensor on ``x``'s device (``nasops.train
    --cuda-graphs``): a CUDA graph replays the kernels it captured, so the
    probability must be read on the device, not by the host; the draws are made
    then even at 0 (every sample kept: ``x`` itself, as values), and the value is
    not checked.
    """
    if isinstance(drop_prob, torch.Tensor):
        keep = (1.0 - drop_prob).to(x.dtype)
    elif drop_prob <= 0.0:
        return x
    elif not drop_prob < 1.0:
        raise ValueError(f"drop_prob: expected a probability in [0, 1), got {drop_prob}")
    else:
        keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class Zero(nn.Module):
    """The Zero op of a trained cell: zeros shaped like the op's output (stride 1 or 2)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, ::self.stride, ::self.stride].mul(0.0)


# ---- DARTS / RobustDARTS ----------------------------------------------------------------

def darts_edge_ops(space: str, nodes: int) -> dict[str, list[tuple[str, ...]]]:
    """The candidate ops of every edge of ``space`` (``darts`` or ``rdarts-sN``), per cell type."""
    if space == "darts":
        return {t: [DARTS_OPS] * len(edge_ends(nodes)) for t in DARTS_CELL_TYPES}
    variant = space.split("-", 1)[1] if space.startswith("rdarts-") else None
    if variant not in rdarts.RDARTS_SPACES:
        raise ValueError(f"space: expected darts or rdarts-s1 .. rdarts-s4, got {space!r}")
    if nodes != 4:
        raise ValueError(f"genotype: the {space} cells have 4 nodes (8 genes), got {2 * nodes} genes")
    return {t: [tuple(ops) for ops in edges] for t, edges in rdarts.edge_ops(variant).items()}


def darts_cells(genotype: Mapping, space: str = "darts") -> dict:
    """Check a DARTS-form genotype of ``space``; returns it normalised:
    ``{"normal": [(op, input), ...], "normal_concat": [..], "reduce": ..., "reduce_concat": ...}``.

    Two genes per node; node i (0-based) takes inputs 0 .. i + 1 (the two cell
    inputs, then earlier nodes); each gene's op must be a candidate of its edge
    in ``space``; ``*_concat`` lists distinct states (0 .. nodes + 1). Both cell
    types need the same number of nodes. Raises ValueError saying what is wrong.
    """
    if not isinstance(genotype, Mapping):
        raise ValueError(f"genotype: expected an object with the keys normal, normal_concat, reduce, "
                         f"reduce_concat (a {space} cell), got {type(genotype).__name__}")
    for key in ("normal", "normal_concat", "reduce", "reduce_concat"):
        if key not in genotype:
            raise ValueError(f"genotype: missing key {key!r} (a {space} genotype has normal, "
                             f"normal_concat, reduce, reduce_concat; got {sorted(genotype)})")
    result = {}
    nodes = None
    for t in DARTS_CELL_TYPES:
        genes = genotype[t]
        if (not isinstance(genes, Sequence) or isinstance(genes, str) or len(genes) < 2
                or len(genes) % 2):
            raise ValueError(f"genotype[{t!r}]: expected a list of [op, input] genes, two per node, "
                             f"got {genes!r}")
        if nodes is not None and len(genes) // 2 != nodes:
            raise ValueError(f"genotype: the normal cell has {nodes} nodes, the reduce cell "
                             f"{len(genes) // 2}; both need the same number")
        nodes = len(genes) // 2
        edge_ops = darts_edge_ops(space, nodes)[t]
        checked = []
        for g, gene in enumerate(genes):
            node = g // 2
            if (not isinstance(gene, Sequence) or isinstance(gene, str) or len(gene) != 2
                    or not isinstance(gene[0], str) or isinstance(gene[1], bool) or not isinstance(gene[1], int)):
                raise ValueError(f"genotype[{t!r}] gene {g}: expected [op, input], got {gene!r}")
            op, src = gene
            if not 0 <= src < node + 2:
                raise ValueError(f"genotype[{t!r}] gene {g} {list(gene)}: node {node} takes inputs "
                                 f"0 .. {node + 1}, got {src}")
            candidates = edge_ops[sum(2 + k for k in range(node)) + src]
            if op not in candidates:
                raise ValueError(f"genotype[{t!r}] gene {g} {list(gene)}: {op!r} is not an op of this "
                                 f"edge in space {space} (candidates: {', '.join(candidates)})")
            checked.append((op, src))
        concat = genotype[f"{t}_concat"]
        if (not isinstance(concat, Sequence) or isinstance(concat, str) or not concat
                or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < nodes + 2 for s in concat)
                or len(set(concat)) != len(concat)):
            raise ValueError(f"genotype[{t + '_concat'!r}]: expected distinct states 0 .. {nodes + 1}, "
                             f"got {concat!r}")
        result[t], result[f"{t}_concat"] = checked, list(concat)
    return result


class DartsTrainCell(nn.Module):
    """A cell of :class:`DartsNetwork`: DARTS' ``model.Cell``."""

    def __init__(self, genes, concat, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:  # c_{k-2} has twice the resolution of c_{k-1}
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=True)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=True)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=True)
        self.inputs = [src for _, src in genes]
        self.concat = list(concat)
        self.ops = nn.ModuleList()
        for op, src in genes:
            stride = 2 if reduction and src < 2 else 1
            module = make_darts_op(op, C, stride, search=False)
            self.ops.append(Zero(stride) if module is None else module)
        # DARTS drops every op's output but the identity's.
        self._droppable = [not isinstance(op, nn.Identity) for op in self.ops]

    @property
    def multiplier(self) -> int:
        return len(self.concat)

    def forward(self, s0, s1, drop_prob: float = 0.0):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(len(self.ops) // 2):
            total = None
            for k in (2 * node, 2 * node + 1):
                h = self.ops[k](states[self.inputs[k]])
                if self.training and self._droppable[k]:
                    h = drop_path(h, drop_prob)  # x itself at a probability of 0.0
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS' ``AuxiliaryHeadCIFAR``: ReLU, 5x5 average pool (stride 3) to 2x2, conv
    1x1 to 128 + BN + ReLU, conv 2x2 to 768 + BN + ReLU, linear classifier.

    DARTS assumes an 8x8 input (CIFAR after two reductions). On any other size
    the 5x5/stride-3 pool is replaced by an adaptive average pool to 2x2 (the
    8x8 case is unchanged; the parameters are the same either way).
    """

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = F.relu(x)
        if x.shape[-2:] == (8, 8):
            x = F.avg_pool2d(x, 5, stride=3, padding=0, count_include_pad=False)
        else:
            x = F.adaptive_avg_pool2d(x, 2)
        return self.classifier(self.features(x).flatten(1))


class DartsNetwork(nn.Module):
    """DARTS' ``NetworkCIFAR`` for a DARTS-form genotype (see the module doc).

    ``forward(x)`` returns the logits; in training mode with the auxiliary head,
    ``(logits, auxiliary logits)``. ``drop_path_prob`` (0 at construction; a float,
    or a 0-d device tensor under ``nasops.train --cuda-graphs``, see :func:`drop_path`) is
    the drop-path probability of the next forward passes in training mode.
    Parameters of the head are named ``auxiliary_head.*`` (DARTS leaves them out
    of the reported parameter count; so does ``nasops.train``).
    """

    def __init__(self, genotype: Mapping, *, space: str = "darts", in_channels: int, num_classes: int,
                 C: int = 36, layers: int = 20, auxiliary: bool = False, stem_multiplier: int = 3):
        super().__init__()
        if C < 1 or layers < 1:
            raise ValueError(f"C, layers: expected >= 1, got C={C}, layers={layers}")
        cells = darts_cells(genotype, space)
        self.genotype = cells
        self.drop_path_prob = 0.0
        self.aux_position = reduction_cells(layers)[1]  # after the second reduction, as DARTS

        def make_cell(t, *sizes):
            cell = DartsTrainCell(cells[t], cells[f"{t}_concat"], *sizes)
            return cell, cell.multiplier * sizes[2]

        self.stem, self.cells, channels = darts_stack(in_channels, C, layers, stem_multiplier, make_cell)
        C_prev = channels[-1]
        C_aux = channels[self.aux_position]
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x):
        logits_aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_position and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return logits if logits_aux is None else (logits, logits_aux)


# ---- NAS-Bench-201 ----------------------------------------------------------------------

class NB201TrainCell(nn.Module):
    """NB201's ``InferCell``: node j sums op(node i) over its genes; Zero genes add nothing
    (a node whose genes are all Zero is zeros)."""

    def __init__(self, nodes: Sequence[Sequence[tuple[str, int]]], C: int):
        super().__init__()
        self.wiring = []  # per node: [(op index, input node)] of its non-Zero genes
        self.ops = nn.ModuleList()
        for genes in nodes:
            live = []
            for op, src in genes:
                module = make_nb201_op(op, C, search=False)
                if module is not None:
                    live.append((len(self.ops), src))
                    self.ops.append(module)
            self.wiring.append(live)

    def forward(self, x):
        states = [x]
        for live in self.wiring:
            if not live:
                states.append(x.mul(0.0))
                continue
            total = None
            for k, src in live:
                h = self.ops[k](states[src])
                total = h if total is None else total + h
            states.append(total)
        return states[-1]


class NB201Network(nn.Module):
    """NAS-Bench-201's ``TinyNetwork`` for an architecture string (see the module doc).

    ``layers`` = cells per stage (NB201: N = 5, C = 16). ``forward(x)`` returns the logits.
    """

    def __init__(self, arch: str, *, in_channels: int, num_classes: int, C: int = 16, layers: int = 5):
        super().__init__()
        if C < 1 or layers < 1:
            raise ValueError(f"C, layers: expected >= 1, got C={C}, layers={layers}")
        nodes = parse_arch(arch)
        self.arch = arch
        nb201.build_macro(self, in_channels=in_channels, num_classes=num_classes, C=C, layers=layers,
                          make_cell=lambda C_stage: NB201TrainCell(nodes, C_stage))

    def forward(self, x):
        feature = self.stem(x)
        for cell in self.cells:
            feature = cell(feature)
        return self.classifier(self.global_pooling(self.lastact(feature)).flatten(1))
