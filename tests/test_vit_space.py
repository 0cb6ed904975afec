"""The ``vit`` search space (nasops.spaces.vit): mixed edges with and without token
selection against independent eager computations, genotype, pruning and weight
inheritance between stages, the derived and plain networks, and the cost counter
against hand-computed values, torch's FLOP counter and the DASViT paper's table."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import nasops.ops
from nasops.spaces import build, plot, vit
from nasops.spaces.vit import VIT_OPS, VitMixedEdge, VitSearchNetwork

PARAMETRIC = [n for n in VIT_OPS if n not in ("none", "skip_connect")]


# Tiny networks: a thread pool costs more than it gains (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(**kw):
    args = dict(in_channels=1, num_classes=4, embed_dim=16, depth=1, image_size=8, patch_size=2)
    args.update(kw)
    return VitSearchNetwork(**args)


def set_weights(net, rows):
    """softmax(alphas) = rows exactly (alpha = log p)."""
    with torch.no_grad():
        net.alphas_encoder.copy_(torch.tensor(rows, dtype=torch.float64).log())


# ---- structure -------------------------------------------------------------------------------

def test_structure_and_defaults():
    net = build("vit", in_channels=3, num_classes=10, image_size=32)
    assert net.space == "vit" and net.cell_types == ("encoder",) and net.depth == 2
    assert net.alphas_encoder.shape == (5, 8)
    assert net.edge_names("encoder") == ["0->2", "1->2", "0->3", "1->3", "2->3"]
    assert net.op_names("encoder") == [list(VIT_OPS)] * 5
    assert net.embed.tokens == 17  # 4x4 patches (default patch 8 on 32 px) + CLS
    assert net.settings["patch_size"] == 8 and net.settings["embed_dim"] == 48
    logits = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    # no token selection by default: no selector weights
    assert not any("selector" in name for name, _ in net.named_parameters())


def test_other_image_sizes_are_resized_to_the_networks():
    torch.manual_seed(0)
    net = tiny_net(image_size=8, patch_size=2).eval()
    x = torch.randn(2, 1, 4, 4)
    resized = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(net(x), net(resized))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"token_ratio: expected a share of the tokens in \(0, 1\], got 0"):
        tiny_net(token_ratio=0)
    with pytest.raises(ValueError, match="token_gate: expected one of"):
        tiny_net(token_gate="hard")
    with pytest.raises(ValueError, match="patch_size: expected a divisor of image_size=8, got 3"):
        tiny_net(patch_size=3)
    with pytest.raises(ValueError, match="embed_dim: expected an int >= 1, got 0"):
        tiny_net(embed_dim=0)
    with pytest.raises(ValueError, match="edge_ops: expected 5 edges for 2 nodes, got 1"):
        tiny_net(edge_ops=[VIT_OPS])
    with pytest.raises(ValueError, match="same, non-zero number of ops"):
        tiny_net(edge_ops=[VIT_OPS] * 4 + [VIT_OPS[:3]])
    with pytest.raises(ValueError, match="op: expected one of .* got 'conv'"):
        tiny_net(edge_ops=[("none", "conv")] * 5)
    with pytest.raises(TypeError, match=r"options: space 'darts' takes none, got \['token_ratio'\]"):
        build("darts", in_channels=3, num_classes=10, token_ratio=0.5)


# ---- mixed edges -------------------------------------------------------------------------------

def _ops_of(edge):
    return {n: edge.ops[n.replace(".", "_")] for n in PARAMETRIC if n in edge.op_names}


def test_edge_without_selection_is_the_weighted_sum_of_its_ops():
    torch.manual_seed(0)
    edge = VitMixedEdge(VIT_OPS, 16)
    x = torch.randn(3, 9, 16)
    w = torch.softmax(torch.randn(8), 0)
    ops = _ops_of(edge)
    expected = w[1] * x + sum(w[VIT_OPS.index(n)] * op(x) for n, op in ops.items())
    torch.testing.assert_close(edge(x, w), expected)


@pytest.mark.parametrize("dim,heads", [(16, 8), (16, 12), (12, 16)])  # whole heads, a projected width, 1-wide
def test_msa_is_multi_head_attention_forward_and_backward(dim, heads):
    """The MSA op against attention written out per head (float64): qkv's output is
    [q | k | v], each heads x head_dim; softmax(q k^T / sqrt(head_dim)) v, heads
    concatenated, projected back."""
    torch.manual_seed(0)
    msa = vit.MSA(dim, heads).double()
    x = torch.randn(2, 5, dim, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, dim, dtype=torch.float64)
    d = msa.head_dim
    q, k, v = msa.qkv(msa.norm(x)).split(heads * d, dim=-1)
    heads_out = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        heads_out.append(torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1) @ vh)
    expected = msa.proj(torch.cat(heads_out, dim=-1))
    expected_grads = torch.autograd.grad(expected, [x, *msa.parameters()], grad)
    got = msa(x)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, [x, *msa.parameters()], grad), expected_grads):
        torch.testing.assert_close(a, b)


def _reference_selected_edge(edge, x, w, keep):
    """DASViT's selection as the paper writes it (the N x N score matrix), the ops on
    each sample's kept tokens, Identity on every token."""
    Wq, Wk = edge.selector.weight.chunk(2, dim=0)
    q, k = x @ Wq.T, x @ Wk.T
    scores = (q @ k.transpose(1, 2) / math.sqrt(x.shape[-1])).mean(-1)  # (B, N)
    y = w[1] * x
    rows = []
    for b in range(x.shape[0]):
        others = torch.argsort(scores[b, 1:].detach(), descending=True, stable=True)[:keep - 1] + 1
        idx = torch.sort(torch.cat([torch.zeros(1, dtype=torch.long), others])).values
        s_sel = scores[b, idx].unsqueeze(-1)
        x_sel = x[b, idx] * (1 + s_sel - s_sel.detach())  # the straight-through gate
        mixed = sum(w[VIT_OPS.index(n)] * op(x_sel.unsqueeze(0))[0] for n, op in _ops_of(edge).items())
        rows.append((idx, mixed))
    out = y.clone()
    for b, (idx, mixed) in enumerate(rows):
        out[b, idx] = out[b, idx] + mixed
    return out, [idx for idx, _ in rows]


