"""DASViT (nasops.methods.dasvit): the fairness loss against hand-computed values, its
gradient in the architecture step, the progressive stages (pruning, inheritance,
fresh optimizers), the flags, and end-to-end runs of the driver: outputs, kill and
resume across a stage boundary, two gloo ranks, bfloat16 autocast, fairness on/off,
and the search-step benchmark script."""
from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_same_checkpoint_model, run_killed_after_epoch, subprocess_env, torchrun_two_ranks
from nasops.methods.dasvit import DasVit, Stage, fairness_terms, plan_stages, split_epochs
from nasops.search import SearchError, main, parse_args, run_config
from nasops.spaces import vit
from nasops.spaces.vit import VIT_OPS, VitSearchNetwork

REPO = Path(__file__).resolve().parents[1]
# digits 8x8, patch 2 (16 tokens + CLS), width 16, two stages of depth 1 and 2.
BASE = ["--space", "vit", "--method", "dasvit", "--embed-dim", "16", "--patch-size", "2", "--batch-size", "8",
        "--threads", "1", "--quiet"]
TINY = [*BASE, "--stage-depths", "1", "2", "--stage-keep", "3"]


# Tiny networks: a thread pool costs more than it gains (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_net(**kw):
    args = dict(in_channels=1, num_classes=4, embed_dim=16, depth=1, image_size=8, patch_size=2, token_ratio=0.5)
    args.update(kw)
    return VitSearchNetwork(**args)


def _batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


# ---- the fairness loss ----------------------------------------------------------------------------

def test_fairness_terms_hand_computed():
    names = [["none", "skip_connect", "msa_h8", "mlp_r4"],
             ["msa_h12", "msa_h16", "mlp_r0.5", "mlp_r3"],
             ["skip_connect", "msa_h8", "mlp_r3", "mlp_r4"]]
    w = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.35, 0.15, 0.1], [0.2, 0.1, 0.3, 0.4]])
    l1, l2 = fairness_terms(w, names, gamma_min=0.2, gamma_max=0.6, zeta1=2.0, zeta2=3.0)
    # L1: the Identity weights 0.5 and 0.2 -> 0.35.
    # L2 per edge, over the types it has (parameter-free, MSA, MLP):
    #   edge 0: 0.6, 0.3, 0.1 -> 3 * (0.2 - 0.1)                 = 0.3
    #   edge 1: -, 0.75, 0.25 -> 2 * (0.75 - 0.6)                = 0.3
    #   edge 2: 0.2, 0.1, 0.7 -> 3 * (0.2 - 0.1) + 2 * (0.7 - 0.6) = 0.5;  mean 1.1 / 3
    assert l1.item() == pytest.approx(0.35, abs=1e-6)
    assert l2.item() == pytest.approx(1.1 / 3, abs=1e-6)
    l1, l2 = fairness_terms(w[1:2], names[1:2], gamma_min=0.0, gamma_max=1.0, zeta1=1.0, zeta2=1.0)
    assert l1.item() == 0.0 and l2.item() == 0.0  # no Identity op; every type inside the bounds


def _method(net, **kw):
    return DasVit(net, epochs=2, device="cpu", **kw)


def test_architecture_gradient_is_the_validation_gradient_plus_the_fairness_gradient():
    torch.manual_seed(0)
    net = tiny_net()
    with torch.no_grad():
        net.alphas_encoder.normal_()
    method = _method(net, fair_a=2.0, fair_b=3.0, gamma_min=0.3, gamma_max=0.4, zeta1=1.5, zeta2=0.5)
    x, y = _batch(1)
    alpha = net.alphas_encoder
    g_val, = torch.autograd.grad(F.cross_entropy(net(x), y), alpha)
    l1, l2 = fairness_terms(torch.softmax(alpha, -1), net.op_names("encoder"), gamma_min=0.3, gamma_max=0.4,
                            zeta1=1.5, zeta2=0.5)
    g_fair, = torch.autograd.grad(2.0 * l1 + 3.0 * l2, alpha)
    assert g_fair.abs().sum() > 0
    method._arch_step(x, y)
    torch.testing.assert_close(alpha.grad, g_val + g_fair)


