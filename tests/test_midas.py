"""MIDAS (nasops.methods.midas): the edge, the topology rule and the node against
independent computations written here; the search end to end through the driver
(every space, backends, resume, DDP, AMP), its outputs against an independent
pass over the validation data."""
from __future__ import annotations

import itertools
import json
import math
import sys

import pytest
import torch
import torch.nn as nn

import nasops
from helpers import (assert_same_checkpoint_model, assert_same_forward_and_backward, kernel_backends,
                     run_killed_after_epoch, torchrun_two_ranks, unshared_ops)
from nasops import data as datasets
from nasops import spaces
from nasops.methods import midas
from nasops.methods.midas import (MidasDartsCell, MidasEdge, decode, decode_darts_cell, edge_strength,
                                  pair_weighted_node, pair_weights)
from nasops.search import main, parse_args
from nasops.spaces.base import MixedEdge
from nasops.spaces.operations import DARTS_OPS, AvgPool3x3, make_darts_op
from test_search import _comparable, _is_png, _metrics, _tiny, nb201_table  # noqa: F401

BACKENDS = ["eager", *kernel_backends("cpu")]
MIDAS_SPACES = ("darts", "rdarts-s1", "rdarts-s2", "rdarts-s3", "rdarts-s4", "nb201")


# Tiny networks: a thread pool costs more than it gains (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _midas(space, out, *extra):
    """A tiny MIDAS run: the driver tests' tiny network, 2 decoding batches."""
    return _tiny(space, out, "--method", "midas", "--midas-decode-batches", "2", "--midas-dim", "4", *extra)


def _darts_edge(C, stride, dim=3, grid=(2, 2), tau=1.0):
    edge = MixedEdge(DARTS_OPS, [make_darts_op(n, C, stride) for n in DARTS_OPS])
    return MidasEdge.replacing(edge, C, dim=dim, grid=grid, tau=tau)


# ---- the edge ---------------------------------------------------------------------------

_EDGE_CASES = [(1, 6, (2, 2), 4), (1, 6, (2, 3), 6), (2, 4, (4, 4), 4), (1, 3, (5, 1), 3)]


# Every case on eager and the C++ kernels; Triton's interpreter (ms per launch) on one.
@pytest.mark.parametrize("backend,stride,size,grid,expected_patches",
                         [(b, *case) for b in BACKENDS if b != "triton" for case in _EDGE_CASES]
                         + [(b, *_EDGE_CASES[2]) for b in BACKENDS if b == "triton"])
def test_edge_weights_sum_to_one_per_patch_and_sample(backend, stride, size, grid, expected_patches):
    torch.manual_seed(0)
    edge = _darts_edge(4, stride, grid=grid)
    x = torch.randn(3, 4, size, size)
    with _backend(backend):
        y, w = edge(x)
    assert y.shape == (3, 4, size // stride, size // stride)
    assert w.shape == (3, expected_patches, len(DARTS_OPS)) and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(3, expected_patches))
    assert (w > 0).all() and not torch.allclose(w[0], w[1])  # input-specific


class _backend:
    """nasops.set_backend for a block, restored after."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.saved = nasops.backend._override
        nasops.set_backend(self.name)

    def __exit__(self, *exc):
        nasops.backend._override = self.saved


class _Constant(nn.Module):
    """An 'op' whose output does not depend on the input: a fixed map per channel."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value.expand(x.shape[0], -1, -1, -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_patch_and_sample_independent_keys_reduce_to_a_per_sample_softmax(backend):
    """Grid 1x1 and ops whose outputs are the same for every sample: the keys
    c_k @ Wk are sample-independent, so w[b] = softmax_k(mean(x_b) @ Wq . key_k
    / sqrt(D) / tau) - a per-sample softmax - and the edge is DARTS's mixed edge
    with those per-sample weights."""
    torch.manual_seed(1)
    B, C, H, W, D, tau = 5, 3, 4, 5, 6, 0.7
    constants = [torch.randn(1, C, H, W) for _ in range(2)]
    names = ["none", "a", "b"]
    edge = MidasEdge(names, [None, _Constant(constants[0]), _Constant(constants[1])], C, dim=D, grid=(1, 1),
                     tau=tau)
    with torch.no_grad():
        edge.zero_key.normal_()
    x = torch.randn(B, C, H, W)
    with _backend(backend):
        y, w = edge(x)

    q = x.double().mean(dim=(2, 3)) @ edge.Wq.double()  # (B, D)
    keys = torch.stack([edge.zero_key.double()] + [c.double().mean(dim=(2, 3))[0] @ edge.Wk.double()
                                                    for c in constants])  # (K, D), one for all samples
    expected = torch.softmax(q @ keys.T / math.sqrt(D) / tau, dim=-1)  # (B, K): per sample
    torch.testing.assert_close(w[:, 0].double(), expected)
    assert not torch.allclose(expected[0], expected[1])
    darts_edge = MixedEdge(names, [None, _Constant(constants[0]), _Constant(constants[1])])
    torch.testing.assert_close(y, darts_edge(x, expected.float()))


