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
- ``vit``: the DASViT Transformer-encoder DAG (8 ops, 2 nodes, 5 edges per
  encoder); ``C`` = embedding dimension, ``layers`` = encoders (default 2),
  ``nodes`` = intermediate nodes (default 2); keyword options ``image_size``,
  ``patch_size``, ``edge_ops``, ``token_ratio``, ``token_gate``
  (:mod:`nasops.spaces.vit`, which also builds the derived discrete ViT).

Every network is a :class:`SearchNetwork`: ``arch_parameters()`` (the alphas),
``weight_parameters()``, ``op_names(cell_type)``, ``edge_weights()``,
``genotype()``, ``genotype_str()``. Pictures: :mod:`nasops.spaces.plot`.
"""
from __future__ import annotations

from nasops.spaces.base import SearchNetwork
from nasops.spaces.darts import build_darts
from nasops.spaces.nb201 import build_nb201
from nasops.spaces.rdarts import build_rdarts
from nasops.spaces.vit import DEFAULT_EMBED_DIM, build_vit

SPACES = ("darts", "nb201", "rdarts-s1", "rdarts-s2", "rdarts-s3", "rdarts-s4", "vit")

# Cells in the search network when ``layers`` is not given: DARTS' 8 cells,
# NB201's N = 5 cells per stage, DASViT's first-stage 2 encoders.
DEFAULT_LAYERS = {"nb201": 5, "vit": 2}
DEFAULT_LAYERS.update({s: 8 for s in SPACES if s not in DEFAULT_LAYERS})
# Nodes per cell when ``nodes`` is not given (nb201 counts its input node).
DEFAULT_NODES = {"vit": 2}
DEFAULT_NODES.update({s: 4 for s in SPACES if s not in DEFAULT_NODES})


def build(name: str, *, in_channels: int, num_classes: int, C: int | None = None, layers: int | None = None,
          nodes: int | None = None, stem_multiplier: int = 3, cell=None, alphas: bool = True,
          **options) -> SearchNetwork:
    """The search network of space ``name`` (one of :data:`SPACES`).

    Args:
        in_channels, num_classes: of the data set.
        C: initial channels (default 16, as DARTS and NB201 search); vit: the
            embedding dimension (default 48).
        layers: darts/rdarts: number of cells (default 8); nb201: cells per
            stage (default 5); vit: encoders (default 2).
        nodes: darts/rdarts: intermediate nodes per cell (4); nb201: nodes per
            cell including the input node (4); vit: intermediate nodes per encoder (2).
        stem_multiplier: darts/rdarts stem width is ``stem_multiplier * C``;
            unused by nb201 and vit.
        cell: darts/rdarts/nb201: the cell module to build the network from, called with the
            arguments of the space's own (``darts.DartsCell`` for darts/rdarts,
            ``nb201.NB201Cell`` for nb201, which a replacement must subclass);
            None = the space's own. MIDAS passes its cells here.
        alphas: False builds no alpha tables: the cells compute their own op
            weights and get ``None`` as weights (MIDAS without a prior).
        options: vit only: ``image_size``, ``patch_size``, ``edge_ops``,
            ``token_ratio``, ``token_gate`` (:class:`nasops.spaces.vit.VitSearchNetwork`).
    """
    if name not in SPACES:
        raise ValueError(f"space: expected one of {SPACES}, got {name!r}")
    if C is None:
        C = DEFAULT_EMBED_DIM if name == "vit" else 16
    if layers is None:
        layers = DEFAULT_LAYERS[name]
    if nodes is None:
        nodes = DEFAULT_NODES[name]
    kwargs = dict(in_channels=in_channels, num_classes=num_classes, C=C, layers=layers, nodes=nodes,
                  stem_multiplier=stem_multiplier)
    if name == "vit":
        if cell is not None or not alphas:
            raise TypeError("cell, alphas: the vit space builds its own encoders and alphas")
        return build_vit(**kwargs, **options)
    if options:
        raise TypeError(f"options: space {name!r} takes none, got {sorted(options)}")
    kwargs["alphas"] = alphas
    if cell is not None:
        kwargs["cell"] = cell
    if name == "darts":
        return build_darts(**kwargs)
    if name == "nb201":
        return build_nb201(**kwargs)
    return build_rdarts(name.split("-", 1)[1], **kwargs)


def from_args(args, data, **overrides) -> SearchNetwork:
    """The search network the driver's flags describe (``--space`` and its size
    flags) for ``data`` (an ImageDataset); ``overrides`` replace or add keyword
    arguments of :func:`build` (a method's own, e.g. DASViT's depth and token ratio)."""
    if args.space == "vit":
        image_size = args.input_size or data.image_size
        if args.patch_size is not None and image_size % args.patch_size:
            raise ValueError(f"--patch-size: expected a divisor of the image size {image_size} "
                             f"(--input-size, or the data's), got {args.patch_size}")
        kwargs = dict(C=args.embed_dim, layers=args.layers, nodes=args.encoder_nodes, image_size=image_size,
                      patch_size=args.patch_size)
    else:
        kwargs = dict(C=args.init_channels, layers=args.layers)
    kwargs.update(overrides)
    return build(args.space, in_channels=data.in_channels, num_classes=data.num_classes, **kwargs)


__all__ = ["SPACES", "DEFAULT_LAYERS", "DEFAULT_NODES", "SearchNetwork", "build", "from_args"]
