"""The NAS-Bench-201 search space (Dong & Yang, ICLR 2020) and its accuracy table.

Cell: nodes 0..3 (``nodes`` = 4 counts the input node 0); node ``j`` sums one
mixed edge from every node ``i < j``: 6 edges, in the order of the NB201
architecture string (``1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2``; ``edge_weights()``
names them ``"0->1"``, ...). The cell output is node 3. Ops: ``none,
skip_connect, nor_conv_1x1, nor_conv_3x3, avg_pool_3x3`` (ReLU-Conv-BN convs).

Network (NB201's ``TinyNetworkDarts``): stem conv 3x3 to ``C`` channels + BN,
three stages of ``layers`` cells (NB201: N = 5) with C, 2C, 4C channels,
separated by stride-2 ResNet basic blocks, then BN-ReLU, global average
pooling and a linear classifier. All cells share one alpha table (6, 5), cell
type ``"normal"``. The input's height and width must be divisible by 4.

Genotype: per edge the argmax over all 5 ops, ``none`` included (NB201's rule),
as the architecture string
``|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|``.
"""
from __future__ import annotations

import csv
import gzip
import os
import zlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

from nasops.spaces.base import MixedEdge, SearchNetwork, share_ops
from nasops.spaces.operations import NB201_OPS, ResNetBasicBlock, make_nb201_op

# The table that ships with nasops (data/README.md says where it comes from): all
# 15,625 cells, the four columns below of NATS-Bench's export, gzipped.
BUILTIN_TABLE = Path(__file__).resolve().parent / "data" / "nb201_test_accuracy.csv.gz"
NUM_ARCHITECTURES = 5 ** 6  # 5 ops on each of 6 edges

# Columns of the table (../shared/data/nb201_test_accuracy.csv) -> our data set names.
TABLE_COLUMNS = {
    "cifar10": "CIFAR10TestAccuracy200Epochs",
    "cifar100": "CIFAR100TestAccuracy200Epochs",
    "imagenet16-120": "ImageNetTestAccuracy200Epochs",
}
ARCH_COLUMN = "ArchitectureString"


# ---- the architecture string ----------------------------------------------------------

def parse_arch(arch: str) -> list[list[tuple[str, int]]]:
    """``"|op~0|+|op~0|op~1|+|..."`` -> per node j = 1, 2, ...: ``[(op, input i), ...]`` for i < j.

    Raises ValueError naming the problem for a malformed string or an unknown op.
    """
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch: expected an NB201 architecture string, got {arch!r}")
    nodes = []
    for j, node in enumerate(arch.split("+"), start=1):
        if not (node.startswith("|") and node.endswith("|")) or len(node) < 2:
            raise ValueError(f"arch: node {j} {node!r} must look like |op~0|op~1|... in {arch!r}")
        genes = []
        for i, gene in enumerate(node[1:-1].split("|")):
            op, sep, src = gene.partition("~")
            if not sep or op not in NB201_OPS or src != str(i):
                raise ValueError(f"arch: node {j} gene {gene!r} must be <op>~{i} with op in "
                                 f"{NB201_OPS}, in {arch!r}")
            genes.append((op, i))
        if len(genes) != j:
            raise ValueError(f"arch: node {j} must have {j} genes (one per earlier node), "
                             f"got {len(genes)} in {arch!r}")
        nodes.append(genes)
    return nodes


def format_arch(nodes: Sequence[Sequence[Sequence]]) -> str:
    """Inverse of :func:`parse_arch`: per node ``[(op, input), ...]`` -> the NB201 string."""
    return "+".join("|" + "|".join(f"{op}~{i}" for op, i in node) + "|" for node in nodes)


def derive_arch(weights: Sequence[Sequence[float]], op_names: Sequence[str] = NB201_OPS,
                nodes: int = 4) -> str:
    """NB201's rule: the argmax op of every edge (``none`` included; ties: the first op)."""
    genes = []
    e = 0
    for j in range(1, nodes):
        node = []
        for i in range(j):
            row = list(weights[e])
            node.append((op_names[row.index(max(row))], i))
            e += 1
        genes.append(node)
    return format_arch(genes)