def test_prior_is_the_alpha_table_up_to_a_constant():
    """The cells pass log softmax(alpha) as the prior: the same weights as alpha itself."""
    torch.manual_seed(2)
    edge = _darts_edge(4, 1)
    x = torch.randn(2, 4, 6, 6)
    alpha = torch.randn(len(DARTS_OPS))
    _, w_alpha = edge(x, alpha)
    _, w_log_softmax = edge(x, torch.log_softmax(alpha, 0))
    _, w_none = edge(x)
    torch.testing.assert_close(w_log_softmax, w_alpha)
    assert not torch.allclose(w_alpha, w_none)


# ---- the topology rule and the node -----------------------------------------------------

def test_edge_strength_hand_computed():
    w = torch.tensor([[0.6, 0.1, 0.3], [0.05, 0.9, 0.05]], dtype=torch.float64)
    torch.testing.assert_close(edge_strength(w, 0), torch.log(torch.tensor([0.4, 0.95], dtype=torch.float64)))
    torch.testing.assert_close(edge_strength(w, 2), torch.log(torch.tensor([0.7, 0.95], dtype=torch.float64)))
    # no Zero op: the log of the largest weight (SPEC's summed weight would be log 1 = 0)
    torch.testing.assert_close(edge_strength(w, None), torch.log(torch.tensor([0.6, 0.9], dtype=torch.float64)))
    # an all-Zero edge is very weak, not -inf (a node of such edges still has finite pair weights)
    assert torch.isfinite(edge_strength(torch.tensor([1.0, 0.0, 0.0]), 0))


def test_node_strengths_are_the_edges_strengths_from_their_patch_means():
    torch.manual_seed(5)
    ws = [torch.softmax(torch.randn(2, 4, 3, dtype=torch.float64), -1) for _ in range(3)]
    for zeros in ([0, 0, 0], [None] * 3, [0, None, 2]):  # alike (batched) and mixed (per edge)
        expected = torch.stack([edge_strength(w.mean(dim=1), z) for w, z in zip(ws, zeros)], dim=1)
        torch.testing.assert_close(midas.node_strengths(ws, zeros), expected)
    by_hand = torch.log(1 - ws[1].mean(dim=1)[:, 0])
    torch.testing.assert_close(midas.node_strengths(ws, [0, 0, 0])[:, 1], by_hand)


def _row(none, *others):
    return [none, *others]


def test_topology_rule_on_hand_built_weights_picks_the_expected_pairs():
    """Two nodes (5 edges), ops none/a/b. Node 1's edges have w[none] 0.9, 0.2, 0.5:
    s = log .1, log .8, log .5, pair weights prop. to (.08, .05, .40): pair (1, 2)."""
    names = [["none", "a", "b"]] * 5
    dist = [
        _row(0.6, 0.1, 0.3),  # node 0 <- 0: s = log .4
        _row(0.3, 0.5, 0.2),  # node 0 <- 1: s = log .7 (stronger)
        _row(0.9, 0.04, 0.06),  # node 1 <- 0
        _row(0.2, 0.3, 0.5),  # node 1 <- 1: s = log .8
        _row(0.5, 0.45, 0.05),  # node 1 <- 2: s = log .5
    ]
    genes, info = decode_darts_cell(dist, names, nodes=2)
    assert genes == [["a", 1], ["b", 0], ["b", 1], ["a", 2]]
    assert info[0] == {"node": 0, "pairs": [[0, 1]], "weights": [1.0], "chosen": [0, 1]}
    assert info[1]["pairs"] == [[0, 1], [0, 2], [1, 2]] and info[1]["chosen"] == [1, 2]
    expected = torch.tensor([0.1 * 0.8, 0.1 * 0.5, 0.8 * 0.5], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(info[1]["weights"], dtype=torch.float64), expected / expected.sum())


