"""The pictures of a MIDAS search (:mod:`nasops.methods.midas`), PNG via
matplotlib's object API (``Figure`` rendered by Agg, pyplot's state left alone,
as in :mod:`nasops.spaces.plot`):

- :func:`plot_class_weights`: per edge a heatmap classes x ops of the mean op
  weights of each class's validation samples;
- :func:`plot_unimodality`: per edge the share of validation samples whose
  argmax is the decoded op;
- :func:`plot_mosaic`: validation images with each patch coloured by the op it
  picks on one edge.
"""
from __future__ import annotations

import math
import os

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from nasops.ops.reference import patch_map


def plot_class_weights(edges: list[dict], samples_per_class: list[int], path, title: str = "") -> str:
    """One heatmap (classes x ops) per edge; ``edges`` as in
    ``midas_class_weights.json``: ``{"edge", "ops", "weights": per class a row or None}``."""
    if not edges:
        raise ValueError("edges: expected a non-empty list of {'edge', 'ops', 'weights'} entries")
    columns = min(len(edges), 5)
    rows = math.ceil(len(edges) / columns)
    n_classes = len(samples_per_class)
    n_ops = max(len(e["ops"]) for e in edges)
    fig = Figure(figsize=(columns * (0.9 + 0.32 * n_ops), rows * (1.3 + 0.2 * n_classes) + 0.6))
    axes = fig.subplots(rows, columns, squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")  # classes without samples
    tables = [np.array([row if row is not None else [np.nan] * len(entry["ops"]) for row in entry["weights"]],
                       dtype=float) for entry in edges]
    # One colour scale for all edges, up to the largest weight (early in a search
    # every weight is near 1/K: a 0..1 scale would show one flat colour).
    vmax = max(float(np.nanmax(t)) if np.isfinite(t).any() else 0.0 for t in tables) or 1.0
    image = None
    for ax, entry, table in zip(axes.flat, edges, tables):
        image = ax.imshow(np.ma.masked_invalid(table), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_title(entry["edge"], fontsize=8)
        ax.set_xticks(range(len(entry["ops"])), entry["ops"], rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(n_classes), [str(c) for c in range(n_classes)], fontsize=6)
    for ax in axes.flat[len(edges):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("class", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="mean op weight")
    fig.savefig(path, dpi=100)
    return os.fspath(path)


def plot_unimodality(unimodality: dict[str, list[dict]], path, title: str = "") -> str:
    """Horizontal bars per cell type: for each edge the share of samples whose
    argmax is its decoded op (``{cell type: [{"edge", "op", "share"}]}``)."""
    if not unimodality or not all(unimodality.values()):
        raise ValueError("unimodality: expected {cell type: non-empty list of {'edge', 'op', 'share'}}")
    types = list(unimodality)
    n_edges = max(len(v) for v in unimodality.values())
    fig = Figure(figsize=(4.6 * len(types), 1.0 + 0.32 * n_edges))
    axes = fig.subplots(1, len(types), squeeze=False)[0]
    for ax, t in zip(axes, types):
        entries = unimodality[t]
        shares = [e["share"] for e in entries]
        y = np.arange(len(entries))
        ax.barh(y, shares, color="#4c72b0")
        for i, e in enumerate(entries):
            ax.text(min(e["share"], 1.0) + 0.02, i, f"{e['op']} {e['share']:.2f}", va="center", fontsize=7)
        ax.set_yticks(y, [e["edge"] for e in entries], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.45)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_xlabel("share of validation samples")
        ax.set_title(f"{t} cell", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return os.fspath(path)


def plot_mosaic(mosaic: dict, path) -> str:
    """Validation images, each patch tinted with the colour of the op it picks.

    ``mosaic``: ``images`` (n, C, H, W) float, ``picks`` (n, P) op indices,
    ``op_names``, and ``summary`` with ``edge``, ``grid`` (of the edge's map)
    and ``map_size`` (the edge's output map; the mosaic is stretched onto the
    image by the ratio of the sizes) and per sample its ``label``.
    """
    images, picks, names = mosaic["images"], mosaic["picks"], mosaic["op_names"]
    summary = mosaic["summary"]
    n = images.shape[0]
    if n == 0:
        raise ValueError("mosaic: expected at least one image")
    height, width = summary["map_size"]
    grid = tuple(summary["grid"])
    patch_of_pixel = patch_map(height, width, grid).numpy()  # (h, w) on the edge's map
    colors = matplotlib.colormaps["tab10"].colors
    palette = np.array([colors[k % len(colors)] for k in range(len(names))])
    columns = min(n, 4)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(2.1 * columns, 2.4 * rows + 0.9))
    axes = fig.subplots(rows, columns, squeeze=False)
    H, W = images.shape[2:]
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i].permute(1, 2, 0).numpy()
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img[..., :3], cmap="gray", extent=(0, W, H, 0),
                  interpolation="nearest")
        overlay = palette[picks[i].numpy()[patch_of_pixel]]  # (h, w, 3)
        ax.imshow(overlay, alpha=0.45, extent=(0, W, H, 0), interpolation="nearest")
        for r in range(1, grid[0]):  # patch borders, in image coordinates
            row = next(h for h in range(height) if h * grid[0] // height == r) * H / height
            ax.axhline(row, color="white", lw=1)
        for c in range(1, grid[1]):
            col = next(w for w in range(width) if w * grid[1] // width == c) * W / width
            ax.axvline(col, color="white", lw=1)
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_title(f"class {summary['samples'][i]['label']}", fontsize=8)
    used = sorted({int(k) for k in picks.reshape(-1).tolist()})
    fig.legend(handles=[Patch(color=palette[k], label=names[k]) for k in used], loc="lower center",
               ncol=min(len(used), 4), fontsize=7, frameon=False)
    fig.suptitle(f"op picked per patch on edge {summary['edge']} (grid {grid[0]}x{grid[1]})", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=100)
    return os.fspath(path)
