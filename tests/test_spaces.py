"""nasops.spaces: the search networks, their genotypes, the NB201 table and the pictures."""
from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch

import nasops
import nasops.ops
from nasops.ops.mixed_op import _KERNELS as MIXED_OP_KERNELS
from nasops.spaces import SPACES, build
from nasops.spaces import darts, nb201
from nasops.spaces.darts import derive_genes
from nasops.spaces.operations import DARTS_OPS, NB201_OPS
from nasops.spaces.plot import plot_cell, plot_edge_weights
from helpers import assert_same_forward_and_backward, kernel_backends, unshared_ops

ROOT = Path(__file__).resolve().parent.parent
EXCERPT = Path(__file__).resolve().parent / "data" / "nb201_excerpt.csv"
RDARTS_JSON = ROOT / "nasops" / "spaces" / "data" / "rdarts_spaces.json"

BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


# Tiny networks: a thread pool costs more than it gains (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(space, **kw):
    """C=4, 3 DARTS cells (normal, reduce, reduce) or one NB201 cell per stage."""
    args = dict(in_channels=3, num_classes=5, C=4, layers=1 if space == "nb201" else 3)
    args.update(kw)
    return build(space, **args)


def set_weights(net, cell_type, rows):
    """Make softmax(alphas) equal the given probability rows exactly (alpha = log p)."""
    with torch.no_grad():
        net.alphas(cell_type).copy_(torch.tensor(rows, dtype=torch.float64).log())


def rdarts_spec():
    return json.loads(RDARTS_JSON.read_text())


# ---- structure ------------------------------------------------------------------------

def test_tests_here_run_with_one_thread():
    """conftest.py's one_thread fixture is in force (pytestmark above)."""
    assert torch.get_num_threads() == 1


def test_build_rejects_unknown_space():
    with pytest.raises(ValueError, match=r"space: expected one of .*'darts'.*'rdarts-s4'.*got 'dart'"):
        build("dart", in_channels=3, num_classes=10)


@pytest.mark.parametrize("space", SPACES)
def test_forward_backward(space):
    torch.manual_seed(0)
    net = tiny(space)
    assert net.space == space
    x = torch.randn(2, 3, 8, 8)
    logits = net(x)
    assert logits.shape == (2, 5)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    for a in net.arch_parameters():
        assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    weights = net.weight_parameters()
    assert all(p.grad is not None for p in weights)
    # The two groups partition the parameters.
    ids = [id(p) for p in weights] + [id(p) for p in net.arch_parameters()]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())


def _mixed_edge_calls(monkeypatch, net):
    """Run a forward pass, recording the op outputs (None or not) of every mixed_op call."""
    calls = []
    original = nasops.ops.mixed_op

    def recording(outputs, weights, **kw):
        calls.append(([o is None for o in outputs], tuple(weights.shape)))
        return original(outputs, weights, **kw)

    monkeypatch.setattr(nasops.ops, "mixed_op", recording)
    torch.manual_seed(0)
    net(torch.randn(2, 3, 8, 8))
    return calls


@pytest.mark.parametrize("space", ["darts", "rdarts-s3"])
def test_every_darts_edge_goes_through_mixed_op(space, monkeypatch):
    net = tiny(space)
    calls = _mixed_edge_calls(monkeypatch, net)
    # 3 cells (normal, reduce, reduce) x 14 edges, Zero ops passed as None (stride 2 too).
    assert len(calls) == 3 * 14
    for cell, cell_type in enumerate(("normal", "reduce", "reduce")):
        for e, names in enumerate(net.op_names(cell_type)):
            is_none, wshape = calls[14 * cell + e]
            assert is_none == [n == "none" for n in names]
            assert wshape == (len(names),)


def test_every_nb201_edge_goes_through_mixed_op(monkeypatch):
    net = tiny("nb201", layers=2)
    calls = _mixed_edge_calls(monkeypatch, net)
    assert len(calls) == 3 * 2 * 6  # 3 stages x 2 cells x 6 edges
    assert all(is_none == [True, False, False, False, False] and wshape == (5,)
               for is_none, wshape in calls)