def test_topology_rule_weighs_all_non_zero_ops_not_the_best_one():
    """DARTS keeps the edges whose best non-Zero op is heaviest (here 0 and 2);
    MIDAS the edges with the most non-Zero weight in all (here 0 and 1)."""
    names = [["none", "a", "b"]] * 5
    dist = [_row(0.5, 0.25, 0.25), _row(0.5, 0.25, 0.25),
            _row(0.1, 0.5, 0.4), _row(0.4, 0.3, 0.3), _row(0.55, 0.45, 0.0)]
    genes, _ = decode_darts_cell(dist, names, nodes=2)
    assert [j for _, j in genes[2:]] == [0, 1]
    darts_genes = spaces.darts.derive_genes(dist, names, nodes=2)
    assert sorted(j for _, j in darts_genes[2:]) == [0, 2]


def test_topology_rule_without_zero_op_uses_the_largest_weight():
    names = [["skip_connect", "sep_conv_3x3"]] * 5
    dist = [[0.5, 0.5], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]
    genes, info = decode_darts_cell(dist, names, nodes=2)
    assert genes[2:] == [["skip_connect", 1], ["sep_conv_3x3", 2]]
    expected = torch.tensor([0.5 * 0.9, 0.5 * 0.7, 0.9 * 0.7], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(info[1]["weights"], dtype=torch.float64), expected / expected.sum())
    # ties: the first pair, the lower input first, the first op
    genes, info = decode_darts_cell([[0.5, 0.5]] * 5, names, nodes=2)
    assert info[1]["chosen"] == [0, 1] and genes[2:] == [["skip_connect", 0], ["skip_connect", 1]]


def test_decode_nb201_is_the_argmax_with_zero():
    ops = list(spaces.nb201.NB201_OPS)
    dist = [[0.1, 0.2, 0.3, 0.4, 0.0], [0.9, 0.1, 0, 0, 0], [0, 0, 0, 0, 1], [0.2] * 5, [0, 1, 0, 0, 0],
            [0, 0, 0.6, 0.4, 0]]
    decoded = decode("nb201", 4, {"normal": dist}, {"normal": [ops] * 6})
    assert decoded["genotype_str"] == ("|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|none~0|skip_connect~1|"
                                       "nor_conv_1x1~2|")


