"""Hard-exit DARTS (nasops.methods.hardexit, SPEC 4.4): the exit distribution, the
objective, the cost model, hard-exit inference that really stops, the report and
the driver paths (search, --evaluate-only, resume), checked against hand-computed
values and independent computations."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_same_checkpoint_model, run_killed_after_epoch, torchrun_two_ranks
from nasops import data as datasets
from nasops import spaces
from nasops.methods import hardexit_report as report
from nasops.methods.hardexit import (HardExit, HardExitNetwork, data_splits, exit_distribution,
                                     hard_exit_inference, hardexit_objective, lambda_at, load_run,
                                     log_exit_distribution)
from nasops.search import SearchError, main, parse_args

REPO = Path(__file__).resolve().parents[1]
TINY = ["--init-channels", "4", "--batch-size", "16", "--threads", "1", "--quiet", "--method", "hardexit",
        "--holdout-portion", "0.1"]


# Tiny networks: a thread pool costs more than it gains (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(space, out, *extra):
    return ["--space", space, "--layers", "1" if space == "nb201" else "3", "--out", str(out), *TINY, *extra]


def _network(space="nb201", layers=1, C=4, seed=0, classes=10):
    torch.manual_seed(seed)
    supernet = spaces.build(space, in_channels=1, num_classes=classes, C=C, layers=layers)
    return HardExitNetwork(supernet, num_classes=classes, image_shape=(1, 8, 8))


def _spread_exits(model, seed=1):
    """Random stop heads and BN statistics, so that samples leave at different exits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.exit_heads:
            head.stop.weight.copy_(torch.randn(head.stop.weight.shape, generator=g))
            head.stop.bias.zero_()
            head.classifier.weight.mul_(8)
        model.controller[2].weight.copy_(0.3 * torch.randn(model.controller[2].weight.shape, generator=g))
    return model.eval()


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# ---- the exit distribution and the objective ------------------------------------------------

def test_exit_distribution_matches_eqs_12_to_14_for_hand_set_stop_probabilities():
    s = torch.tensor([[0.2, 0.5, 0.1], [0.0, 1.0, 0.3], [0.9, 0.9, 0.9]], dtype=torch.float64)
    expected = torch.tensor([[0.2, 0.5 * 0.8, 0.1 * 0.8 * 0.5, 0.8 * 0.5 * 0.9],
                             [0.0, 1.0, 0.0, 0.0],
                             [0.9, 0.09, 0.009, 0.001]], dtype=torch.float64)
    torch.testing.assert_close(exit_distribution(s), expected)
    random = torch.rand(64, 7, dtype=torch.float64)
    torch.testing.assert_close(exit_distribution(random).sum(1), torch.ones(64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"stop_prob: expected shape \(B, N-1\)"):
        exit_distribution(torch.rand(4, 0))
    # the log-space form the objective uses, from the stop logits, even where s rounds to 0 or 1
    beta = torch.tensor([[-3.0, 0.5, 2.0], [40.0, -40.0, 0.0]])
    torch.testing.assert_close(log_exit_distribution(beta).exp(),
                               exit_distribution(torch.sigmoid(beta.double())).float())
    assert torch.isfinite(log_exit_distribution(beta)).all()


def test_with_zero_delta_alpha_and_lambda_the_loss_is_plain_ce_of_the_blended_output():
    model = _network()
    method = HardExit(model, epochs=1, device="cpu", lambda_target=0.0, mu=1.0, aux_weight=0.0)
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    out = model.forward_exits(x)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in out.delta.values())  # a fresh controller
    with torch.no_grad():  # at delta alpha = 0 the last exit is the plain search network (eq. 23)
        torch.testing.assert_close(model.eval().forward_exits(x).logits[-1], model.supernet(x))
    model.train()
    s = torch.sigmoid(out.stop_logits)
    blended = torch.zeros(12, 10)  # y_hat = sum_i q_i softmax(y_i), q by eqs. 12-14
    for b in range(12):
        reach = 1.0
        for i, logits in enumerate(out.logits):
            q = s[b, i] * reach if i < len(out.logits) - 1 else reach
            blended[b] += q * F.softmax(logits[b], dim=0)
            if i < len(out.logits) - 1:
                reach = reach * (1 - s[b, i])
    loss, correct = method._loss(x, y)
    torch.testing.assert_close(loss, -blended[torch.arange(12), y].log().mean())
    assert correct == int((blended.argmax(1) == y).sum())