def test_darts_structure():
    net = build("darts", in_channels=3, num_classes=10)
    assert [a.shape for a in net.arch_parameters()] == [(14, 8), (14, 8)]
    assert [c.reduction for c in net.cells] == [False, False, True, False, False, True, False, False]
    assert net.op_names("normal") == [list(DARTS_OPS)] * 14 == net.op_names("reduce")
    # The DARTS search log for CIFAR-10 prints "param size = 1.930618MB" (alphas excluded).
    assert sum(p.numel() for p in net.weight_parameters()) == 1_930_618
    edges = [e["edge"] for e in net.edge_weights()["normal"]]
    assert edges[:5] == ["0->2", "1->2", "0->3", "1->3", "2->3"] and edges[-1] == "4->5"


def test_nb201_structure():
    net = build("nb201", in_channels=3, num_classes=10)  # NB201: N = 5 cells per stage
    assert [a.shape for a in net.arch_parameters()] == [(6, 5)]
    assert net.cell_types == ("normal",)
    assert sum(isinstance(c, nb201.NB201Cell) for c in net.cells) == 15
    assert len(net.cells) == 17  # + two ResNet reduction blocks
    assert net.op_names("normal") == [list(NB201_OPS)] * 6
    assert [e["edge"] for e in net.edge_weights()["normal"]] == ["0->1", "0->2", "1->2", "0->3",
                                                                  "1->3", "2->3"]


@pytest.mark.parametrize("variant", ["s1", "s2", "s3", "s4"])
def test_rdarts_op_lists_match_the_json(variant):
    spec = rdarts_spec()[variant]
    net = tiny(f"rdarts-{variant}")
    for cell_type in ("normal", "reduce"):
        assert net.op_names(cell_type) == spec[cell_type]
        assert net.alphas(cell_type).shape == (14, len(spec[cell_type][0]))
        cell = next(c for c in net.cells if c.reduction == (cell_type == "reduce"))
        assert [edge.op_names for edge in cell.edges] == spec[cell_type]


def test_s4_noise_is_standard_normal_and_subsampled():
    from nasops.spaces.operations import make_darts_op
    x = torch.zeros(64, 4, 8, 8)
    assert make_darts_op("noise", 4, 2)(x).shape == (64, 4, 4, 4)
    noise = make_darts_op("noise", 4, 1)(x)
    assert noise.shape == x.shape
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05


def test_mixed_edge_is_the_weighted_sum_of_its_ops():
    net = tiny("darts")
    edge = net.cells[1].edges[0]  # reduction edge c_{k-2} -> node 0: stride 2
    x = torch.randn(2, edge.ops[4].op[1].in_channels, 8, 8)
    w = torch.softmax(torch.randn(8), 0)
    expected = sum(w[k] * op(x) for k, op in enumerate(edge.ops) if k > 0)  # none: nothing
    torch.testing.assert_close(edge(x, w), expected)