def _explicit_pair_sum(outputs, strengths):
    """sum over pairs (a, b) of pi_(a,b) (o_a + o_b), pi = softmax over pairs of s_a + s_b."""
    pairs = list(itertools.combinations(range(len(outputs)), 2))
    logits = torch.stack([strengths[:, a] + strengths[:, b] for a, b in pairs], dim=1)
    pi = torch.exp(logits - logits.logsumexp(dim=1, keepdim=True))
    return sum(pi[:, i, None, None, None] * (outputs[a] + outputs[b]) for i, (a, b) in enumerate(pairs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_pair_weighted_node_equals_its_explicit_sum(backend, n):
    torch.manual_seed(n)
    outputs = [torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    strengths = (-3 * torch.rand(3, n, dtype=torch.float64)).requires_grad_(True)
    expected = _explicit_pair_sum(outputs, strengths)
    with _backend(backend):
        got = pair_weighted_node(outputs, strengths if n > 2 else None)
    torch.testing.assert_close(got, expected)
    if n > 2:
        g = torch.randn_like(expected)
        got_grads = torch.autograd.grad(got, [*outputs, strengths], g)
        want_grads = torch.autograd.grad(expected, [*outputs, strengths], g)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(pair_weights(strengths).sum(-1), torch.ones(3, dtype=torch.float64))


def test_darts_cell_forward_is_its_edges_with_pair_weighted_nodes():
    """The cell wires edge e of node i to state j in DARTS order, takes strengths from
    each edge's weights averaged over patches, and concatenates the nodes."""
    torch.manual_seed(3)
    cell = MidasDartsCell([DARTS_OPS] * 14, 4, 6, 6, 4, False, False, dim=3, grid=(2, 2), tau=1.0).double()
    s0, s1 = torch.randn(2, 6, 6, 6, dtype=torch.float64), torch.randn(2, 6, 6, 6, dtype=torch.float64)
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    e = 0
    for _ in range(4):
        outs = [cell.edges[e + j](h) for j, h in enumerate(states)]
        strengths = torch.stack([torch.log(1 - w.mean(dim=1)[:, 0]) for _, w in outs], dim=1)
        states.append(_explicit_pair_sum([y for y, _ in outs], strengths))
        e += len(outs)
    torch.testing.assert_close(cell(s0, s1, None), torch.cat(states[2:], dim=1))


# ---- the network ------------------------------------------------------------------------

@pytest.mark.parametrize("space", MIDAS_SPACES)
@pytest.mark.parametrize("prior", [False, True])
def test_network_arch_parameters_are_the_attention_parameters(space, prior):
    net = midas.build_network(space, in_channels=1, num_classes=10, C=4, layers=1 if space == "nb201" else 3,
                              dim=5, prior=prior)
    edges = [m for m in net.modules() if isinstance(m, MidasEdge)]
    expected = ([net.alphas(t) for t in net.cell_types] if prior else []) + [
        p for edge in edges for p in (edge.Wq, edge.Wk, edge.zero_key) if p is not None]
    assert [id(p) for p in net.arch_parameters()] == [id(p) for p in expected]
    assert all(edge.Wq.shape[1] == 5 for edge in edges)
    assert {id(p) for p in net.weight_parameters()}.isdisjoint(id(p) for p in net.arch_parameters())
    assert len(net.weight_parameters()) + len(net.arch_parameters()) == len(list(net.parameters()))
    assert all((edge.zero_key is not None) == ("none" in edge.op_names) for edge in edges)
    if not prior:
        assert net.mixing_weights() == {t: None for t in net.cell_types}
        with pytest.raises(ValueError, match="without alphas"):
            net.edge_weights()
    logits = net(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.arch_parameters())


def test_describe_decodes_the_running_means_of_the_architecture_steps():
    """describe() (metrics.jsonl) averages what the validation forwards of the
    epoch's architecture steps saw, and begin_epoch starts over."""
    torch.manual_seed(4)
    net = midas.build_network("rdarts-s3", in_channels=1, num_classes=10, C=4, layers=3, dim=3)
    method = midas.Midas(net, epochs=1, device="cpu")
    seen = []
    for edge in [m for m in net.modules() if isinstance(m, MidasEdge)]:
        edge.register_forward_hook(lambda module, inputs, output: seen.append(output[1].detach()))
    batches = [(torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))) for _ in range(2)]
    method.begin_epoch(0)
    expected = 0
    for x, y in batches:
        seen.clear()
        method._arch_step(x, y)
        w = torch.stack([s.double().mean(dim=1) for s in seen]).reshape(3, 14, 6, 3)  # cells, edges, B, K
        expected = expected + w[[0]].mean(dim=0).sum(dim=1)  # cell 0 is the only normal cell
    seen.clear()
    method._weight_step(*batches[0])  # weight steps are not counted
    described = method.describe()
    got = torch.tensor([list(e["ops"].values()) for e in described["edge_weights"]["normal"]],
                       dtype=torch.float64)
    torch.testing.assert_close(got, expected / 12)
    genes, _ = decode_darts_cell(got.tolist(), net.op_names("normal"), 4)
    assert described["genotype"]["normal"] == genes
    method.begin_epoch(1)
    assert all(e["ops"]["none"] == pytest.approx(1 / 3) for e in method.describe()["edge_weights"]["normal"])


@pytest.mark.parametrize("space,layers", [("darts", 5), ("nb201", 2)])
def test_weights_start_nearly_uniform_on_every_edge(space, layers):
    """The driver's default network on the digits: every edge's weights start close
    to uniform (as DARTS's alphas), deep cells included. With Wq, Wk of the usual
    1/C variance the last NB201 stage started at weights 0 and 1 and the supernet
    did not train (midas module docstring, INIT_SCALE)."""
    torch.manual_seed(0)
    net = midas.build_network(space, in_channels=1, num_classes=10, C=8, layers=layers)
    x, _ = datasets.load("digits").batch(torch.arange(64))
    weights = []
    for edge in [m for m in net.modules() if isinstance(m, MidasEdge)]:
        edge.register_forward_hook(lambda module, inputs, output: weights.append(output[1]))
    with torch.no_grad():
        net(x)
    for w in weights:
        K = w.shape[-1]
        assert 0.8 / K < w.min() and w.max() < 1.25 / K


# ---- flags ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--midas-grid", "0x2"], "--midas-grid: expected GHxGW or G"),
    (["--midas-grid", "two"], "--midas-grid: expected GHxGW or G"),
    (["--midas-dim", "0"], "--midas-dim: expected >= 1, got 0"),
    (["--midas-tau", "0"], "--midas-tau: expected a positive number, got 0.0"),
    (["--midas-decode-batches", "0"], "--midas-decode-batches: expected >= 1"),
    (["--midas-mosaic-edge", "normal:5->0"], "--midas-mosaic-edge: expected [TYPE:]SRC->DST"),
    (["--midas-mosaic-edge", "normal:0->2", "--layers", "2"], "has no normal cell"),
    (["--space", "nb201", "--midas-mosaic-edge", "reduce:0->1"], "--midas-mosaic-edge"),
])
def test_bad_midas_flags_exit_2_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--method", "midas", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_midas_flags_parse_and_enter_only_midas_runs():
    args = parse_args(["--method", "midas", "--midas-grid", "3", "--space", "nb201", "--midas-mosaic-edge",
                       "1->3"])
    assert midas.parse_grid(args.midas_grid) == (3, 3) and midas.parse_grid("2x4") == (2, 4)
    assert midas.parse_mosaic_edge(args.midas_mosaic_edge, "nb201", 2) == ("normal", "1->3")
    assert midas.parse_mosaic_edge(None, "darts", 2) == ("reduce", "0->2")  # 2 cells: both reduce
    from nasops.search import run_config
    assert "midas_grid" not in run_config(parse_args([]))


