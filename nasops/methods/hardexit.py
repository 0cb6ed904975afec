"""Input-adaptive hard-exit DARTS (seed 004; SPEC 4.4): ``--method hardexit``.

The network (:class:`HardExitNetwork`) wraps a space's search network:

- **Controller** ``g_theta``: ``delta_alpha(x) = g_theta(x)`` (eq. 1), one
  ``(edges, K)`` table per cell type and sample. It reads the stem's output,
  globally pooled and detached (so the controller costs two small linear
  layers, and only the architecture step moves theta): Linear -> ReLU ->
  Linear, the last layer initialised to zero, so a fresh network is plain
  DARTS (eq. 23). The edges mix with ``softmax(alpha + delta_alpha(x))``
  (eqs. 2, 4), passed to :func:`nasops.ops.mixed_op` as per-sample ``(B, K)``
  weights through ``SearchNetwork.mixing_weights``' per-sample override.
- **Candidate exit nodes**: after every searched cell. darts/rdarts: after
  each of the ``--layers`` cells (its state is the pair (c_{k-1}, c_k) that the
  next cell reads); nb201: after each NB201 cell, the stride-2 ResNet block
  between stages belonging to the next node. So darts has ``--layers`` exits,
  nb201 ``3 * --layers``.
- **Exit heads** ``y_i = f_i(h_i)`` (eq. 6) and **stop heads**
  ``s_i = sigmoid(u_i(h_i))`` (eq. 11) at exits 1..N-1 share one pooled
  feature: BN -> ReLU -> average pool to 2x2, then a linear classifier and a
  linear stop logit (:class:`ExitHead`). The stop bias starts at -2 (s ~ 0.12): the exit
  distribution starts weighted towards full depth (accuracy first, seed 1.12).
  The last exit is the search network's own head (no stop head: eq. 14).
- **Exit distribution** eqs. 12-14 (:func:`exit_distribution`). The training
  output (eq. 9) blends the exits' class *probabilities*:
  ``y_hat = sum_i q_i softmax(y_i)``, and ``CE(y, y_hat) = -log y_hat[y]``, the
  likelihood of the label when the exit is drawn from q (what hard-exit
  inference does with one draw), and blind to the exits' logit scales, which
  a blend of logits would reward. Computed in log space
  (:func:`log_exit_distribution`, :func:`blend`).

**Cost model** (:func:`count_exit_flops`): ``C_i`` = the FLOPs that hard-exit
inference spends on one sample that leaves at exit i: controller, stem, nodes
1..i (the supernet as it runs: every live candidate op of every mixed edge),
and the exit and stop heads 1..i (each is evaluated to decide). FLOPs of the
real layers only: convolutions and linear layers (2 per multiply-accumulate;
biases, BN, pooling and the mixed sums not counted), as
``torch.utils.flop_counter.FlopCounterMode`` counts them.
Normalised by ``C_N`` (full depth, every node and head), so ``c_N = 1``;
``plain_flops`` is the search network alone (no controller, no intermediate
heads), for comparison.

**Objective** (:func:`hardexit_objective`), seed eq. 20 plus auxiliary exit
supervision: ``CE(y, y_hat) + lambda * sum_i q_i c_i + mu * ||delta_alpha||^2
+ aux_weight * sum_i CE(y, softmax(y_i))``; ``||delta_alpha||^2`` sums over edges, ops
and cell types and averages over the batch. ``lambda`` is 0 for
``--warmup-epochs`` epochs, then ramps (linear or cosine, per epoch) to
``--lambda-target`` over ``--lambda-ramp-epochs`` (:func:`lambda_at`). In the
warm-up the stop heads get no gradient (the exit distribution stays at its
start): with nothing but the CE term, and the early exits still poor, the stop
logits of a digits run fell to about -5.5 in the warm-up, where sigmoid's
slope s(1 - s) ~ 0.004 left the later compute pressure no grip (q_N stayed at
0.97 with lambda = 1). After the warm-up they learn whatever lambda is:
``--lambda-target 0`` is the seed's lambda = 0 objective, ``L = CE(y, y_hat)``
(eqs. 25-27), which trains them too.

Defaults, measured on 12-epoch nb201 digits searches (C=16, 2 cells per
stage; all 1797 images, before the digits test split was held out): the auxiliary term sums the exits' CEs, each head trained as a
classifier; with the mean over 6 exits (weight 0.5) each head got 1/12 of a CE
gradient and stayed under-confident (label probability 0.44 at a 95 %-accurate
exit 3), and with lambda 0.3 and 1 alike q_N stayed at 0.96. With the sum,
lambda 0.3 (weight 0.5) ended at q_N 0.52 and lambda 1 (weight 1) at 0.11
(chosen point: 61 % fewer FLOPs at the full-depth top-1). ``--lambda-target``
defaults to 0.5, above the seed's 1e-3..1e-1: short searches leave the exits
less confident than long trainings, and the CE term weighs more.

**Bilevel split** (SPEC 4: weights on the train half, architecture on the
validation half): the weight step trains the search network's weights, the
exit heads and the stop heads (``weight_parameters``); the architecture step
trains the alphas and the controller theta (``arch_parameters``), with the
architecture gradient clipped to ``--arch-grad-clip``. Both minimise the whole
objective. The exponential moving average of all network state
(``--ema-decay``, with the warm-up ``min(decay, (1+t)/(10+t))`` after t steps)
is what the evaluation uses; the genotype comes from the live alphas, as in
DARTS. AMP and DDP are the DARTS loop's.

**Held-out data**: ``--holdout-portion`` of the architecture half (seeded by
``--seed``) never trains anything; half of it is the *calibration* split
(temperature fitted by NLL, per-exit quantiles of s and c, threshold
candidates), the other half the *selection* split, where the (tau_s, tau_c, T)
sweep runs, the deployment rule picks its point, and the report is measured.
See :mod:`nasops.methods.hardexit_report`.

**Hard-exit inference** (:func:`hard_exit_inference`, seed 1.14): node by
node; after node i the samples with ``s_i >= tau_s and max softmax(y_i / T) >=
tau_c`` (or i = N) are written out (``scatter_rows``) and the rest continue as a
compacted batch (``gather_rows`` of every state tensor and of the per-sample
mixing weights): an exited sample is never computed deeper.

Deployment rule: of the sweep points with top-1 >= ``--accuracy-target``
(default: the full-depth top-1 on the selection split minus 0.01), the one with
the lowest mean cost (ties: higher top-1); if none, the most accurate.

``--evaluate-only --checkpoint PATH`` loads a finished run and redoes the
calibration, the sweep and the report (the driver's evaluation hook).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nasops import data as datasets
from nasops.methods.darts import Darts, RunContext
from nasops.ops import gather_rows, scatter_rows
from nasops.spaces.darts import DartsSearchNetwork
from nasops.spaces.nb201 import NB201Cell, NB201SearchNetwork

# Files of the report (in --out), besides Darts' cell pictures.
REPORT_FILES = ("protocol.json", "env_info.json", "config.json", "pip_freeze.txt",
                "train_epoch_metrics.csv", "summary.json", "pareto.csv", "pareto.png",
                "reliability.png", "exit_histogram.png")

STOP_BIAS_INIT = -2.0


# ---- the network --------------------------------------------------------------------------

class ExitHead(nn.Module):
    """An intermediate exit: BN -> ReLU -> average pool to a 2x2 grid, then the
    exit's classifier f_i and its stop head u_i on the same pooled feature.

    The 2x2 grid keeps the coarse layout that a global pool would lose: on the
    8x8 digits, global-pool heads after the first cells stayed at chance level."""

    POOL = 2

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(self.POOL)
        self.classifier = nn.Linear(channels * self.POOL ** 2, num_classes)
        self.stop = nn.Linear(channels * self.POOL ** 2, 1)
        nn.init.constant_(self.stop.bias, STOP_BIAS_INIT)

    def forward(self, h):
        feature = self.pool(F.relu(self.bn(h))).flatten(1)
        return self.classifier(feature), self.stop(feature).squeeze(1)


@dataclass
class ExitOutputs:
    """Every exit of a batch: ``logits`` N tensors (B, classes); ``stop_logits``
    (B, N-1); ``delta`` per cell type (B, edges, K)."""

    logits: list
    stop_logits: torch.Tensor
    delta: dict


class ForwardExits(nn.Module):
    """``network.forward_exits`` as a module whose forward returns a tuple of tensors
    (the exits' logits, the stop logits, the deltas per cell type), what CUDA graphs
    replay (--cuda-graphs: ``torch.cuda.make_graphed_callables`` graphs a module's
    forward); :meth:`outputs` makes the :class:`ExitOutputs` again. Its training
    mode is the network's."""

    def __init__(self, network: "HardExitNetwork"):
        super().__init__()
        self.network = network

    @property
    def training(self) -> bool:
        return self.network.training

    @training.setter
    def training(self, mode: bool) -> None:
        pass  # nn.Module sets it in __init__ and train(): the network's own is the one read

    def forward(self, x) -> tuple[torch.Tensor, ...]:
        out = self.network.forward_exits(x)
        return (*out.logits, out.stop_logits, *out.delta.values())

    def outputs(self, flat) -> ExitOutputs:
        n = self.network.num_exits
        return ExitOutputs(list(flat[:n]), flat[n], dict(zip(self.network.cell_types, flat[n + 1:])))


class HardExitNetwork(nn.Module):
    """A search network with a controller, exit heads and stop heads (module doc).

    Args:
        supernet: a darts/rdarts or nb201 search network of ``nasops.spaces``.
        num_classes: classes of the data.
        image_shape: (channels, height, width) of an input, for the channel
            counts of the exits and the FLOP count.
        controller_hidden: width of the controller's hidden layer.
    """

    def __init__(self, supernet, *, num_classes: int, image_shape, controller_hidden: int = 32):
        super().__init__()
        if isinstance(supernet, DartsSearchNetwork):
            self._kind = "darts"
            segments = [[i] for i in range(len(supernet.cells))]
        elif isinstance(supernet, NB201SearchNetwork):
            self._kind = "nb201"
            segments, current = [], []
            for i, cell in enumerate(supernet.cells):
                current.append(i)
                if isinstance(cell, NB201Cell):
                    segments.append(current)
                    current = []
        else:
            raise TypeError(f"supernet: expected a darts/rdarts or nb201 search network, "
                            f"got {type(supernet).__name__}")
        if len(segments) < 2:
            raise ValueError(f"supernet: hard exit needs at least 2 exits (cells), got {len(segments)}")
        self.supernet = supernet
        self.space = supernet.space
        self.cell_types = supernet.cell_types
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self._segments = segments
        self._delta_shapes = {t: tuple(supernet.alphas(t).shape) for t in self.cell_types}

        with _eval_mode(supernet), torch.no_grad():
            stem = supernet.stem(torch.zeros(1, *self.image_shape))
            state = self._initial_state(stem)
            mixing = {t: w.unsqueeze(0) for t, w in supernet.mixing_weights().items()}
            channels = []
            for i in range(len(segments)):
                state = self.node(i, state, mixing)
                channels.append(state[-1].shape[1])
        self.exit_heads = nn.ModuleList(ExitHead(c, num_classes) for c in channels[:-1])
        total = sum(e * k for e, k in self._delta_shapes.values())
        self.controller = nn.Sequential(nn.Linear(stem.shape[1], controller_hidden), nn.ReLU(),
                                        nn.Linear(controller_hidden, total))
        nn.init.zeros_(self.controller[2].weight)
        nn.init.zeros_(self.controller[2].bias)

        flops, plain = count_exit_flops(self)
        # Not persistent: a function of the architecture, recomputed whenever it is built.
        self.register_buffer("exit_flops", torch.tensor(flops, dtype=torch.float64), persistent=False)
        self.register_buffer("exit_costs", torch.tensor([f / flops[-1] for f in flops]), persistent=False)
        self.plain_flops = plain

    @property
    def num_exits(self) -> int:
        return len(self._segments)

    # ---- parameters (the DARTS loop's split) ----------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        """The alphas and the controller theta (the architecture step trains them)."""
        return list(self.supernet.arch_parameters()) + list(self.controller.parameters())

    def weight_parameters(self) -> list[nn.Parameter]:
        """The search network's weights, the exit heads and the stop heads."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    # ---- what the driver and the plots read ---------------------------------------------------
    def alphas(self, cell_type):
        return self.supernet.alphas(cell_type)

    def op_names(self, cell_type):
        return self.supernet.op_names(cell_type)

    def edge_weights(self):
        return self.supernet.edge_weights()

    def genotype(self):
        return self.supernet.genotype()

    def genotype_str(self):
        return self.supernet.genotype_str()

    # ---- the pieces hard-exit inference runs one by one ---------------------------------------
    def begin(self, x):
        """(state, mixing, delta) before node 1: the stem, and the per-sample
        mixing weights ``softmax(alpha + delta_alpha(x))`` (B, edges, K) per cell type."""
        stem = self.supernet.stem(x)
        delta = self.delta_alpha(stem)
        mixing = {t: F.softmax(self.supernet.alphas(t) + d, dim=-1) for t, d in delta.items()}
        return self._initial_state(stem), mixing, delta

    def delta_alpha(self, stem) -> dict[str, torch.Tensor]:
        flat = self.controller(stem.detach().mean((2, 3)))
        delta, offset = {}, 0
        for t, (edges, k) in self._delta_shapes.items():
            delta[t] = flat[:, offset:offset + edges * k].reshape(-1, edges, k)
            offset += edges * k
        return delta

    def node(self, i: int, state: tuple, mixing: dict) -> tuple:
        """Run node i (0-based) on ``state``; every tensor of a state has the batch first."""
        cells = self.supernet.cells
        if self._kind == "darts":
            s0, s1 = state
            cell = cells[self._segments[i][0]]
            return s1, cell(s0, s1, mixing["reduce" if cell.reduction else "normal"])
        (feature,) = state
        for j in self._segments[i]:
            cell = cells[j]
            feature = cell(feature, mixing["normal"]) if isinstance(cell, NB201Cell) else cell(feature)
        return (feature,)

    def exit(self, i: int, state: tuple):
        """(logits (B, classes), stop logit (B,) or None at the last exit) of exit i."""
        h = state[-1]
        if i < self.num_exits - 1:
            return self.exit_heads[i](h)
        net = self.supernet
        if self._kind == "nb201":
            h = net.lastact(h)
        return net.classifier(net.global_pooling(h).flatten(1)), None

    def _initial_state(self, stem):
        return (stem, stem) if self._kind == "darts" else (stem,)

    # ---- full depth ---------------------------------------------------------------------------
    def forward_exits(self, x) -> ExitOutputs:
        """Every exit's logits and stop logit, computed at full depth (training, sweeps)."""
        state, mixing, delta = self.begin(x)
        logits, stops = [], []
        for i in range(self.num_exits):
            state = self.node(i, state, mixing)
            y, s = self.exit(i, state)
            logits.append(y)
            if s is not None:
                stops.append(s)
        return ExitOutputs(logits, torch.stack(stops, dim=1), delta)

    def forward(self, x):
        """``log y_hat``, the log of the blended class probabilities (eq. 9, module doc)."""
        out = self.forward_exits(x)
        return blend(out.logits, log_exit_distribution(out.stop_logits))

    def forward_plain(self, x):
        """The search network alone at full depth with the per-sample mixing
        (no intermediate heads): the deployment without early exits."""
        state, mixing, _ = self.begin(x)
        for i in range(self.num_exits):
            state = self.node(i, state, mixing)
        return self.exit(self.num_exits - 1, state)[0]


@contextlib.contextmanager
def _eval_mode(module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def count_exit_flops(model: HardExitNetwork) -> tuple[list[float], float]:
    """(C_1..C_N, plain) in FLOPs per sample: every ``nn.Conv2d`` and ``nn.Linear``
    (the real layers of every space) counted by a forward hook on one image,
    2 per multiply-accumulate, biases not counted, as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them (same numbers, but
    for the CPU's AvgPool3x3, a depthwise convolution there that it counts and
    this does not: pooling is no layer; its first use costs seconds of lazy
    imports)."""
    counted = [0]

    def conv(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        counted[0] += 2 * output.numel() * (module.in_channels // module.groups) * k

    def linear(module, inputs, output):
        counted[0] += 2 * output.numel() * module.in_features

    def flops(fn):
        counted[0] = 0
        result = fn()
        return counted[0], result

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with _eval_mode(model), torch.no_grad():
            x = torch.zeros(1, *model.image_shape, device=next(model.parameters()).device)
            stem_flops, stem = flops(lambda: model.supernet.stem(x))
            controller_flops, delta = flops(lambda: model.delta_alpha(stem))
            mixing = {t: F.softmax(model.supernet.alphas(t) + d, dim=-1) for t, d in delta.items()}
            state = model._initial_state(stem)
            total, cumulative, plain = stem_flops + controller_flops, [], stem_flops
            for i in range(model.num_exits):
                node_flops, state = flops(lambda: model.node(i, state, mixing))
                head_flops, _ = flops(lambda: model.exit(i, state))
                total += node_flops + head_flops
                plain += node_flops
                cumulative.append(float(total))
            plain += head_flops  # the last head is the search network's own
    finally:
        for h in hooks:
            h.remove()
    return cumulative, float(plain)


# ---- the objective -----------------------------------------------------------------------

def exit_distribution(stop_prob: torch.Tensor) -> torch.Tensor:
    """Seed eqs. 12-14: (B, N-1) stop probabilities s -> (B, N) exit probabilities q:
    ``q_1 = s_1``, ``q_i = s_i prod_{m<i} (1 - s_m)``, ``q_N = prod_{m<N} (1 - s_m)``."""
    if stop_prob.dim() != 2 or stop_prob.shape[1] < 1:
        raise ValueError(f"stop_prob: expected shape (B, N-1) with N >= 2, got {tuple(stop_prob.shape)}")
    survive = torch.cumprod(1 - stop_prob, dim=1)
    reach = torch.cat([torch.ones_like(survive[:, :1]), survive[:, :-1]], dim=1)
    return torch.cat([stop_prob * reach, survive[:, -1:]], dim=1)


def log_exit_distribution(stop_logits: torch.Tensor) -> torch.Tensor:
    """``log q`` (B, N) from the stop logits beta (B, N-1), s = sigmoid(beta), in
    float32 without forming 1 - s: ``log s = logsigmoid(beta)``, ``log(1 - s) =
    logsigmoid(-beta)``."""
    if stop_logits.dim() != 2 or stop_logits.shape[1] < 1:
        raise ValueError(f"stop_logits: expected shape (B, N-1) with N >= 2, got {tuple(stop_logits.shape)}")
    beta = stop_logits.float()
    log_survive = torch.cumsum(F.logsigmoid(-beta), dim=1)
    log_reach = torch.cat([torch.zeros_like(log_survive[:, :1]), log_survive[:, :-1]], dim=1)
    return torch.cat([F.logsigmoid(beta) + log_reach, log_survive[:, -1:]], dim=1)


def blend(logits: list, log_q: torch.Tensor) -> torch.Tensor:
    """``log sum_i q_i softmax(y_i)`` (B, classes): the log of the blended class
    probabilities (eq. 9, module doc), in float32."""
    log_probs = torch.stack([F.log_softmax(y.float(), dim=1) for y in logits], dim=1)  # (B, N, classes)
    return torch.logsumexp(log_q.unsqueeze(2) + log_probs, dim=1)


@dataclass
class ObjectiveParts:
    loss: torch.Tensor
    ce: torch.Tensor
    expected_cost: torch.Tensor  # mean over the batch of sum_i q_i c_i
    delta_sq: torch.Tensor  # mean over the batch of ||delta_alpha||^2
    aux: torch.Tensor
    q: torch.Tensor
    blended: torch.Tensor  # log y_hat (B, classes)


def hardexit_objective(out: ExitOutputs, y: torch.Tensor, costs: torch.Tensor, *, lam: float, mu: float,
                       aux_weight: float) -> ObjectiveParts:
    """``CE(y, y_hat) + lam * E[c] + mu * ||delta_alpha||^2 + aux_weight * sum_i CE(y, y_i)``
    (module doc); ``costs`` are the normalised c_i."""
    log_q = log_exit_distribution(out.stop_logits)
    q = log_q.exp()
    blended = blend(out.logits, log_q)
    ce = F.nll_loss(blended, y)
    expected_cost = (q * costs.to(q.dtype)).sum(1).mean()
    delta_sq = sum(d.float().pow(2).sum((1, 2)) for d in out.delta.values()).mean()
    aux = torch.stack([F.cross_entropy(logits.float(), y) for logits in out.logits]).sum()
    loss = ce + lam * expected_cost + mu * delta_sq + aux_weight * aux
    return ObjectiveParts(loss, ce, expected_cost, delta_sq, aux, q, blended)


def lambda_at(epoch: int, *, target: float, warmup_epochs: int, ramp_epochs: int, kind: str) -> float:
    """lambda of ``epoch`` (0-based): 0 during the warm-up, then ``target * r(t)``
    with ``t = min(1, (epoch - warmup + 1) / ramp_epochs)``, r(t) = t (linear) or
    (1 - cos(pi t)) / 2 (cosine): the target is reached in the ramp's last epoch."""
    if kind not in ("linear", "cosine"):
        raise ValueError(f"kind: expected 'linear' or 'cosine', got {kind!r}")
    if epoch < warmup_epochs:
        return 0.0
    t = min(1.0, (epoch - warmup_epochs + 1) / ramp_epochs)
    return target * (t if kind == "linear" else (1 - math.cos(math.pi * t)) / 2)


# ---- hard-exit inference -----------------------------------------------------------------

@dataclass
class HardExitResult:
    """Per sample: ``logits`` (B, classes) of its exit, ``exit_index`` (0-based) and
    ``cost`` (normalised C_e); ``node_batches`` the batch size each node ran with."""

    logits: torch.Tensor
    exit_index: torch.Tensor
    cost: torch.Tensor
    node_batches: list


def check_thresholds(tau_s, tau_c, temperature) -> None:
    """ValueError naming the threshold unless tau_s, tau_c are in [0, 1] (or inf:
    never exit early) and the temperature is a positive finite number."""
    for name, value in (("tau_s", tau_s), ("tau_c", tau_c)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                or not (0.0 <= value <= 1.0 or value == math.inf):
            raise ValueError(f"{name}: expected a number in [0, 1] (or inf: never exit early), got {value!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")


@torch.no_grad()
def hard_exit_inference(model: HardExitNetwork, x: torch.Tensor, *, tau_s: float, tau_c: float,
                        temperature: float = 1.0) -> HardExitResult:
    """Seed 1.14 with real early termination (module doc). Every sample gets the
    logits of the exit where it stopped; the model should be in eval mode (in
    training mode BatchNorm would mix the samples of each compacted batch)."""
    check_thresholds(tau_s, tau_c, temperature)
    batch = x.shape[0]
    n_exits = model.num_exits
    out = x.new_zeros((batch, model.num_classes), dtype=torch.float32)
    exit_index = torch.full((batch,), n_exits - 1, dtype=torch.long, device=x.device)
    node_batches = []
    if batch == 0:
        return HardExitResult(out, exit_index, model.exit_costs[exit_index], node_batches)
    state, mixing, _ = model.begin(x)
    alive = torch.arange(batch, device=x.device)  # original row of each computed sample
    for i in range(n_exits):
        node_batches.append(alive.numel())
        state = model.node(i, state, mixing)
        logits, stop = model.exit(i, state)
        logits = logits.float()
        if stop is None:
            done = torch.ones(alive.numel(), dtype=torch.bool, device=x.device)
        else:
            confidence = F.softmax(logits / temperature, dim=1).amax(1)
            done = (torch.sigmoid(stop.float()) >= tau_s) & (confidence >= tau_c)
        leaving = done.nonzero().squeeze(1)
        if leaving.numel():
            rows = alive[leaving]
            out += scatter_rows(gather_rows(logits, leaving), rows, batch)
            exit_index[rows] = i
        staying = (~done).nonzero().squeeze(1)
        if staying.numel() == 0:
            break
        if staying.numel() < alive.numel():
            state = tuple(gather_rows(t, staying) for t in state)
            mixing = {t: gather_rows(w, staying) for t, w in mixing.items()}
            alive = alive[staying]
    return HardExitResult(out, exit_index, model.exit_costs[exit_index].float(), node_batches)


# ---- data splits ---------------------------------------------------------------------------

def hold_out(val_idx: torch.Tensor, portion: float, seed: int) -> dict[str, torch.Tensor]:
    """The architecture half ``val_idx`` cut into ``arch`` (trains alpha and theta),
    ``calibration`` and ``selection``: ``floor(portion * len)`` samples drawn with a
    generator seeded ``seed`` are held out, the first half of them calibration."""
    held = int(math.floor(portion * len(val_idx)))
    if held < 2 or held >= len(val_idx):
        raise ValueError(f"--holdout-portion {portion} of the {len(val_idx)} architecture samples "
                         f"leaves an empty split (held out {held})")
    perm = val_idx[torch.randperm(len(val_idx), generator=torch.Generator().manual_seed(seed))]
    return {"arch": perm[held:].sort().values, "calibration": perm[:held // 2].sort().values,
            "selection": perm[held // 2:held].sort().values}


def data_splits(args: argparse.Namespace, n: int) -> dict[str, torch.Tensor]:
    """Sample indices of ``train`` (weights), ``arch``, ``calibration`` and
    ``selection`` for a data set of n samples: the driver's split
    (``datasets.split(n, train_portion, seed)``), then :func:`hold_out`."""
    train, val = datasets.split(n, args.train_portion, args.seed)
    return {"train": train, **hold_out(val, args.holdout_portion, args.seed)}


def load_run(path, *, device="cpu", data_dir: str | None = None):
    """(evaluation network in eval mode, settings, data set) of a finished hardexit
    run's ``checkpoint.pt``: the network rebuilt from the run's config, with the
    EMA state (or the live one when the run kept no EMA). For inference outside the
    driver (benchmarks/hardexit_throughput.py); RunError naming the file otherwise."""
    from nasops import runtime

    checkpoint = runtime.load_checkpoint(Path(path), flag="checkpoint")
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or config.get("method") != HardExit.name:
        raise runtime.RunError(f"checkpoint: {path} is not the checkpoint of a hardexit run")
    args = argparse.Namespace(**config)
    data = datasets.load(args.dataset, data_dir=data_dir, image_size=args.image_size,
                         num_classes=args.num_classes, synthetic_size=args.synthetic_size, seed=args.seed)
    model = HardExit.build_model(args, data)
    ema = checkpoint["method"].get("ema")
    model.load_state_dict(ema if ema is not None else checkpoint["model"])
    return model.to(device).eval(), args, data


# ---- the method ----------------------------------------------------------------------------

class HardExit(Darts):
    """Input-adaptive hard-exit DARTS (module doc) on the DARTS bilevel loop."""

    name = "hardexit"
    spaces = ("darts", "nb201", "rdarts-s1", "rdarts-s2", "rdarts-s3", "rdarts-s4")
    output_patterns = Darts.output_patterns + REPORT_FILES
    # Flags an --evaluate-only run takes from its command line; everything else
    # that decides the computation comes from the checkpoint's config.
    evaluation_keys = ("evaluate_only", "checkpoint", "tau_s_grid", "tau_c_grid", "temperature_grid",
                       "accuracy_target", "eval_batch_size")

    def __init__(self, model: HardExitNetwork, *, epochs: int, device, amp=None, lambda_target: float = 0.5,
                 lambda_ramp: str = "cosine", warmup_epochs: int = 2, lambda_ramp_epochs: int | None = None,
                 mu: float = 1e-3, aux_weight: float = 1.0, ema_decay: float = 0.99,
                 arch_grad_clip: float = 5.0, **darts_kwargs):
        super().__init__(model, epochs=epochs, device=device, amp=amp, **darts_kwargs)
        self.lambda_schedule = dict(target=lambda_target, warmup_epochs=warmup_epochs, kind=lambda_ramp,
                                    ramp_epochs=lambda_ramp_epochs or max(1, epochs - warmup_epochs))
        self.epochs = epochs
        self.mu = mu
        self.aux_weight = aux_weight
        self.ema_decay = ema_decay
        self.arch_grad_clip = arch_grad_clip
        self.lam = lambda_at(0, **self.lambda_schedule)
        self.warming_up = warmup_epochs > 0  # the stop heads learn after it (module doc)
        self.ema = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                    if ema_decay > 0 else None)
        self.ema_steps = 0
        self._recorded_batch = None
        self._sums = None
        self._epoch_stats = {}
        self.report = None
        # Clip the architecture gradient right before Adam steps (after the
        # gradient scaler has unscaled it; a skipped inf step skips this too).
        self.a_opt.register_step_pre_hook(self._clip_arch_gradient)

    # ---- the driver's interface ----------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("hardexit (--method hardexit)")
        g.add_argument("--lambda-target", type=float, default=0.5,
                       help="compute-penalty weight lambda after the ramp (costs normalised to full depth)")
        g.add_argument("--lambda-ramp", choices=["linear", "cosine"], default="cosine",
                       help="shape of the lambda ramp after the warm-up")
        g.add_argument("--warmup-epochs", type=int, default=2, help="epochs with lambda = 0")
        g.add_argument("--lambda-ramp-epochs", type=int, default=None,
                       help="epochs the ramp takes to reach --lambda-target (default: the rest of the run)")
        g.add_argument("--mu", type=float, default=1e-3, help="weight of ||delta alpha(x)||^2")
        g.add_argument("--aux-weight", type=float, default=1.0,
                       help="weight of the auxiliary loss: the sum of every exit's cross-entropy")
        g.add_argument("--ema-decay", type=float, default=0.99,
                       help="EMA of the network state used for evaluation (0: the live network)")
        g.add_argument("--arch-grad-clip", type=float, default=5.0,
                       help="max norm of the architecture (alphas + controller) gradient")
        g.add_argument("--controller-hidden", type=int, default=32, help="hidden width of the controller")
        g.add_argument("--holdout-portion", type=float, default=0.4,
                       help="share of the architecture half held out: half calibration, half selection")
        g.add_argument("--tau-s-grid", type=float, nargs="+",
                       default=[0.1, 0.3, 0.5, 0.7, 0.9], help="stop-probability thresholds of the sweep")
        g.add_argument("--tau-c-grid", type=float, nargs="+",
                       default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99], help="confidence thresholds of the sweep")
        g.add_argument("--temperature-grid", type=float, nargs="+",
                       default=[0.7, 1.0, 1.5],
                       help="confidence temperatures of the sweep (the calibrated one is added)")
        g.add_argument("--accuracy-target", type=float, default=None,
                       help="deployment: largest saving with top-1 >= this (default: full-depth top-1 "
                            "on the selection split minus 0.01)")
        g.add_argument("--eval-batch-size", type=int, default=256, help="batch size of the evaluation")
        g.add_argument("--evaluate-only", action="store_true",
                       help="no search: redo calibration, sweep and report of --checkpoint")
        g.add_argument("--checkpoint", default=None, metavar="PATH",
                       help="--evaluate-only: the checkpoint.pt of a finished hardexit run")

    @classmethod
    def check_args(cls, args):
        def need(flag, ok, expected):
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
            if not ok(value):
                raise ValueError(f"{flag}: expected {expected}, got {value}")

        need("--lambda-target", lambda v: v >= 0, ">= 0")
        need("--warmup-epochs", lambda v: v >= 0, ">= 0")
        need("--lambda-ramp-epochs", lambda v: v is None or v >= 1, ">= 1")
        need("--mu", lambda v: v >= 0, ">= 0")
        need("--aux-weight", lambda v: v >= 0, ">= 0")
        need("--ema-decay", lambda v: 0 <= v < 1, "a number in [0, 1)")
        need("--arch-grad-clip", lambda v: v > 0, "> 0")
        need("--controller-hidden", lambda v: v >= 1, ">= 1")
        need("--holdout-portion", lambda v: 0 < v < 1, "a fraction in (0, 1)")
        need("--eval-batch-size", lambda v: v >= 1, ">= 1")
        need("--accuracy-target", lambda v: v is None or 0 <= v <= 1, "a top-1 accuracy in [0, 1]")
        for flag, ok, expected in (("--tau-s-grid", lambda v: 0 <= v <= 1, "in [0, 1]"),
                                   ("--tau-c-grid", lambda v: 0 <= v <= 1, "in [0, 1]"),
                                   ("--temperature-grid", lambda v: math.isfinite(v) and v > 0,
                                    "finite and > 0")):
            bad = [v for v in getattr(args, flag[2:].replace("-", "_")) if not ok(v)]
            if bad:
                raise ValueError(f"{flag}: expected every value {expected}, got {bad}")
        if not args.evaluate_only and args.warmup_epochs >= args.epochs:
            # A smoke run of a few epochs is fine; a search whose report is of stop heads
            # that never learned should not pass unnoticed.
            print(f"nasops.search: warning: --warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: "
                  f"lambda stays 0 the whole search, so the stop heads never learn and the report's "
                  f"exits are those of their initial values", file=sys.stderr)
        # --layers is None here when not given (the driver's default, 5 cells, comes later).
        if args.space != "nb201" and args.layers is not None and args.layers < 2:
            raise ValueError(f"--layers: hard exit needs at least 2 cells (exits), got {args.layers}")
        if args.evaluate_only:
            if not args.checkpoint:
                raise ValueError("--evaluate-only: needs --checkpoint PATH (the checkpoint.pt of a "
                                 "finished hardexit run)")
            if not Path(args.checkpoint).is_file():
                raise ValueError(f"--checkpoint: no such file {args.checkpoint!r}")
            if args.resume:
                raise ValueError("--evaluate-only and --resume exclude each other: finish the run "
                                 "with --resume first, then evaluate it")
        elif args.checkpoint:
            raise ValueError("--checkpoint: only used with --evaluate-only")

    @classmethod
    def evaluation_checkpoint(cls, args):
        return args.checkpoint if args.evaluate_only else None

    @classmethod
    def search_split(cls, args, train_idx, val_idx):
        return train_idx, hold_out(val_idx, args.holdout_portion, args.seed)["arch"]

    @classmethod
    def build_model(cls, args, data):
        supernet = super().build_model(args, data)
        return HardExitNetwork(supernet, num_classes=data.num_classes,
                               image_shape=tuple(data.images.shape[1:]),
                               controller_hidden=args.controller_hidden)

    @staticmethod
    def hyperparameters(args):
        return dict(Darts.hyperparameters(args), lambda_target=args.lambda_target,
                    lambda_ramp=args.lambda_ramp, warmup_epochs=args.warmup_epochs,
                    lambda_ramp_epochs=args.lambda_ramp_epochs, mu=args.mu, aux_weight=args.aux_weight,
                    ema_decay=args.ema_decay, arch_grad_clip=args.arch_grad_clip)

    def begin_epoch(self, epoch):
        self.lam = lambda_at(epoch, **self.lambda_schedule)
        self.warming_up = epoch < self.lambda_schedule["warmup_epochs"]
        n = self.model.num_exits
        # q, correct per exit, then expected cost, ||delta||^2, samples; on the device,
        # read back once, at the epoch's end
        self._sums = torch.zeros(2 * n + 3, dtype=torch.float64, device=self.device)

    def end_epoch(self):
        super().end_epoch()
        sums = self._sums
        if sums is None:
            return
        if self.world_size > 1:
            torch.distributed.all_reduce(sums)
        sums = sums.cpu()
        n, count = self.model.num_exits, max(sums[-1].item(), 1.0)
        self._epoch_stats = {
            "exit_distribution": (sums[:n] / count).tolist(),
            "exit_accuracy": (sums[n:2 * n] / count).tolist(),
            "expected_cost": sums[2 * n].item() / count,
            "delta_alpha_sq": sums[2 * n + 1].item() / count,
        }

    def describe(self):
        """DARTS' entries plus ``lambda`` and, over the epoch's architecture
        batches, ``expected_cost`` (mean sum_i q_i c_i), ``exit_distribution``
        (mean q), ``exit_accuracy`` (top-1 of each exit) and ``delta_alpha_sq``."""
        stats = {k: self._epoch_stats.get(k) for k in
                 ("expected_cost", "exit_distribution", "exit_accuracy", "delta_alpha_sq")}
        return {**super().describe(), "lambda": self.lam, **stats}

    def finish(self, run: RunContext):
        """Calibration, sweep and report on the held-out splits, with the EMA network."""
        from nasops.methods import hardexit_report as report

        self.report = report.evaluate(self.evaluation_model(), run)
        genotype = {k: v for k, v in Darts.describe(self).items() if k != "edge_weights"}
        return {**genotype, "hardexit": report.compact(self.report)}

    def write_outputs(self, out, result):
        from nasops.methods import hardexit_report as report

        super().write_outputs(out, result)
        report.write_run_folder(out, self.report, result)

    # ---- state --------------------------------------------------------------------------------
    def evaluation_model(self) -> HardExitNetwork:
        """A copy of the network with the EMA state, in eval mode."""
        model = copy.deepcopy(self.model)
        if self.ema is not None:
            model.load_state_dict(self.ema)
        return model.eval()

    def state_dict(self):
        return {**super().state_dict(), "ema": self.ema, "ema_steps": self.ema_steps}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.ema_steps = int(state["ema_steps"])
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError("ema: the checkpoint's --ema-decay and this run's disagree on using an EMA")
        if self.ema is not None:
            missing = set(self.ema) ^ set(state["ema"])
            if missing:
                raise KeyError(f"ema: the checkpoint's EMA does not fit this network ({sorted(missing)[:3]})")
            for k, v in state["ema"].items():
                self.ema[k].copy_(v)

    # ---- the step -----------------------------------------------------------------------------
    def _clip_arch_gradient(self, optimizer, args, kwargs):
        torch.nn.utils.clip_grad_norm_(self.alphas, self.arch_grad_clip)

    def step(self, train_batch, val_batch):
        stats = super().step(train_batch, val_batch)
        self._update_ema()
        return stats

    def _update_ema(self):
        if self.ema is None:
            return
        self.ema_steps += 1
        decay = min(self.ema_decay, (1 + self.ema_steps) / (10 + self.ema_steps))
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if v.is_floating_point():
                    self.ema[k].lerp_(v, 1 - decay)
                else:
                    self.ema[k].copy_(v)

    # The epoch statistics come from the architecture steps' validation batch
    # (the unrolled step also evaluates training batches: those are not recorded).
    def _arch_step(self, x, y):
        self._recorded_batch = x
        try:
            return super()._arch_step(x, y)
        finally:
            self._recorded_batch = None

    def _arch_step_unrolled(self, xt, yt, xv, yv):
        self._recorded_batch = xv
        try:
            return super()._arch_step_unrolled(xt, yt, xv, yv)
        finally:
            self._recorded_batch = None

    # --compile and --cuda-graphs: the step calls forward_exits, not forward. What runs
    # it instead is held by the method, not set on the network: a deep copy of the
    # network (evaluation_model) must run its own weights, not those of the network
    # the compiled function or the graphs were made for.
    def compile_network(self, **options):
        self._forward_exits = torch.compile(self.model.forward_exits, **options)

    def graph_network(self):
        exits = ForwardExits(self.model)
        graphed = super().graph_network(exits)
        self._forward_exits = lambda x: exits.outputs(exits(x))
        return graphed

    _forward_exits = None

    def _loss(self, x, y, dtype=None):
        with self._autocast(dtype):
            out = (self._forward_exits or self.model.forward_exits)(x)
        if self.warming_up:  # the stop heads learn after the warm-up (module doc)
            out.stop_logits = out.stop_logits.detach()
        parts = hardexit_objective(out, y, self.model.exit_costs, lam=self.lam, mu=self.mu,
                                   aux_weight=self.aux_weight)
        if x is self._recorded_batch and self._sums is not None:
            with torch.no_grad():
                correct = torch.stack([(logits.argmax(1) == y).sum() for logits in out.logits])
                self._sums += torch.cat([
                    parts.q.sum(0).double(), correct.double(),
                    torch.stack([parts.expected_cost, parts.delta_sq]).double() * len(y),
                    parts.q.new_full((1,), len(y), dtype=torch.float64)])
        return parts.loss, (parts.blended.argmax(1) == y).sum()