# ---- the accuracy table --------------------------------------------------------------

@lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float) -> dict[str, dict]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in (ARCH_COLUMN, *TABLE_COLUMNS.values())
                       if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path} lacks the NB201 table columns {missing} "
                                 f"(has {reader.fieldnames})")
            table = {}
            for row in reader:
                try:
                    table[row[ARCH_COLUMN]] = {name: float(row[col]) for name, col in TABLE_COLUMNS.items()}
                except (TypeError, ValueError):
                    raise ValueError(f"{path} line {reader.line_num}: expected an architecture "
                                     f"string and three accuracies, got {row}") from None
            return table
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error, csv.Error) as exc:
        raise ValueError(f"{path} is not a CSV table ({type(exc).__name__}: {exc})") from None


def load_table(path: str | os.PathLike = BUILTIN_TABLE) -> dict[str, dict]:
    """Read an NB201 accuracy CSV (``.gz`` too; by default the one shipped with
    nasops): ``{arch string: {"cifar10": .., "cifar100": .., "imagenet16-120": ..}}``
    (200-epoch test accuracies in percent). Cached per file. A file that is not
    such a table raises ValueError naming the file and what is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: NB201 table {path!r} does not exist (the CSV with columns "
                                f"{ARCH_COLUMN}, {', '.join(TABLE_COLUMNS.values())})")
    try:
        return _read_table(path)
    except ValueError as exc:
        raise ValueError(f"path: {exc}") from None


def _read_table(path: str) -> dict[str, dict]:
    """The table of an existing file, cached; ValueError naming the file otherwise
    (each caller says which argument or flag gave it)."""
    return _load_cached(os.path.abspath(path), os.path.getmtime(path))


def checked_table(path: str | os.PathLike | None) -> str:
    """The table a command line names (None: the one shipped with nasops), read
    now so that a wrong file stops a run before it starts: ValueError in one
    line when it is missing, not a CSV table, or not all of NAS-Bench-201."""
    path = os.fspath(path) if path is not None else str(BUILTIN_TABLE)
    if not os.path.isfile(path):
        raise ValueError(f"no such file {path!r} (the NB201 accuracy CSV)")
    table = _read_table(path)
    if len(table) != NUM_ARCHITECTURES:
        raise ValueError(f"{path} has {len(table)} architectures, expected all {NUM_ARCHITECTURES} "
                         f"of NAS-Bench-201")
    return path


def lookup(arch: str, path_or_table: str | os.PathLike | Mapping[str, dict] = BUILTIN_TABLE,
           ) -> dict[str, float]:
    """The test accuracies of ``arch``: ``{"cifar10": .., "cifar100": .., "imagenet16-120": ..}``.

    Raises ValueError for a malformed string, KeyError for a valid one the table lacks.
    """
    parse_arch(arch)
    table = path_or_table if isinstance(path_or_table, Mapping) else load_table(path_or_table)
    if arch not in table:
        raise KeyError(f"arch: {arch!r} is not in the NB201 table ({len(table)} architectures)")
    return dict(table[arch])


# ---- the search network --------------------------------------------------------------

def edge_ends(nodes: int) -> list[tuple[int, int]]:
    """(source node, destination node) of every edge, in NB201 string order."""
    return [(i, j) for j in range(1, nodes) for i in range(j)]


class NB201Cell(nn.Module):
    def __init__(self, C, nodes):
        super().__init__()
        self.nodes = nodes
        self.edges = nn.ModuleList(MixedEdge(NB201_OPS, [make_nb201_op(n, C) for n in NB201_OPS])
                                   for _ in edge_ends(nodes))
        share_ops(self.edges, [i for i, _ in edge_ends(nodes)])

    def forward(self, x, weights):
        """``weights``: (edges, 5) or per sample (B, edges, 5)."""
        states = [x]
        shared = [{}]  # per state: the outputs its edges share (share_ops)
        e = 0
        for j in range(1, self.nodes):
            node = None
            for i in range(j):
                out = self.edge_output(e, states[i], weights, shared[i])
                node = out if node is None else node + out
                e += 1
            states.append(node)
            shared.append({})
        return states[-1]

    def edge_output(self, e: int, x, weights, shared=None):
        """Edge ``e``'s output on ``x``: its mixed sum with row ``e`` of the cell's
        weights (a cell with other edges, MIDAS's, overrides this alone); ``shared``:
        the dict of ``x``'s state (:meth:`MixedEdge.forward`)."""
        return self.edges[e](x, weights[..., e, :], shared)


def build_macro(net: nn.Module, *, in_channels: int, num_classes: int, C: int, layers: int, make_cell) -> None:
    """NB201's macro network (xautodl's ``TinyNetwork``) as modules of ``net``:
    ``stem`` (3x3 conv, BN); ``cells``: three stages of ``layers`` cells
    (``make_cell(C_stage)``, C_stage = C, 2C, 4C), a stride-2 ResNet block before
    the second and the third; ``lastact`` (BN, ReLU), ``global_pooling``,
    ``classifier``. One definition for the search network and the discrete
    :class:`~nasops.spaces.discrete.NB201Network`: the same module names (state
    dict keys) and the same order of initialisation."""
    net.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
    net.cells = nn.ModuleList()
    C_prev = C
    for stage, C_stage in enumerate((C, 2 * C, 4 * C)):
        if stage > 0:
            net.cells.append(ResNetBasicBlock(C_prev, C_stage, 2))
        net.cells.extend(make_cell(C_stage) for _ in range(layers))
        C_prev = C_stage
    net.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=False))
    net.global_pooling = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Linear(C_prev, num_classes)