def test_objective_adds_the_cost_the_perturbation_and_the_exit_supervision():
    model = _network()
    delta = {t: 0.5 * torch.randn(shape) for t, shape in model._delta_shapes.items()}
    with torch.no_grad():  # zero weights: delta_alpha(x) = the bias for every sample
        model.controller[2].bias.copy_(torch.cat([d.flatten() for d in delta.values()]))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    model.eval()
    out = model.forward_exits(x)
    mixing = {t: F.softmax(model.supernet.alphas(t) + d, dim=-1) for t, d in delta.items()}
    torch.testing.assert_close(out.logits[-1], model.supernet(x, mixing))  # alpha + delta alpha mixes
    parts = hardexit_objective(out, y, model.exit_costs, lam=0.3, mu=0.01, aux_weight=0.5)
    q = exit_distribution(torch.sigmoid(out.stop_logits))
    ce = F.nll_loss(sum(q[:, i:i + 1] * F.softmax(z, 1) for i, z in enumerate(out.logits)).log(), y)
    cost = (q * model.exit_costs).sum(1).mean()
    delta_sq = sum(float((d ** 2).sum()) for d in delta.values())
    aux = sum(F.cross_entropy(z, y) for z in out.logits)
    torch.testing.assert_close(parts.loss, ce + 0.3 * cost + 0.01 * delta_sq + 0.5 * aux)
    assert parts.delta_sq.item() == pytest.approx(delta_sq, rel=1e-5)


def test_lambda_is_zero_in_the_warm_up_then_ramps_to_the_target():
    linear = [lambda_at(e, target=0.1, warmup_epochs=2, ramp_epochs=4, kind="linear") for e in range(8)]
    assert linear == pytest.approx([0, 0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    cosine = [lambda_at(e, target=0.1, warmup_epochs=2, ramp_epochs=4, kind="cosine") for e in range(8)]
    assert cosine == pytest.approx([0, 0, 0.1 * (1 - math.cos(math.pi / 4)) / 2, 0.05,
                                    0.1 * (1 - math.cos(3 * math.pi / 4)) / 2, 0.1, 0.1, 0.1])


@pytest.mark.parametrize("target", [0.0, 0.3], ids=["lambda-target-0", "lambda-target-0.3"])
def test_stop_heads_learn_after_the_warm_up_whatever_lambda_is(target):
    """The warm-up keeps the stop heads as they started (module doc); after it they
    learn, also with --lambda-target 0 (the seed's lambda = 0 objective, CE of the
    blended output, still depends on the stop probabilities)."""
    model = _network()
    method = HardExit(model, epochs=2, device="cpu", lambda_target=target, warmup_epochs=1, lambda_ramp_epochs=1,
                      weight_decay=0.0, aux_weight=0.0)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))

    def stop_heads():
        return torch.cat([torch.cat([h.stop.weight.flatten(), h.stop.bias]) for h in model.exit_heads]).detach().clone()

    moved = []
    for epoch in range(2):
        method.begin_epoch(epoch)
        before = stop_heads()
        method.step(batch, batch)
        moved.append(float((stop_heads() - before).abs().max()))
        method.end_epoch()
    assert moved[0] == 0 and moved[1] > 1e-6, moved


# ---- the cost model ------------------------------------------------------------------------------