def test_second_order_step_adds_the_fairness_gradient():
    x, y = _batch(1)
    xt, yt = _batch(2)
    grads = {}
    for a in (0.0, 2.0):
        torch.manual_seed(0)
        net = tiny_net(token_ratio=1.0)
        with torch.no_grad():
            net.alphas_encoder.normal_()
        method = _method(net, fair_a=a, fair_b=0.0, second_order=True)
        method._arch_step_unrolled(xt, yt, x, y)
        grads[a] = net.alphas_encoder.grad.clone()
    torch.manual_seed(0)
    net = tiny_net(token_ratio=1.0)
    with torch.no_grad():
        net.alphas_encoder.normal_()
    l1, _ = fairness_terms(torch.softmax(net.alphas_encoder, -1), net.op_names("encoder"), gamma_min=0.2,
                           gamma_max=0.6, zeta1=1.0, zeta2=1.0)
    g_fair, = torch.autograd.grad(2.0 * l1, net.alphas_encoder)
    torch.testing.assert_close(grads[2.0] - grads[0.0], g_fair, rtol=1e-4, atol=1e-6)


def test_no_fairness_is_no_penalty():
    assert _method(tiny_net(), fair_a=0.0, fair_b=0.0).arch_penalty() is None


# ---- stages ------------------------------------------------------------------------------------------

def test_stage_plan():
    assert split_epochs(6, 3) == [2, 2, 2] and split_epochs(7, 3) == [2, 2, 3] and split_epochs(3, 3) == [1, 1, 1]
    assert plan_stages([2, 4, 6], [5, 3], [30, 30, 30]) == [Stage(2, None, 30, 0), Stage(4, 5, 30, 30),
                                                          Stage(6, 3, 30, 60)]
    with pytest.raises(ValueError, match="one keep count per stage after the first"):
        plan_stages([2, 4], [5, 3], [1, 1])


def test_a_new_stage_prunes_grows_inherits_and_restarts_the_optimizers():
    torch.manual_seed(0)
    net = tiny_net(depth=1)
    stages = plan_stages([1, 2], [3], [1, 1])
    method = DasVit(net, epochs=2, device="cpu", stages=stages, lr=0.01, lr_min=0.001)
    with torch.no_grad():
        net.alphas_encoder.normal_()
    x, y = _batch(1)
    method.step((x, y), (x, y))
    method.end_epoch()
    assert method.lr < 0.01  # the first stage's cosine moved
    method.begin_epoch(0)
    assert method.model is net  # epoch 0 is still stage 1
    method.begin_epoch(1)

    new = method.model
    assert new is not net and new.depth == 2 and method.stage == 1
    kept = vit.prune_ops(net.alphas_encoder.detach(), net.op_names("encoder"), 3)
    assert new.op_names("encoder") == [[VIT_OPS[i] for i in cols] for cols in kept]
    torch.testing.assert_close(new.alphas_encoder.detach(), torch.gather(net.alphas_encoder.detach(), 1,
                                                                         torch.tensor(kept)))
    assert torch.equal(new.embed.pos, net.embed.pos) and torch.equal(new.head.weight, net.head.weight)
    # fresh optimizers over the new network's parameters, a fresh cosine
    assert {id(p) for g in method.w_opt.param_groups for p in g["params"]} == \
        {id(p) for p in new.weight_parameters()}
    assert [id(p) for p in method.a_opt.param_groups[0]["params"]] == [id(new.alphas_encoder)]
    assert isinstance(method.w_opt, torch.optim.AdamW) and method.lr == 0.01 and not method.w_opt.state
    # the finished stage's op weights are kept for the outputs
    assert len(method.stage_tables) == 1 and method.stage_tables[0]["stage"] == 1
    assert method.stage_tables[0]["edges"] == net.edge_weights()["encoder"]
    method.step((x, y), (x, y))
    with pytest.raises(RuntimeError, match="stage 2 already"):
        method.begin_epoch(0)