# ---- the search, end to end --------------------------------------------------------------

def _check_outputs(out, space, result):
    saved = json.loads((out / "genotype.json").read_text())
    assert saved["method"] == "midas" and saved["genotype_str"] == result["genotype_str"]
    assert saved["decode_samples"] == 2 * 16
    for t, table in saved["edge_weights"].items():
        for edge in table:
            assert sum(edge["ops"].values()) == pytest.approx(1.0, abs=1e-6)
        assert _is_png(out / f"cell_{t}.png") and _is_png(out / f"weights_{t}.png")
        assert _is_png(out / f"midas_class_weights_{t}.png")
    if space == "nb201":
        assert saved["pair_weights"] == {}
    else:
        for t in ("normal", "reduce"):
            kept = [sorted(j for _, j in saved["genotype"][t][2 * i:2 * i + 2]) for i in range(4)]
            assert [node["chosen"] for node in saved["pair_weights"][t]] == kept
            for node in saved["pair_weights"][t]:
                assert sum(node["weights"]) == pytest.approx(1.0)
    for name in ("midas_unimodality.png", "midas_mosaic.png"):
        assert _is_png(out / name)
    mosaic = saved["mosaic"]
    assert len(mosaic["samples"]) == 8 and len(mosaic["samples"][0]["patch_ops"]) == 4  # 2x2 grid on 8x8
    records = _metrics(out)
    assert records[-1]["genotype_str"] and "pair_weights" in records[-1]
    return saved


@pytest.mark.slow
@pytest.mark.parametrize("space", MIDAS_SPACES)
def test_tiny_midas_search_on_every_space(tmp_path, space, nb201_table):
    out = tmp_path / "run"
    extra = ["--epochs", "1", "--max-steps", "1"]
    if space == "nb201":
        extra += ["--nb201-table", str(nb201_table)]
    if space == "rdarts-s3":
        extra += ["--midas-prior"]
    result = main(_midas(space, out, *extra))
    saved = _check_outputs(out, space, result)
    if space == "nb201":
        assert "nb201" in saved and saved["genotype"]["arch"] == saved["genotype_str"]
    if space == "rdarts-s3":
        state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
        assert "alphas_normal" in state and "alphas_reduce" in state


@pytest.mark.slow
def test_second_order_and_amp_midas_searches_run(tmp_path):
    second = main(_midas("rdarts-s2", tmp_path / "so", "--epochs", "1", "--max-steps", "1", "--second-order"))
    assert second["metrics"][0]["val_loss"] > 0
    args = ["--epochs", "1", "--max-steps", "2"]
    full = main(_midas("nb201", tmp_path / "fp32", *args))["metrics"][0]
    amp = main(_midas("nb201", tmp_path / "amp", *args, "--amp"))["metrics"][0]
    assert amp["train_loss"] != full["train_loss"]  # autocast really changed the arithmetic
    assert amp["train_loss"] == pytest.approx(full["train_loss"], rel=0.05)
    assert amp["val_loss"] == pytest.approx(full["val_loss"], rel=0.05)