def test_costs_are_the_cumulative_flops_of_the_conv_and_linear_layers():
    """nb201, C=4, 1 cell per stage, one 8x8 grey image, 10 classes, controller
    hidden 32; 2 FLOPs per multiply-accumulate, biases not counted."""
    model = _network()
    conv = lambda c_out, c_in, k, hw: 2 * c_out * c_in * k * k * hw  # noqa: E731
    controller = 2 * 4 * 32 + 2 * 32 * 30  # pooled stem (4) -> 32 -> 6 edges x 5 ops
    stem = conv(4, 1, 3, 64)
    cell = lambda c, hw: 6 * (conv(c, c, 1, hw) + conv(c, c, 3, hw))  # noqa: E731  (1x1 and 3x3 per edge)
    def block(c_in, c_out, hw):  # NB201's stride-2 ResNet block: conv_a, conv_b, 1x1 downsample
        return conv(c_out, c_in, 3, hw) + conv(c_out, c_out, 3, hw) + conv(c_out, c_in, 1, hw)
    head = lambda c: 2 * 4 * c * 10 + 2 * 4 * c  # noqa: E731  (2x2 pooled: classifier + stop head)
    c1 = controller + stem + cell(4, 64) + head(4)
    c2 = c1 + block(4, 8, 16) + cell(8, 16) + head(8)
    c3 = c2 + block(8, 16, 4) + cell(16, 4) + 2 * 16 * 10
    assert model.exit_flops.tolist() == [c1, c2, c3]
    torch.testing.assert_close(model.exit_costs, torch.tensor([c1 / c3, c2 / c3, 1.0]))
    assert model.plain_flops == stem + cell(4, 64) + block(4, 8, 16) + cell(8, 16) + block(8, 16, 4) \
        + cell(16, 4) + 2 * 16 * 10
    # torch's own counter agrees on darts' plain search network (depthwise, dilated, strided convs)
    from torch.utils.flop_counter import FlopCounterMode
    from nasops.spaces.operations import AvgPool3x3
    darts = _network("darts", layers=3)
    # the average pools compute with a depthwise conv on the CPU: count them as the pools they are
    for module in list(darts.modules()):
        for name, child in module.named_children():
            if isinstance(child, AvgPool3x3):
                setattr(module, name, torch.nn.AvgPool2d(3, child.stride, 1, count_include_pad=False))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        darts.supernet.eval()(torch.zeros(1, 1, 8, 8))
    assert counter.get_total_flops() == darts.plain_flops


# ---- hard-exit inference --------------------------------------------------------------------------

def _expected_exits(full, tau_s, tau_c, temperature):
    """The dual rule, sample by sample, on the full-depth outputs."""
    n_exits = len(full.logits)
    exits = []
    for b in range(full.stop_logits.shape[0]):
        e = n_exits - 1
        for i in range(n_exits - 1):
            s = torch.sigmoid(full.stop_logits[b, i]).item()
            c = F.softmax(full.logits[i][b] / temperature, dim=0).max().item()
            if s >= tau_s and c >= tau_c:
                e = i
                break
        exits.append(e)
    return exits