def test_edge_with_selection_matches_the_papers_formula_forward_and_backward():
    torch.manual_seed(0)
    edge = VitMixedEdge(VIT_OPS, 16, token_ratio=0.5)
    with torch.no_grad():  # scores far enough apart that both computations rank alike
        edge.selector.weight.mul_(20)
    x = torch.randn(3, 9, 16, requires_grad=True)
    alpha = torch.randn(8, requires_grad=True)
    params = [x, alpha, *edge.parameters()]

    out = edge(x, torch.softmax(alpha, 0))
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * upstream).sum(), params)

    expected, kept = _reference_selected_edge(edge, x, torch.softmax(alpha, 0), keep=4)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), params)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for name, g, e in zip(["x", "alpha"] + [n for n, _ in edge.named_parameters()], grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # the selection's own weights learn through the gate
    assert grads[2 + [n for n, _ in edge.named_parameters()].index("selector.weight")].abs().sum() > 0
    # a token nobody kept gets only the Identity share of the edge
    w = torch.softmax(alpha, 0)
    for b, idx in enumerate(kept):
        assert 0 in idx.tolist() and len(idx) == 4  # floor(0.5 * 9) = 4, CLS among them
        dropped = [i for i in range(9) if i not in idx.tolist()]
        torch.testing.assert_close(out[b, dropped], w[1] * x[b, dropped])


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_recomputed_selection_has_the_gradients_of_the_direct_one(autocast):
    torch.manual_seed(0)
    x = torch.randn(3, 9, 16, requires_grad=True)
    weight = (0.5 * torch.randn(32, 16)).requires_grad_()
    upstream = torch.randn(3, 4, 16)
    results = []
    for select in (lambda *a: vit.RecomputedSelection.apply(*a), vit.select_tokens):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            x_sel, idx = select(x, weight, 0.5, "straight_through")
        results.append((x_sel, idx, torch.autograd.grad((x_sel.float() * upstream).sum(), [x, weight])))
    (recomputed, idx_r, grads_r), (direct, idx_d, grads_d) = results
    assert torch.equal(idx_r, idx_d) and torch.equal(recomputed, direct)
    for g_r, g_d in zip(grads_r, grads_d):
        assert torch.equal(g_r, g_d)


def test_selection_hands_the_op_contiguous_queries_and_keys_of_the_selector(monkeypatch):
    """q = x W[:C]^T and k = x W[C:]^T (DASViT's W_Q and W_K in one C x 2C selector),
    each its own contiguous tensor: a strided half of one product would be copied by
    the op's kernels in the forward, the recomputation and the backward."""
    torch.manual_seed(0)
    x, weight = torch.randn(3, 9, 16, dtype=torch.float64), torch.randn(32, 16, dtype=torch.float64)
    seen = []
    topk_tokens = nasops.ops.topk_tokens

    def recording(x, q, k, *args, **kwargs):
        seen.append((q, k))
        return topk_tokens(x, q, k, *args, **kwargs)
    monkeypatch.setattr(nasops.ops, "topk_tokens", recording)
    vit.select_tokens(x, weight, 0.5, "straight_through")
    (q, k), = seen
    assert q.is_contiguous() and k.is_contiguous()
    torch.testing.assert_close(q, x @ weight[:16].T)
    torch.testing.assert_close(k, x @ weight[16:].T)


def test_recomputed_selection_gradcheck_with_the_sigmoid_gate():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: vit.RecomputedSelection.apply(x, w, 0.5, "sigmoid")[0],
                                    (x, weight))