@pytest.mark.slow
def test_class_weights_and_decoding_match_an_independent_pass(tmp_path):
    """Rebuild the searched network from the checkpoint, run the decoding batches
    through it with forward hooks on the edges, and recompute every number of
    genotype.json and midas_class_weights.json from the hooked weights."""
    out = tmp_path / "run"
    argv = _midas("nb201", out, "--epochs", "1", "--max-steps", "2", "--midas-grid", "3x2")
    main(argv)
    args = parse_args(argv)
    data = datasets.load("digits")
    model = midas.Midas.build_model(args, data)
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=False)["model"])
    model.train()
    _, val_idx = datasets.split(len(data), args.train_portion, args.seed)
    loader = datasets.ShardedLoader(data, val_idx, args.batch_size, seed=args.seed + 1)
    edges = [m for m in model.modules() if isinstance(m, MidasEdge)]
    seen = []
    for edge in edges:
        edge.register_forward_hook(lambda module, inputs, output: seen.append(output[1]))
    per_sample, labels, first_w = [], [], None
    with torch.no_grad():
        for x, y in itertools.islice(loader.epoch(0), 2):
            seen.clear()
            model(x)
            first_w = first_w if first_w is not None else seen[:6]
            w = torch.stack([s.double().mean(dim=1) for s in seen])  # (cells*6, B, K), cells in order
            per_sample.append(w.reshape(-1, 6, *w.shape[1:]).mean(dim=0).transpose(0, 1))  # (B, 6, K)
            labels.append(y)
    per_sample, labels = torch.cat(per_sample), torch.cat(labels)
    mean = per_sample.mean(dim=0)

    saved = json.loads((out / "genotype.json").read_text())
    ops = list(spaces.nb201.NB201_OPS)
    got = torch.tensor([[edge["ops"][op] for op in ops] for edge in saved["edge_weights"]["normal"]])
    torch.testing.assert_close(got, mean.float(), rtol=1e-5, atol=1e-6)
    assert saved["genotype_str"] == spaces.nb201.derive_arch(mean.tolist())
    choice = mean.argmax(dim=-1)
    for e, entry in enumerate(saved["unimodality"]["normal"]):
        assert entry["op"] == ops[choice[e]]
        assert entry["share"] == pytest.approx((per_sample[:, e].argmax(-1) == choice[e]).double().mean().item())

    classes = json.loads((out / "midas_class_weights.json").read_text())
    assert classes["samples_per_class"] == torch.bincount(labels, minlength=10).tolist()
    for e, entry in enumerate(classes["cells"]["normal"]):
        assert entry["ops"] == ops
        for c in range(10):
            members = per_sample[labels == c, e]
            if len(members) == 0:
                assert entry["weights"][c] is None
            else:
                torch.testing.assert_close(torch.tensor(entry["weights"][c], dtype=torch.float64),
                                           members.mean(0), rtol=1e-5, atol=1e-6)
    mosaic = saved["mosaic"]
    assert mosaic["edge"] == "normal:0->1" and mosaic["grid"] == [3, 2] and mosaic["map_size"] == [8, 8]
    picks = first_w[0][:8].argmax(dim=-1)  # the first cell's first edge, first batch
    assert [s["patch_ops"] for s in mosaic["samples"]] == [[ops[k] for k in row] for row in picks.tolist()]
    assert [s["label"] for s in mosaic["samples"]] == labels[:8].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_kernel_backends_give_the_eager_midas_loss_curve(tmp_path, backend):
    # nb201, one cell per stage. Triton's interpreter costs milliseconds per
    # program instance, and its patch pooling runs one per (sample, patch, map):
    # there, 4 samples and one patch per map (the per-patch kernels are checked
    # against the reference in test_patch_attention.py), two epochs.
    if backend == "triton":
        args = ["--epochs", "2", "--batch-size", "4", "--midas-grid", "1"]
    else:
        args = ["--epochs", "3"]
    args += ["--max-steps", "1", "--midas-decode-batches", "1"]
    eager = main(_midas("nb201", tmp_path / "eager", *args, "--backend", "eager"))
    kernel = main(_midas("nb201", tmp_path / backend, *args, "--backend", backend))
    for e, k in zip(eager["metrics"], kernel["metrics"]):
        for key in ("train_loss", "val_loss"):
            assert k[key] == pytest.approx(e[key], rel=1e-4, abs=1e-5), (key, e["epoch"])
    states = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"]
              for name in ("eager", backend)]
    arch = [name for name in states[0] if name.endswith(("Wq", "Wk", "zero_key"))]
    assert len(arch) == 3 * 6 * 3
    for name in arch:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=1e-4, atol=1e-5)
    assert kernel["genotype_str"] == eager["genotype_str"]