def _between(values, q):
    """A threshold halfway between two neighbouring values (no sample sits on it)."""
    ordered = values.flatten().sort().values
    k = int(q * (len(ordered) - 1))
    return ((ordered[k] + ordered[k + 1]) / 2).item()


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_hard_exit_returns_each_samples_full_depth_prediction_at_its_exit(space):
    model = _spread_exits(_network(space, layers=3 if space == "darts" else 1))
    x = torch.randn(48, 1, 8, 8)
    with torch.no_grad():
        full = model.forward_exits(x)
    stops = torch.sigmoid(full.stop_logits)
    conf = torch.stack([F.softmax(z / 0.8, 1).amax(1) for z in full.logits[:-1]])
    settings = [(0.0, 0.0, 1.0), (math.inf, math.inf, 1.0), (_between(stops, 0.5), 0.0, 1.0),
                (_between(stops, 0.3), _between(conf, 0.4), 0.8)]
    mixed = False
    for tau_s, tau_c, temperature in settings:
        result = hard_exit_inference(model, x, tau_s=tau_s, tau_c=tau_c, temperature=temperature)
        expected = _expected_exits(full, tau_s, tau_c, temperature)
        assert result.exit_index.tolist() == expected
        for b, e in enumerate(expected):
            torch.testing.assert_close(result.logits[b], full.logits[e][b], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.cost, model.exit_costs[result.exit_index])
        mixed |= len(set(expected)) >= 3
    assert mixed  # the thresholds really split the batch over several exits
    assert hard_exit_inference(model, x, tau_s=0.0, tau_c=0.0).node_batches == [48]
    empty = hard_exit_inference(model, x[:0], tau_s=0.5, tau_c=0.5)
    assert empty.logits.shape == (0, 10) and empty.exit_index.shape == (0,)


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_an_exited_sample_is_never_computed_deeper(space):
    """Hooks on the network's cells record the rows each one computes; every row
    is traced back to its sample through the full-depth run's inputs."""
    model = _spread_exits(_network(space, layers=3 if space == "darts" else 1), seed=2)
    x = torch.randn(40, 1, 8, 8)
    modules = [model.supernet.cells[seg[-1]] for seg in model._segments]
    seen = {}

    def recorder(node):
        def hook(module, args):
            seen.setdefault(node, []).append(args[1] if space == "darts" else args[0])
        return hook

    handles = [m.register_forward_pre_hook(recorder(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            full = model.forward_exits(x)
        full_inputs = {i: rows[0] for i, rows in seen.items()}
        seen.clear()
        stops = torch.sigmoid(full.stop_logits)
        result = hard_exit_inference(model, x, tau_s=_between(stops, 0.4), tau_c=0.0)
    finally:
        for h in handles:
            h.remove()
    evaluations = torch.zeros(40, dtype=torch.long)
    computed = {}
    for node, (rows,) in seen.items():
        distance = torch.cdist(rows.flatten(1), full_inputs[node].flatten(1),
                               compute_mode="donot_use_mm_for_euclid_dist")  # exact, no cancellation
        best = distance.argmin(1)
        assert distance.min(1).values.max() < 1e-4 and len(set(best.tolist())) == len(best)
        evaluations[best] += 1
        computed[node] = set(best.tolist())
    for b in range(40):
        e = result.exit_index[b].item()
        assert all((b in computed.get(node, ())) == (node <= e) for node in range(model.num_exits)), b
    torch.testing.assert_close(evaluations, result.exit_index + 1)
    assert len(set(result.exit_index.tolist())) >= 2
    assert result.node_batches == [len(computed[i]) for i in range(len(result.node_batches))]


def test_bad_thresholds_are_refused_naming_them():
    model = _network().eval()
    x = torch.randn(2, 1, 8, 8)
    for kwargs, message in [(dict(tau_s=1.5, tau_c=0.5), r"tau_s: expected a number in \[0, 1\].*got 1.5"),
                            (dict(tau_s=0.5, tau_c=-0.1), r"tau_c: expected a number in \[0, 1\].*got -0.1"),
                            (dict(tau_s=float("nan"), tau_c=0.5), "tau_s: expected"),
                            (dict(tau_s=0.5, tau_c=0.5, temperature=0.0), "temperature: expected a finite "
                                                                          "number > 0, got 0.0")]:
        with pytest.raises(ValueError, match=message):
            hard_exit_inference(model, x, **kwargs)


# ---- the report's pieces ------------------------------------------------------------------------

def test_deployment_rule_pareto_frontier_p90_and_ece_on_hand_made_cases():
    points = [{"top1": 0.90, "mean_cost": 0.5}, {"top1": 0.95, "mean_cost": 0.7},
              {"top1": 0.95, "mean_cost": 0.6}, {"top1": 0.97, "mean_cost": 1.0}, {"top1": 0.85, "mean_cost": 0.6}]
    assert report.choose_point(points, 0.94) == (2, True)  # cheapest of the accurate enough
    assert report.choose_point(points, 0.90) == (0, True)
    assert report.choose_point(points, 0.99) == (3, False)  # none: the most accurate
    assert report.pareto_flags(points) == [True, False, True, True, False]
    assert report.p90(torch.tensor([0.1] * 9 + [1.0])) == pytest.approx(0.1)
    assert report.p90(torch.tensor([0.1] * 8 + [0.5, 1.0])) == pytest.approx(0.5)
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55, 0.55, 0.55])
    correct = torch.tensor([True, False, True, True, True, False])
    # bins: 0.95 -> accuracy 0.5 (gap 0.45, 2 of 6); 0.55 -> 0.75 (gap 0.2, 4 of 6)
    assert report.expected_calibration_error(conf, correct) == pytest.approx(2 / 6 * 0.45 + 4 / 6 * 0.2)


def test_fitted_temperature_undoes_a_known_overconfidence():
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(4000, 6, generator=g)
    labels = torch.multinomial(F.softmax(z, 1), 1, generator=g).squeeze(1)
    assert report.fit_temperature(3 * z, labels) == pytest.approx(3.0, rel=0.1)
    assert report.fit_temperature(z / 2, labels) == pytest.approx(0.5, rel=0.1)


def test_held_out_splits_partition_the_architecture_half():
    args = parse_args(["--method", "hardexit", "--holdout-portion", "0.3", "--seed", "3"])
    splits = data_splits(args, 1442)
    train, val = (set(t.tolist()) for t in datasets.split(1442, 0.5, 3))
    parts = [set(splits[k].tolist()) for k in ("arch", "calibration", "selection")]
    assert set(splits["train"].tolist()) == train and set().union(*parts) == val
    assert sum(map(len, parts)) == len(val) and len(parts[1]) + len(parts[2]) == int(0.3 * len(val))
    kept = HardExit.search_split(args, torch.tensor(sorted(train)), torch.tensor(sorted(val)))[1]
    assert set(kept.tolist()) == parts[0]


# ---- the method's state ---------------------------------------------------------------------------

def test_ema_follows_the_warmed_up_decay_and_the_arch_gradient_is_clipped():
    model = _network()
    method = HardExit(model, epochs=1, device="cpu", ema_decay=0.9, arch_grad_clip=1e-3)
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        batch = lambda: (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))  # noqa
        method.step(batch(), batch())
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    d1, d2 = min(0.9, 2 / 11), min(0.9, 3 / 12)
    for k, v in method.ema.items():
        if v.is_floating_point():
            expected = d2 * (d1 * states[0][k] + (1 - d1) * states[1][k]) + (1 - d2) * states[2][k]
            torch.testing.assert_close(v, expected, msg=k)
        else:
            assert torch.equal(v, states[2][k])
    norm = torch.sqrt(sum((a.grad ** 2).sum() for a in method.alphas))
    assert 0 < norm.item() <= 1e-3 * (1 + 1e-5)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.controller.parameters())


