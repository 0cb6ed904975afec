"""The DARTS bilevel step (nasops.methods.darts) and the data pipeline (nasops.data),
checked against independent computations on a tiny stand-in network."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nasops import data as datasets
from nasops import methods
from nasops.methods.darts import Darts


class TinySearchNet(nn.Module):
    """logits = sum_k softmax(alpha)_k * f_k(x): two tanh 'ops' and a linear one,
    float64, with the SearchNetwork parameter interface."""

    def __init__(self, d_in=5, n_cls=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ops = nn.ParameterList([nn.Parameter(torch.randn(d_in, n_cls, generator=g, dtype=torch.float64))
                                     for _ in range(3)])
        self.alpha = nn.Parameter(0.3 * torch.randn(3, generator=g, dtype=torch.float64))

    def arch_parameters(self):
        return [self.alpha]

    def weight_parameters(self):
        return list(self.ops)

    def forward(self, x, alpha=None, ops=None):
        alpha = self.alpha if alpha is None else alpha
        ops = list(self.ops) if ops is None else ops
        w = F.softmax(alpha, 0)
        outs = [torch.tanh(x @ ops[0]), torch.tanh(x @ ops[1]) ** 2, x @ ops[2]]
        return sum(wk * o for wk, o in zip(w, outs))


def _batches(seed=1, n=16, d_in=5, n_cls=3):
    g = torch.Generator().manual_seed(seed)
    make = lambda: (torch.randn(n, d_in, generator=g, dtype=torch.float64),  # noqa: E731
                    torch.randint(0, n_cls, (n,), generator=g))
    return make(), make()


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match="method: expected one of darts.*got 'nope'"):
        methods.get("nope")


def test_first_order_arch_gradient_is_grad_of_val_loss():
    model = TinySearchNet()
    method = Darts(model, epochs=1, device="cpu")
    (xt, yt), (xv, yv) = _batches()
    alpha = model.alpha.detach().clone().requires_grad_(True)
    expected, = torch.autograd.grad(F.cross_entropy(model(xv, alpha=alpha), yv), alpha)
    method._arch_step(xv, yv)
    torch.testing.assert_close(model.alpha.grad, expected)


def test_second_order_matches_exact_unrolled_hypergradient():
    """With momentum and weight decay 0 the virtual step is w' = w - xi grad_w L_train;
    the exact gradient of L_val(w'(alpha), alpha), by autograd through the unroll,
    must match DARTS's finite-difference version to O(eps)."""
    model = TinySearchNet()
    method = Darts(model, epochs=1, device="cpu", lr=0.5, momentum=0.0, weight_decay=0.0, second_order=True)
    (xt, yt), (xv, yv) = _batches()
    weights_before = [p.detach().clone() for p in model.weight_parameters()]

    alpha = model.alpha.detach().clone().requires_grad_(True)
    w = [p.detach().clone().requires_grad_(True) for p in weights_before]
    g = torch.autograd.grad(F.cross_entropy(model(xt, alpha=alpha, ops=w), yt), w, create_graph=True)
    w_virtual = [wi - 0.5 * gi for wi, gi in zip(w, g)]
    exact, = torch.autograd.grad(F.cross_entropy(model(xv, alpha=alpha, ops=w_virtual), yv), alpha)
    first_order, = torch.autograd.grad(F.cross_entropy(model(xv, alpha=alpha), yv), alpha)

    method._arch_step_unrolled(xt, yt, xv, yv)
    for p, b in zip(model.weight_parameters(), weights_before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)  # the virtual step is undone
    torch.testing.assert_close(model.alpha.grad, exact, rtol=1e-3, atol=1e-5)
    assert (exact - first_order).abs().max() > 1e-3  # the test tells the two orders apart


class NoisyTinySearchNet(TinySearchNet):
    """TinySearchNet plus noise on the logits (a stochastic op, as rdarts-s4's
    ``noise``), recording every draw."""

    def __init__(self):
        super().__init__()
        self.draws = []

    def forward(self, x, alpha=None, ops=None):
        noise = torch.randn(x.shape[0], 3, dtype=x.dtype)
        self.draws.append(noise)
        return super().forward(x, alpha, ops) + 0.1 * noise


def test_second_order_finite_difference_draws_the_same_noise_at_w_plus_and_w_minus():
    """(grad L_train(w+) - grad L_train(w-)) / 2 eps with independent noise at w+
    and w- is mostly noise / eps: DARTS' difference needs common random numbers.
    The stream then goes on after the draws of w+ (three forwards' worth)."""
    model = NoisyTinySearchNet()
    method = Darts(model, epochs=1, device="cpu", second_order=True)
    (xt, yt), (xv, yv) = _batches()
    torch.manual_seed(0)
    method._arch_step_unrolled(xt, yt, xv, yv)
    after = torch.randn(16, 3, dtype=torch.float64)
    assert len(model.draws) == 4  # L_train at w, L_val at w', L_train at w+ and at w-
    assert torch.equal(model.draws[2], model.draws[3])
    assert not torch.equal(model.draws[1], model.draws[2])
    torch.manual_seed(0)
    stream = [torch.randn(16, 3, dtype=torch.float64) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(model.draws[:3], stream)) and torch.equal(after, stream[3])


def test_step_updates_both_levels_and_state_round_trips():
    model = TinySearchNet()
    method = Darts(model, epochs=4, device="cpu")
    train, val = _batches()
    before = [p.detach().clone() for p in model.parameters()]
    stats = method.step(train, val)
    assert stats.train_count == 16 and stats.val_count == 16 and stats.train_loss > 0
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    method.end_epoch()
    assert method.lr < 0.025  # cosine moved on
    state = method.state_dict()
    other = Darts(TinySearchNet(), epochs=4, device="cpu")
    other.load_state_dict(state)
    assert other.lr == method.lr and other.scheduler.last_epoch == 1


# ---- data ------------------------------------------------------------------------------

def test_digits_training_split_is_normalised_and_has_every_class():
    ds = datasets.load("digits")  # the training split: the test split is held out (tests/test_train.py)
    assert ds.images.shape == (1442, 1, 8, 8) and ds.num_classes == 10 and len(ds) == 1442
    assert abs(ds.images.mean().item()) < 1e-5 and abs(ds.images.std().item() - 1) < 1e-4
    assert sorted(ds.labels.unique().tolist()) == list(range(10))


def _write_cifar(root, files, per_file, label_key, n_cls):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in files:
        entry = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, n_cls, per_file).tolist()}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(entry, f)


