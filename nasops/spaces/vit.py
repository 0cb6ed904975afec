"""The ``vit`` search space: DASViT's Transformer-encoder DAG (Wu, Neri & Feng, 2025; SPEC 3).

Network (ViT, Dosovitskiy et al.): images are resized (bilinear) to
``image_size`` if they have another size (DASViT resizes CIFAR to 224), cut
into ``patch_size`` patches and embedded linearly (a stride-``patch_size``
conv), a learned CLS token is prepended and a learned position embedding
added; ``depth`` encoders follow, then a LayerNorm and a linear head on the
CLS token. Tokens are ``(B, N, C)`` with ``N = (image_size / patch_size)^2 + 1``
and ``C = embed_dim`` throughout.

Encoder (a DARTS cell on tokens, DASViT Fig. 4-6): two input states, the
outputs of the two previous encoders ``e_{k-2}``, ``e_{k-1}`` (state indices 0
and 1; the first encoder gets the embedding twice, DASViT eq. 25-27), and
``nodes`` intermediate nodes (state indices 2 .. nodes+1). Node ``i`` sums one
mixed edge from every earlier state: 5 edges for the default 2 nodes (the
paper's found encoders have two), in DARTS edge order. The encoder output is
the **sum** of the intermediate nodes (DASViT eq. 22: ``e_k = o_0 + o_1``; a
concatenation would change the width). Every encoder shares one alpha table
(cell type ``"encoder"``), as DARTS's normal cells do.

Candidate ops (:data:`VIT_OPS`, names in the DARTS style): ``none`` (Zero,
never computed), ``skip_connect`` (Identity), ``msa_h8/12/16`` (multi-head
self-attention with 8/12/16 heads) and ``mlp_r0.5/3/4`` (MLP with hidden
ratio 0.5/3/4). Choices where the paper is silent:

- MSA and MLP are pre-norm, as in ViT blocks: each op has its own LayerNorm
  before its projection; residual paths are not part of an op (the Identity
  op provides them).
- MSA: head dimension ``embed_dim // heads`` (at least 1), so that ViT-B
  (768) has 96/64/48 per head; when ``embed_dim`` is not a multiple of the
  heads (small search widths), the ``heads * head_dim`` attention width is
  projected back to ``embed_dim``. qkv with bias, ``scaled_dot_product_attention``.
- MLP: hidden width ``max(1, int(ratio * embed_dim))``, GELU.
- Initialisation as timm's ViT: linear weights and the CLS and position
  embeddings truncated-normal with std 0.02, biases 0.

Partial token selection (DASViT section III-C, SPEC 2.3), on when
``token_ratio < 1``: every mixed edge scores its input's tokens with its own
query and key projections ``W_Q, W_K`` (C x C, no bias; the score is the mean
attention ``q_i . mean_j(k_j) / sqrt(C)``) and keeps the ``floor(ratio * N)``
best, the CLS token always among them (:func:`nasops.ops.topk_tokens`,
straight-through gate by default, so that ``W_Q, W_K`` learn from the loss).
The MSA and MLP candidates run on the kept tokens only - that is where the
memory goes - and their weighted sum is scattered back to the kept rows. The
parameter-free ops act on every token: Identity contributes ``w_id * x`` to
all of them, so an unselected token gets exactly its share of the mixed edge
that needs no computation, and the scale of the token stream matches the
mixed edge without selection (passing unselected tokens through unweighted,
as PC-DARTS does with channels, would grow them by the number of edges into
a node at every encoder). The derived network has no selection.

Genotype (DARTS's rule, :func:`nasops.spaces.darts.derive_genes`): per node
the two incoming edges whose best non-Zero op has the largest weight, each
with that op - the paper's found encoders have exactly this shape. The
genotype dict also records what is needed to rebuild the network
(``embed_dim``, ``depth``, ``nodes``, ``patch_size``, ``image_size``,
``in_channels``, ``num_classes``); the op names carry the heads and ratios.
:func:`build_derived_vit` builds the discrete network from it,
:func:`build_plain_vit` the ViT of the same width and depth, and
:func:`vit_cost` counts their parameters and FLOPs analytically.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import nasops.ops
from nasops.ops._checks import first_order_only
from nasops.ops.reference import TOKEN_GATES
from nasops.spaces.base import RecomputableEdge, SearchNetwork, _autocast, _autocast_state, one_dtype
from nasops.spaces.darts import derive_genes, edge_ends, genes_str

VIT_OPS = ("none", "skip_connect", "msa_h8", "msa_h12", "msa_h16", "mlp_r0.5", "mlp_r3", "mlp_r4")
MSA_HEADS = {"msa_h8": 8, "msa_h12": 12, "msa_h16": 16}
MLP_RATIOS = {"mlp_r0.5": 0.5, "mlp_r3": 3.0, "mlp_r4": 4.0}
PARAMETER_FREE = ("none", "skip_connect")
# The op-type partition of DASViT's fairness loss (L2).
OP_TYPES = ("msa", "mlp", "parameter_free")

DEFAULT_EMBED_DIM = 48  # divisible by 8, 12 and 16: every MSA candidate has whole heads
DEFAULT_NODES = 2
DEFAULT_GRID = 4  # patches per image side when patch_size is not given


def op_type(name: str) -> str:
    """``"msa"``, ``"mlp"`` or ``"parameter_free"`` (Zero, Identity)."""
    if name in MSA_HEADS:
        return "msa"
    if name in MLP_RATIOS:
        return "mlp"
    if name in PARAMETER_FREE:
        return "parameter_free"
    raise ValueError(f"op: expected one of {VIT_OPS}, got {name!r}")


def head_dim(embed_dim: int, heads: int) -> int:
    """Width of one attention head: ``embed_dim // heads``, at least 1."""
    return max(1, embed_dim // heads)


def mlp_hidden(embed_dim: int, ratio: float) -> int:
    """Hidden width of an MLP op: ``int(ratio * embed_dim)``, at least 1."""
    return max(1, int(ratio * embed_dim))


def default_patch_size(image_size: int) -> int:
    """A 4 x 4 grid of patches (patch 2 on the 8x8 digits), or 1 for images under 4 pixels."""
    return max(1, image_size // DEFAULT_GRID)


# ---- the ops ------------------------------------------------------------------------------

class MSA(nn.Module):
    """Pre-norm multi-head self-attention: ``proj(attention(qkv(LN(x))))``, (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim(dim, heads)
        inner = heads * self.head_dim
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x):
        B, N, _ = x.shape
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward stacks the three gradients
        # once, where each index's backward zero-fills and copies a gradient of the whole
        # qkv (same values; 2-14 % of an MSA's forward + backward on the CPU).
        q, k, v = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class MLP(nn.Module):
    """Pre-norm MLP: ``fc2(GELU(fc1(LN(x))))`` with hidden width ``int(ratio * dim)``."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = mlp_hidden(dim, ratio)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


def make_vit_op(name: str, dim: int) -> nn.Module | None:
    """One candidate op; None for ``none`` (Zero), ``nn.Identity`` for ``skip_connect``."""
    if name == "none":
        return None
    if name == "skip_connect":
        return nn.Identity()
    if name in MSA_HEADS:
        return MSA(dim, MSA_HEADS[name])
    if name in MLP_RATIOS:
        return MLP(dim, MLP_RATIOS[name])
    raise ValueError(f"op: expected one of {VIT_OPS}, got {name!r}")


def _module_key(name: str) -> str:
    # nn.ModuleDict keys cannot hold dots ("mlp_r0.5").
    return name.replace(".", "_")


# ---- embedding and head -----------------------------------------------------------------

class PatchEmbedding(nn.Module):
    """Images (B, C_in, H, W) -> tokens (B, 1 + (image_size / patch_size)^2, dim), CLS first."""

    def __init__(self, in_channels: int, dim: int, image_size: int, patch_size: int):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size: expected a divisor of image_size={image_size}, got {patch_size}")
        self.image_size = image_size
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, dim))

    @property
    def tokens(self) -> int:
        return self.grid * self.grid + 1

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"x: expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)
        patches = self.proj(x).flatten(2).transpose(1, 2)  # (B, grid^2, dim)
        cls = self.cls.expand(x.shape[0], -1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.pos


def _init_vit_weights(module: nn.Module) -> None:
    """timm's ViT initialisation: truncated normal (std 0.02) linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbedding):
            nn.init.trunc_normal_(m.pos, std=0.02)
            nn.init.trunc_normal_(m.cls, std=0.02)


def _check_sizes(*, in_channels, num_classes, embed_dim, depth, nodes, image_size, patch_size):
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                        ("embed_dim", embed_dim), ("depth", depth), ("nodes", nodes),
                        ("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if image_size % patch_size:
        raise ValueError(f"patch_size: expected a divisor of image_size={image_size}, got {patch_size}")


# ---- the search network -------------------------------------------------------------------

class VitMixedEdge(RecomputableEdge):
    """A mixed edge on tokens, with DASViT's partial token selection when ``token_ratio < 1``
    (see the module docstring). Recomputation (``--recompute-edges``): see
    :class:`nasops.spaces.base.RecomputableEdge`."""

    def __init__(self, op_names: Sequence[str], dim: int, token_ratio: float = 1.0,
                 token_gate: str = "straight_through"):
        super().__init__()
        self.op_names = tuple(op_names)
        for name in self.op_names:
            op_type(name)  # an unknown name fails here, naming it
        self.ops = nn.ModuleDict({_module_key(n): make_vit_op(n, dim) for n in self.op_names
                                  if n not in PARAMETER_FREE})
        self.identity = self.op_names.index("skip_connect") if "skip_connect" in self.op_names else None
        self.token_ratio = token_ratio
        self.token_gate = token_gate
        # W_Q and W_K of the selection, one C x 2C matrix; only where there is something to save.
        self.selector = nn.Linear(dim, 2 * dim, bias=False) if token_ratio < 1.0 and len(self.ops) else None

    def _mix(self, x, weights, kept=(), shared=None):
        """``x`` (B, N, C); ``weights`` (K,) or per sample (B, K); ``kept`` is empty
        (a token edge keeps no op's output when recomputing) and ``shared`` unused
        (no token op shares anything with another edge's)."""
        if self.selector is None:
            outputs = [None if n == "none" else x if n == "skip_connect" else self.ops[_module_key(n)](x)
                       for n in self.op_names]
            return nasops.ops.mixed_op(one_dtype(outputs, x.device.type), weights)

        if torch.compiler.is_compiling():
            # Compiled (--compile): dynamo cannot trace the autograd.grad of the
            # recomputing Function; AOTAutograd's partitioner decides what to keep.
            x_sel, idx = select_tokens(x, self.selector.weight, self.token_ratio, self.token_gate)
        else:
            x_sel, idx = RecomputedSelection.apply(x, self.selector.weight, self.token_ratio, self.token_gate)
        outputs = [None if n in PARAMETER_FREE else self.ops[_module_key(n)](x_sel) for n in self.op_names]
        y_sel = nasops.ops.mixed_op(one_dtype(outputs, x.device.type), weights)  # (B, keep, C)
        if self.identity is None:
            y = torch.zeros_like(x, dtype=y_sel.dtype)
        else:
            w_id = weights[..., self.identity]
            y = (w_id.reshape(-1, 1, 1) * x).to(y_sel.dtype)
        return y.scatter_add(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), y_sel)


def select_tokens(x, weight, ratio, gate):
    """(x_sel (B, keep, C), idx (B, keep)): the tokens of ``x`` that :func:`nasops.ops.topk_tokens`
    keeps with the queries and keys ``x @ weight.T`` split in two (CLS kept), gated."""
    # Two products rather than one split in two: a half of one (B, N, 2C) product is a
    # strided view, which the op's kernels would copy (forward, recomputation, backward).
    C = x.shape[-1]
    q, k = F.linear(x, weight[:C]).to(x.dtype), F.linear(x, weight[C:]).to(x.dtype)
    x_sel, idx, _ = nasops.ops.topk_tokens(x, q, k, ratio, keep_cls=True, gate=gate)
    return x_sel, idx


class RecomputedSelection(torch.autograd.Function):
    """:func:`select_tokens`, recomputed in the backward pass.

    Differentiating through it directly would keep the (B, N, 2C) queries and
    keys of every edge until the backward pass: at ratio 0.5 about a tenth of
    the memory the selection is there to save (benchmarks/RESULTS.md, "DASViT
    search step"). The forward keeps only ``x`` (alive anyway) and the weight;
    the backward redoes the selection under the forward's autocast state (same
    tokens: it is deterministic) and differentiates it. torch.utils.checkpoint
    would do the same, but its first use imports torch._dynamo (seconds per
    process).
    """

    @staticmethod
    def forward(ctx, x, weight, ratio, gate):
        ctx.recompute = (ratio, gate, _autocast_state(x.device.type))
        ctx.save_for_backward(x, weight)
        x_sel, idx = select_tokens(x, weight, ratio, gate)
        ctx.mark_non_differentiable(idx)
        return x_sel, idx

    @staticmethod
    @first_order_only("the vit search network's token selection (recomputed in the backward)",
                      "select no tokens (token_ratio=1, --token-ratio 1)")
    def backward(ctx, grad_x_sel, grad_idx):
        x, weight = ctx.saved_tensors
        ratio, gate, autocast = ctx.recompute
        need_x, need_weight = ctx.needs_input_grad[:2]
        with torch.enable_grad(), _autocast(autocast):
            x = x.detach().requires_grad_(need_x)
            weight = weight.detach().requires_grad_(need_weight)
            x_sel, _ = select_tokens(x, weight, ratio, gate)
            # A scalar, not grad_outputs=: autograd.grad with a gradient tensor imports
            # torch.fx's symbolic shapes (seconds) on first use.
            acc = torch.promote_types(x_sel.dtype, torch.float32)
            product = (x_sel.to(acc) * grad_x_sel.to(acc)).sum()
            grads = iter(torch.autograd.grad(product, [t for t in (x, weight) if t.requires_grad]))
        return (next(grads) if need_x else None), (next(grads) if need_weight else None), None, None


class VitSearchEncoder(nn.Module):
    """One searched encoder: ``nodes`` nodes over mixed edges from every earlier state."""

    def __init__(self, edge_ops, nodes, dim, token_ratio, token_gate):
        super().__init__()
        self.nodes = nodes
        self.edges = nn.ModuleList(VitMixedEdge(names, dim, token_ratio, token_gate) for names in edge_ops)

    def forward(self, s0, s1, weights):
        """``weights``: (edges, K) or per sample (B, edges, K)."""
        states = [s0, s1]
        e = 0
        for _ in range(self.nodes):
            node = None
            for h in states:
                out = self.edges[e](h, weights[..., e, :])
                node = out if node is None else node + out
                e += 1
            states.append(node)
        return sum(states[2:])


class VitSearchNetwork(SearchNetwork):
    """The DASViT search network (see the module docstring).

    Args:
        in_channels, num_classes: of the data set.
        embed_dim: token width C (ViT-B: 768).
        depth: encoders.
        nodes: intermediate nodes per encoder (default 2).
        image_size: side of the images the patch embedding sees (others are resized).
        patch_size: side of a patch (default: :func:`default_patch_size`).
        edge_ops: per edge, the candidate op names (default: all of :data:`VIT_OPS`);
            every edge must have the same number of ops (one alpha table).
        token_ratio: share of the tokens the MSA/MLP candidates see, in (0, 1]
            (1: no selection).
        token_gate: the gate of :func:`nasops.ops.topk_tokens`.
    """

    space = "vit"
    cell_types = ("encoder",)

    def __init__(self, *, in_channels: int, num_classes: int, embed_dim: int = DEFAULT_EMBED_DIM,
                 depth: int = 2, nodes: int = DEFAULT_NODES, image_size: int = 32,
                 patch_size: int | None = None, edge_ops: Sequence[Sequence[str]] | None = None,
                 token_ratio: float = 1.0, token_gate: str = "straight_through"):
        super().__init__()
        if patch_size is None:
            patch_size = default_patch_size(image_size)
        _check_sizes(in_channels=in_channels, num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                     nodes=nodes, image_size=image_size, patch_size=patch_size)
        if isinstance(token_ratio, bool) or not isinstance(token_ratio, (int, float)) \
                or not 0.0 < token_ratio <= 1.0:
            raise ValueError(f"token_ratio: expected a share of the tokens in (0, 1], got {token_ratio!r}")
        if token_gate not in TOKEN_GATES:
            raise ValueError(f"token_gate: expected one of {TOKEN_GATES}, got {token_gate!r}")
        self._edge_ends = edge_ends(nodes)
        n_edges = len(self._edge_ends)
        ops = [tuple(VIT_OPS)] * n_edges if edge_ops is None else [tuple(names) for names in edge_ops]
        if len(ops) != n_edges:
            raise ValueError(f"edge_ops: expected {n_edges} edges for {nodes} nodes, got {len(ops)}")
        if len({len(names) for names in ops}) != 1 or not ops[0]:
            raise ValueError(f"edge_ops: every edge needs the same, non-zero number of ops, got "
                             f"{[len(names) for names in ops]}")
        if any(all(n == "none" for n in names) for names in ops):
            raise ValueError("edge_ops: every edge needs an op other than 'none'")
        self._edge_ops = {"encoder": ops}
        self.settings = dict(in_channels=in_channels, num_classes=num_classes, embed_dim=embed_dim,
                             depth=depth, nodes=nodes, image_size=image_size, patch_size=patch_size,
                             token_ratio=float(token_ratio), token_gate=token_gate)

        self.embed = PatchEmbedding(in_channels, embed_dim, image_size, patch_size)
        self.encoders = nn.ModuleList(VitSearchEncoder(ops, nodes, embed_dim, float(token_ratio), token_gate)
                                      for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        _init_vit_weights(self)
        # DARTS initialises the alphas to 1e-3 * N(0, 1): nearly uniform mixing.
        self.alphas_encoder = nn.Parameter(1e-3 * torch.randn(n_edges, len(ops[0])))

    @property
    def depth(self) -> int:
        return len(self.encoders)

    def edge_cells(self) -> list[nn.Module]:
        """The encoders (every one holds mixed edges; all see the same tokens)."""
        return list(self.encoders)

    def forward(self, x, weights=None):
        """Logits (B, num_classes); ``weights`` optionally overrides the mixing
        weights (see :meth:`SearchNetwork.mixing_weights`)."""
        mixing = self.mixing_weights(weights)["encoder"]
        s0 = s1 = self.embed(x)
        for encoder in self.encoders:
            s0, s1 = s1, encoder(s0, s1, mixing)
        return self.head(self.norm(s1[:, 0]))

    def genotype(self) -> dict:
        """``{"encoder": [[op, input state], ...] (two per node), "encoder_sum": [2, ...],
        "embed_dim", "depth", "nodes", "patch_size", "image_size", "in_channels", "num_classes"}``."""
        nodes = self.settings["nodes"]
        names = self.op_names("encoder")
        table = [[edge["ops"][n] for n in edge_names]
                 for edge, edge_names in zip(self.edge_weights()["encoder"], names)]
        genotype = {"encoder": derive_genes(table, names, nodes),
                    "encoder_sum": list(range(2, 2 + nodes))}
        genotype.update({k: self.settings[k] for k in ("embed_dim", "depth", "nodes", "patch_size",
                                                       "image_size", "in_channels", "num_classes")})
        return genotype

    def genotype_str(self) -> str:
        """``encoder=|op~j|op~j|+|...|`` (the genes of ``genotype()``)."""
        return f"encoder={genes_str(self.genotype()['encoder'], self.settings['nodes'])}"

    def grown(self, depth: int, keep: int | None) -> "VitSearchNetwork":
        """The next stage of a progressive search (DASViT Algorithm 1): a network of
        ``depth`` encoders whose edges keep their ``keep`` strongest ops (None: all),
        inheriting every weight of this one that it still has (the embedding, the
        head, the kept ops of the first ``self.depth`` encoders, the selectors) and
        the alphas of the kept ops. New encoders are initialised afresh (from the
        global RNG). Returns a new network on this one's device."""
        if depth < self.depth:
            raise ValueError(f"depth: a later stage cannot be shallower, got {depth} < {self.depth}")
        names = self.op_names("encoder")
        kept = [list(range(len(n))) for n in names] if keep is None else \
            prune_ops(self.alphas_encoder.detach(), names, keep)
        edge_ops = [[n[i] for i in cols] for n, cols in zip(names, kept)]
        device = self.alphas_encoder.device
        new = VitSearchNetwork(**{**self.settings, "depth": depth, "edge_ops": edge_ops}).to(device)
        old_state = self.state_dict()
        new_state = new.state_dict()
        inherited = {k: v for k, v in old_state.items()
                     if k in new_state and k != "alphas_encoder" and v.shape == new_state[k].shape}
        new.load_state_dict(inherited, strict=False)
        with torch.no_grad():
            columns = torch.tensor(kept, device=device)
            new.alphas_encoder.copy_(torch.gather(self.alphas_encoder.detach(), 1, columns))
        return new


def prune_ops(alphas: torch.Tensor, op_names: Sequence[Sequence[str]], keep: int) -> list[list[int]]:
    """Per edge, the columns of its ``keep`` strongest ops (by alpha, hence by softmax
    weight; ties to the earlier op), in their original order. Zero competes like any
    op; ``keep >= 2`` leaves every edge an op other than Zero."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 2:
        raise ValueError(f"keep: expected an int >= 2 (ops kept per edge), got {keep!r}")
    if alphas.dim() != 2 or alphas.shape[0] != len(op_names):
        raise ValueError(f"alphas: expected shape ({len(op_names)}, K), got {tuple(alphas.shape)}")
    if keep > alphas.shape[1]:
        raise ValueError(f"keep: the edges have {alphas.shape[1]} ops, cannot keep {keep}")
    order = torch.sort(alphas.float().cpu(), dim=1, descending=True, stable=True).indices
    return [sorted(row[:keep].tolist()) for row in order]


def build_vit(*, in_channels, num_classes, C=DEFAULT_EMBED_DIM, layers=2, nodes=DEFAULT_NODES,
              stem_multiplier=None, image_size=32, patch_size=None, edge_ops=None, token_ratio=1.0,
              token_gate="straight_through") -> VitSearchNetwork:
    """The ``vit`` space through :func:`nasops.spaces.build`: ``C`` is the embedding
    dimension, ``layers`` the depth; ``stem_multiplier`` is unused."""
    return VitSearchNetwork(in_channels=in_channels, num_classes=num_classes, embed_dim=C, depth=layers,
                            nodes=nodes, image_size=image_size, patch_size=patch_size, edge_ops=edge_ops,
                            token_ratio=token_ratio, token_gate=token_gate)


# ---- discrete networks ------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """Patch embedding, ``encoders`` (each maps the two previous outputs to the next),
    LayerNorm and a linear head on the CLS token."""

    def __init__(self, encoders: Sequence[nn.Module], *, in_channels: int, num_classes: int,
                 embed_dim: int, image_size: int, patch_size: int):
        super().__init__()
        self.embed = PatchEmbedding(in_channels, embed_dim, image_size, patch_size)
        self.encoders = nn.ModuleList(encoders)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        _init_vit_weights(self)

    def forward(self, x):
        s0 = s1 = self.embed(x)
        for encoder in self.encoders:
            s0, s1 = s1, encoder(s0, s1)
        return self.head(self.norm(s1[:, 0]))


class DerivedEncoder(nn.Module):
    """A found encoder: node i = sum of its genes' ops on their input states; output = sum of nodes."""

    def __init__(self, genes: Sequence[Sequence], nodes: int, dim: int):
        super().__init__()
        self.genes = [(str(op), int(j)) for op, j in genes]
        self.nodes = nodes
        self.ops = nn.ModuleList(make_vit_op(op, dim) for op, _ in self.genes)

    def forward(self, s0, s1):
        states = [s0, s1]
        per_node = len(self.genes) // self.nodes
        for i in range(self.nodes):
            genes = range(per_node * i, per_node * (i + 1))
            states.append(sum(self.ops[g](states[self.genes[g][1]]) for g in genes))
        return sum(states[2:])


class PlainViTBlock(nn.Module):
    """A ViT encoder block: ``x + MSA(x)``, then ``+ MLP``; uses the previous output only."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.msa = MSA(dim, heads)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, s0, s1):
        x = s1 + self.msa(s1)
        return x + self.mlp(x)


GENOTYPE_KEYS = ("encoder", "embed_dim", "depth", "nodes", "patch_size", "image_size", "in_channels",
                 "num_classes")


def check_genotype(genotype: dict) -> None:
    """ValueError naming what is wrong unless ``genotype`` is a ``vit`` genotype
    (:meth:`VitSearchNetwork.genotype`)."""
    if not isinstance(genotype, dict):
        raise TypeError(f"genotype: expected a dict (a vit genotype), got {type(genotype).__name__}")
    missing = [k for k in GENOTYPE_KEYS if k not in genotype]
    if missing:
        raise ValueError(f"genotype: not a vit genotype, it lacks {missing} (has {sorted(genotype)})")
    nodes, genes = genotype["nodes"], genotype["encoder"]
    if not isinstance(genes, (list, tuple)) or len(genes) != 2 * nodes:
        raise ValueError(f"genotype['encoder']: expected {2 * nodes} genes [op, input] (two per node "
                         f"for nodes={nodes}), got {genes!r}")
    for g, gene in enumerate(genes):
        if not isinstance(gene, (list, tuple)) or len(gene) != 2:
            raise ValueError(f"genotype['encoder'][{g}]: expected [op, input state], got {gene!r}")
        op, j = gene
        if op not in VIT_OPS or op == "none":
            raise ValueError(f"genotype['encoder'][{g}]: expected an op of {VIT_OPS[1:]}, got {op!r}")
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < 2 + g // 2:
            raise ValueError(f"genotype['encoder'][{g}]: node {g // 2} takes input states "
                             f"0..{1 + g // 2}, got {j!r}")


def _sizes(genotype: dict, overrides: dict) -> dict:
    sizes = {k: genotype[k] for k in GENOTYPE_KEYS if k != "encoder"}
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    _check_sizes(**sizes)
    return sizes


def build_derived_vit(genotype: dict, *, depth: int | None = None, num_classes: int | None = None,
                      in_channels: int | None = None, image_size: int | None = None,
                      patch_size: int | None = None, embed_dim: int | None = None) -> VisionTransformer:
    """The discrete ViT of a ``vit`` genotype (``genotype.json``'s ``genotype``): every
    encoder is the found one (:class:`DerivedEncoder`), no token selection, fresh
    weights. Every size defaults to the genotype's (the search's); pass e.g.
    ``depth=12`` to train the found encoder at ViT-B depth, as DASViT does."""
    check_genotype(genotype)
    s = _sizes(genotype, dict(depth=depth, num_classes=num_classes, in_channels=in_channels,
                              image_size=image_size, patch_size=patch_size, embed_dim=embed_dim))
    encoders = [DerivedEncoder(genotype["encoder"], s["nodes"], s["embed_dim"]) for _ in range(s["depth"])]
    return VisionTransformer(encoders, in_channels=s["in_channels"], num_classes=s["num_classes"],
                             embed_dim=s["embed_dim"], image_size=s["image_size"], patch_size=s["patch_size"])


# ViT-B's encoder: what build_plain_vit builds by default, as op names for the cost model.
PLAIN_VIT_HEADS, PLAIN_VIT_MLP_RATIO = 12, 4
PLAIN_VIT_OPS = (f"msa_h{PLAIN_VIT_HEADS}", f"mlp_r{PLAIN_VIT_MLP_RATIO}")


def build_plain_vit(*, in_channels: int, num_classes: int, embed_dim: int, depth: int, image_size: int,
                    patch_size: int, heads: int = PLAIN_VIT_HEADS,
                    mlp_ratio: float = PLAIN_VIT_MLP_RATIO) -> VisionTransformer:
    """A plain pre-norm ViT (ViT-B/16 at 768, depth 12, patch 16, 224)."""
    _check_sizes(in_channels=in_channels, num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                 nodes=1, image_size=image_size, patch_size=patch_size)
    blocks = [PlainViTBlock(embed_dim, heads, mlp_ratio) for _ in range(depth)]
    return VisionTransformer(blocks, in_channels=in_channels, num_classes=num_classes, embed_dim=embed_dim,
                             image_size=image_size, patch_size=patch_size)


# ---- parameters and FLOPs ------------------------------------------------------------------

def op_cost(name: str, dim: int, tokens: int) -> tuple[int, int]:
    """(parameters, FLOPs) of one op on ``tokens`` tokens of width ``dim``.

    FLOPs are multiply-accumulates (ViT-B/16 at 224 x 224: 17.6 G): every linear
    layer (tokens x in x out) and both attention products (Q K^T and A V:
    tokens^2 x heads x head_dim each). Not counted: LayerNorm, softmax, GELU,
    biases, additions (each O(tokens x dim)). DASViT's Table I counts FLOPs some
    way it does not state (ViT-B/16 12.0 G, its encoder 9.9 G): parameters agree
    with it (85.8 M, 50.4 M), FLOPs and their ratios do not.
    """
    if name in PARAMETER_FREE:
        return 0, 0
    if name in MSA_HEADS:
        inner = MSA_HEADS[name] * head_dim(dim, MSA_HEADS[name])
        params = 2 * dim + (dim * 3 * inner + 3 * inner) + (inner * dim + dim)
        flops = tokens * dim * 3 * inner + 2 * tokens * tokens * inner + tokens * inner * dim
        return params, flops
    if name in MLP_RATIOS:
        hidden = mlp_hidden(dim, MLP_RATIOS[name])
        return 2 * dim + (dim * hidden + hidden) + (hidden * dim + dim), 2 * tokens * dim * hidden
    raise ValueError(f"op: expected one of {VIT_OPS}, got {name!r}")


def vit_cost(encoder_ops: Sequence[str], *, in_channels: int, num_classes: int, embed_dim: int, depth: int,
             image_size: int, patch_size: int) -> dict:
    """``{"params", "flops"}`` of a ViT whose ``depth`` encoders each apply the ops
    ``encoder_ops`` once (see :func:`op_cost` for what a FLOP is). The patch
    embedding counts ``patches x (in_channels * patch^2) x dim`` (the conv), the
    head ``dim x num_classes`` (CLS token only); the CLS and position embeddings
    and the final LayerNorm count as parameters."""
    grid = image_size // patch_size
    tokens = grid * grid + 1
    patch_in = in_channels * patch_size * patch_size
    params = (patch_in * embed_dim + embed_dim) + embed_dim + tokens * embed_dim  # conv, CLS, position
    flops = grid * grid * patch_in * embed_dim
    for name in encoder_ops:
        p, f = op_cost(name, embed_dim, tokens)
        params += depth * p
        flops += depth * f
    params += 2 * embed_dim + embed_dim * num_classes + num_classes  # final LayerNorm, head
    flops += embed_dim * num_classes
    return {"params": params, "flops": flops}


def derived_cost(genotype: dict, **overrides) -> dict:
    """:func:`vit_cost` of :func:`build_derived_vit` (same keyword overrides)."""
    check_genotype(genotype)
    s = _sizes(genotype, overrides)
    return vit_cost([op for op, _ in genotype["encoder"]], in_channels=s["in_channels"],
                    num_classes=s["num_classes"], embed_dim=s["embed_dim"], depth=s["depth"],
                    image_size=s["image_size"], patch_size=s["patch_size"])


def plain_vit_cost(genotype: dict, **overrides) -> dict:
    """:func:`vit_cost` of the plain ViT (MSA-12 + MLP-4 per encoder) of the genotype's sizes."""
    check_genotype(genotype)
    s = _sizes(genotype, overrides)
    return vit_cost(PLAIN_VIT_OPS, in_channels=s["in_channels"], num_classes=s["num_classes"],
                    embed_dim=s["embed_dim"], depth=s["depth"], image_size=s["image_size"],
                    patch_size=s["patch_size"])


__all__ = ["VIT_OPS", "OP_TYPES", "op_type", "VitSearchNetwork", "VitMixedEdge", "prune_ops", "build_vit",
           "build_derived_vit", "build_plain_vit", "check_genotype", "op_cost", "vit_cost",
           "derived_cost", "plain_vit_cost"]