# ---- the driver ------------------------------------------------------------------------------

def test_bad_flags_are_refused_naming_the_flag(capsys, tmp_path):
    for argv, message in [
            (["--tau-s-grid", "0.5", "1.5"], "--tau-s-grid: expected every value in [0, 1], got [1.5]"),
            (["--tau-c-grid", "-1"], "--tau-c-grid: expected every value in [0, 1], got [-1.0]"),
            (["--temperature-grid", "0"], "--temperature-grid: expected every value finite and > 0"),
            (["--accuracy-target", "1.2"], "--accuracy-target: expected a top-1 accuracy in [0, 1], got 1.2"),
            (["--ema-decay", "1"], "--ema-decay: expected a number in [0, 1), got 1.0"),
            (["--evaluate-only"], "--evaluate-only: needs --checkpoint PATH"),
            (["--evaluate-only", "--checkpoint", str(tmp_path / "none.pt")], "--checkpoint: no such file"),
            (["--checkpoint", __file__], "--checkpoint: only used with --evaluate-only"),
            (["--space", "darts", "--layers", "1"], "--layers: hard exit needs at least 2 cells")]:
        with pytest.raises(SystemExit) as exc:
            parse_args(["--method", "hardexit", *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_a_warm_up_as_long_as_the_search_is_pointed_out(capsys):
    parse_args(["--method", "hardexit", "--epochs", "2", "--warmup-epochs", "2"])
    assert "warning: --warmup-epochs 2 >= --epochs 2: lambda stays 0 the whole search" in capsys.readouterr().err
    parse_args(["--method", "hardexit", "--epochs", "3", "--warmup-epochs", "2"])
    assert "warning" not in capsys.readouterr().err


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_search_writes_the_report_and_evaluate_only_redoes_it(tmp_path):
    out = tmp_path / "run"
    result = main(_tiny("nb201", out, "--epochs", "2", "--max-steps", "2", "--warmup-epochs", "1",
                        "--lambda-target", "0.2"))
    for name in ("genotype.json", "metrics.jsonl", "checkpoint.pt", *HardExit.output_patterns[2:]):
        assert (out / name).exists(), name
    for name in ("pareto.png", "reliability.png", "exit_histogram.png", "cell_normal.png"):
        assert _is_png(out / name), name

    summary = json.loads((out / "summary.json").read_text())
    splits = summary["splits"]
    total = splits["train"] + splits["arch"] + splits["calibration"] + splits["selection"]
    assert total == len(datasets.load("digits"))  # the training split, all of it
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["split_sizes"] == splits and protocol["evaluate_only"] is False
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(result["config"]))
    assert "torch==" in (out / "pip_freeze.txt").read_text()
    assert json.loads((out / "env_info.json").read_text())["torch"] == torch.__version__

    costs = summary["costs"]["normalised"]
    assert len(costs) == 3 and costs[-1] == 1.0 and costs == sorted(costs)
    chosen = summary["chosen"]
    n = splits["selection"]
    assert sum(chosen["exit_counts"]) == n
    assert chosen["mean_cost"] == pytest.approx(sum(c * k for c, k in zip(costs, chosen["exit_counts"])) / n)
    assert chosen["hard_matches_sweep"] and chosen["hard_mismatches"] == 0
    # each node ran on the samples that had not left before it
    assert chosen["node_evaluations"] == [n - sum(chosen["exit_counts"][:i]) for i in range(3)]
    assert summary["target_met"] == (chosen["top1"] >= summary["accuracy_target"])
    assert summary["accuracy_target"] == pytest.approx(summary["full_depth"]["top1"] - 0.01)

    rows = _csv_rows(out / "pareto.csv")
    grids = summary["grids"]
    assert len(rows) == len(grids["tau_s"]) * len(grids["tau_c"]) * len(grids["temperature"]) + 1
    points = [(float(r["mean_cost"]), float(r["top1"])) for r in rows]
    for r, (cost, top1) in zip(rows, points):
        dominated = any(c <= cost and a >= top1 and (c < cost or a > top1) for c, a in points)
        assert (r["on_frontier"] == "True") == (not dominated)
    feasible = [p for p in points if p[1] >= summary["accuracy_target"]]
    assert chosen["mean_cost"] == pytest.approx(min(feasible)[0])

    epochs = _csv_rows(out / "train_epoch_metrics.csv")
    assert [float(r["lambda"]) for r in epochs] == pytest.approx([0.0, 0.2])
    for r in epochs:
        assert sum(float(r[f"q_exit{i}"]) for i in (1, 2, 3)) == pytest.approx(1.0, abs=1e-5)
    assert json.loads((out / "genotype.json").read_text())["hardexit"]["top1"] == chosen["top1"]

    # the finished run outside the driver: its network reproduces the chosen point's top-1
    model, args, data = load_run(out / "checkpoint.pt")
    selection = data_splits(args, len(data))["selection"]
    x, y = data.batch(selection)
    c = summary["chosen"]
    hard = hard_exit_inference(model, x, tau_s=math.inf if c["full_depth"] else c["tau_s"],
                               tau_c=math.inf if c["full_depth"] else c["tau_c"], temperature=c["temperature"])
    assert (hard.logits.argmax(1) == y).double().mean().item() == pytest.approx(c["top1"])
    assert torch.bincount(hard.exit_index, minlength=3).tolist() == c["exit_counts"]

    # the benchmark script runs on it (one tiny pass: a smoke test, not a measurement)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import hardexit_throughput
        bench = hardexit_throughput.main(["--checkpoint", str(out / "checkpoint.pt"), "--batch-size", "32",
                                          "--rounds", "1", "--repeats", "1", "--warmup", "0", "--threads", "1"])
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert set(bench["median_s"]) == {"full", "plain", "hard"}
    assert bench["predicted_saving"] == pytest.approx(1 - sum(
        f * c for f, c in zip(bench["exit_fractions"], costs)))

    # --evaluate-only: the run's settings from its checkpoint, the same report again
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    pareto = (out / "pareto.csv").read_text()
    again = main(["--method", "hardexit", "--evaluate-only", "--checkpoint", str(out / "checkpoint.pt"),
                  "--quiet", "--threads", "1"])
    assert again["out"] == str(out) and again["genotype_str"] == result["genotype_str"]
    assert (out / "pareto.csv").read_text() == pareto
    assert {name: (out / name).read_bytes() for name in before} == before
    assert json.loads((out / "protocol.json").read_text())["evaluate_only"] is True
    # ... with another target, into another folder: every point is good enough, the cheapest wins
    other = tmp_path / "eval"
    main(["--method", "hardexit", "--evaluate-only", "--checkpoint", str(out / "checkpoint.pt"), "--quiet",
          "--threads", "1", "--accuracy-target", "0", "--out", str(other)])
    cheap = json.loads((other / "summary.json").read_text())
    assert cheap["accuracy_target"] == 0 and cheap["chosen"]["mean_cost"] == pytest.approx(min(points)[0])
    assert not (other / "checkpoint.pt").exists() and (other / "pareto.png").exists()


def test_evaluate_only_refuses_foreign_unfinished_and_damaged_checkpoints(tmp_path):
    darts = tmp_path / "darts"
    main(["--space", "nb201", "--layers", "1", "--init-channels", "4", "--batch-size", "16", "--threads", "1",
          "--quiet", "--epochs", "1", "--max-steps", "1", "--out", str(darts)])
    evaluate = ["--method", "hardexit", "--evaluate-only", "--quiet", "--checkpoint"]
    with pytest.raises(SearchError, match="--checkpoint: .* is a checkpoint of --method darts, not --method "
                                          "hardexit"):
        main([*evaluate, str(darts / "checkpoint.pt")])

    run = tmp_path / "run"
    main(_tiny("nb201", run, "--epochs", "1", "--max-steps", "1"))
    with pytest.raises(SearchError, match="--out .* holds another run's checkpoint"):
        main([*evaluate, str(run / "checkpoint.pt"), "--out", str(darts)])
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["config"]["epochs"] = 3
    torch.save(state, tmp_path / "unfinished.pt")
    with pytest.raises(SearchError, match="--checkpoint: .* stopped after epoch 1 of 3; finish that run with "
                                          "--resume first"):
        main([*evaluate, str(tmp_path / "unfinished.pt"), "--out", str(tmp_path / "e1")])
    state["config"]["epochs"] = 1
    state["model"].pop("controller.0.weight")
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(SearchError, match="--checkpoint: the checkpoint .* does not fit"):
        main([*evaluate, str(tmp_path / "broken.pt"), "--out", str(tmp_path / "e2")])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SearchError, match="--checkpoint: cannot read the checkpoint"):
        main([*evaluate, str(tmp_path / "junk.pt"), "--out", str(tmp_path / "e3")])