def test_mixed_edge_under_autocast_mixes_one_dtype():
    from nasops.spaces.base import MixedEdge
    from nasops.spaces.operations import make_darts_op
    names = ["none", "skip_connect", "sep_conv_3x3"]
    edge = MixedEdge(names, [make_darts_op(n, 4, 1) for n in names])
    x = torch.randn(2, 4, 8, 8)  # float32: the identity keeps it, the conv goes bfloat16
    w = torch.tensor([0.2, 0.3, 0.5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = edge(x, w)
        conv = edge.ops[2](x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), 0.3 * x + 0.5 * conv.float(), rtol=2e-2, atol=2e-2)


def test_weights_override_per_sample():
    torch.manual_seed(0)
    net = tiny("darts").eval()
    x = torch.randn(2, 3, 8, 8)
    static = net.mixing_weights()
    per_sample = {t: w.expand(2, *w.shape) for t, w in static.items()}
    torch.testing.assert_close(net(x, weights=per_sample), net(x))
    with pytest.raises(ValueError, match=r"weights\['normal'\]"):
        net(x, weights={"normal": torch.ones(3, 8)})


# ---- genotypes --------------------------------------------------------------------------

def _row(**probs):
    """A probability row over DARTS_OPS: the given ops, the rest share what is left."""
    rest = (1.0 - sum(probs.values())) / (len(DARTS_OPS) - len(probs))
    return [probs.get(op, rest) for op in DARTS_OPS]


UNIFORM = _row()
DARTS_TABLE = [
    # node 0 (c_{k-2}, c_{k-1}): Zero dominates edge 0 but a node keeps two edges anyway.
    _row(none=0.65, sep_conv_3x3=0.2), _row(skip_connect=0.3),
    # node 1: edge 2 has by far the largest weight, on Zero: it must lose.
    _row(none=0.93), _row(dil_conv_3x3=0.4), _row(avg_pool_3x3=0.35),
    # node 2
    _row(sep_conv_5x5=0.5), UNIFORM, UNIFORM, _row(max_pool_3x3=0.45),
    # node 3: 0.30 beats 0.29 (which hides behind a 0.7 Zero)
    UNIFORM, UNIFORM, _row(dil_conv_5x5=0.3), _row(none=0.7, skip_connect=0.29), UNIFORM,
]
DARTS_GENES = [["skip_connect", 1], ["sep_conv_3x3", 0],
               ["dil_conv_3x3", 1], ["avg_pool_3x3", 2],
               ["sep_conv_5x5", 0], ["max_pool_3x3", 3],
               ["dil_conv_5x5", 2], ["skip_connect", 3]]


def test_darts_genes_hand_built():
    assert derive_genes(DARTS_TABLE, [DARTS_OPS] * 14, 4) == DARTS_GENES


def test_darts_genotype_from_alphas():
    net = tiny("darts")
    set_weights(net, "normal", DARTS_TABLE)
    set_weights(net, "reduce", [UNIFORM] * 14)
    g = net.genotype()
    assert g["normal"] == DARTS_GENES
    # All equal: the first two inputs, the first non-Zero op.
    assert g["reduce"] == [["max_pool_3x3", 0], ["max_pool_3x3", 1]] * 4
    assert g["normal_concat"] == g["reduce_concat"] == [2, 3, 4, 5]
    assert json.loads(json.dumps(g)) == g
    assert net.genotype_str().startswith(
        "normal=|skip_connect~1|sep_conv_3x3~0|+|dil_conv_3x3~1|avg_pool_3x3~2|+|")
    ew = net.edge_weights()["normal"][2]
    assert ew["edge"] == "0->3" and math.isclose(ew["ops"]["none"], 0.93, rel_tol=1e-6)


def test_rdarts_genotypes_hand_built():
    spec = rdarts_spec()
    # S3 {none, skip, sep3}: the Zero op is never chosen nor counted.
    net = tiny("rdarts-s3")
    s3 = [[0.9, 0.05, 0.05], [0.2, 0.5, 0.3],  # node 0
          [0.98, 0.01, 0.01], [0.2, 0.3, 0.5], [0.2, 0.6, 0.2]]  # node 1: edge 2 loses
    s3 += [[0.1, 0.45, 0.45]] * 9
    set_weights(net, "normal", s3)
    genes = net.genotype()["normal"]
    assert genes[:4] == [["skip_connect", 1], ["skip_connect", 0],
                         ["skip_connect", 2], ["sep_conv_3x3", 1]]
    assert all(op != "none" for op, _ in genes)
    # S2 {skip, sep3}: no Zero op; the best op wins.
    net = tiny("rdarts-s2")
    set_weights(net, "reduce", [[0.7, 0.3], [0.2, 0.8]] + [[0.5, 0.5]] * 12)
    assert net.genotype()["reduce"][:2] == [["sep_conv_3x3", 1], ["skip_connect", 0]]
    # S1: every edge its own pair; picking column 1 everywhere names that edge's second op.
    net = tiny("rdarts-s1")
    set_weights(net, "normal", [[0.25, 0.75]] * 14)
    second = [names[1] for names in spec["s1"]["normal"]]
    expected = [[second[0], 0], [second[1], 1], [second[2], 0], [second[3], 1]]
    assert net.genotype()["normal"][:4] == expected
    # S4 {noise, sep3}: noise is an op like any other.
    net = tiny("rdarts-s4")
    set_weights(net, "normal", [[0.6, 0.4]] * 14)
    assert {op for op, _ in net.genotype()["normal"]} == {"noise"}


def test_nb201_genotype_hand_built():
    net = tiny("nb201")
    # NB201 argmax over all five ops, none included.
    rows = [[0.1, 0.1, 0.1, 0.6, 0.1],   # 1<-0 nor_conv_3x3
            [0.1, 0.1, 0.1, 0.6, 0.1],   # 2<-0 nor_conv_3x3
            [0.1, 0.1, 0.1, 0.6, 0.1],   # 2<-1 nor_conv_3x3
            [0.1, 0.6, 0.1, 0.1, 0.1],   # 3<-0 skip_connect
            [0.1, 0.1, 0.1, 0.6, 0.1],   # 3<-1 nor_conv_3x3
            [0.6, 0.1, 0.1, 0.1, 0.1]]   # 3<-2 none
    set_weights(net, "normal", rows)
    arch = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|none~2|"
    assert net.genotype() == {"arch": arch}
    assert net.genotype_str() == arch
    assert nb201.derive_arch([[0.2] * 5] * 6) == "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"


# ---- NB201 strings and table ------------------------------------------------------------

def test_nb201_parse_format_round_trip():
    nodes = nb201.parse_arch(BEST)
    assert nodes == [[("nor_conv_3x3", 0)],
                     [("nor_conv_3x3", 0), ("nor_conv_3x3", 1)],
                     [("skip_connect", 0), ("nor_conv_3x3", 1), ("nor_conv_1x1", 2)]]
    assert nb201.format_arch(nodes) == BEST
    for row in nb201.load_table(EXCERPT):
        assert nb201.format_arch(nb201.parse_arch(row)) == row


@pytest.mark.parametrize("bad", [
    "", "nor_conv_3x3~0", "|nor_conv_3x3~0|+|nor_conv_3x3~0|",  # node 2 lacks a gene
    "|conv~0|+|nor_conv_3x3~0|nor_conv_3x3~1|", "|nor_conv_3x3~1|", "|nor_conv_3x3|"])
def test_nb201_parse_rejects_malformed(bad):
    with pytest.raises(ValueError, match="arch"):
        nb201.parse_arch(bad)


def test_nb201_lookup_excerpt():
    best = nb201.lookup(BEST, EXCERPT)
    assert set(best) == {"cifar10", "cifar100", "imagenet16-120"}
    assert round(best["cifar10"], 2) == 94.37
    assert round(best["cifar100"], 2) == 73.22 and round(best["imagenet16-120"], 2) == 46.71
    assert round(nb201.lookup(ALL_SKIP, EXCERPT)["cifar10"], 2) == 54.30
    table = nb201.load_table(EXCERPT)
    assert len(table) == 7
    assert nb201.lookup(ALL_SKIP, table) == nb201.lookup(ALL_SKIP, str(EXCERPT))


def test_nb201_lookup_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: NB201 table .*missing.csv"):
        nb201.lookup(BEST, tmp_path / "missing.csv")
    absent = "|avg_pool_3x3~0|+|avg_pool_3x3~0|avg_pool_3x3~1|+|none~0|none~1|none~2|"
    with pytest.raises(KeyError, match="not in the NB201 table"):
        nb201.lookup(absent, EXCERPT)
    with pytest.raises(ValueError, match="arch"):
        nb201.lookup("|nor_conv_3x3~0|+|nor_conv_3x3~1|nor_conv_3x3~0|", EXCERPT)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="lacks the NB201 table columns"):
        nb201.load_table(bad)