def test_selection_without_identity_leaves_dropped_tokens_zero():
    torch.manual_seed(0)
    ops = ("none", "msa_h8", "mlp_r4")
    edge = VitMixedEdge(ops, 16, token_ratio=0.34)
    x = torch.randn(2, 9, 16)
    out = edge(x, torch.tensor([0.2, 0.5, 0.3]))
    zero_rows = (out.abs().sum(-1) == 0).sum(1)
    assert zero_rows.tolist() == [9 - 3, 9 - 3]  # floor(0.34 * 9) = 3 kept


def test_every_edge_goes_through_mixed_op_on_the_kept_tokens(monkeypatch):
    calls = []
    original = nasops.ops.mixed_op

    def recording(outputs, weights, **kw):
        calls.append(([o is None for o in outputs], [tuple(o.shape) for o in outputs if o is not None],
                      tuple(weights.shape)))
        return original(outputs, weights, **kw)

    monkeypatch.setattr(nasops.ops, "mixed_op", recording)
    for ratio, tokens, skip_is_none in ((1.0, 17, False), (0.5, 8, True)):
        calls.clear()
        torch.manual_seed(0)
        net = tiny_net(depth=2, token_ratio=ratio)
        net(torch.randn(2, 1, 8, 8)).sum().backward()
        assert len(calls) == 2 * 5  # 2 encoders x 5 edges (the backward recomputes no mixed edge)
        for is_none, shapes, wshape in calls:
            assert is_none == [True, skip_is_none] + [False] * 6 and wshape == (8,)
            assert shapes == [(2, tokens, 16)] * (6 if skip_is_none else 7)