def test_state_dict_rebuilds_the_stage_it_was_saved_in():
    torch.manual_seed(0)
    stages = plan_stages([1, 2], [3], [1, 1])
    first = DasVit(tiny_net(depth=1), epochs=2, device="cpu", stages=stages)
    first.begin_epoch(1)
    x, y = _batch(1)
    first.step((x, y), (x, y))
    buffer = io.BytesIO()  # through torch.save, as the checkpoint goes
    torch.save({"method": first.state_dict(), "model": first.model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    state, model_state = saved["method"], saved["model"]

    torch.manual_seed(1)
    second = DasVit(tiny_net(depth=1), epochs=2, device="cpu", stages=stages)
    second.load_state_dict(state)
    second.model.load_state_dict(model_state)  # what the driver does next
    assert second.stage == 1 and second.model.op_names("encoder") == first.model.op_names("encoder")
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert second.stage_tables == first.stage_tables
    second.step((x, y), (x, y))
    first.step((x, y), (x, y))
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


# ---- flags --------------------------------------------------------------------------------------------

def test_defaults_are_the_papers():
    args = parse_args(["--space", "vit", "--method", "dasvit", "--epochs", "90"])
    assert args.stage_depths == [2, 4, 6] and args.stage_keep == [5, 3] and args.stage_epochs == [30, 30, 30]
    assert args.token_ratio == 0.5 and args.adamw_lr == 1e-3 and args.adamw_weight_decay == 5e-2
    assert args.layers == 6 and args.embed_dim == 48 and args.encoder_nodes == 2


@pytest.mark.parametrize("argv,message", [
    (["--space", "darts", "--method", "dasvit"], "--method dasvit searches the spaces vit; got --space darts"),
    (["--space", "darts", "--embed-dim", "32"], "--embed-dim: only for --space vit"),
    (["--token-ratio", "0"], r"--token-ratio: expected a share in \(0, 1\], got 0.0"),
    (["--stage-keep", "5"], r"--stage-keep: expected 2 values .* got \[5\]"),
    (["--stage-keep", "3", "5"], "never increase"),
    (["--stage-depths", "4", "2", "6"], "never decrease"),
    (["--stage-epochs", "1", "2", "2"], r"--stage-epochs: expected 3 counts >= 1 adding up to --epochs 6"),
    (["--epochs", "2"], "--epochs: 3 stages need at least 3 epochs, got 2"),
    (["--fair-gamma-min", "0.7"], "--fair-gamma-min, --fair-gamma-max: expected 0 <= min <= max <= 1"),
    (["--fair-a", "-1"], "--fair-a: expected >= 0"),
    (["--layers", "3"], "--layers: dasvit takes its depths from --stage-depths"),
])
def test_bad_flags_are_refused_naming_them(argv, message, capsys):
    base = ["--space", "vit", "--method", "dasvit"]
    with pytest.raises(SystemExit) as exc:
        parse_args(base + argv if "--space" not in argv else argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_vit_size_flags_enter_only_vit_runs_configs():
    assert not {"embed_dim", "patch_size", "input_size", "encoder_nodes"} & set(run_config(parse_args([])))
    config = run_config(parse_args(["--space", "vit", "--patch-size", "4"]))
    assert config["embed_dim"] == 48 and config["patch_size"] == 4 and config["input_size"] is None


def test_a_patch_that_does_not_divide_the_image_is_refused(tmp_path):
    with pytest.raises(SearchError, match=r"--patch-size: expected a divisor of the image size 8 "
                                          r"\(--input-size, or the data's\), got 3"):
        main([*TINY, "--patch-size", "3", "--out", str(tmp_path / "run")])


# ---- end to end -----------------------------------------------------------------------------------

def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_search_writes_every_output(tmp_path):
    out = tmp_path / "run"
    result = main([*TINY, "--epochs", "2", "--max-steps", "2", "--out", str(out)])
    saved = json.loads((out / "genotype.json").read_text())
    g = saved["genotype"]
    assert saved["method"] == "dasvit" and g == result["genotype"] and g["depth"] == 2 and g["embed_dim"] == 16
    assert saved["identity_edges"] == sum(op == "skip_connect" for op, _ in g["encoder"])
    assert saved["derived_network"]["params"] == vit.derived_cost(g)["params"]
    assert saved["plain_vit"] == {**vit.plain_vit_cost(g), "encoder": ["msa_h12", "mlp_r4"]}
    assert saved["config"]["stage_epochs"] == [1, 1] and saved["config"]["layers"] == 2

    records = _metrics(out)
    assert [(r["stage"], r["depth"]) for r in records] == [(1, 1), (2, 2)]
    assert all(set(r["fairness"]) == {"L1", "L2", "L_fair"} for r in records)
    for stage, ops in ((1, 8), (2, 3)):
        table = json.loads((out / f"stage{stage}_weights.json").read_text())
        assert table["stage"] == stage and len(table["edges"]) == 5
        rows = _read_csv(out / f"stage{stage}_weights.csv")
        assert [r["edge"] for r in rows] == ["0->2", "1->2", "0->3", "1->3", "2->3"]
        for row, edge in zip(rows, table["edges"]):
            filled = {op: float(v) for op, v in row.items() if op != "edge" and v}
            assert len(filled) == ops and filled == pytest.approx(edge["ops"], abs=1e-6)
        assert (out / f"stage{stage}_weights.png").read_bytes()[:4] == b"\x89PNG"
    # the last stage's table is the run's final op weights
    assert json.loads((out / "stage2_weights.json").read_text())["edges"] == records[-1]["edge_weights"]["encoder"]
    assert (out / "cell_encoder.png").read_bytes()[:4] == b"\x89PNG"

    net = vit.build_derived_vit(g)
    x = torch.randn(2, 1, 8, 8)
    assert net(x).shape == (2, 10)


@pytest.mark.slow
def test_plain_darts_searches_the_vit_space(tmp_path):
    result = main(["--space", "vit", "--embed-dim", "16", "--layers", "1", "--batch-size", "8", "--threads", "1",
                   "--quiet", "--epochs", "1", "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert result["method"] == "darts" and result["genotype"]["depth"] == 1
    assert "stage" not in result["metrics"][0]  # no DASViT extras
    assert (tmp_path / "run" / "cell_encoder.png").exists() and (tmp_path / "run" / "weights_encoder.png").exists()


@pytest.mark.slow
def test_killed_and_resumed_across_a_stage_boundary_equals_uninterrupted_run(tmp_path):
    # Three stages of one epoch; killed after epoch 2 (stage 2's network in the checkpoint),
    # the resumed run rebuilds stage 2, then grows stage 3.
    args = [*BASE, "--stage-depths", "1", "2", "3", "--stage-keep", "5", "3", "--epochs", "3", "--max-steps", "2",
            "--deterministic"]
    full = main([*args, "--out", str(tmp_path / "full")])

    out = tmp_path / "killed"
    run_killed_after_epoch("nasops.search", [*args, "--out", out], epoch=2)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["method"]["stage"] == 1

    resumed = main([*args, "--out", str(out), "--resume"])
    assert resumed["genotype"] == full["genotype"]
    drop = ("time", "samples_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in _metrics(out)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _metrics(tmp_path / "full")]
    _, full_state = assert_same_checkpoint_model(out, tmp_path / "full")
    assert any(k.startswith("encoders.2.") for k in full_state["model"])  # the third stage's depth
    for name in ("stage2_weights.csv", "stage3_weights.json"):
        assert (out / name).read_text() == (tmp_path / "full" / name).read_text()


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_end_with_identical_parameters(tmp_path):
    out = tmp_path / "ddp"
    torchrun_two_ranks("nasops.search", [*TINY, "--epochs", "2", "--max-steps", "2", "--out", out],
                       NASOPS_TEST_DUMP_ALPHAS=str(tmp_path))
    rank0 = torch.load(tmp_path / "model_rank0.pt")
    rank1 = torch.load(tmp_path / "model_rank1.pt")
    assert rank0.keys() == rank1.keys() and any(k.startswith("encoders.1.") for k in rank0)  # stage 2 grown
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert json.loads((out / "genotype.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_amp_bfloat16_on_cpu_runs_and_stays_close(tmp_path):
    args = [*TINY, "--epochs", "2", "--max-steps", "2"]
    full = main([*args, "--out", str(tmp_path / "fp32")])["metrics"]
    amp = main([*args, "--amp", "--out", str(tmp_path / "amp")])["metrics"]
    assert amp[0]["train_loss"] != full[0]["train_loss"]  # autocast changed the arithmetic
    for a, f in zip(amp, full):
        assert a["train_loss"] == pytest.approx(f["train_loss"], rel=0.05)
        assert a["val_loss"] == pytest.approx(f["val_loss"], rel=0.05)


def _mean_skip_weight(record):
    weights = [e["ops"]["skip_connect"] for e in record["edge_weights"]["encoder"] if "skip_connect" in e["ops"]]
    return sum(weights) / len(weights)


@pytest.mark.slow
def test_fairness_on_and_off_record_the_identity_edges(tmp_path):
    """Report, not a claim: both runs record how many Identity edges they derived;
    a strong L1 weight keeps the Identity weights below those of the run without it."""
    args = [*TINY, "--stage-keep", "8", "--epochs", "2", "--max-steps", "3", "--arch-lr", "0.05"]
    on = main([*args, "--fair-a", "20", "--out", str(tmp_path / "on")])
    off = main([*args, "--fair-a", "0", "--fair-b", "0", "--out", str(tmp_path / "off")])
    for result in (on, off):
        saved = json.loads((Path(result["out"]) / "genotype.json").read_text())
        assert saved["identity_edges"] == sum(op == "skip_connect" for op, _ in saved["genotype"]["encoder"])
    assert _mean_skip_weight(on["metrics"][-1]) < _mean_skip_weight(off["metrics"][-1])
    assert on["metrics"][-1]["fairness"]["L1"] < off["metrics"][-1]["fairness"]["L1"]


def test_search_step_benchmark_runs(tmp_path):
    results = tmp_path / "RESULTS.md"
    config = json.dumps(dict(embed_dim=16, depth=1, image_size=8, patch_size=2, batch_size=4))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dasvit_search_step.py"), "--config", config,
                           "--reps", "1", "--threads", "1", "--out", str(results)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert "<!-- BEGIN dasvit-search-step cpu -->" in text
    rows = [line for line in text.splitlines() if line.startswith("| ratio-")]
    assert [r.split("|")[1].strip() for r in rows] == ["ratio-1.0", "ratio-0.5", "ratio-0.5-literal"]
