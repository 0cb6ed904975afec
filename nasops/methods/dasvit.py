"""DASViT (Wu, Neri & Feng, 2025): differentiable search of Vision Transformer encoders (SPEC 4.3).

The DARTS bilevel loop (:class:`nasops.methods.darts.Darts`: one architecture
step on a validation batch, then one weight step on a training batch; first
order, or ``--second-order`` as DASViT's Algorithm 1 writes it) on the ``vit``
space (:mod:`nasops.spaces.vit`), with DASViT's three additions:

- **Partial token selection** (section III-C): in the search network every
  mixed edge keeps the ``floor(token_ratio * N)`` tokens of highest mean
  attention score (CLS always kept) for its MSA and MLP candidates
  (:func:`nasops.ops.topk_tokens`; see the ``vit`` space for what the other
  tokens get). The derived network has none.
- **Operation fairness** (section III-D, eqs. 16-19): the architecture loss is
  ``L_val + L_fair`` with ``L_fair = a L1 + b L2``. ``L1`` is the mean softmax
  weight of the Identity (skip) ops over every edge that has one.
  ``L2 = sum_T zeta1 max(0, alpha_T - gamma_max) + zeta2 max(0, gamma_min - alpha_T)``
  with ``alpha_T`` the summed softmax weight of the ops of type T on an edge,
  types MSA / MLP / parameter-free (Zero, Identity). The paper writes L2 for
  one op set; we take it per edge, over the types that edge has, and average
  over the edges (so that, like L1, it does not grow with the number of
  edges). The paper gives no values for a, b, gamma and zeta; the defaults
  (a = b = 1, gamma in [0.2, 0.6], zeta1 = zeta2 = 1) leave the uniform start
  (MSA 3/8, MLP 3/8, parameter-free 2/8) unpenalised. ``a = b = 0`` is DARTS.
  The paper partitions every op into a type, so Zero and Identity form one
  too: where MSA and MLP hold more than 1 - gamma_min of an edge, L2's lower
  bound raises Zero and Identity together, against L1's push on Identity
  (``--fair-gamma-min 0`` drops the lower bound, for every type).
- **Progressive stages** (Algorithm 1): depth 2 -> 4 -> 6 encoders, keeping
  all -> the top 5 -> the top 3 ops of every edge (by alpha, the Zero op
  competing like the others). At a stage's first epoch the network is rebuilt
  deeper and pruned (:meth:`VitSearchNetwork.grown`): it inherits the
  embedding, the head, the kept ops' weights of the encoders it had and their
  alphas; new encoders start afresh. The stage depends on the epoch alone, so
  ``--resume`` (which rebuilds the checkpoint's stage in
  :meth:`load_state_dict`) and data parallel runs take the same path.

Optimisation (section IV-A): weights AdamW, lr 1e-3, weight decay 5e-2, cosine
annealing. Where the paper is silent: as in P-DARTS, every stage starts fresh
optimizers (its parameters changed) and its own cosine over its epochs; the
architecture optimizer is DARTS's Adam (3e-4, betas (0.5, 0.999), wd 1e-3);
gradients are clipped as in DARTS (``--grad-clip``). With ``--second-order``
the virtual step is Algorithm 1's gradient step ``w - xi (grad L_train + wd w)``
(xi the current learning rate), not an AdamW step.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nasops import spaces
from nasops.methods.darts import Darts
from nasops.ops.reference import TOKEN_GATES
from nasops.runtime import write_text
from nasops.spaces import vit
from nasops.spaces.vit import OP_TYPES, VIT_OPS, VitSearchNetwork, op_type

DEFAULT_STAGE_DEPTHS = (2, 4, 6)
DEFAULT_STAGE_KEEP = (5, 3)


@dataclass(frozen=True)
class Stage:
    """One stage of the progressive search: ``depth`` encoders, ``keep`` ops per edge
    (None: as the previous stage left them, all at the start), ``epochs`` epochs
    from ``first_epoch`` (0-based)."""

    depth: int
    keep: int | None
    epochs: int
    first_epoch: int


def plan_stages(depths, keeps, epochs) -> list[Stage]:
    """The stages of ``depths`` (one per stage), ``keeps`` (ops kept from stage 2 on:
    one fewer) and ``epochs`` (one per stage)."""
    if not depths or len(keeps) != len(depths) - 1 or len(epochs) != len(depths):
        raise ValueError(f"stages: expected one depth and one epoch count per stage and one keep count per "
                         f"stage after the first, got depths {list(depths)}, keeps {list(keeps)}, "
                         f"epochs {list(epochs)}")
    stages, first = [], 0
    for i, (depth, n) in enumerate(zip(depths, epochs)):
        stages.append(Stage(int(depth), None if i == 0 else int(keeps[i - 1]), int(n), first))
        first += n
    return stages


@functools.lru_cache(maxsize=None)
def _fairness_masks(op_names: tuple[tuple[str, ...], ...], device: torch.device):
    """(op type masks (T, E, K), skip_connect mask (E, K), skip_connect count) of
    :func:`fairness_terms`, made once per op set and device: built every step, their
    host-to-device copies and the count's read would each wait for the queued kernels."""
    types = torch.tensor([[OP_TYPES.index(op_type(n)) for n in names] for names in op_names], device=device)
    skip = [[n == "skip_connect" for n in names] for names in op_names]
    return (torch.stack([types == t for t in range(len(OP_TYPES))]).float(),
            torch.tensor(skip, device=device, dtype=torch.float32), sum(map(sum, skip)))


