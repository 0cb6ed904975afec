"""nasops.spaces.discrete: the networks nasops.train builds from found genotypes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from nasops.spaces.discrete import (DARTS_V2, AuxiliaryHead, DartsNetwork, DartsTrainCell, NB201Network,
                                    NB201TrainCell, Zero, darts_cells, drop_path)
from nasops.spaces.nb201 import parse_arch
from nasops.spaces.operations import FactorizedReduce, make_darts_op, make_nb201_op
from nasops.train import model_cost

ALL_CONV3 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"


# Tiny networks: a thread pool costs more than it gains (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _params(model):
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("auxiliary_head."))


# ---- parameter and MAC counts against published and hand-computed values ---------------

def test_darts_v2_has_the_papers_parameter_count():
    # DARTS' train.py logs "param size = 3.349342MB" for DARTS_V2 at C=36, 20 cells
    # (the auxiliary head left out of the count, as here).
    net = DartsNetwork(DARTS_V2, in_channels=3, num_classes=10, C=36, layers=20, auxiliary=True)
    assert _params(net) == 3_349_342
    assert model_cost(net, torch.zeros(1, 3, 32, 32))["params"] == 3_349_342


def test_nb201_counts_match_the_benchmark():
    # NAS-Bench-201 (C=16, N=5, CIFAR-10) lists params 1.531546 M / 0.073306 M and
    # FLOPs 220.11969 M / 7.78305 M for the largest cell (all 3x3 convs) and the cells
    # without convs; its FLOPs add the classifier's 10 bias additions to the MACs.
    for arch, params, macs in ((ALL_CONV3, 1_531_546, 220_119_690 - 10), (ALL_SKIP, 73_306, 7_783_050 - 10)):
        net = NB201Network(arch, in_channels=3, num_classes=10, C=16, layers=5)
        cost = model_cost(net, torch.zeros(1, 3, 32, 32))
        assert (cost["params"], cost["macs"]) == (params, macs), arch
    # CIFAR-100: the classifier grows by 64 * 90 + 90 (the benchmark: 1.537396 M).
    assert _params(NB201Network(ALL_CONV3, in_channels=3, num_classes=100, C=16, layers=5)) == 1_537_396


def test_small_darts_network_parameters_by_hand():
    genotype = {"normal": [["skip_connect", 0], ["skip_connect", 1], ["sep_conv_3x3", 2], ["avg_pool_3x3", 0],
                           ["max_pool_3x3", 3], ["skip_connect", 1], ["skip_connect", 4], ["none", 0]],
                "normal_concat": [2, 3, 4, 5],
                "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1], ["max_pool_3x3", 0], ["skip_connect", 2],
                           ["avg_pool_3x3", 1], ["skip_connect", 3], ["max_pool_3x3", 0], ["skip_connect", 4]],
                "reduce_concat": [2, 3, 4, 5]}
    net = DartsNetwork(genotype, in_channels=3, num_classes=5, C=4, layers=3)
    stem = 3 * 12 * 9 + 2 * 12
    cell0 = 2 * (12 * 4 + 2 * 4) + (4 * 9 + 4 * 4 + 2 * 4) * 2  # two ReLUConvBN 12->4, one SepConv(4, 4, 3)
    cell1 = (12 * 8 + 2 * 8) + (16 * 8 + 2 * 8)  # reduce: ReLUConvBN 12->8, 16->8; pools and identities
    cell2 = (2 * 16 * 8 + 2 * 16) + (32 * 16 + 2 * 16)  # FactorizedReduce 16->16, ReLUConvBN 32->16
    classifier = 64 * 5 + 5
    assert _params(net) == stem + cell0 + cell1 + cell2 + classifier
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_model_cost_on_a_hand_computable_network():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    cost = model_cost(net, torch.zeros(4, 1, 4, 4))
    # conv: 2 output channels x 16 pixels x 9 taps; linear: 32 x 3 (per image: only sample[:1]).
    assert cost == {"params": 18 + 96 + 3, "params_auxiliary": 0, "macs": 2 * 16 * 9 + 32 * 3}


    class WithHead(nn.Module):  # a training-only head: counted apart, not run in evaluation
        def __init__(self):
            super().__init__()
            self.body, self.auxiliary_head = net, nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    assert model_cost(WithHead(), torch.zeros(1, 1, 4, 4)) == {**cost, "params_auxiliary": 6}


# ---- structure and semantics ---------------------------------------------------------------

def test_train_ops_have_affine_bn_and_bare_pools():
    sep = make_darts_op("sep_conv_3x3", 4, 1, search=False)
    assert all(m.affine for m in sep.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(m.affine for m in make_darts_op("sep_conv_3x3", 4, 1).modules()
                   if isinstance(m, nn.BatchNorm2d))
    assert isinstance(make_darts_op("max_pool_3x3", 4, 2, search=False), nn.MaxPool2d)
    assert isinstance(make_darts_op("max_pool_3x3", 4, 2)[1], nn.BatchNorm2d)  # the search's pool + BN
    assert isinstance(make_darts_op("skip_connect", 4, 2, search=False), FactorizedReduce)
    conv = make_nb201_op("nor_conv_3x3", 4, search=False).op
    assert conv[1].bias is None and conv[2].affine
    search_conv = make_nb201_op("nor_conv_3x3", 4).op
    assert search_conv[1].bias is not None and not search_conv[2].affine


def test_darts_network_shapes_and_auxiliary_head():
    net = DartsNetwork(DARTS_V2, in_channels=3, num_classes=7, C=4, layers=6, auxiliary=True)
    x = torch.randn(3, 3, 32, 32)
    logits, aux = net.train()(x)
    assert logits.shape == aux.shape == (3, 7)
    assert net.eval()(x).shape == (3, 7)  # no auxiliary output in evaluation
    # odd sizes and the digits' 8x8 (the head then sees 2x2 maps)
    for size in (8, 9, 15):
        logits, aux = net.train()(torch.randn(2, 3, size, size))
        assert logits.shape == aux.shape == (2, 7)
    assert DartsNetwork(DARTS_V2, in_channels=1, num_classes=3, C=4, layers=2).train()(
        torch.randn(2, 1, 8, 8)).shape == (2, 3)  # no head: plain logits in training too


def test_auxiliary_head_on_8x8_is_darts_head():
    torch.manual_seed(0)
    head = AuxiliaryHead(6, 4).eval()
    darts = nn.Sequential(nn.ReLU(), nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
                          *head.features, nn.Flatten(), head.classifier).eval()
    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(head(x), darts(x))


def test_darts_cell_wiring_by_hand():
    genotype = darts_cells({"normal": [["skip_connect", 0], ["skip_connect", 1], ["skip_connect", 2],
                                       ["none", 0], ["skip_connect", 3], ["skip_connect", 2],
                                       ["skip_connect", 1], ["skip_connect", 1]],
                            "normal_concat": [2, 5], "reduce": [["skip_connect", 0]] * 8,
                            "reduce_concat": [2, 3, 4, 5]})
    cell = DartsTrainCell(genotype["normal"], genotype["normal_concat"], 3, 3, 3, False, False).eval()
    s0, s1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    p0, p1 = cell.preprocess0(s0), cell.preprocess1(s1)
    n2 = p0 + p1
    n5 = 2 * p1  # nodes 3 (n2 + Zero) and 4 (n3 + n2) are not in the output
    out = cell(s0, s1)
    assert cell.multiplier == 2 and out.shape == (2, 6, 4, 4)
    torch.testing.assert_close(out, torch.cat([n2, n5], 1))


def test_zero_op_has_the_output_shape():
    assert Zero(2)(torch.ones(2, 3, 7, 7)).shape == (2, 3, 4, 4)
    assert Zero(1)(torch.ones(2, 3, 7, 7)).abs().sum() == 0


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.rand(4000, 2, 3, 3) + 0.5
    y = drop_path(x, 0.3)
    kept = (y != 0).flatten(1)
    assert (kept.all(1) | ~kept.any(1)).all()  # all or nothing per sample
    ratio = y[kept.all(1)] / x[kept.all(1)]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / 0.7))
    assert abs((~kept.any(1)).float().mean().item() - 0.3) < 0.03
    assert drop_path(x, 0.0) is x
    with pytest.raises(ValueError, match="drop_prob"):
        drop_path(x, 1.0)


def test_drop_path_in_the_cell_spares_identities_and_evaluation():
    skip_only = {"normal": [["skip_connect", 0], ["skip_connect", 1]] * 4, "normal_concat": [2, 3, 4, 5],
                 "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]] * 4, "reduce_concat": [2, 3, 4, 5]}
    cells = darts_cells(skip_only)
    s0, s1 = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6)
    normal = DartsTrainCell(cells["normal"], cells["normal_concat"], 4, 4, 4, False, False).train()
    torch.testing.assert_close(normal(s0, s1, 0.9), normal(s0, s1, 0.0))  # identities are never dropped

    reduce = DartsTrainCell(cells["reduce"], cells["reduce_concat"], 4, 4, 4, True, False).train()
    torch.manual_seed(1)
    dropped = reduce(s0, s1, 0.5)
    # node 0 = max_pool(input 0) + max_pool(input 1), each dropped per sample: 0 or twice its value
    a = reduce.ops[0](reduce.preprocess0(s0))
    b = reduce.ops[1](reduce.preprocess1(s1))
    choices = []
    for i in range(len(s0)):
        options = [torch.zeros_like(a[i]), 2 * a[i], 2 * b[i], 2 * a[i] + 2 * b[i]]
        matches = [k for k, o in enumerate(options) if torch.allclose(dropped[i, :4], o, atol=1e-5)]
        assert len(matches) == 1, i
        choices += matches
    assert len(set(choices)) > 1
    assert torch.equal(reduce.eval()(s0, s1, 0.5), reduce.eval()(s0, s1, 0.0))  # no drop in evaluation


def test_nb201_cell_sums_its_genes_and_zero_nodes_are_zero():
    x = torch.randn(2, 4, 5, 5)
    cell = NB201TrainCell(parse_arch("|skip_connect~0|+|skip_connect~0|none~1|+|skip_connect~0|skip_connect~1|none~2|"), 4)
    torch.testing.assert_close(cell(x), 2 * x)
    dead = NB201TrainCell(parse_arch("|avg_pool_3x3~0|+|none~0|none~1|+|none~0|none~1|skip_connect~2|"), 4)
    assert torch.equal(dead(x), torch.zeros_like(x))
    pool = NB201TrainCell(parse_arch("|avg_pool_3x3~0|+|none~0|skip_connect~1|+|none~0|none~1|skip_connect~2|"), 4)
    torch.testing.assert_close(pool(x), nn.AvgPool2d(3, 1, 1, count_include_pad=False)(x))


def test_nb201_network_shapes():
    net = NB201Network(ALL_CONV3, in_channels=1, num_classes=10, C=4, layers=1)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert len(net.cells) == 5  # 3 stages of one cell, 2 reduction blocks


# ---- genotype checks -------------------------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    (lambda g: g.pop("reduce_concat"), "missing key 'reduce_concat'"),
    (lambda g: g["normal"].__setitem__(4, ["sep_conv_3x3", 4]), r"node 2 takes inputs 0 .. 3, got 4"),
    (lambda g: g["normal"].__setitem__(0, ["conv_7x7", 0]), r"'conv_7x7' is not an op of this edge in space darts"),
    (lambda g: g["normal"].__setitem__(1, "sep_conv_3x3"), r"gene 1: expected \[op, input\]"),
    (lambda g: g["reduce"].pop(), "expected a list of \\[op, input\\] genes, two per node"),
    (lambda g: g.__setitem__("reduce", g["reduce"][:6]), "the normal cell has 4 nodes, the reduce cell 3"),
    (lambda g: g.__setitem__("normal_concat", [2, 2]), "expected distinct states"),
    (lambda g: g.__setitem__("normal_concat", [2, 9]), "expected distinct states"),
])
def test_darts_genotype_errors_say_what_is_wrong(change, message):
    genotype = {k: [list(v) if isinstance(v, list) else v for v in val] for k, val in DARTS_V2.items()}
    change(genotype)
    with pytest.raises(ValueError, match=message):
        DartsNetwork(genotype, in_channels=3, num_classes=10, C=4, layers=3)


def test_rdarts_genotype_must_use_the_edges_candidates():
    # S2 offers {skip_connect, sep_conv_3x3} on every edge; DARTS V2's normal cell ends with dil_conv_3x3.
    with pytest.raises(ValueError, match=r"genotype\['normal'\] gene 7 \['dil_conv_3x3', 2\]: 'dil_conv_3x3' is "
                                         r"not an op of this edge in space rdarts-s2 \(candidates: skip_connect, "
                                         r"sep_conv_3x3\)"):
        darts_cells(DARTS_V2, "rdarts-s2")
    s4 = {"normal": [["noise", 0], ["sep_conv_3x3", 1]] * 4, "normal_concat": [2, 3, 4, 5],
          "reduce": [["sep_conv_3x3", 0], ["noise", 1]] * 4, "reduce_concat": [2, 3, 4, 5]}
    net = DartsNetwork(s4, space="rdarts-s4", in_channels=3, num_classes=4, C=4, layers=3)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match="'noise' is not an op of this edge in space darts"):
        darts_cells(s4, "darts")