@pytest.mark.slow
def test_killed_and_resumed_midas_run_equals_uninterrupted_run(tmp_path):
    args = ["--epochs", "3", "--max-steps", "2", "--deterministic"]
    full = main(_midas("nb201", tmp_path / "full", *args))

    out = tmp_path / "killed"
    run_killed_after_epoch("nasops.search", _midas("nb201", out, *args), epoch=1)
    assert len(_metrics(out)) == 1 and not (out / "genotype.json").exists()

    resumed = main(_midas("nb201", out, *args, "--resume"))
    assert resumed["genotype"] == full["genotype"]
    assert _comparable(_metrics(out)) == _comparable(_metrics(tmp_path / "full"))
    for name in ("genotype.json", "midas_class_weights.json"):
        assert (out / name).read_text() == (tmp_path / "full" / name).read_text()
    _, full_state = assert_same_checkpoint_model(out, tmp_path / "full")
    assert any(k.endswith(".Wq") for k in full_state["model"])


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_end_with_identical_midas_parameters(tmp_path):
    out = tmp_path / "ddp"
    torchrun_two_ranks("nasops.search", _midas("nb201", out, "--epochs", "2", "--max-steps", "2", "--midas-prior"),
                       NASOPS_TEST_DUMP_ALPHAS=str(tmp_path))
    rank0 = torch.load(tmp_path / "alphas_rank0.pt")
    rank1 = torch.load(tmp_path / "alphas_rank1.pt")
    assert len(rank0) == 1 + 18 * 3  # the prior table, then Wq, Wk, zero key of 3 cells x 6 edges
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert torch.equal(state["alphas_normal"], rank0[0]) and torch.equal(state["cells.0.edges.0.Wq"], rank0[1])
    saved = json.loads((out / "genotype.json").read_text())
    # both ranks' shards were decoded: 2 batches of 16 per rank
    assert saved["world_size"] == 2 and saved["decode_samples"] == 2 * 2 * 16


def test_step_benchmark_runs_and_rewrites_its_results_block(tmp_path):
    """benchmarks/bench_midas_step.py stays runnable (timing itself is not a test)."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import bench_midas_step as bench
    finally:
        sys.path.remove(str(root / "benchmarks"))
    flags = ["--space", "nb201", "--layers", "1", "--init-channels", "4", "--batch-size", "8", "--threads", "1"]
    row = bench.time_config("tiny", flags, reps=1, block=1, backend="auto", device=torch.device("cpu"))
    assert row["reps"] == 1 and row["darts_s"] > 0 and row["midas_cpu_s"] > 0
    assert row["ratio"] == pytest.approx(row["midas_s"] / row["darts_s"])
    assert row["layout"] == "channels_last"  # as the driver runs on the CPU (--memory-format auto)
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\nother section\n")
    bench.write(results, bench.section([row], torch.device("cpu"), "cmd one"))
    bench.write(results, bench.section([row], torch.device("cpu"), "cmd two"))
    text = results.read_text()
    assert text.startswith("# results\n\nother section\n") and text.count(bench.BEGIN) == 1
    assert "cmd two" in text and "cmd one" not in text and "| tiny |" in text


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_edges_from_one_state_share_its_pools(space):
    """MIDAS's cells pass each state's dict to its edges (spaces.base.share_ops): a pool
    runs once per state (DARTS: 5 states, 14 edges a cell; NB201: 3 states, 6 edges),
    with the values of a network whose edges run their own."""
    torch.manual_seed(0)
    net = midas.build_network(space, in_channels=1, num_classes=10, C=4, layers=1 if space == "nb201" else 3,
                              dim=3).double()
    ref = unshared_ops(net)
    calls = []
    for m in net.modules():
        if isinstance(m, AvgPool3x3):
            m.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert_same_forward_and_backward(net, ref, x)
    cells = [c for c in net.cells if hasattr(c, "edges")]
    assert len(calls) == len(cells) * (5 if space == "darts" else 3)