class NB201SearchNetwork(SearchNetwork):
    """The NB201 search network (see the module doc).

    ``cell``: the cell module, called with :class:`NB201Cell`'s arguments (default
    NB201Cell; a replacement must subclass it: the forward tells cells from the
    ResNet blocks by type). ``alphas``: False builds no alpha table (see
    :class:`SearchNetwork`).
    """

    cell_types = ("normal",)

    def __init__(self, *, in_channels, num_classes, C=16, layers=5, nodes=4, cell=NB201Cell, alphas=True):
        super().__init__()
        self.space = "nb201"
        self.has_alphas = alphas
        self.nodes = nodes
        self._edge_ends = edge_ends(nodes)
        self._edge_ops = {"normal": [NB201_OPS] * len(self._edge_ends)}
        build_macro(self, in_channels=in_channels, num_classes=num_classes, C=C, layers=layers,
                    make_cell=lambda C_stage: cell(C_stage, nodes))
        if alphas:
            self.alphas_normal = nn.Parameter(1e-3 * torch.randn(len(self._edge_ends), len(NB201_OPS)))

    def forward(self, x, weights=None):
        """Logits (B, num_classes); ``weights`` optionally overrides the mixing
        weights (see :meth:`SearchNetwork.mixing_weights`)."""
        mixing = self.mixing_weights(weights)["normal"]
        feature = self.stem(x)
        for cell in self.cells:
            feature = cell(feature, mixing) if isinstance(cell, NB201Cell) else cell(feature)
        return self.classifier(self.global_pooling(self.lastact(feature)).flatten(1))

    def genotype(self) -> dict:
        """``{"arch": "|op~0|+|op~0|op~1|+|..."}`` (NB201's argmax rule)."""
        probs = [list(edge["ops"].values()) for edge in self.edge_weights()["normal"]]
        return {"arch": derive_arch(probs, NB201_OPS, self.nodes)}

    def genotype_str(self) -> str:
        return self.genotype()["arch"]


def build_nb201(*, in_channels, num_classes, C=16, layers=5, nodes=4, stem_multiplier=None, cell=NB201Cell,
                alphas=True):
    """``layers`` = cells per stage (NB201: 5); ``stem_multiplier`` is unused (NB201's stem has C channels)."""
    return NB201SearchNetwork(in_channels=in_channels, num_classes=num_classes, C=C, layers=layers,
                              nodes=nodes, cell=cell, alphas=alphas)
