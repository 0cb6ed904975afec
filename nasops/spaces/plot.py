"""Pictures of searched cells and of their op weights (PNG).

- :func:`plot_cell`: the derived cell as a DAG, edges labelled with their op.
  DARTS/RobustDARTS: inputs ``c_{k-2}``, ``c_{k-1}``, nodes 0..n-1 and the
  output ``c_{k}`` (the concatenation of the nodes). vit (a genotype with
  ``<type>_sum``): ``e_{k-2}``, ``e_{k-1}`` and ``e_{k}``, the sum of the
  nodes. NB201: nodes 0..3, node 3 the output; ``none`` edges are not drawn.
- :func:`plot_edge_weights`: a heatmap edges x ops of the softmax weights
  (``SearchNetwork.edge_weights()[cell_type]``); ops an edge lacks are blank.

Figures are made with matplotlib's object API (``Figure``, rendered by Agg): no
screen needed, and pyplot's global state (the user's backend, open figures) is
left alone.
"""
from __future__ import annotations

import os

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from nasops.spaces.nb201 import parse_arch

_INPUT_COLOR = "#a6cee3"
_NODE_COLOR = "#ffffb3"
_OUTPUT_COLOR = "#b2df8a"


def _cell_graph(genotype: dict, cell_type: str):
    """Nodes {key: (label, color)} in drawing order and edges [(src, dst, op)]."""
    if "arch" in genotype:  # NB201: node j <- every i < j
        arch = parse_arch(genotype["arch"])
        n = len(arch) + 1
        nodes = {i: (str(i), _INPUT_COLOR if i == 0 else _OUTPUT_COLOR if i == n - 1 else _NODE_COLOR)
                 for i in range(n)}
        edges = [(i, j, op) for j, genes in enumerate(arch, start=1) for op, i in genes if op != "none"]
        return nodes, edges
    if cell_type not in genotype:
        raise ValueError(f"cell_type: genotype has no {cell_type!r} cell "
                         f"(has {sorted(k for k in genotype if not k.endswith('_concat'))})")
    genes = genotype[cell_type]
    n = len(genes) // 2
    # A vit encoder sums its nodes into e_k (``<type>_sum``); a DARTS cell concatenates them.
    summed = f"{cell_type}_sum" in genotype
    state = "e" if summed else "c"
    nodes = {0: (f"{state}_{{k-2}}", _INPUT_COLOR), 1: (f"{state}_{{k-1}}", _INPUT_COLOR)}
    nodes.update({2 + i: (str(i), _NODE_COLOR) for i in range(n)})
    nodes["out"] = (f"{state}_{{k}}", _OUTPUT_COLOR)
    edges = [(j, 2 + g // 2, op) for g, (op, j) in enumerate(genes)]
    concat = genotype.get(f"{cell_type}_sum" if summed else f"{cell_type}_concat", range(2, 2 + n))
    edges += [(s, "out", "") for s in concat]
    return nodes, edges


def _layout(nodes, edges):
    """Positions by rank, as graphviz's left-to-right layout would: inputs (DARTS) or
    node 0 (NB201) at rank 0, every other node one rank right of its furthest
    input, the output last; nodes of one rank stacked vertically."""
    darts = "out" in nodes
    rank = {}
    if darts:
        rank[0] = rank[1] = 0
        for key in nodes:
            if key not in (0, 1, "out"):
                rank[key] = 1 + max((rank[s] for s, d, _ in edges if d == key), default=0)
        rank["out"] = 1 + max(rank.values())
    else:  # NB201: the nodes in order, on a zigzag so that long edges miss them
        rank = {key: i for i, key in enumerate(nodes)}
    columns: dict[int, list] = {}
    for key in nodes:
        columns.setdefault(rank[key], []).append(key)
    pos = {}
    for r, keys in columns.items():
        for i, key in enumerate(keys):
            y = (len(keys) - 1) / 2.0 - i
            if not darts and 0 < r < len(nodes) - 1:
                y = 0.7 if r % 2 else -0.7
            pos[key] = (2.2 * r, 1.4 * y)
    return pos


def _arc(p1, p2, pos):
    """The curvature (matplotlib's arc3 ``rad``) of an edge: straight unless a node
    lies in its way, else bowed away from the nodes in the way."""
    (x1, y1), (x2, y2) = p1, p2
    dx, dy = x2 - x1, y2 - y1
    length = (dx * dx + dy * dy) ** 0.5
    side = 0.0  # > 0: the nodes in the way lie left of the edge's direction
    blocked = 0
    for x, y in pos.values():
        t = ((x - x1) * dx + (y - y1) * dy) / length ** 2
        cross = dx * (y - y1) - dy * (x - x1)
        if 0.05 < t < 0.95 and abs(cross) / length < 0.5:
            blocked += 1
            side += cross
    if not blocked:
        return 0.0
    # arc3's control point is the midpoint + rad * (dy, -dx): a positive rad bows to
    # the right of the direction of travel.
    magnitude = 0.2 + 0.06 * blocked
    return magnitude if side > 0 else -magnitude


def _bezier(p1, control, p2, t):
    return tuple((1 - t) ** 2 * a + 2 * t * (1 - t) * c + t ** 2 * b for a, c, b in zip(p1, control, p2))


def _label_spot(p1, control, p2, op, labels, pos):
    """Where on its edge the label ``op`` goes: the point nearest the middle among
    those that overlap least with the labels already placed and with the nodes
    (boxes in data units: 1 unit = 0.95 inch, 8 pt text)."""
    half_w, half_h = 0.04 * len(op) + 0.05, 0.1

    def overlap(x, y):
        boxes = [(lx, ly, 0.04 * len(lop) + 0.05, 0.1) for lx, ly, lop in labels]
        boxes += [(nx, ny, 0.32, 0.2) for nx, ny in pos.values()]
        return sum(max(0.0, w + half_w - abs(x - bx)) * max(0.0, h + half_h - abs(y - by))
                   for bx, by, w, h in boxes)

    spots = [_bezier(p1, control, p2, t) for t in (0.5, 0.4, 0.6, 0.3, 0.7, 0.22, 0.78, 0.15, 0.85)]
    return min(spots, key=lambda spot: overlap(*spot))  # min() keeps the first of ties


def plot_cell(genotype: dict, cell_type: str, path: str | os.PathLike, title: str | None = None) -> str:
    """Draw the derived cell ``cell_type`` of ``genotype`` (a ``SearchNetwork.genotype()``)
    to the PNG ``path``; returns the path. NB201 genotypes ignore ``cell_type``."""
    nodes, edges = _cell_graph(genotype, cell_type)
    pos = _layout(nodes, edges)
    # Geometry first, in data units; the axes get an equal aspect so that arc3 (which
    # bends in display space) draws the same curves as computed here.
    curves, labels = [], []
    extent = list(pos.values())
    for src, dst, op in edges:
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        rad = _arc(pos[src], pos[dst], pos)
        control = ((x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1))
        curves.append((pos[src], pos[dst], rad, bool(op)))
        extent.append(_bezier(pos[src], control, pos[dst], 0.5))
        if op:
            labels.append((*_label_spot(pos[src], control, pos[dst], op, labels, pos), op))
    xs = [p[0] for p in extent]
    ys = [p[1] for p in extent]
    xlim, ylim = (min(xs) - 0.9, max(xs) + 0.9), (min(ys) - 0.5, max(ys) + 0.5)
    scale = 0.95  # inches per data unit
    fig = Figure(figsize=(scale * (xlim[1] - xlim[0]), scale * (ylim[1] - ylim[0]) + 0.5))
    ax = fig.add_axes((0, 0, 1, (ylim[1] - ylim[0]) / (ylim[1] - ylim[0] + 0.5 / scale)))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.axis("off")
    for p1, p2, rad, live in curves:
        ax.add_patch(FancyArrowPatch(p1, p2, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                     mutation_scale=14, shrinkA=17, shrinkB=17, lw=1.3, zorder=1,
                                     color="#555555" if live else "#bbbbbb"))
    for x, y, op in labels:
        ax.text(x, y, op, fontsize=8, ha="center", va="center", zorder=3,
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
    for key, (label, color) in nodes.items():
        x, y = pos[key]
        text = f"${label}$" if "_" in label else label
        ax.text(x, y, text, fontsize=11, ha="center", va="center", zorder=4,
                bbox=dict(boxstyle="round,pad=0.45", fc=color, ec="#333333"))
    fig.suptitle(title or (f"{cell_type} cell" if "arch" not in genotype else "NB201 cell"),
                 y=1 - 0.15 / fig.get_figheight())
    fig.savefig(path, dpi=110)
    return os.fspath(path)


def plot_edge_weights(edge_weights: list[dict], path: str | os.PathLike, title: str = "",
                      ops: list[str] | None = None) -> str:
    """Heatmap (edges x ops) of one cell type's ``edge_weights()`` entry to the PNG ``path``.

    ``ops``: the columns in order (default: the ops in order of appearance)."""
    if not edge_weights:
        raise ValueError("edge_weights: expected a non-empty list of {'edge', 'ops'} entries")
    present = {op for entry in edge_weights for op in entry["ops"]}
    if ops is not None and not present <= set(ops):
        raise ValueError(f"ops: expected every op of edge_weights, lacks {sorted(present - set(ops))}")
    ops = list(ops) if ops is not None else []
    for entry in edge_weights:
        ops += [op for op in entry["ops"] if op not in ops]
    table = np.full((len(edge_weights), len(ops)), np.nan)
    for r, entry in enumerate(edge_weights):
        for op, w in entry["ops"].items():
            table[r, ops.index(op)] = w
    fig = Figure(figsize=(1.0 + 0.9 * len(ops), 1.2 + 0.38 * len(edge_weights)))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")  # ops an edge lacks
    image = ax.imshow(np.ma.masked_invalid(table), cmap=cmap, vmin=0.0, vmax=np.nanmax(table),
                      aspect="auto")
    for r in range(table.shape[0]):
        for c in range(table.shape[1]):
            if not np.isnan(table[r, c]):
                best = table[r, c] == np.nanmax(table[r])
                ax.text(c, r, f"{table[r, c]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if table[r, c] > 0.6 * np.nanmax(table) else "white",
                        fontweight="bold" if best else "normal")
    ax.set_xticks(range(len(ops)), ops, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(edge_weights)), [e["edge"] for e in edge_weights], fontsize=8)
    ax.set_xlabel("op")
    ax.set_ylabel("edge (source -> destination state)")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="softmax weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return os.fspath(path)