def _full_table():
    for base in (Path("/work/shared/data"), ROOT.parent / "shared" / "data"):
        if (base / "nb201_test_accuracy.csv").is_file():
            return base / "nb201_test_accuracy.csv"
    return None


@pytest.mark.skipif(_full_table() is None, reason="the full NB201 table (../shared/data) is not here")
def test_nb201_lookup_full_table():
    table = nb201.load_table(_full_table())
    assert len(table) == 15625
    assert round(nb201.lookup(BEST, table)["cifar10"], 2) == 94.37
    assert round(nb201.lookup(ALL_SKIP, table)["cifar10"], 2) == 54.30
    assert round(sum(r["cifar10"] for r in table.values()) / len(table), 2) == 87.06
    assert max(table, key=lambda a: table[a]["cifar10"]) == BEST
    for arch in list(table)[:200]:
        assert nb201.format_arch(nb201.parse_arch(arch)) == arch


def test_nb201_table_ships_with_nasops():
    """Issue #10 item 8: the table is package data; checked against the reference
    points of its source and the repository's excerpt (and the full CSV if here)."""
    assert nb201.BUILTIN_TABLE.is_file() and nb201.BUILTIN_TABLE.name.endswith(".csv.gz")
    table = nb201.load_table()
    assert len(table) == nb201.NUM_ARCHITECTURES == 15625
    assert round(nb201.lookup(BEST)["cifar10"], 2) == 94.37
    assert round(nb201.lookup(ALL_SKIP)["cifar10"], 2) == 54.30
    assert round(sum(r["cifar10"] for r in table.values()) / len(table), 2) == 87.06
    assert max(table, key=lambda a: table[a]["cifar10"]) == BEST
    for arch, accuracies in nb201.load_table(EXCERPT).items():
        assert table[arch] == accuracies
    if _full_table() is not None:
        assert table == nb201.load_table(_full_table())
    attribution = (nb201.BUILTIN_TABLE.parent / "README.md").read_text()
    assert "NATS-Bench" in attribution and "nb201_test_accuracy.csv.gz" in attribution


