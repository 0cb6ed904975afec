"""The driver's speed and memory flags change how a search runs, never what it
computes: --memory-format, --recompute-edges, --recompute-depthwise and --compile against the plain
run (tiny networks, a few steps), and recomputation's gradients and BatchNorm
statistics against the plain network's."""
from __future__ import annotations

import copy

import pytest
import torch

import nasops.spaces
from nasops.spaces.base import RecomputableEdge
from nasops.search import SearchError, main, parse_args

TINY = ["--init-channels", "4", "--batch-size", "16", "--threads", "1", "--quiet", "--epochs", "1",
        "--layers", "3", "--deterministic"]


def _run(out, *flags):
    return main(["--out", str(out), *TINY, *flags])


def _state(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def _assert_same_run(a, b, out_a, out_b, rtol, atol):
    for ra, rb in zip(a["metrics"], b["metrics"]):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert ra[key] == pytest.approx(rb[key], rel=rtol, abs=atol), key
    sa, sb = _state(out_a), _state(out_b)
    assert sa.keys() == sb.keys()
    for key in sa:  # weights, alphas, BatchNorm running statistics and counters
        if key.startswith("alphas"):
            # Adam's first steps are nearly lr * sign(grad): a rounding-size difference in
            # a gradient near 0 moves that alpha by up to twice the learning rate (3e-4,
            # about an alpha's own size), so the alphas are compared in norm. A missed
            # or wrong update is an error near 1.
            a, b = sa[key].double(), sb[key].double()
            assert float((a - b).norm() / a.norm()) <= 1e-2, key
            continue
        torch.testing.assert_close(sa[key].float(), sb[key].float(), rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_channels_last_network_equals_contiguous(space):
    """One forward and backward: the same loss and gradients in both layouts."""
    plain = _network(space).train()
    nhwc = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x = torch.randn(6, 3, 12, 12)
    y = torch.randint(0, 5, (6,))
    losses, grads = [], []
    for net, inp in ((plain, x), (nhwc, x.contiguous(memory_format=torch.channels_last))):
        loss = torch.nn.functional.cross_entropy(net(inp), y)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in net.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for name in grads[0]:
        # atol: a conv bias before a BatchNorm has a gradient of exactly 0 in
        # theory, rounding noise (~1e-6) in practice.
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("order", [[], ["--second-order"]], ids=["first-order", "second-order"])
def test_channels_last_search_equals_contiguous(tmp_path, order):
    if not order:  # the first step's validation loss comes before any update: equal up to rounding
        first = [_run(tmp_path / f"first-{f}", "--max-steps", "1", "--memory-format", f)
                 for f in ("contiguous", "channels_last")]
        assert first[0]["metrics"][0]["val_loss"] == pytest.approx(first[1]["metrics"][0]["val_loss"],
                                                                   rel=1e-5)
    # More steps: rounding differences of the two layouts' convolutions go
    # through SGD, momentum and Adam (whose first steps are nearly sign(grad)),
    # so the runs agree closely, not to the last bits.
    flags = ["--max-steps", "2", *order]
    plain = _run(tmp_path / "nchw", "--memory-format", "contiguous", *flags)
    nhwc = _run(tmp_path / "nhwc", "--memory-format", "channels_last", *flags)
    _assert_same_run(plain, nhwc, tmp_path / "nchw", tmp_path / "nhwc", rtol=5e-3, atol=5e-3)
    # The channels_last run's feature maps were channels_last: its BatchNorm
    # statistics equal the contiguous run's above, and its layers saw NHWC maps.
    seen = []
    net = _network("darts").to(memory_format=torch.channels_last)
    net.cells[0].preprocess1.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(
        memory_format=torch.channels_last) and not o.is_contiguous()))
    from nasops.search import _in_format
    net(_in_format((torch.randn(2, 3, 12, 12), None), torch.channels_last)[0])
    assert seen == [True]