def split_epochs(epochs: int, stages: int) -> list[int]:
    """``epochs`` split as evenly as possible, later stages taking the remainder."""
    base, extra = divmod(epochs, stages)
    return [base + (1 if i >= stages - extra else 0) for i in range(stages)]


def fairness_terms(weights: torch.Tensor, op_names, *, gamma_min: float, gamma_max: float, zeta1: float,
                   zeta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, L2) of DASViT's fairness loss (see the module docstring).

    Args:
        weights: (edges, K) softmax weights of the ops.
        op_names: per edge, its K op names (:data:`nasops.spaces.vit.VIT_OPS`).
    """
    if weights.dim() != 2 or weights.shape[0] != len(op_names):
        raise ValueError(f"weights: expected shape ({len(op_names)}, K), got {tuple(weights.shape)}")
    masks, skip, skips = _fairness_masks(tuple(map(tuple, op_names)), weights.device)
    masks, skip = masks.to(weights.dtype), skip.to(weights.dtype)
    l1 = (weights * skip).sum() / skips if skips else weights.new_zeros(())
    alpha_t = (weights.unsqueeze(0) * masks).sum(-1)  # (T, E)
    present = masks.amax(-1)  # the types each edge has
    per_type = zeta1 * F.relu(alpha_t - gamma_max) + zeta2 * F.relu(gamma_min - alpha_t)
    l2 = (per_type * present).sum(0).mean()
    return l1, l2


class DasVit(Darts):
    """DASViT's search (see the module docstring). ``model`` is the first stage's
    :class:`VitSearchNetwork`; ``stages`` the plan (default: one stage, all epochs)."""

    name = "dasvit"
    spaces = ("vit",)
    output_patterns = ("cell_*.png", "stage*_weights.*")

    def __init__(self, model: VitSearchNetwork, *, epochs: int, device: torch.device,
                 amp: torch.dtype | None = None, stages: list[Stage] | None = None, fair_a: float = 1.0, fair_b: float = 1.0,
                 gamma_min: float = 0.2, gamma_max: float = 0.6, zeta1: float = 1.0, zeta2: float = 1.0,
                 lr: float = 1e-3, lr_min: float = 0.0, weight_decay: float = 5e-2, grad_clip: float = 5.0,
                 arch_lr: float = 3e-4, arch_betas: tuple[float, float] = (0.5, 0.999),
                 arch_weight_decay: float = 1e-3, second_order: bool = False):
        if not isinstance(model, VitSearchNetwork):
            raise TypeError(f"model: expected a vit search network, got {type(model).__name__}")
        stages = stages or [Stage(model.depth, None, epochs, 0)]
        if sum(s.epochs for s in stages) != epochs:
            raise ValueError(f"stages: their epochs {[s.epochs for s in stages]} must add up to "
                             f"epochs={epochs}")
        if stages[0].depth != model.depth:
            raise ValueError(f"model: the first stage has {stages[0].depth} encoders, the model {model.depth}")
        # Darts sets up the loop (device, AMP scalers, world size); the optimizers are
        # the stage's, made by _start_stage.
        super().__init__(model, epochs=epochs, device=device, amp=amp, grad_clip=grad_clip,
                         second_order=second_order)
        self.stages = stages
        self.fairness = dict(a=fair_a, b=fair_b, gamma_min=gamma_min, gamma_max=gamma_max, zeta1=zeta1,
                             zeta2=zeta2)
        self.optim = dict(lr=lr, lr_min=lr_min, weight_decay=weight_decay, arch_lr=arch_lr,
                          arch_betas=tuple(arch_betas), arch_weight_decay=arch_weight_decay)
        self.stage_tables: list[dict] = []  # op weights at the end of each finished stage
        self._start_stage(0, model)

    # ---- what the driver asks of a method -------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("dasvit (--method dasvit, --space vit)")
        g.add_argument("--token-ratio", type=float, default=0.5,
                       help="share of the tokens the MSA/MLP candidates of a mixed edge see (CLS kept); "
                            "1 = no selection")
        g.add_argument("--token-gate", default="straight_through", choices=list(TOKEN_GATES),
                       help="how the selection scores reach W_Q, W_K (nasops.ops.topk_tokens)")
        g.add_argument("--fair-a", type=float, default=1.0, help="weight a of L1 (mean Identity weight)")
        g.add_argument("--fair-b", type=float, default=1.0, help="weight b of L2 (op-type balance)")
        g.add_argument("--fair-gamma-min", type=float, default=0.2,
                       help="L2: lower bound of an op type's summed weight on an edge")
        g.add_argument("--fair-gamma-max", type=float, default=0.6,
                       help="L2: upper bound of an op type's summed weight on an edge")
        g.add_argument("--fair-zeta1", type=float, default=1.0, help="L2: coefficient above gamma_max")
        g.add_argument("--fair-zeta2", type=float, default=1.0, help="L2: coefficient below gamma_min")
        g.add_argument("--stage-depths", type=int, nargs="+", default=list(DEFAULT_STAGE_DEPTHS),
                       metavar="D", help="encoders in each stage of the progressive search")
        g.add_argument("--stage-keep", type=int, nargs="*", default=list(DEFAULT_STAGE_KEEP), metavar="K",
                       help="ops kept per edge from the second stage on (one per stage after the first)")
        g.add_argument("--stage-epochs", type=int, nargs="+", default=None, metavar="E",
                       help="epochs of each stage, adding up to --epochs (default: --epochs split evenly)")
        g.add_argument("--adamw-lr", type=float, default=1e-3, help="weight AdamW learning rate")
        g.add_argument("--adamw-lr-min", type=float, default=0.0,
                       help="weight learning rate at the end of each stage's cosine")
        g.add_argument("--adamw-weight-decay", type=float, default=5e-2, help="weight AdamW weight decay")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if not 0.0 < args.token_ratio <= 1.0:
            raise ValueError(f"--token-ratio: expected a share in (0, 1], got {args.token_ratio}")
        for flag in ("fair_a", "fair_b", "fair_zeta1", "fair_zeta2", "adamw_lr_min", "adamw_weight_decay"):
            if getattr(args, flag) < 0:
                raise ValueError(f"--{flag.replace('_', '-')}: expected >= 0, got {getattr(args, flag)}")
        if args.adamw_lr <= 0:
            raise ValueError(f"--adamw-lr: expected > 0, got {args.adamw_lr}")
        if not 0.0 <= args.fair_gamma_min <= args.fair_gamma_max <= 1.0:
            raise ValueError(f"--fair-gamma-min, --fair-gamma-max: expected 0 <= min <= max <= 1, got "
                             f"{args.fair_gamma_min}, {args.fair_gamma_max}")
        depths, keeps = args.stage_depths, args.stage_keep
        if any(d < 1 for d in depths) or any(b < a for a, b in zip(depths, depths[1:])):
            raise ValueError(f"--stage-depths: expected depths >= 1 that never decrease, got {depths}")
        if len(keeps) != len(depths) - 1:
            raise ValueError(f"--stage-keep: expected {len(depths) - 1} values (one per stage after the "
                             f"first of --stage-depths {depths}), got {keeps}")
        if any(not 2 <= k <= len(VIT_OPS) for k in keeps) or any(b > a for a, b in zip(keeps, keeps[1:])):
            raise ValueError(f"--stage-keep: expected op counts in [2, {len(VIT_OPS)}] that never increase, "
                             f"got {keeps}")
        if args.stage_epochs is None:
            if args.epochs < len(depths):
                raise ValueError(f"--epochs: {len(depths)} stages need at least {len(depths)} epochs, got "
                                 f"{args.epochs}")
            args.stage_epochs = split_epochs(args.epochs, len(depths))
        elif (len(args.stage_epochs) != len(depths) or any(e < 1 for e in args.stage_epochs)
              or sum(args.stage_epochs) != args.epochs):
            raise ValueError(f"--stage-epochs: expected {len(depths)} counts >= 1 adding up to --epochs "
                             f"{args.epochs}, got {args.stage_epochs}")
        if args.layers is not None:
            raise ValueError(f"--layers: dasvit takes its depths from --stage-depths, got --layers {args.layers}")
        args.layers = depths[-1]  # the depth of the found network

    @classmethod
    def build_model(cls, args: argparse.Namespace, data) -> VitSearchNetwork:
        return spaces.from_args(args, data, layers=args.stage_depths[0], token_ratio=args.token_ratio,
                                token_gate=args.token_gate)

    @classmethod
    def from_args(cls, model, args, *, device, amp) -> "DasVit":
        stages = plan_stages(args.stage_depths, args.stage_keep, args.stage_epochs)
        return cls(model, epochs=args.epochs, device=device, amp=amp, stages=stages,
                   fair_a=args.fair_a, fair_b=args.fair_b, gamma_min=args.fair_gamma_min,
                   gamma_max=args.fair_gamma_max, zeta1=args.fair_zeta1, zeta2=args.fair_zeta2,
                   lr=args.adamw_lr, lr_min=args.adamw_lr_min, weight_decay=args.adamw_weight_decay,
                   grad_clip=args.grad_clip, arch_lr=args.arch_lr, arch_betas=args.arch_betas,
                   arch_weight_decay=args.arch_weight_decay, second_order=args.second_order)

    def stage_of(self, epoch: int) -> int:
        """The (0-based) stage of a (0-based) epoch."""
        for i in reversed(range(len(self.stages))):
            if epoch >= self.stages[i].first_epoch:
                return i
        raise ValueError(f"epoch: expected >= 0, got {epoch}")

    def begin_epoch(self, epoch: int) -> None:
        target = self.stage_of(epoch)
        if target < self.stage:
            raise RuntimeError(f"epoch {epoch} belongs to stage {target + 1}, but the search is in stage "
                               f"{self.stage + 1} already")
        while self.stage < target:
            self._advance()

    def arch_penalty(self) -> torch.Tensor | None:
        if self.fairness["a"] == 0 and self.fairness["b"] == 0:
            return None
        l1, l2 = self._fairness_terms(self.model.alphas_encoder)
        return self.fairness["a"] * l1 + self.fairness["b"] * l2

    def describe(self) -> dict:
        with torch.no_grad():
            l1, l2 = self._fairness_terms(self.model.alphas_encoder.detach())
        fairness = {"L1": l1.item(), "L2": l2.item(),
                    "L_fair": self.fairness["a"] * l1.item() + self.fairness["b"] * l2.item()}
        return {**super().describe(), "stage": self.stage + 1, "depth": self.model.depth, "fairness": fairness}

    def finish(self, run) -> dict:
        genotype = self.model.genotype()
        derived, plain = vit.derived_cost(genotype), vit.plain_vit_cost(genotype)
        return {
            "genotype": genotype, "genotype_str": self.model.genotype_str(),
            "identity_edges": sum(op == "skip_connect" for op, _ in genotype["encoder"]),
            "derived_network": {**derived, "params_vs_plain_vit": derived["params"] / plain["params"],
                                "flops_vs_plain_vit": derived["flops"] / plain["flops"]},
            "plain_vit": {**plain, "encoder": list(vit.PLAIN_VIT_OPS)},
            "stages": [{"stage": i + 1, **asdict(s)} for i, s in enumerate(self.stages)],
        }

    def write_outputs(self, out: Path, result: dict) -> None:
        from nasops.spaces import plot
        g = result["genotype"]
        plot.plot_cell(g, "encoder", str(out / "cell_encoder.png"),
                       f"DASViT encoder (dim {g['embed_dim']}, depth {g['depth']})")
        for table in self.stage_tables + [self._stage_table()]:
            stem = out / f"stage{table['stage']}_weights"
            write_text(stem.with_suffix(".json"), json.dumps(table, indent=2) + "\n")
            write_text(stem.with_suffix(".csv"), _weights_csv(table["edges"]))
            first, last = table["epochs"]
            plot.plot_edge_weights(table["edges"], str(stem.with_suffix(".png")),
                                   f"stage {table['stage']} (depth {table['depth']}, epochs {first}-{last}): "
                                   f"op weights", ops=list(VIT_OPS))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stage": self.stage, "depth": self.model.depth,
                "edge_ops": self.model.op_names("encoder"), "stage_tables": self.stage_tables}

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the checkpoint's stage (depth and pruned ops) when it is not the
        current one, then restore its optimizers; the driver loads the network next."""
        if (state["stage"], state["depth"], state["edge_ops"]) != \
                (self.stage, self.model.depth, self.model.op_names("encoder")):
            settings = {**self.model.settings, "depth": state["depth"], "edge_ops": state["edge_ops"]}
            self._start_stage(state["stage"], VitSearchNetwork(**settings).to(self.device))
        self.stage_tables = list(state["stage_tables"])
        super().load_state_dict(state)

    # ---- stages ----------------------------------------------------------------------------

    def _start_stage(self, index: int, model: VitSearchNetwork) -> None:
        self.stage = index
        self.model = model
        self.weights = [p for p in model.weight_parameters() if p.requires_grad]
        self.alphas = list(model.arch_parameters())
        o = self.optim
        self.w_opt = torch.optim.AdamW(self.weights, lr=o["lr"], weight_decay=o["weight_decay"])
        self.a_opt = torch.optim.Adam(self.alphas, lr=o["arch_lr"], betas=o["arch_betas"],
                                      weight_decay=o["arch_weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt, T_max=self.stages[index].epochs,
                                                                    eta_min=o["lr_min"])

    def _advance(self) -> None:
        self.stage_tables.append(self._stage_table())
        nxt = self.stages[self.stage + 1]
        model = self.model.grown(nxt.depth, nxt.keep)
        if self.world_size > 1:  # every rank grew the same network; make sure of it
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
        self._start_stage(self.stage + 1, model)

    def _stage_table(self) -> dict:
        s = self.stages[self.stage]
        return {"stage": self.stage + 1, "depth": self.model.depth, "epochs": [s.first_epoch + 1,
                s.first_epoch + s.epochs], "edges": self.model.edge_weights()["encoder"]}

    def _fairness_terms(self, alphas: torch.Tensor):
        f = self.fairness
        return fairness_terms(F.softmax(alphas.float(), dim=-1), self.model.op_names("encoder"),
                              gamma_min=f["gamma_min"], gamma_max=f["gamma_max"], zeta1=f["zeta1"],
                              zeta2=f["zeta2"])


def _weights_csv(edges: list[dict]) -> str:
    """One row per edge, one column per op of VIT_OPS (empty where the edge lost the op)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["edge", *VIT_OPS])
    for edge in edges:
        writer.writerow([edge["edge"], *(f"{edge['ops'][op]:.6f}" if op in edge["ops"] else ""
                                         for op in VIT_OPS)])
    return buffer.getvalue()