def test_per_sample_weights_with_selection():
    torch.manual_seed(0)
    net = tiny_net(token_ratio=0.5)
    x = torch.randn(3, 1, 8, 8)
    w = torch.softmax(torch.randn(5, 8), -1)
    same = net(x, weights={"encoder": w})
    per_sample = net(x, weights={"encoder": w.expand(3, 5, 8)})
    torch.testing.assert_close(per_sample, same)


def test_amp_bfloat16_forward_backward():
    torch.manual_seed(0)
    net = tiny_net(token_ratio=0.5)
    x = torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
    logits.float().sum().backward()
    assert torch.isfinite(net.alphas_encoder.grad).all() and net.alphas_encoder.grad.abs().sum() > 0


# ---- genotype, pruning, stages --------------------------------------------------------------------

def test_genotype_follows_the_darts_rule_and_records_the_sizes():
    net = tiny_net()
    # edges 0->2, 1->2 | 0->3, 1->3, 2->3; columns VIT_OPS
    rows = [[0.3, 0.1, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05],   # best non-Zero: msa_h8 0.2
            [0.05, 0.05, 0.1, 0.1, 0.1, 0.5, 0.05, 0.05],  # mlp_r0.5 0.5
            [0.1, 0.6, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05],  # skip 0.6
            [0.9, 0.02, 0.02, 0.02, 0.02, 0.01, 0.005, 0.005],  # only 0.02 (msa_h8 first)
            [0.1, 0.1, 0.1, 0.1, 0.35, 0.1, 0.1, 0.05]]     # msa_h16 0.35
    set_weights(net, rows)
    g = net.genotype()
    assert g["encoder"] == [["mlp_r0.5", 1], ["msa_h8", 0], ["skip_connect", 0], ["msa_h16", 2]]
    assert g["encoder_sum"] == [2, 3]
    assert {k: g[k] for k in ("embed_dim", "depth", "nodes", "patch_size", "image_size", "in_channels",
                              "num_classes")} == dict(embed_dim=16, depth=1, nodes=2, patch_size=2, image_size=8,
                                                      in_channels=1, num_classes=4)
    assert net.genotype_str() == "encoder=|mlp_r0.5~1|msa_h8~0|+|skip_connect~0|msa_h16~2|"


