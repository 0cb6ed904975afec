"""The RobustDARTS spaces S1-S4 (Zela et al., ICLR 2020).

The DARTS search network (:mod:`nasops.spaces.darts`) with reduced candidate
sets per edge, read from ``nasops/spaces/data/rdarts_spaces.json`` (transcribed from
automl/RobustDARTS; see nasops/spaces/data/README.md):
S1 its own pair of ops per edge, S2 {skip_connect, sep_conv_3x3},
S3 {none, skip_connect, sep_conv_3x3}, S4 {noise, sep_conv_3x3}.
The genotype rule is DARTS' (the Zero op, where present, is never chosen);
``noise`` is a regular op and can be chosen - that is the failure S4 probes.
The spaces are defined for 4 intermediate nodes (14 edges).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from nasops.spaces.darts import DartsCell, DartsSearchNetwork

SPACES_FILE = Path(__file__).resolve().parent / "data" / "rdarts_spaces.json"
RDARTS_SPACES = ("s1", "s2", "s3", "s4")


@lru_cache(maxsize=None)
def _load() -> dict:
    with open(SPACES_FILE) as f:
        return json.load(f)


def edge_ops(variant: str) -> dict[str, list[list[str]]]:
    """``{"normal": [[op, ...] per edge], "reduce": [...]}`` of RobustDARTS space ``variant``."""
    if variant not in RDARTS_SPACES:
        raise ValueError(f"variant: expected one of {RDARTS_SPACES}, got {variant!r}")
    spec = _load()[variant]
    return {t: [list(ops) for ops in spec[t]] for t in ("normal", "reduce")}


def build_rdarts(variant, *, in_channels, num_classes, C=16, layers=8, nodes=4, stem_multiplier=3,
                 cell=DartsCell, alphas=True):
    if nodes != 4:
        raise ValueError(f"nodes: the RobustDARTS spaces define 14 edges (4 nodes), got nodes={nodes}")
    return DartsSearchNetwork(f"rdarts-{variant}", edge_ops(variant), in_channels=in_channels,
                              num_classes=num_classes, C=C, layers=layers, nodes=nodes,
                              stem_multiplier=stem_multiplier, cell=cell, alphas=alphas)
