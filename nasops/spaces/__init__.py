"""Search spaces (SPEC 3): one-shot search networks whose every mixed edge runs
through :func:`nasops.ops.mixed_op`, so the backend (``nasops.set_backend``) is a
one-flag choice.

Spaces:
- ``darts``: the DARTS CNN cell (8 ops, 4 nodes, 14 edges); ``layers`` cells
  (default 8) with reductions at 1/3 and 2/3; ``nodes`` intermediate nodes.
- ``rdarts-s1`` .. ``rdarts-s4``: the DARTS network with the RobustDARTS
  per-edge op lists (nasops/spaces/data/rdarts_spaces.json); ``nodes`` must be 4.
- ``nb201``: the NAS-Bench-201 cell (5 ops, 4 nodes incl. the input, 6 edges);
  ``layers`` = cells per stage (default 5, as NB201), 3 stages;
  ``stem_multiplier`` unused.

Every network is a :class:`SearchNetwork`: ``arch_parameters()`` (the alphas),
``weight_parameters()``, ``op_names(cell_type)``, ``edge_weights()``,
``genotype()``, ``genotype_str()``. Pictures: :mod:`nasops.spaces.plot`.
"""
from __future__ import annotations

from nasops.spaces.base import SearchNetwork
from nasops.spaces.darts import build_darts
from nasops.spaces.nb201 import build_nb201
from nasops.spaces.rdarts import build_rdarts

SPACES = ("darts", "nb201", "rdarts-s1", "rdarts-s2", "rdarts-s3", "rdarts-s4")

# Cells in the search network when ``layers`` is not given: DARTS' 8 cells,
# NB201's N = 5 cells per stage.
DEFAULT_LAYERS = {"nb201": 5}
DEFAULT_LAYERS.update({s: 8 for s in SPACES if s != "nb201"})


def build(name: str, *, in_channels: int, num_classes: int, C: int = 16, layers: int | None = None,
          nodes: int = 4, stem_multiplier: int = 3, cell=None, alphas: bool = True) -> SearchNetwork:
    """The search network of space ``name`` (one of :data:`SPACES`).

    Args:
        in_channels, num_classes: of the data set.
        C: initial channels (DARTS and NB201 search: 16).
        layers: darts/rdarts: number of cells (default 8); nb201: cells per
            stage (default 5).
        nodes: darts/rdarts: intermediate nodes per cell (4); nb201: nodes per
            cell including the input node (4).
        stem_multiplier: darts/rdarts stem width is ``stem_multiplier * C``;
            unused by nb201.
        cell: the cell module to build the network from, called with the
            arguments of the space's own (``darts.DartsCell`` for darts/rdarts,
            ``nb201.NB201Cell`` for nb201, which a replacement must subclass);
            None = the space's own. MIDAS passes its cells here.
        alphas: False builds no alpha tables: the cells compute their own op
            weights and get ``None`` as weights (MIDAS without a prior).
    """
    if name not in SPACES:
        raise ValueError(f"space: expected one of {SPACES}, got {name!r}")
    if layers is None:
        layers = DEFAULT_LAYERS[name]
    kwargs = dict(in_channels=in_channels, num_classes=num_classes, C=C, layers=layers, nodes=nodes,
                  stem_multiplier=stem_multiplier, alphas=alphas)
    if cell is not None:
        kwargs["cell"] = cell
    if name == "darts":
        return build_darts(**kwargs)
    if name == "nb201":
        return build_nb201(**kwargs)
    return build_rdarts(name.split("-", 1)[1], **kwargs)


__all__ = ["SPACES", "DEFAULT_LAYERS", "SearchNetwork", "build"]