def test_prune_ops_keeps_each_edges_top_ops():
    names = [list(VIT_OPS)] * 2
    alphas = torch.tensor([[0.0, 5.0, 1.0, 3.0, 3.0, -1.0, 2.0, 4.0],
                           [9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # ties: the earlier op
    assert vit.prune_ops(alphas, names, 5) == [[1, 3, 4, 6, 7], [0, 1, 2, 3, 4]]
    assert vit.prune_ops(alphas, names, 3) == [[1, 3, 7], [0, 1, 2]]
    with pytest.raises(ValueError, match="keep: expected an int >= 2"):
        vit.prune_ops(alphas, names, 1)
    with pytest.raises(ValueError, match="keep: the edges have 8 ops, cannot keep 9"):
        vit.prune_ops(alphas, names, 9)


def test_grown_network_inherits_weights_and_alphas_of_the_kept_ops():
    torch.manual_seed(0)
    net = tiny_net(depth=1, token_ratio=0.5)
    with torch.no_grad():
        net.alphas_encoder.normal_()
    old_alphas = net.alphas_encoder.detach().clone()
    new = net.grown(2, 3)
    assert new.depth == 2 and new.settings["token_ratio"] == 0.5
    kept = vit.prune_ops(old_alphas, net.op_names("encoder"), 3)
    assert new.op_names("encoder") == [[VIT_OPS[i] for i in cols] for cols in kept]
    torch.testing.assert_close(new.alphas_encoder.detach(), torch.gather(old_alphas, 1, torch.tensor(kept)))
    old_state, new_state = net.state_dict(), new.state_dict()
    inherited = 0
    for name, value in new_state.items():
        if name.startswith("encoders.1.") or name == "alphas_encoder":
            continue
        assert torch.equal(value, old_state[name]), name  # embedding, head, selectors, kept ops
        inherited += 1
    assert inherited > 20
    assert any(name.startswith("encoders.1.") for name in new_state)  # the new encoder
    assert not any(k.startswith("encoders.0.edges.0.ops.") and k not in new_state
                   for k in old_state if any(f".ops.{n.replace('.', '_')}." in k
                                             for n in new.op_names("encoder")[0]))
    new(torch.randn(2, 1, 8, 8)).sum().backward()
    with pytest.raises(ValueError, match="cannot be shallower"):
        new.grown(1, 3)


# ---- derived and plain networks, cost -----------------------------------------------------------

PAPER_CIFAR_ENCODER = [["mlp_r0.5", 0], ["mlp_r0.5", 1], ["msa_h8", 2], ["mlp_r0.5", 0]]  # eqs. 20-22


def _genotype(genes, **sizes):
    g = {"encoder": genes, "encoder_sum": [2, 2 + len(genes) // 2 - 1], "nodes": len(genes) // 2}
    g.update(dict(embed_dim=16, depth=2, patch_size=2, image_size=8, in_channels=1, num_classes=4))
    g.update(sizes)
    return g


def test_derived_network_builds_runs_and_has_no_selection():
    g = _genotype([["skip_connect", 1], ["msa_h12", 0], ["mlp_r3", 2], ["skip_connect", 0]])
    torch.manual_seed(0)
    net = vit.build_derived_vit(g)
    assert len(net.encoders) == 2 and not any("selector" in n for n, _ in net.named_parameters())
    x = torch.randn(3, 1, 8, 8)
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    deeper = vit.build_derived_vit(g, depth=5, num_classes=7)
    assert len(deeper.encoders) == 5 and deeper(x).shape == (3, 7)

    # the encoder computes the genes: node 0 = e_{k-1} + MSA(e_{k-2}), node 1 = MLP(node 0) + e_{k-2}
    enc = net.encoders[0]
    s0, s1 = torch.randn(2, 17, 16), torch.randn(2, 17, 16)
    node0 = s1 + enc.ops[1](s0)
    node1 = enc.ops[2](node0) + s0
    torch.testing.assert_close(enc(s0, s1), node0 + node1)


def test_genotype_check_names_the_problem():
    good = _genotype(PAPER_CIFAR_ENCODER)
    with pytest.raises(ValueError, match=r"lacks \['embed_dim'\]"):
        vit.build_derived_vit({k: v for k, v in good.items() if k != "embed_dim"})
    with pytest.raises(ValueError, match=r"genotype\['encoder'\]\[2\]: expected an op of"):
        vit.build_derived_vit({**good, "encoder": [["mlp_r3", 0], ["mlp_r3", 1], ["none", 0], ["mlp_r3", 1]]})
    with pytest.raises(ValueError, match=r"genotype\['encoder'\]\[1\]: node 0 takes input states 0..1, got 2"):
        vit.build_derived_vit({**good, "encoder": [["mlp_r3", 0], ["mlp_r3", 2], ["mlp_r3", 0], ["mlp_r3", 1]]})
    with pytest.raises(ValueError, match="expected 4 genes"):
        vit.build_derived_vit({**good, "encoder": PAPER_CIFAR_ENCODER[:3]})
    with pytest.raises(TypeError, match="expected a dict"):
        vit.build_derived_vit("encoder=|...|")


def test_cost_of_a_tiny_network_computed_by_hand():
    # dim 4; 4x4 image, patch 2 -> 4 patches + CLS = 5 tokens; 1 channel, 3 classes, depth 1,
    # one node with the genes MSA-8 (head dim max(1, 4 // 8) = 1, width 8) and MLP-0.5 (hidden 2).
    g = _genotype([["msa_h8", 0], ["mlp_r0.5", 1]], embed_dim=4, depth=1, image_size=4, patch_size=2,
                  in_channels=1, num_classes=3)
    # params: embedding conv 1*2*2*4 + 4 = 20, CLS 4, position 5*4 = 20 -> 44
    #         MSA: LN 8, qkv 4*24 + 24 = 120, proj 8*4 + 4 = 36 -> 164; MLP: LN 8, fc1 4*2 + 2, fc2 2*4 + 4 -> 30
    #         final LN 8, head 4*3 + 3 -> 23                                              total 261
    # FLOPs (multiply-accumulates): embedding 4 patches * 4 inputs * 4 = 64
    #         MSA: qkv 5*4*24 = 480, Q K^T and A V 2 * 5*5*8 = 400, proj 5*8*4 = 160 -> 1040
    #         MLP: 2 * 5*4*2 = 80; head 4*3 = 12                                           total 1196
    assert vit.derived_cost(g) == {"params": 261, "flops": 1196}
    net = vit.build_derived_vit(g)
    assert sum(p.numel() for p in net.parameters()) == 261
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 1, 4, 4))
    assert counter.get_total_flops() == 2 * 1196  # torch counts a multiply-add as 2 FLOPs


@pytest.mark.parametrize("genes", [PAPER_CIFAR_ENCODER,
                                   [["msa_h16", 1], ["mlp_r4", 0], ["skip_connect", 2], ["msa_h12", 1]]])
def test_cost_counter_agrees_with_torch_on_the_built_networks(genes):
    g = _genotype(genes, embed_dim=20, depth=3, image_size=12, patch_size=3, in_channels=3, num_classes=5)
    for build_net, cost in ((vit.build_derived_vit, vit.derived_cost(g)),
                            (lambda g: vit.build_plain_vit(**{k: g[k] for k in (
                                "in_channels", "num_classes", "embed_dim", "depth", "image_size", "patch_size")}),
                             vit.plain_vit_cost(g))):
        net = build_net(g)
        assert sum(p.numel() for p in net.parameters()) == cost["params"]
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            net(torch.randn(1, 3, 12, 12))
        assert counter.get_total_flops() == 2 * cost["flops"]


def test_paper_scale_numbers():
    """ViT-B/16 on 10 classes has 85.8 M parameters and DASViT's CIFAR-10 encoder at
    depth 12 50.4 M (DASViT Table I); ViT-B/16 is the usual 17.6 G multiply-adds at 224.
    (The paper's FLOPs column, 12.0 G and 9.9 G, counts differently.)"""
    g = _genotype(PAPER_CIFAR_ENCODER, embed_dim=768, depth=12, image_size=224, patch_size=16, in_channels=3,
                  num_classes=10)
    plain, derived = vit.plain_vit_cost(g), vit.derived_cost(g)
    assert round(plain["params"] / 1e6, 1) == 85.8 and round(derived["params"] / 1e6, 1) == 50.4
    assert round(plain["flops"] / 1e9, 1) == 17.6
    with torch.device("meta"):  # built without memory: the counted parameters are the real ones
        assert sum(p.numel() for p in vit.build_derived_vit(g).parameters()) == derived["params"]
        assert sum(p.numel() for p in vit.build_plain_vit(
            in_channels=3, num_classes=10, embed_dim=768, depth=12, image_size=224,
            patch_size=16).parameters()) == plain["params"]


def test_encoder_picture(tmp_path):
    g = _genotype(PAPER_CIFAR_ENCODER)
    nodes, edges = plot._cell_graph(g, "encoder")
    assert [label for label, _ in nodes.values()] == ["e_{k-2}", "e_{k-1}", "0", "1", "e_{k}"]
    assert sorted(edges, key=str) == sorted([(0, 2, "mlp_r0.5"), (1, 2, "mlp_r0.5"), (2, 3, "msa_h8"),
                                            (0, 3, "mlp_r0.5"), (2, "out", ""), (3, "out", "")], key=str)
    path = plot.plot_cell(g, "encoder", tmp_path / "encoder.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