def test_nb201_table_errors_name_the_file_and_the_problem(tmp_path):
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="binary.csv is not a CSV table"):
        nb201.load_table(binary)
    broken_gz = tmp_path / "broken.csv.gz"
    broken_gz.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="broken.csv.gz is not a CSV table"):
        nb201.load_table(broken_gz)
    bad_value = tmp_path / "bad_value.csv"
    bad_value.write_text(EXCERPT.read_text().splitlines()[0] + "\n" + f"high,1,2,{BEST},x\n")
    with pytest.raises(ValueError, match="bad_value.csv line 2: expected an architecture string and three"):
        nb201.load_table(bad_value)


# ---- pictures ----------------------------------------------------------------------------

def _assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 150 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.mark.parametrize("space", ["darts", "nb201", "rdarts-s1"])
def test_plots_are_real_pngs(space, tmp_path):
    torch.manual_seed(1)
    net = tiny(space)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_()
    g = net.genotype()
    for cell_type in net.cell_types:
        _assert_png(plot_cell(g, cell_type, tmp_path / f"cell_{cell_type}.png"))
        _assert_png(plot_edge_weights(net.edge_weights()[cell_type], tmp_path / f"w_{cell_type}.png",
                                      f"{space} {cell_type}"))
    with pytest.raises(ValueError, match="cell_type"):
        plot_cell({"normal": g.get("normal", [])}, "reduce", tmp_path / "x.png")


# ---- backends ----------------------------------------------------------------------------

def _mixed_op_kernel_backends():
    return [b for b in kernel_backends("cpu") if b in MIXED_OP_KERNELS]