@pytest.mark.slow
def test_darts_space_with_amp_runs_and_reports(tmp_path):
    result = main(_tiny("darts", tmp_path / "amp", "--epochs", "1", "--max-steps", "1", "--amp"))
    assert math.isfinite(result["metrics"][0]["train_loss"])
    summary = json.loads((tmp_path / "amp" / "summary.json").read_text())
    assert summary["exits"] == 3 and summary["chosen"]["hard_matches_sweep"]


@pytest.mark.slow
def test_killed_and_resumed_hardexit_run_equals_uninterrupted_run(tmp_path):
    args = ["--epochs", "2", "--max-steps", "2", "--deterministic", "--warmup-epochs", "1"]
    main(_tiny("nb201", tmp_path / "full", *args))
    out = tmp_path / "killed"
    run_killed_after_epoch("nasops.search", _tiny("nb201", out, *args), epoch=1)
    main(_tiny("nb201", out, *args, "--resume"))

    def comparable(path):
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "samples_per_s")}
                for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert comparable(out) == comparable(tmp_path / "full")
    resumed, full = assert_same_checkpoint_model(out, tmp_path / "full")
    assert full["method"]["ema_steps"] == resumed["method"]["ema_steps"] == 4
    for name, value in full["method"]["ema"].items():
        assert torch.equal(resumed["method"]["ema"][name], value), name
    assert (out / "pareto.csv").read_text() == (tmp_path / "full" / "pareto.csv").read_text()


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_end_with_identical_architecture_and_report(tmp_path):
    out = tmp_path / "ddp"
    torchrun_two_ranks("nasops.search",
                       _tiny("nb201", out, "--epochs", "1", "--max-steps", "2", "--warmup-epochs", "0"),
                       NASOPS_TEST_DUMP_ALPHAS=str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"alphas_rank{r}.pt") for r in (0, 1))
    assert len(rank0) == 1 + 4  # the alphas and the controller's two linear layers
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)
    assert rank0[3].abs().max() > 0 and rank0[4].abs().max() > 0  # the zero-initialised last layer learned
    assert json.loads((out / "genotype.json").read_text())["world_size"] == 2
    assert json.loads((out / "summary.json").read_text())["chosen"]["hard_matches_sweep"]