def test_speed_flags_are_not_part_of_the_config_and_auto_is_channels_last_on_cpu(tmp_path):
    from nasops.runtime import memory_format
    from nasops.search import run_config
    args = parse_args(["--out", str(tmp_path), "--memory-format", "channels_last", "--compile",
                       "--recompute-edges"])
    assert not {"memory_format", "compile", "recompute_edges"} & set(run_config(args))
    assert "recompute_depthwise" not in run_config(parse_args(["--out", str(tmp_path), "--recompute-depthwise"]))
    assert parse_args(["--out", str(tmp_path)]).memory_format == "auto"
    assert memory_format(parse_args(["--out", str(tmp_path)]), torch.device("cpu")) == torch.channels_last
    assert memory_format(args, torch.device("cpu")) == torch.channels_last
    # A run may be resumed with other speed flags.
    _run(tmp_path / "run", "--max-steps", "1", "--memory-format", "contiguous")
    resumed = _run(tmp_path / "run", "--max-steps", "1", "--memory-format", "channels_last",
                   "--recompute-edges", "--resume")
    assert len(resumed["metrics"]) == 1
    resumed = _run(tmp_path / "run", "--max-steps", "1", "--recompute-depthwise", "--resume")
    assert len(resumed["metrics"]) == 1


def test_recompute_edges_search_equals_plain(tmp_path):
    plain = _run(tmp_path / "plain", "--max-steps", "3", "--second-order")
    recompute = _run(tmp_path / "recompute", "--max-steps", "3", "--second-order", "--recompute-edges")
    _assert_same_run(plain, recompute, tmp_path / "plain", tmp_path / "recompute", rtol=1e-5, atol=1e-6)


def test_recompute_depthwise_search_equals_plain(tmp_path):
    plain = _run(tmp_path / "plain", "--max-steps", "3")
    recompute = _run(tmp_path / "recompute", "--max-steps", "3", "--recompute-depthwise")
    _assert_same_run(plain, recompute, tmp_path / "plain", tmp_path / "recompute", rtol=1e-5, atol=1e-6)


def test_recompute_depthwise_refusals(tmp_path, capsys):
    """--recompute-depthwise adds nothing to --recompute-edges on every edge (which
    recomputes the depthwise convolutions with the rest of an edge), and needs
    depthwise convolutions (outside the cells of --recompute-edges CELLS)."""
    for edges in (["--recompute-edges"], ["--recompute-edges", "all"]):
        with pytest.raises(SystemExit):
            parse_args(["--out", str(tmp_path), "--recompute-depthwise", *edges])
        assert "--recompute-depthwise and --recompute-edges (every edge) exclude each other" in capsys.readouterr().err
    with pytest.raises(SearchError, match="--recompute-depthwise: the .* of --space nb201 has no sep_conv"):
        _run(tmp_path / "nb201", "--space", "nb201", "--layers", "1", "--max-steps", "1", "--recompute-depthwise")
    with pytest.raises(SearchError, match="no sep_conv or dil_conv op outside the cells that --recompute-edges 3"):
        _run(tmp_path / "all", "--max-steps", "1", "--recompute-edges", "3", "--recompute-depthwise")


def test_recompute_edges_cells_refusals(tmp_path, capsys):
    """CELLS is a positive number no larger than the network's cells, or 'all'."""
    assert parse_args(["--out", str(tmp_path), "--recompute-edges"]).recompute_edges == "all"
    assert parse_args(["--out", str(tmp_path), "--recompute-edges", "2"]).recompute_edges == 2
    assert parse_args(["--out", str(tmp_path)]).recompute_edges is None
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(SystemExit):
            parse_args(["--out", str(tmp_path), "--recompute-edges", bad])
        assert f"argument --recompute-edges: expected a positive number of cells or 'all', got '{bad}'" \
            in capsys.readouterr().err
    with pytest.raises(SearchError, match=r"--recompute-edges 4: expected a number of cells from 1 to 3 "
                                          r"\(the DartsSearchNetwork's cells"):
        _run(tmp_path / "many", "--max-steps", "1", "--recompute-edges", "4")