def test_cifar_batches_are_read_and_normalised(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], 4, "labels", 10)
    ds = datasets.load("cifar10", data_dir=str(tmp_path))
    assert ds.images.shape == (20, 3, 32, 32) and ds.images.dtype == torch.uint8 and ds.num_classes == 10
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f)
    x, y = ds.batch(torch.tensor([5]))  # first image of batch 2
    pixel = raw["data"][1, 32 * 32 + 3 * 32 + 7]  # image 1 of that file, green channel, row 3, col 7
    assert x.shape == (1, 3, 32, 32) and y.item() == raw["labels"][1]
    assert x[0, 1, 3, 7].item() == pytest.approx((pixel / 255 - 0.4822) / 0.2435, rel=1e-5)

    _write_cifar(tmp_path / "c100", ["train"], 6, "fine_labels", 100)
    ds = datasets.load("cifar100", data_dir=str(tmp_path / "c100"))
    assert len(ds) == 6 and ds.num_classes == 100


def test_cifar_missing_file_is_named(tmp_path):
    _write_cifar(tmp_path, ["data_batch_1", "data_batch_2"], 2, "labels", 10)
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        datasets.load("cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--data-dir"):
        datasets.load("cifar100")


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="digits, cifar10, cifar100, synthetic"):
        datasets.load("mnist")


def test_synthetic_has_the_requested_shape_and_is_seeded():
    a = datasets.load("synthetic", image_size=12, num_classes=7, synthetic_size=40, seed=3)
    b = datasets.load("synthetic", image_size=12, num_classes=7, synthetic_size=40, seed=3)
    assert a.images.shape == (40, 3, 12, 12) and a.num_classes == 7 and int(a.labels.max()) < 7
    assert torch.equal(a.images, b.images)


def test_split_is_a_seeded_partition():
    train, val = datasets.split(101, 0.5, seed=4)
    assert len(train) == 50 and len(val) == 51
    assert sorted(torch.cat([train, val]).tolist()) == list(range(101))
    assert torch.equal(datasets.split(101, 0.5, seed=4)[0], train)
    assert not torch.equal(datasets.split(101, 0.5, seed=5)[0], train)
    with pytest.raises(ValueError, match="train_portion"):
        datasets.split(10, 1.0, seed=0)


def test_loader_depends_on_seed_and_epoch_only_and_shards_partition():
    ds = datasets.load("synthetic", image_size=2, synthetic_size=30)
    idx = torch.arange(3, 24)  # 21 samples
    single = datasets.ShardedLoader(ds, idx, 4, seed=7)
    assert len(single) == 5
    assert torch.equal(single.order(2), datasets.ShardedLoader(ds, idx, 4, seed=7).order(2))
    assert not torch.equal(single.order(2), single.order(3))
    ranks = [datasets.ShardedLoader(ds, idx, 4, seed=7, rank=r, world_size=2) for r in (0, 1)]
    o0, o1 = ranks[0].order(2), ranks[1].order(2)
    assert len(o0) == len(o1) == 11  # 21 padded to 22 by wrapping around
    assert sorted(set(torch.cat([o0, o1]).tolist())) == idx.tolist()
    batches = list(ranks[1].epoch(2))
    assert len(batches) == 2 and torch.equal(batches[0][1], ds.labels[o1[:4]])
    with pytest.raises(ValueError, match="batch_size"):
        datasets.ShardedLoader(ds, idx, 40, seed=0)