@pytest.mark.skipif(not _mixed_op_kernel_backends(),
                    reason="no mixed_op kernel built for CPU tensors (nasops._C / nasops.triton)")
@pytest.mark.parametrize("space", ["darts", "nb201", "rdarts-s4"])
def test_eager_and_kernels_agree(space):
    torch.manual_seed(0)
    net = tiny(space)
    x = torch.randn(2, 3, 8, 8)
    # Not logits.sum(): through the cells' train-mode BatchNorm its gradient with
    # respect to the alphas is 0 in exact arithmetic, and its float value rounding noise.
    upstream = torch.randn(2, 5)  # tiny(): 5 classes

    def run(backend):
        nasops.set_backend(backend)
        try:
            net.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # the same S4 noise in both runs
            logits = net(x)
            (logits * upstream).sum().backward()
            return logits.detach(), [a.grad.clone() for a in net.arch_parameters()]
        finally:
            nasops.set_backend(None)

    ref_logits, ref_grads = run("eager")
    for backend in _mixed_op_kernel_backends():
        logits, grads = run(backend)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_avg_pool_3x3_is_torchs_pool_without_padding_counted(stride, layout):
    from nasops.spaces.operations import AvgPool3x3
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    g = torch.randn(3, 5, (7 - 1) // stride + 1, (6 - 1) // stride + 1, dtype=torch.float64)
    ref = torch.nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)(x)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    y = AvgPool3x3(stride)(x)
    (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(grad, ref_grad)
    # a corner averages its 4 in-map pixels, not 9 with zeros
    torch.testing.assert_close(y[0, 0, 0, 0], x[0, 0, :2, :2].mean())


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool_3x3_is_torchs_pool_keeping_its_input_not_indices(stride, layout, dtype):
    """The search's max pool: PyTorch's values and gradients bitwise (ties included),
    and what it keeps for the backward is its input, no int64 map of indices
    (nn.MaxPool2d, the control, keeps one)."""
    from nasops.spaces.operations import MaxPool3x3
    x = torch.randn(3, 5, 9, 11).round(decimals=1).to(dtype=dtype, memory_format=layout)  # many ties
    g = torch.randn(3, 5, (9 - 1) // stride + 1, (11 - 1) // stride + 1).to(dtype)
    results = {}
    for name, pool in (("torch", torch.nn.MaxPool2d(3, stride=stride, padding=1)), ("nasops", MaxPool3x3(stride))):
        leaf = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = pool(leaf)
        (grad,) = torch.autograd.grad(y, leaf, g)
        results[name] = (y, grad, saved, leaf)
    (y_ref, grad_ref, saved_ref, _), (y, grad, saved, leaf) = results["torch"], results["nasops"]
    assert torch.equal(y, y_ref) and torch.equal(grad, grad_ref)
    assert y.stride() == y_ref.stride() and grad.stride() == grad_ref.stride()
    assert any(t.dtype == torch.int64 for t in saved_ref)
    assert [t.untyped_storage().data_ptr() for t in saved] == [leaf.untyped_storage().data_ptr()]
    with torch.no_grad():
        assert torch.equal(MaxPool3x3(stride)(x), y_ref)


def test_search_ops_take_the_lean_max_pool_trained_networks_torchs():
    from nasops.spaces.operations import MaxPool3x3, make_darts_op
    assert type(make_darts_op("max_pool_3x3", 4, 2)[0]) is MaxPool3x3
    assert type(make_darts_op("max_pool_3x3", 4, 2, search=False)) is torch.nn.MaxPool2d


# ---- edges that read one state share its pools (spaces.base.share_ops) -----------------------

@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_edges_from_one_state_share_its_pools(space):
    net = tiny(space)
    cell = next(c for c in net.cells if hasattr(c, "edges"))
    sources = [src for src, _ in (nb201 if space == "nb201" else darts).edge_ends(cell.nodes)]
    pool = lambda edge: edge.ops[edge.op_names.index("avg_pool_3x3")]  # noqa: E731
    for a, src_a in zip(cell.edges, sources):
        for b, src_b in zip(cell.edges, sources):
            assert (pool(a) is pool(b)) == (src_a == src_b)
    # The state dict still names every edge's pool (old checkpoints load).
    assert any(".edges.1.ops." in k for k in net.state_dict())


def test_shared_pools_run_once_per_state_and_forward():
    net = tiny("darts")
    calls = []
    for m in net.modules():
        if isinstance(m, torch.nn.MaxPool2d):
            m.register_forward_hook(lambda *_: calls.append(1))
    net(torch.randn(2, 3, 8, 8))
    assert len(calls) == 3 * 5  # 3 cells, each reading 5 states (14 edges)


@pytest.mark.parametrize("space,recompute,layout", [
    ("darts", False, "contiguous"), ("darts", True, "contiguous"), ("darts", "depthwise", "contiguous"),
    ("darts", False, "channels_last"), ("nb201", False, "contiguous"), ("rdarts-s4", False, "contiguous")])
def test_sharing_pools_and_relus_changes_no_value(space, recompute, layout):
    """The network with shared pools and ReLUs against a copy whose edges run
    their own pools and whose ops their own ReLUs: the same logits, gradients
    (weights and alphas) and BatchNorm running statistics, in float64; with
    --recompute-edges (the shared ReLU then stays within each edge), with
    --recompute-depthwise, and in channels_last, where the C++ depthwise kernel
    computes the ReLU itself. rdarts-s4's noise op is not shared: both draw the
    same noise."""
    from nasops.spaces.operations import set_recompute_depthwise
    torch.manual_seed(0)
    fmt = FORMATS[layout]
    net = tiny(space).double().to(memory_format=fmt)
    ref = unshared_ops(net)
    if recompute == "depthwise":
        set_recompute_depthwise(net)
    else:
        net.set_recompute_edges(recompute)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=fmt)
    assert_same_forward_and_backward(net, ref, x)


@pytest.mark.parametrize("layout,relus", [("contiguous", 105), ("channels_last", 10)])
def test_relu_of_a_state_runs_once_for_its_edges(layout, relus):
    """The tiny DARTS network (3 cells: normal, reduce, reduce; 14 edges each,
    5 states with edges) in float32. Channels-first, where PyTorch convolves,
    each cell runs 35 ReLUs: its 2 preprocessing ones, the second ReLU of its 28
    SepConvs, and one for each state, shared by the 4 convolutions of every
    edge from it (and a reduction cell's stride-2 skips, FactorizedReduce): 105,
    against 274 with a ReLU per op. In channels_last the C++ depthwise kernel
    computes the ReLU as it reads its input: 2 per cell remain, and 2 per
    reduction cell for its FactorizedReduce skips (one per state): 10, not 22.
    A ReLU backward for each."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[func.overloadpacket] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    fmt = FORMATS[layout]
    net = tiny("darts").to(memory_format=fmt)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=fmt)
    with Count() as count:
        net(x).sum().backward()
    assert count.calls[torch.ops.aten.relu] == relus
    assert count.calls[torch.ops.aten.threshold_backward] == relus


def test_share_ops_refuses_ops_that_differ():
    from nasops.spaces.base import MixedEdge, share_ops
    from nasops.spaces.operations import make_darts_op
    names = ["max_pool_3x3", "sep_conv_3x3"]
    edges = [MixedEdge(names, [make_darts_op(n, 4, stride) for n in names]) for stride in (1, 2)]
    with pytest.raises(ValueError, match="max_pool_3x3.*differs"):
        share_ops(edges, [0, 0])
    # A module with parameters under a shared op's name is not shared.
    edges = [MixedEdge(["avg_pool_3x3"], [torch.nn.Conv2d(4, 4, 1)]) for _ in range(2)]
    with pytest.raises(ValueError, match="avg_pool_3x3.*has parameters"):
        share_ops(edges, [1, 1])