def test_recompute_edges_of_the_first_cells_and_depthwise_in_the_others():
    """set_recompute_edges(cells=k) switches the edges of the first k cells that hold
    mixed edges, in forward order; set_recompute_depthwise then takes only the
    sep_conv and dil_conv ops outside them."""
    from nasops.spaces.base import set_recompute_edges
    from nasops.spaces.operations import DilConv, SepConv, set_recompute_depthwise
    net = _network("darts")
    assert net.edge_cells() == list(net.cells)
    assert set_recompute_edges(net, True, cells=2) == 2 * 14
    assert [all(e.recompute for e in cell.edges) for cell in net.cells] == [True, True, False]
    assert [any(e.recompute for e in cell.edges) for cell in net.cells] == [True, True, False]
    separable = [[isinstance(m, (SepConv, DilConv)) for m in cell.modules()].count(True) for cell in net.cells]
    assert set_recompute_depthwise(net, True) == separable[2] > 0
    assert [any(getattr(m, "recompute_depthwise", False) for m in cell.modules()) for cell in net.cells] \
        == [False, False, True]
    # Through a network that wraps the search network (hardexit's), cells counted the same.
    wrapped = torch.nn.Sequential(_network("darts"))
    assert set_recompute_edges(wrapped, True, cells=1) == 14
    # NB201's ResNet blocks hold no edges: not cells here.
    nb201 = _network("nb201")
    assert len(nb201.edge_cells()) == 3 < len(nb201.cells)
    assert set_recompute_edges(nb201, True, cells=2) == 2 * 6
    assert [edge.recompute for edge in nb201.edge_cells()[2].edges] == [False] * 6
    from nasops.spaces.vit import VitSearchNetwork
    vit = VitSearchNetwork(in_channels=3, num_classes=5, image_size=8, patch_size=2, embed_dim=16, depth=2)
    assert vit.edge_cells() == list(vit.encoders)
    assert 0 < set_recompute_edges(vit, True, cells=1) == set_recompute_edges(vit.encoders[0], True)
    for cells in (0, 4, True, 1.0):
        with pytest.raises(ValueError, match="cells: expected a number of cells from 1 to 3"):
            set_recompute_edges(net, True, cells=cells)
    with pytest.raises(ValueError, match="cells: the first cells of a network need one SearchNetwork"):
        set_recompute_edges(torch.nn.Sequential(_network("darts"), _network("darts")), True, cells=1)


def test_recompute_edges_of_the_first_cells_search_equals_plain(tmp_path):
    # Second order, like the test of every edge above: first-order steps of this tiny
    # network on other batches moved a weight gradient by ~1e-4 at the third step with
    # any recomputation, every edge's too (a last-bit difference flips a ReLU or pool tie).
    plain = _run(tmp_path / "plain", "--max-steps", "3", "--second-order")
    mixed = _run(tmp_path / "mixed", "--max-steps", "3", "--second-order", "--recompute-edges", "1",
                 "--recompute-depthwise")
    _assert_same_run(plain, mixed, tmp_path / "plain", tmp_path / "mixed", rtol=1e-5, atol=1e-6)


def _network(space, seed=0):
    torch.manual_seed(seed)
    return nasops.spaces.build(space, in_channels=3, num_classes=5, C=4,
                               layers=1 if space == "nb201" else 3)


@pytest.mark.parametrize("space", ["darts", "rdarts-s4", "nb201"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_recompute_edges_same_gradients_and_running_statistics(space, layout):
    plain = _network(space).to(memory_format=layout).train()
    recompute = copy.deepcopy(plain)
    assert recompute.set_recompute_edges(True) > 0
    x = torch.randn(6, 3, 12, 12).contiguous(memory_format=layout)
    y = torch.randint(0, 5, (6,))
    results = []
    for net in (plain, recompute):
        torch.manual_seed(1)  # rdarts-s4's noise op draws: the recomputation must draw the same
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        # The architecture step's path: gradients of the alphas only.
        torch.manual_seed(2)
        alpha_grads = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), net.arch_parameters())
        results.append((loss.detach(), {n: p.grad for n, p in net.named_parameters()}, alpha_grads,
                        {n: b.clone() for n, b in net.named_buffers()}))
    (loss_a, grads_a, alphas_a, buffers_a), (loss_b, grads_b, alphas_b, buffers_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    # atol 1e-6 on gradients of ~0.1: the recomputing edge sums its gradients in
    # another order, and NB201's conv bias before a BatchNorm has a true gradient
    # of 0, so its float value (~1e-7) is rounding alone.
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(alphas_a, alphas_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # Running statistics moved once per forward (two forwards here), not once more per recomputation.
    for name in buffers_a:
        torch.testing.assert_close(buffers_a[name], buffers_b[name], rtol=0, atol=0, msg=name)
    assert any("num_batches_tracked" in n and b.item() == 2 for n, b in buffers_b.items())


def _saved_bytes(net, x):
    """Bytes of the distinct storages autograd keeps for the backward of one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum()
    return sum(storages.values())


def test_recompute_edges_keeps_far_less_for_the_backward():
    plain = _network("darts").train()
    recompute = copy.deepcopy(plain)
    recompute.set_recompute_edges(True)
    x = torch.randn(8, 3, 16, 16)
    kept, kept_recompute = _saved_bytes(plain, x), _saved_bytes(recompute, x)
    assert kept_recompute < 0.3 * kept, (kept, kept_recompute)  # 0.23 with the pools' outputs kept


@pytest.mark.parametrize("space", ["darts", "rdarts-s4"])
def test_recompute_edges_recompute_the_ops_with_parameters_only(space):
    """The convolutions (a reduction's skip_connect too) run again in the backward;
    the pools, identity and noise (no parameters) run once and keep their outputs."""
    from nasops.spaces.operations import DilConv, FactorizedReduce, SepConv
    net = _network(space).train()
    net.set_recompute_edges(True)
    calls, expected = {}, {}
    for cell in net.cells:
        for e, edge in enumerate(cell.edges):
            for name, op, zero in zip(edge.op_names, edge.ops, edge._is_zero):
                key = (id(cell), e, name)
                calls[key] = 0
                expected[key] = 0 if zero else 2 if isinstance(op, (SepConv, DilConv, FactorizedReduce)) else 1
                op.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    net(torch.randn(2, 3, 12, 12)).sum().backward()
    assert calls == expected
    assert {name for (_, _, name), n in calls.items() if n == 1} >= ({"max_pool_3x3", "avg_pool_3x3", "skip_connect"}
                                                                    if space == "darts" else {"noise"})


@pytest.mark.slow
@pytest.mark.parametrize("cells", [None, 2], ids=["every-edge", "first-cells"])
def test_recompute_edges_under_torch_compile_equal_plain(cells):
    """Under torch.compile a recomputing edge is checkpointed (dynamo cannot trace
    _RecomputedEdge's nested autograd.grad): the network compiles into one graph
    (fullgraph) and gives the plain network's loss, gradients and running statistics.
    NB201 with one cell per stage: tracing DARTS cells takes minutes here."""
    plain = _network("nb201").train()
    recompute = copy.deepcopy(plain)
    assert recompute.set_recompute_edges(True, cells=cells) == 6 * (3 if cells is None else cells)
    torch._dynamo.reset()
    compiled = torch.compile(recompute, backend="aot_eager", fullgraph=True)
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 5, (4,))
    losses = []
    for net in (plain, compiled):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), recompute.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(plain.named_buffers(), recompute.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)


def test_recompute_edges_in_eval_mode_equal_plain():
    """BatchNorm in eval mode normalises with the running statistics in the
    recomputation too, and nothing updates them."""
    plain = _network("darts").train()
    plain(torch.randn(6, 3, 12, 12))  # running statistics away from their initial values
    plain.eval()
    recompute = copy.deepcopy(plain)
    recompute.set_recompute_edges(True)
    x = torch.randn(3, 3, 12, 12)
    grads = [torch.autograd.grad(net(x).square().sum(), list(net.parameters()), allow_unused=True)
             for net in (plain, recompute)]
    for (name, _), a, b in zip(plain.named_parameters(), *grads):
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.named_buffers(), recompute.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


class _CountingConv(torch.nn.Conv2d):
    """A conv with a buffer its forward updates, as a layer other than BatchNorm might."""

    def __init__(self):
        super().__init__(2, 2, 3, padding=1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_recompute_edges_restore_any_buffer_the_recomputation_updates():
    from nasops.spaces.base import MixedEdge
    edge = MixedEdge(["conv", "none"], [_CountingConv(), None])
    edge.recompute = True
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    edge(x, torch.tensor([0.7, 0.3])).sum().backward()
    assert edge.ops[0].calls.item() == 1 and x.grad.abs().sum() > 0


def test_recompute_edges_put_back_batchnorm_momentum_and_counter():
    """A recomputation runs BatchNorm with momentum 0 and no batch counter, so it
    leaves the statistics as they are; afterwards every layer has its momentum
    and counter back, a cumulative average (momentum None) too, and also when
    the recomputation raises."""
    plain = _network("darts").train()
    batchnorms = [m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for i, bn in enumerate(batchnorms):
        bn.momentum = None if i % 2 else 0.3
    recompute = copy.deepcopy(plain)
    recompute.set_recompute_edges(True)
    x = torch.randn(4, 3, 12, 12)
    for net in (plain, recompute):
        for _ in range(2):
            net(x).square().mean().backward()
    for (name, a), b in zip(plain.named_buffers(), recompute.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    def settings():
        return [(m.momentum, m.num_batches_tracked) for m in recompute.modules()
                if isinstance(m, torch.nn.BatchNorm2d)]
    before = settings()
    assert [momentum for momentum, _ in before] == [None if i % 2 else 0.3 for i in range(len(batchnorms))]
    assert all(count.item() == 2 for _, count in before)

    def fail_in_recomputation(module, inputs, output):
        if torch.is_grad_enabled():  # the forward of a recomputing edge runs without grad
            raise RuntimeError("recomputation failed")
    recompute.cells[0].edges[0].ops[4].op[1].register_forward_hook(fail_in_recomputation)
    loss = recompute(x).sum()
    with pytest.raises(RuntimeError, match="recomputation failed"):
        loss.backward()
    after = settings()
    assert [m for m, _ in after] == [m for m, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))


def test_recompute_edges_under_autocast_give_autograd_grad_the_weight_gradients():
    """The recomputation runs under the forward's autocast (bfloat16 convs), and
    torch.autograd.grad(loss, weights) (DARTS' second-order step) gets the edges'
    weight gradients, not only .grad."""
    plain = _network("darts").train()
    recompute = copy.deepcopy(plain)
    recompute.set_recompute_edges(True)
    conv_dtypes = []  # a pointwise conv inside a recomputing edge: forward, then recomputation
    recompute.cells[0].edges[0].ops[4].op[1].register_forward_hook(lambda m, i, out: conv_dtypes.append(out.dtype))
    x = torch.randn(4, 3, 12, 12)
    y = torch.randint(0, 5, (4,))
    grads = []
    for net in (plain, recompute):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        grads.append(torch.autograd.grad(loss, list(net.parameters()), allow_unused=True))
    assert conv_dtypes == [torch.bfloat16, torch.bfloat16]
    for (name, _), a, b in zip(plain.named_parameters(), *grads):
        assert (a is None) == (b is None), name
        if a is not None:  # bfloat16 rounding summed in another order: ~1 % apart
            assert (a - b).norm() <= 0.1 * a.norm(), name
    assert all(p.grad is None for p in recompute.parameters())


def test_recompute_edges_refuse_a_weight_changed_between_forward_and_backward():
    """A recomputation with weights an optimizer changed in place would differentiate
    another network: the saved-tensor version check stops it."""
    net = _network("darts").train()
    net.set_recompute_edges(True)
    loss = net(torch.randn(2, 3, 12, 12)).sum()
    with torch.no_grad():
        next(net.cells[0].edges[0].parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class _TwoOutputEdge(RecomputableEdge):
    """An edge returning (y, aux), as MIDAS' returns (y, op weights)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def _mix(self, x, weights, kept=(), shared=None):
        y = self.conv(x)
        return y * weights[0], (y * y).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("used", ["y", "aux", "both"])
def test_recompute_edges_differentiate_only_the_outputs_the_loss_uses(used):
    plain = _TwoOutputEdge()
    recompute = copy.deepcopy(plain)
    recompute.recompute = True
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    weights = torch.rand(1, requires_grad=True)
    grads = []
    for edge in (plain, recompute):
        y, aux = edge(x, weights)
        loss = {"y": y.sum(), "aux": aux.sum(), "both": y.sum() + aux.sum()}[used]
        grads.append(torch.autograd.grad(loss, [x, weights, *edge.parameters()], allow_unused=True))
    for a, b in zip(*grads):
        if a is None or b is None:  # weights: unused by aux alone
            assert a is None and b is None or used == "aux" and torch.count_nonzero(a if b is None else b) == 0
        else:
            torch.testing.assert_close(a, b)


def test_recompute_edges_compute_only_the_gradients_the_backward_asks_for():
    """autograd.grad(loss, alphas) (DARTS' architecture step) differentiates the
    recomputed edge for the alphas' path only, as autograd prunes a plain graph:
    the edge's weight gradients are not computed (a third more work at batch 64)."""
    edge = _TwoOutputEdge()
    edge.recompute = True
    weight_grads = []
    edge.conv.weight.register_hook(weight_grads.append)
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    weights = torch.rand(1, requires_grad=True)
    (grad_weights,) = torch.autograd.grad(edge(x, weights)[0].sum(), [weights])
    assert weight_grads == [] and grad_weights.abs().sum() > 0
    edge(x, weights)[0].sum().backward()
    assert len(weight_grads) == 1


@pytest.mark.slow
def test_compile_first_steps_match_eager(tmp_path, monkeypatch):
    # Inductor's C++ code generation takes ~12 minutes of this 2-core machine for
    # even this network; the compile backend here is aot_eager: dynamo traces the
    # whole network into one graph (fullgraph) and AOTAutograd splits forward and
    # backward through the nasops ops' fake and autograd registrations, which is
    # what --compile asks of nasops. (benchmarks/bench_search_step.py runs inductor.)
    compiled_with = {}
    module_compile = torch.nn.Module.compile

    def compile_with_aot_eager(self, *args, **kwargs):
        compiled_with.update(kwargs)
        return module_compile(self, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_aot_eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    flags = ["--max-steps", "2", "--space", "nb201", "--layers", "1"]
    plain = _run(tmp_path / "plain", *flags)
    compiled = _run(tmp_path / "compiled", "--compile", *flags)
    assert compiled_with == {"fullgraph": True, "mode": None}  # reduce-overhead on CUDA only
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # architecture and weight steps
    _assert_same_run(plain, compiled, tmp_path / "plain", tmp_path / "compiled", rtol=1e-4, atol=1e-5)


def test_compiled_op_is_traced_once():
    """The backend choice is fixed at import: a compiled function calling an op
    is traced once, not again after the first call fills a lazy cache (dynamo
    guards on module globals it read while tracing)."""
    from nasops.ops.mixed_op import mixed_op
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    step = torch.compile(lambda outs, w: mixed_op(outs, w).sum(), backend=count_graphs, fullgraph=True)
    outputs = [torch.randn(2, 4, 5, 5) for _ in range(3)]
    weights = torch.randn(3)
    for _ in range(3):
        step(outputs, weights)
    assert len(graphs) == 1


# ---- every method: dasvit (space vit) and hardexit -------------------------------------------
DASVIT = ["--space", "vit", "--method", "dasvit", "--embed-dim", "16", "--patch-size", "2", "--batch-size", "8",
          "--threads", "1", "--quiet", "--stage-depths", "1", "2", "--stage-keep", "3", "--token-ratio", "0.5",
          "--epochs", "2", "--max-steps", "2", "--deterministic"]
HARDEXIT = [*TINY, "--method", "hardexit", "--holdout-portion", "0.1", "--max-steps", "2"]
MIDAS = [*TINY, "--method", "midas", "--midas-decode-batches", "2", "--midas-dim", "4", "--max-steps", "2"]
METHOD_RUNS = {"dasvit": DASVIT, "hardexit": HARDEXIT, "midas": MIDAS}


def _method_run(out, method, *flags):
    return main(["--out", str(out), *METHOD_RUNS[method], *flags])


@pytest.mark.parametrize("method", ["hardexit", "midas"])
def test_recompute_depthwise_methods_on_the_darts_space_equal_plain(tmp_path, method):
    plain = _method_run(tmp_path / "plain", method)
    recompute = _method_run(tmp_path / "recompute", method, "--recompute-depthwise")
    _assert_same_run(plain, recompute, tmp_path / "plain", tmp_path / "recompute", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHOD_RUNS))
def test_recompute_edges_every_method_equals_plain(tmp_path, method):
    """dasvit's token edges (with token selection), hardexit's per-sample mixing
    and MIDAS's attention edges recompute too, with the plain run's results."""
    plain = _method_run(tmp_path / "plain", method)
    # hardexit: the edges of the first cell only, through the network that wraps the supernet
    cells = ["1", "--recompute-depthwise"] if method == "hardexit" else []
    recompute = _method_run(tmp_path / "recompute", method, "--recompute-edges", *cells)
    # Not bit-identical: a recomputing edge sums its input's gradient in another
    # order, and Adam turns last-bit differences of gradients that are 0 in exact
    # arithmetic (attention key biases) into ~1e-6 differences of the weights.
    _assert_same_run(plain, recompute, tmp_path / "plain", tmp_path / "recompute", rtol=1e-4, atol=1e-5)


def test_an_edge_that_bypasses_recomputation_is_not_counted():
    """set_recompute_edges reports only edges whose forward honours the flag: a
    subclass with a forward of its own would silently keep everything."""
    from nasops.spaces.base import set_recompute_edges
    net = _network("nb201")
    edges = set_recompute_edges(net, True)
    assert edges > 0

    class Bypassing(type(net.cells[0].edges[0])):
        def forward(self, x, weights):
            return self._mix(x, weights)

    for cell in net.cells:
        for edge in getattr(cell, "edges", []):
            edge.__class__ = Bypassing
    assert set_recompute_edges(net, True) == 0


def test_recompute_edges_token_edges_keep_less():
    from nasops.spaces.vit import VitSearchNetwork
    torch.manual_seed(0)
    plain = VitSearchNetwork(in_channels=3, num_classes=5, image_size=8, patch_size=2, embed_dim=16,
                             depth=2, token_ratio=0.5).train()
    recompute = copy.deepcopy(plain)
    assert recompute.set_recompute_edges(True) > 0
    x = torch.randn(4, 3, 8, 8)
    kept, kept_recompute = _saved_bytes(plain, x), _saved_bytes(recompute, x)
    assert kept_recompute < 0.5 * kept, (kept, kept_recompute)


def test_memory_format_token_space(tmp_path, capsys):
    """The vit space's edges mix (B, N, C) tokens: auto means contiguous there, and
    an explicit channels_last is refused, naming the flag."""
    from nasops.runtime import memory_format
    args = parse_args(["--out", str(tmp_path), *DASVIT])
    assert memory_format(args, torch.device("cpu")) == torch.contiguous_format
    with pytest.raises(SystemExit) as exc:
        parse_args(["--out", str(tmp_path), *DASVIT, "--memory-format", "channels_last"])
    assert exc.value.code == 2
    assert "--memory-format channels_last" in capsys.readouterr().err
    # hardexit's networks are DARTS ones: channels_last by default on the CPU
    args = parse_args(["--out", str(tmp_path), *HARDEXIT])
    assert memory_format(args, torch.device("cpu")) == torch.channels_last


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_RUNS))
def test_compile_every_method_first_steps_match_eager(tmp_path, monkeypatch, method):
    """--compile compiles what each method's step runs (hardexit: forward_exits,
    not forward) and the first steps match the eager run (aot_eager: see above)."""
    compiled_with = []
    torch_compile = torch.compile

    def compile_with_aot_eager(fn, **kwargs):
        if "backend" not in kwargs:  # not the call inside Module.compile below
            compiled_with.append(kwargs)
        return torch_compile(fn, **{**kwargs, "backend": "aot_eager"})

    module_compile = torch.nn.Module.compile

    def module_compile_with_aot_eager(self, **kwargs):
        compiled_with.append(kwargs)
        return module_compile(self, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    monkeypatch.setattr(torch.nn.Module, "compile", module_compile_with_aot_eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # hardexit (3 exits) and midas on NB201 with one cell per stage: tracing DARTS
    # cells takes minutes here
    small = ["--space", "nb201", "--layers", "1"] if method in ("hardexit", "midas") else []
    plain = _method_run(tmp_path / "plain", method, *small)
    compiled = _method_run(tmp_path / "compiled", method, "--compile", *small)
    # one per network: dasvit's second stage builds a new one
    assert compiled_with and all(k == {"fullgraph": True, "mode": None} for k in compiled_with)
    assert len(compiled_with) == (2 if method == "dasvit" else 1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # traced, not bypassed
    _assert_same_run(plain, compiled, tmp_path / "plain", tmp_path / "compiled", rtol=1e-4, atol=1e-5)


def test_compile_refuses_a_torch_older_than_it_was_tested_on(tmp_path, monkeypatch, capsys):
    """torch.compile 2.11 could not trace the search networks: --compile names the
    torch it needs instead of failing inside dynamo; the version it runs on passes."""
    assert parse_args(["--out", str(tmp_path), "--compile"]).compile
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.11.0+cu130"))
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--compile"])
    err = capsys.readouterr().err
    assert "--compile: needs torch >= 2.13, this is 2.11.0+cu130" in err
    assert not parse_args(["--out", str(tmp_path)]).compile  # the rest of the driver runs
