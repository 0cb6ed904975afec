"""``python -m nasops.train``: training a found genotype from scratch (in-process through
``main(argv)`` unless the test is about processes), its data splits and augmentation,
and the optional TensorBoard scalars of the search and the train command."""
from __future__ import annotations

import csv
import gzip
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (HostReads, assert_same_checkpoint_model, run_killed_after_epoch, save_interrupted, subprocess_env,
                     torchrun_two_ranks)
import nasops.search
from nasops import data as datasets
from nasops import runtime
import nasops.spaces.nb201
from nasops.spaces import vit
from nasops.train import KINDS, TrainError, learning_rate, main


DARTS_GENOTYPE = {
    "normal": [["sep_conv_3x3", 0], ["skip_connect", 1], ["dil_conv_3x3", 0], ["sep_conv_5x5", 2],
               ["skip_connect", 0], ["avg_pool_3x3", 1], ["dil_conv_5x5", 3], ["skip_connect", 2]],
    "normal_concat": [2, 3, 4, 5],
    "reduce": [["max_pool_3x3", 0], ["sep_conv_3x3", 1], ["skip_connect", 2], ["max_pool_3x3", 1],
               ["avg_pool_3x3", 0], ["skip_connect", 2], ["skip_connect", 2], ["dil_conv_3x3", 1]],
    "reduce_concat": [2, 3, 4, 5],
}
S4_GENOTYPE = {"normal": [["noise", 0], ["sep_conv_3x3", 1]] * 4, "normal_concat": [2, 3, 4, 5],
               "reduce": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1]] * 4, "reduce_concat": [2, 3, 4, 5]}
BEST_NB201 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
UNUSED_CONV_NB201 = "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|nor_conv_1x1~2|"
GENOTYPES = {"darts": DARTS_GENOTYPE, "rdarts-s4": S4_GENOTYPE, "nb201": {"arch": BEST_NB201}}

# Tiny networks, few steps, one thread.
TINY = ["--init-channels", "4", "--batch-size", "16", "--threads", "1", "--quiet"]
TINY_LAYERS = {"nb201": "1"}


def _write_genotype(folder: Path, space: str, genotype=None, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "genotype.json"
    path.write_text(json.dumps({"space": space, "method": "darts",
                                "genotype": GENOTYPES[space] if genotype is None else genotype, **extra}))
    return path


def _tiny(genotype: Path, space: str, out: Path, *extra) -> list[str]:
    return ["--genotype", str(genotype), "--layers", TINY_LAYERS.get(space, "3"), "--out", str(out), *TINY, *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in records]


# ---- schedule -------------------------------------------------------------------------------

def test_learning_rate_is_torchs_cosine_after_a_linear_warmup():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.025)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=0.001)
    for epoch in range(7):
        assert learning_rate(epoch, epochs=7, lr=0.025, lr_min=0.001) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()
    # DASViT: 20 warm-up epochs from 1e-6 to 1e-3, then cosine over 480 epochs
    kw = dict(epochs=500, lr=1e-3, lr_min=0.0, warmup_epochs=20, warmup_lr=1e-6)
    assert learning_rate(0, **kw) == 1e-6
    assert learning_rate(10, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert learning_rate(20, **kw) == 1e-3
    assert learning_rate(260, **kw) == pytest.approx(5e-4)
    assert learning_rate(499, **kw) == pytest.approx(1e-3 * (1 + math.cos(math.pi * 479 / 480)) / 2)


# ---- data splits and augmentation --------------------------------------------------------

def test_digits_test_split_is_fixed_stratified_and_disjoint_from_the_search():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = datasets.load("digits"), datasets.load("digits", split="test")
    assert len(train) == 1442 and len(test) == 355 and train.split == "train" and test.split == "test"
    # every fifth image of each class, by a plain loop over scikit-learn's order
    seen = [0] * 10
    is_test = []
    for label in bunch.target:
        seen[label] += 1
        is_test.append(seen[label] % 5 == 0)
    is_test = np.array(is_test)
    raw = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    mean, std = raw[~is_test].mean(), raw[~is_test].std()
    torch.testing.assert_close(test.images, (raw[is_test] - mean) / std)
    torch.testing.assert_close(train.images, (raw[~is_test] - mean) / std)
    assert test.labels.tolist() == bunch.target[is_test].tolist()
    assert all(34 <= n <= 36 for n in torch.bincount(test.labels).tolist())
    assert test.black == pytest.approx(((0 - mean.item()) / std.item(),))
    # the search loads the training split only
    args = nasops.search.parse_args(["--out", "unused"])
    assert args.dataset == "digits" and len(datasets.load(args.dataset)) == 1442
    with pytest.raises(ValueError, match="split: expected one of train, test; got 'val'"):
        datasets.load("digits", split="val")


def _write_cifar(root, files, per_file, label_key, n_cls):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(len(files))
    for name in files:
        entry = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, n_cls, per_file).tolist()}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(entry, f)


def test_cifar_batches_pickled_again_from_python_3_load_and_others_are_named(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar(root, [f"data_batch_{i}" for i in range(1, 6)], 2, "labels", 10)
    first = root / "data_batch_1"
    with open(first, "rb") as f:
        raw = pickle.load(f)
    with open(first, "wb") as f:  # as after pickle.load(..., encoding="bytes") and a dump
        pickle.dump({k.encode(): v for k, v in raw.items()}, f)
    data = datasets.load("cifar10", data_dir=str(tmp_path))
    assert len(data) == 10 and data.labels[:2].tolist() == raw["labels"]
    for wrong, found in (({"images": raw["data"]}, "got ['images']"), ([1, 2], "got a list")):
        with open(first, "wb") as f:
            pickle.dump(wrong, f)
        with pytest.raises(ValueError, match=rf"dataset cifar10: {first} is not a CIFAR batch: expected a dict "
                                             rf"with the entries 'data' and 'labels', {re.escape(found)}"):
            datasets.load("cifar10", data_dir=str(tmp_path))
    for data, labels, shapes in ((raw["data"][:, :1000], raw["labels"], "(2, 1000) and (2,)"),
                                 (raw["data"], raw["labels"][:1], "(2, 3072) and (1,)")):
        with open(first, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        with pytest.raises(ValueError, match=rf"dataset cifar10: {first} is not a CIFAR batch: expected 'data' "
                                             rf"of shape \(N, 3072\) and N 'labels', got {re.escape(shapes)}"):
            datasets.load("cifar10", data_dir=str(tmp_path))
    with open(first, "wb") as f:
        pickle.dump(raw, f)
    whole = first.read_bytes()
    for damaged, error in ((whole[:len(whole) // 2], "UnpicklingError|EOFError"), (b"not a pickle", "Unpickling")):
        first.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"dataset cifar10: {first} is not a CIFAR batch \(a truncated or "
                                             rf"other file: ({error})"):
            datasets.load("cifar10", data_dir=str(tmp_path))


def test_cifar_test_splits_are_test_batch_and_test(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], 2, "labels", 10)
    _write_cifar(tmp_path / "cifar-10-batches-py", ["test_batch"], 3, "labels", 10)
    test = datasets.load("cifar10", split="test", data_dir=str(tmp_path))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert len(test) == 3 and test.labels.tolist() == raw["labels"]
    assert torch.equal(test.images.flatten(1), torch.from_numpy(raw["data"]))
    assert len(datasets.load("cifar10", data_dir=str(tmp_path))) == 10
    assert test.black == pytest.approx(tuple(-m / s for m, s in zip((0.4914, 0.4822, 0.4465),
                                                                       (0.2470, 0.2435, 0.2616))))
    _write_cifar(tmp_path / "c100", ["train"], 4, "fine_labels", 100)
    with pytest.raises(FileNotFoundError, match="test"):
        datasets.load("cifar100", split="test", data_dir=str(tmp_path / "c100"))
    _write_cifar(tmp_path / "c100", ["test"], 5, "fine_labels", 100)
    assert len(datasets.load("cifar100", split="test", data_dir=str(tmp_path / "c100"))) == 5


def test_synthetic_test_split_is_another_draw():
    train = datasets.load("synthetic", image_size=4, synthetic_size=50, seed=3)
    test = datasets.load("synthetic", split="test", image_size=4, synthetic_size=50, seed=3)
    assert len(test) == 10 and not torch.equal(test.images, train.images[:10])


def test_crop_is_a_window_of_the_padded_image():
    x = torch.randn(5, 3, 6, 7)
    top, left = torch.tensor([0, 4, 2, 1, 3]), torch.tensor([4, 0, 2, 3, 1])
    fill = (-1.0, -2.0, -3.0)
    got = datasets.crop(x, 2, top, left, fill)
    for b in range(5):
        padded = torch.stack([torch.nn.functional.pad(x[b, c], (2, 2, 2, 2), value=fill[c]) for c in range(3)])
        assert torch.equal(got[b], padded[:, top[b]:top[b] + 6, left[b]:left[b] + 7]), b


def test_augment_flips_and_cuts_out_as_darts():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    g = torch.Generator().manual_seed(0)
    flipped = [datasets.augment(x, generator=g, flip=True) for _ in range(20)]
    for y in flipped:
        for b in range(2):
            assert torch.equal(y[b], x[b]) or torch.equal(y[b], x[b].flip(2))
    assert any(not torch.equal(y, x) for y in flipped) and any(torch.equal(y[0], x[0]) for y in flipped)

    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        y = datasets.augment(x, generator=g, cutout=2)
        for b in range(2):
            zero = y[b, 0] == 0
            rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
            # a 2x2 square around a centre in [0, 4), clipped: 1 or 2 rows and columns
            assert 1 <= len(rows) <= 2 and 1 <= len(cols) <= 2 and zero.sum() == len(rows) * len(cols)
            assert torch.equal(y[b, 0][~zero], x[b, 0][~zero])
    a = datasets.augment(x, generator=torch.Generator().manual_seed(5), crop_padding=1, flip=True, cutout=2)
    b = datasets.augment(x, generator=torch.Generator().manual_seed(5), crop_padding=1, flip=True, cutout=2)
    assert torch.equal(a, b)  # a function of the generator alone


@pytest.mark.slow
def test_a_dasvit_search_then_trains_its_encoder(tmp_path):
    search = nasops.search.main(["--space", "vit", "--method", "dasvit", "--embed-dim", "16", "--patch-size", "2",
                                 "--stage-depths", "1", "2", "--stage-keep", "3", "--batch-size", "8",
                                 "--threads", "1", "--quiet", "--epochs", "2", "--max-steps", "1",
                                 "--out", str(tmp_path / "s")])
    out = tmp_path / "t"
    result = main(["--genotype", str(tmp_path / "s"), "--out", str(out), "--batch-size", "16", "--threads", "1",
                   "--quiet", "--epochs", "3", "--max-steps", "2"])
    genotype = search["genotype"]
    assert result["genotype"] == genotype and genotype["depth"] == 2 and genotype["embed_dim"] == 16
    expected = vit.build_derived_vit(genotype, num_classes=10)  # the search's sizes by default
    assert result["params"] == sum(p.numel() for p in expected.parameters())
    assert result["test_samples"] == 355 and 0 <= result["test_acc"] <= result["test_top5"] <= 1
    recipe = KINDS["vit"].recipe
    assert recipe.optimizer == "adamw" and result["config"]["warmup_epochs"] == 1
    lrs = [r["lr"] for r in _metrics(out)]  # one warm-up epoch from 1e-6, then the cosine
    assert lrs == pytest.approx([learning_rate(e, epochs=3, lr=1e-3, lr_min=0.0, warmup_epochs=1, warmup_lr=1e-6)
                                 for e in range(3)])
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(1e-3)
    # wider and deeper than the search, as DASViT retrains its encoders
    bigger = main(["--genotype", str(tmp_path / "s"), "--out", str(tmp_path / "t2"), "--layers", "3",
                   "--init-channels", "24", "--batch-size", "16", "--threads", "1", "--quiet", "--epochs", "2",
                   "--max-steps", "1"])
    assert bigger["params"] == sum(p.numel() for p in vit.build_derived_vit(
        genotype, depth=3, embed_dim=24, num_classes=10).parameters())


def test_eval_batches_cover_every_sample_once_over_the_ranks():
    ds = datasets.load("synthetic", image_size=2, synthetic_size=23)
    labels = [torch.cat([y for _, y in datasets.eval_batches(ds, 4, rank=r, world_size=3)]) for r in range(3)]
    assert sorted(torch.cat(labels).tolist()) == sorted(ds.labels.tolist())
    assert [len(y) for y in labels] == [8, 8, 7]


# ---- end to end --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("space", sorted(GENOTYPES))
def test_tiny_training_run_of_each_genotype_kind(tmp_path, space):
    genotype = _write_genotype(tmp_path / "search", space)
    out = tmp_path / "train"
    result = main(_tiny(genotype, space, out, "--epochs", "2", "--max-steps", "2"))

    saved = json.loads((out / "result.json").read_text())
    assert saved["space"] == space and saved["genotype"] == GENOTYPES[space] and saved["dataset"] == "digits"
    assert saved["test_samples"] == 355 and 0 <= saved["test_acc"] <= saved["test_top5"] <= 1
    assert saved["params"] > 0 and saved["macs"] > 0 and saved["flops"] == 2 * saved["macs"]
    assert saved["params_auxiliary"] > 0 if space != "nb201" else saved["params_auxiliary"] == 0
    assert result["test_acc"] == saved["test_acc"]
    records = _metrics(out)
    assert [r["epoch"] for r in records] == [1, 2] and all(r["steps"] == 2 for r in records)
    assert records[-1]["test_acc"] == saved["test_acc"]
    recipe = KINDS[space].recipe
    assert records[0]["lr"] == recipe.lr and records[1]["lr"] == pytest.approx(
        learning_rate(1, epochs=2, lr=recipe.lr, lr_min=recipe.lr_min))
    assert records[1]["drop_path"] == pytest.approx(recipe.drop_path / 2)
    config = saved["config"]
    assert config["layers"] == int(TINY_LAYERS.get(space, "3")) and config["init_channels"] == 4
    assert config["cutout"] == (4 if recipe.cutout else 0) and config["crop_padding"] == 1 and not config["flip"]
    # the checkpoint holds plain data (loads with weights_only=True)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["space"] == space
    assert not list(out.glob("*.tmp*"))


@pytest.mark.slow
def test_cifar_run_uses_the_32x32_recipe_and_the_test_batch(tmp_path):
    root = tmp_path / "data" / "cifar-10-batches-py"
    _write_cifar(root, [f"data_batch_{i}" for i in range(1, 6)], 4, "labels", 10)
    _write_cifar(root, ["test_batch"], 6, "labels", 10)
    genotype = _write_genotype(tmp_path / "s", "darts", config={"dataset": "cifar10"})
    result = main(["--genotype", str(genotype), "--data-dir", str(tmp_path / "data"), "--layers", "3",
                   "--init-channels", "4", "--batch-size", "4", "--epochs", "1", "--max-steps", "2", "--threads", "1",
                   "--quiet"])
    assert result["dataset"] == "cifar10" and result["test_samples"] == 6
    assert result["out"] == str(tmp_path / "s" / "train-cifar10-0")
    config = result["config"]
    assert (config["crop_padding"], config["cutout"], config["flip"], config["auxiliary_weight"]) == (4, 16, True, 0.4)
    assert result["params_auxiliary"] > 0  # the head ran on the 8x8 maps after the second reduction


def _table_row(arch: str) -> dict:
    """The shipped table's row of ``arch``, read with the csv module (not nasops)."""
    with gzip.open(nasops.spaces.nb201.BUILTIN_TABLE, "rt", newline="") as f:
        return next(r for r in csv.DictReader(f) if r["ArchitectureString"] == arch)


@pytest.mark.slow
def test_search_then_train_prints_the_tables_accuracies(tmp_path, capsys):
    search = nasops.search.main(["--space", "nb201", "--layers", "1", "--out", str(tmp_path / "s"), *TINY,
                                 "--epochs", "1", "--max-steps", "1"])
    capsys.readouterr()
    result = main(["--genotype", str(tmp_path / "s"), "--layers", "1", *TINY, "--epochs", "1", "--max-steps", "1"])
    assert result["out"] == str(tmp_path / "s" / "train-digits-0")  # the default --out
    assert result["genotype"] == search["genotype"] and result["genotype_str"] == search["genotype_str"]
    printed = capsys.readouterr().out
    assert f"measured here: digits {100 * result['test_acc']:.2f} %" in printed
    row = _table_row(search["genotype_str"])
    assert result["nb201"]["cifar10"] == pytest.approx(float(row["CIFAR10TestAccuracy200Epochs"]))
    assert f"cifar10 {float(row['CIFAR10TestAccuracy200Epochs']):.2f} %" in printed


def test_an_nb201_table_given_by_path_is_used(tmp_path, capsys):
    table = tmp_path / "table.csv"
    # the shipped table with the best cell's CIFAR-10 accuracy changed: the file really is read
    with gzip.open(nasops.spaces.nb201.BUILTIN_TABLE, "rt", newline="") as f, \
            open(table, "w", newline="") as out:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(out, reader.fieldnames)
        writer.writeheader()
        for row in reader:
            if row["ArchitectureString"] == BEST_NB201:
                row["CIFAR10TestAccuracy200Epochs"] = "12.5"
            writer.writerow(row)
    genotype = _write_genotype(tmp_path, "nb201", genotype={"arch": BEST_NB201})
    result = main(_tiny(genotype, "nb201", tmp_path / "t", "--epochs", "1", "--max-steps", "1",
                        "--nb201-table", str(table)))
    assert result["nb201"]["cifar10"] == 12.5
    assert "cifar10 12.50 %" in capsys.readouterr().out


@pytest.mark.parametrize("write,message", [
    (None, "no such file"),
    ("{not json", "not a JSON file"),
    ("[1, 2]", "expected a JSON object with space and genotype, got a list"),
    ('{"genotype": {}}', "missing key 'space'"),
    ('{"space": "darts"}', "missing key 'genotype'"),
    ('{"space": ["darts"], "genotype": {}}', "space: expected the name of a space, got ['darts']"),
    ('{"space": "mobilenet", "genotype": {}}', "space 'mobilenet' is not one nasops.train can train"),
    ('{"space": "vit", "genotype": {}}', "genotype: not a vit genotype, it lacks ['encoder'"),
    (json.dumps({"space": "darts", "genotype": {"arch": BEST_NB201}}), "genotype: missing key 'normal'"),
    (json.dumps({"space": "nb201", "genotype": DARTS_GENOTYPE}), "an nb201 genotype is"),
    (json.dumps({"space": "nb201", "genotype": {"arch": "|sep_conv_3x3~0|+|"}}), "arch: node 1 gene"),
    (json.dumps({"space": "rdarts-s2", "genotype": DARTS_GENOTYPE}),
     "'dil_conv_3x3' is not an op of this edge in space rdarts-s2"),
])
def test_bad_genotype_files_give_one_line_naming_the_file(tmp_path, write, message):
    path = tmp_path / "genotype.json"
    if write is not None:
        path.write_text(write)
    with pytest.raises(TrainError) as exc:
        main(["--genotype", str(path), "--out", str(tmp_path / "out"), *TINY])
    text = str(exc.value)
    assert message in text and f"--genotype {path}" in text and "\n" not in text
    assert not (tmp_path / "out").exists()  # nothing written for a run that cannot start


def test_command_line_errors_exit_with_status_1_and_one_line(tmp_path):
    path = tmp_path / "genotype.json"
    path.write_text('{"space": "mobilenet", "genotype": {}}')
    proc = subprocess.run([sys.executable, "-m", "nasops.train", "--genotype", str(path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"nasops.train: error: --genotype {path}: space 'mobilenet' is not one "
                                  f"nasops.train can train")
    assert proc.stderr.count("\n") == 1


def test_flags_the_kind_lacks_are_refused(tmp_path, capsys):
    nb = _write_genotype(tmp_path / "nb", "nb201")
    darts = _write_genotype(tmp_path / "d", "darts")
    for argv, message in [([*_tiny(nb, "nb201", tmp_path / "o"), "--drop-path", "0.1"],
                           "--drop-path: nb201 networks have no drop-path"),
                          ([*_tiny(nb, "nb201", tmp_path / "o"), "--auxiliary-weight", "0.4"],
                           "--auxiliary-weight: nb201 networks have no auxiliary"),
                          ([*_tiny(darts, "darts", tmp_path / "o"), "--nb201-table", "x.csv"],
                           "needs an nb201 genotype"),
                          ([*_tiny(darts, "darts", tmp_path / "o"), "--warmup-epochs", "15"],
                           "--warmup-epochs: expected fewer than --epochs (15)"),
                          ([*_tiny(darts, "darts", tmp_path / "o"), "--drop-path", "1"], "--drop-path"),
                          ([*_tiny(darts, "darts", tmp_path / "o"), "--resume", "--overwrite"], "exclude")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, message


def test_recipe_defaults_fill_unset_flags(tmp_path):
    from nasops.train import parse_args

    darts = _write_genotype(tmp_path / "d", "darts", config={"dataset": "cifar10"})
    args = parse_args(["--genotype", str(darts)])
    assert (args.dataset, args.epochs, args.batch_size, args.layers, args.init_channels) == ("cifar10", 600, 96,
                                                                                             20, 36)
    assert (args.lr, args.lr_min, args.momentum, args.weight_decay, args.grad_clip) == (0.025, 0.0, 0.9, 3e-4, 5.0)
    assert (args.cutout, args.crop_padding, args.flip, args.drop_path, args.auxiliary_weight) == (16, 4, True,
                                                                                                  0.2, 0.4)
    assert args.out == os.path.join(str(tmp_path / "d"), "train-cifar10-0")
    nb = _write_genotype(tmp_path / "n", "nb201")
    args = parse_args(["--genotype", str(nb), "--lr", "0.05", "--no-nesterov"])
    assert (args.dataset, args.epochs, args.layers, args.init_channels, args.lr, args.nesterov,
            args.weight_decay, args.cutout, args.flip) == ("digits", 40, 2, 16, 0.05, False, 5e-4, 0, False)


def test_a_recipes_warmup_shortens_to_fit_a_short_run(tmp_path):
    """DASViT's digits recipe warms up for 1 epoch: --epochs 1 alone must still
    run (the warm-up shortened to 0), while a warm-up given as long as the run is refused."""
    from nasops.train import parse_args

    encoder = [["mlp_r0.5", 0], ["mlp_r0.5", 1], ["msa_h8", 2], ["mlp_r0.5", 0]]
    vit_genotype = _write_genotype(tmp_path / "v", "vit", {
        "encoder": encoder, "encoder_sum": [2, 3], "nodes": 2, "embed_dim": 16, "depth": 2, "patch_size": 2,
        "image_size": 8, "in_channels": 1, "num_classes": 10})
    assert parse_args(["--genotype", str(vit_genotype)]).warmup_epochs == 1  # the recipe's
    assert parse_args(["--genotype", str(vit_genotype), "--epochs", "1"]).warmup_epochs == 0
    with pytest.raises(SystemExit):
        parse_args(["--genotype", str(vit_genotype), "--epochs", "1", "--warmup-epochs", "1"])


def test_nan_and_inf_are_flag_errors(tmp_path, capsys):
    """Every float flag (range checks let nan through); inf only for --grad-clip (no limit)."""
    from nasops.train import build_parser, parse_args

    darts = _write_genotype(tmp_path / "d", "darts")
    floats = [a for a in build_parser()._actions if a.type is float]
    assert len(floats) >= 8
    for action in floats:
        flag = action.option_strings[-1]
        for value in ("nan", "inf"):
            if value == "inf" and action.dest == "grad_clip":
                continue
            with pytest.raises(SystemExit):
                parse_args(["--genotype", str(darts), flag, value])
            assert f"{flag}: expected a finite number, got {value}" in capsys.readouterr().err
    assert parse_args(["--genotype", str(darts), "--grad-clip", "inf"]).grad_clip == float("inf")


def test_seed_out_of_range_is_a_flag_error(tmp_path, capsys):
    from nasops.runtime import MAX_SEED
    from nasops.train import parse_args

    darts = _write_genotype(tmp_path / "d", "darts")
    for seed in ("-1", str(MAX_SEED + 1)):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--genotype", str(darts), "--seed", seed])
        assert exc.value.code == 2
        assert f"--seed: expected an integer in [0, {MAX_SEED}], got {seed}" in capsys.readouterr().err
    assert parse_args(["--genotype", str(darts), "--seed", str(MAX_SEED)]).seed == MAX_SEED


def test_the_trained_network_loads_for_inference(tmp_path):
    """load_trained gives back the network of a run with its weights: on the test
    split it scores what the run reported, fed as model.inputs says."""
    from nasops.train import load_trained

    genotype = _write_genotype(tmp_path / "g", "darts")
    out = tmp_path / "run"
    result = main(_tiny(genotype, "darts", out, "--epochs", "1", "--max-steps", "3"))  # auxiliary head on
    model = load_trained(out)
    assert not model.training and model.inputs == result["inputs"]
    assert result["inputs"] == json.loads((out / "result.json").read_text())["inputs"]
    assert {k: result["inputs"][k] for k in ("dataset", "in_channels", "image_size", "num_classes")} == {
        "dataset": "digits", "in_channels": 1, "image_size": 8, "num_classes": 10}
    test = datasets.load("digits", split="test")
    x, y = test.batch(torch.arange(len(test)))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (len(test), 10)
    assert (logits.argmax(1) == y).float().mean().item() == pytest.approx(result["test_acc"], abs=1e-6)
    # the normalisation it names is the one the data set applied
    from sklearn.datasets import load_digits
    pixels = torch.from_numpy(load_digits().images).float()[datasets.digits_test_mask(
        torch.from_numpy(load_digits().target))] / 16.0
    mean, std = model.inputs["mean"][0], model.inputs["std"][0]
    torch.testing.assert_close(((pixels - mean) / std).unsqueeze(1), x)
    assert load_trained(out / "checkpoint.pt", device="cpu").inputs == model.inputs
    exported = torch.export.export(model, (x[:4],))  # a graph to deploy without nasops' Python
    torch.testing.assert_close(exported.module()(x[:4]), logits[:4])

    nasops.search.main(["--space", "nb201", "--layers", "1", "--out", str(tmp_path / "s"), *TINY,
                        "--epochs", "1", "--max-steps", "1"])
    with pytest.raises(TrainError, match=r"is the checkpoint of a search; train its genotype first"):
        load_trained(tmp_path / "s")
    with pytest.raises(TrainError, match=r"^path: no checkpoint at .*nowhere"):
        load_trained(tmp_path / "nowhere")


def test_an_out_file_and_a_stop_in_the_first_checkpoint(tmp_path, monkeypatch):
    """As nasops.search (tests/test_search.py): a file as --out is refused by name, and
    Ctrl-C in the first checkpoint's write leaves nothing that stops the same command."""
    genotype = _write_genotype(tmp_path, "nb201")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TrainError, match=r"--out .*file: is a file, not a folder"):
        main(_tiny(genotype, "nb201", tmp_path / "file", "--epochs", "1", "--max-steps", "1"))
    out = tmp_path / "run"
    base = _tiny(genotype, "nb201", out, "--epochs", "1", "--max-steps", "1")
    with save_interrupted(monkeypatch), pytest.raises(KeyboardInterrupt):
        main(base)
    assert list(out.iterdir()) == []
    main(base)


def test_out_dir_resume_and_overwrite_rules(tmp_path):
    genotype = _write_genotype(tmp_path, "nb201")
    out = tmp_path / "run"
    base = _tiny(genotype, "nb201", out, "--epochs", "1", "--max-steps", "1")
    with pytest.raises(TrainError, match="no checkpoint"):
        main(base + ["--resume"])
    first = main(base)
    assert json.loads((out / "result.json").read_text())["recipe"] == KINDS["nb201"].recipe.source
    with pytest.raises(TrainError, match="holds the files of another run.*--resume.*--overwrite"):
        main(base)
    with pytest.raises(TrainError, match=r"different run \(init_channels: checkpoint 4, now 6"):
        main(base + ["--resume", "--init-channels", "6"])
    done = main(base + ["--resume"])  # finished: nothing left to train, the result is rewritten
    assert done["test_acc"] == first["test_acc"] and len(done["metrics"]) == 1
    # the genotype itself is part of the run
    _write_genotype(tmp_path, "nb201", {"arch": BEST_NB201.replace("skip_connect", "none")})
    with pytest.raises(TrainError, match="different run \\(genotype: checkpoint"):
        main(base + ["--resume"])
    (out / "notes.txt").write_text("mine")
    main(base + ["--overwrite", "--seed", "1"])
    assert (out / "notes.txt").read_text() == "mine" and len(_metrics(out)) == 1
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="cannot read the checkpoint"):
        main(base + ["--resume", "--seed", "1"])
    # A search's checkpoint (a config, no optimizer): --out pointed at the search's folder.
    torch.save({"config": {"method": "darts"}, "model": {}}, out / "checkpoint.pt")
    with pytest.raises(TrainError, match=r"not a nasops.train checkpoint \(no optimizer\)"):
        main(base + ["--resume", "--seed", "1"])


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    genotype = _write_genotype(tmp_path, "darts")
    args = ["--epochs", "3", "--max-steps", "2", "--deterministic", "--eval-every", "2"]
    full = main(_tiny(genotype, "darts", tmp_path / "full", *args))

    out = tmp_path / "killed"
    # Killed after epoch 2: epoch 1 (0-based 0) has drop-path probability 0, so only a
    # resume into a later epoch shows whether its random draws continue as they should.
    run_killed_after_epoch("nasops.train", _tiny(genotype, "darts", out, *args), epoch=2)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 2
    assert len(_metrics(out)) == 2 and not (out / "result.json").exists()

    resumed = main(_tiny(genotype, "darts", out, *args, "--resume"))
    assert _comparable(_metrics(out)) == _comparable(_metrics(tmp_path / "full"))
    assert resumed["test_acc"] == full["test_acc"] and resumed["test_loss"] == full["test_loss"]
    assert ["test_acc" in r for r in _metrics(out)] == [False, True, True]  # --eval-every 2, and the last
    _, full_state = assert_same_checkpoint_model(out, tmp_path / "full")
    assert any(k.startswith("auxiliary_head.") for k in full_state["model"])  # head and drop-path in play
    assert _metrics(out)[2]["drop_path"] > 0

    # Ctrl-C after epoch 1: no traceback, the way on named, and the same end.
    out = tmp_path / "interrupted"
    stderr = run_killed_after_epoch("nasops.train", _tiny(genotype, "darts", out, *args), epoch=1, how="SIGINT")
    assert "Traceback" not in stderr and stderr.strip().endswith(
        f"nasops.train: interrupted; the epochs checkpointed in {out} are kept: "
        f"the same command with --resume continues after the last one")
    assert main(_tiny(genotype, "darts", out, *args, "--resume"))["test_acc"] == full["test_acc"]


@pytest.mark.slow
def test_recompute_depthwise_trains_as_without(tmp_path):
    """--recompute-depthwise on a trained network (affine BatchNorm, drop-path,
    auxiliary head): the same run; refused for a genotype without sep/dil convs."""
    genotype = _write_genotype(tmp_path, "darts")
    args = ["--epochs", "2", "--max-steps", "2", "--deterministic"]
    plain = main(_tiny(genotype, "darts", tmp_path / "plain", *args))
    recompute = main(_tiny(genotype, "darts", tmp_path / "recompute", *args, "--recompute-depthwise"))
    for a, b in zip(_metrics(tmp_path / "plain"), _metrics(tmp_path / "recompute")):
        for key in ("train_loss", "train_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert recompute["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-5)
    nb201_genotype = _write_genotype(tmp_path / "nb201", "nb201")
    with pytest.raises(TrainError, match="--recompute-depthwise: the genotype of .* has no sep_conv"):
        main(_tiny(nb201_genotype, "nb201", tmp_path / "nb201-run", "--max-steps", "1", "--recompute-depthwise"))


@pytest.mark.parametrize("space,flag,layout", [
    ("darts", [], torch.channels_last),  # auto on the CPU
    ("darts", ["--memory-format", "contiguous"], torch.contiguous_format),
    ("nb201", ["--memory-format", "channels_last"], torch.channels_last),
])
def test_memory_format_lays_out_the_network_its_batches_and_the_evaluation(tmp_path, monkeypatch, space, flag,
                                                                            layout):
    import nasops.train

    seen = []
    step = nasops.train.train_step

    def recording_step(network, x, y, **kwargs):
        conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
        seen.append(("train", x.is_contiguous(memory_format=layout), conv.weight.is_contiguous(memory_format=layout)))
        return step(network, x, y, **kwargs)

    monkeypatch.setattr(nasops.train, "train_step", recording_step)
    genotype = _write_genotype(tmp_path, space)
    trained = []
    forward = torch.nn.Module.__call__

    def recording_call(module, *args, **kwargs):  # the evaluation's batch (after the training steps)
        if seen and not module.training and not trained and args and isinstance(args[0], torch.Tensor):
            trained.append(args[0].is_contiguous(memory_format=layout))
        return forward(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", recording_call)
    # Synthetic RGB images: a one-channel batch is contiguous in both layouts.
    result = main(_tiny(genotype, space, tmp_path / "o", "--epochs", "1", "--max-steps", "2", "--dataset",
                        "synthetic", "--image-size", "8", "--synthetic-size", "64", *flag))
    assert seen == [("train", True, True)] * 2 and trained == [True]
    assert result["memory_format"] == ("channels_last" if layout == torch.channels_last else "contiguous")
    assert json.loads((tmp_path / "o" / "result.json").read_text())["memory_format"] == result["memory_format"]


@pytest.mark.slow
@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_channels_last_trains_as_contiguous(tmp_path, space):
    """The layout changes the order of floating-point sums only: the first steps of
    a run agree to rounding (later ones drift apart as rounding differences grow
    in training, as any two summation orders do: ~1e-3 in the loss after 5 steps
    of a 5-cell DARTS network)."""
    genotype = _write_genotype(tmp_path, space)
    args = ["--epochs", "2", "--max-steps", "1", "--deterministic"]
    runs = [main(_tiny(genotype, space, tmp_path / fmt, *args, "--memory-format", fmt))
            for fmt in ("contiguous", "channels_last")]
    for a, b in zip(*(_metrics(tmp_path / fmt) for fmt in ("contiguous", "channels_last"))):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert runs[0]["test_loss"] == pytest.approx(runs[1]["test_loss"], rel=1e-4)
    assert [r["memory_format"] for r in runs] == ["contiguous", "channels_last"]


def test_memory_format_is_refused_for_token_networks_and_may_change_on_resume(tmp_path, capsys):
    from nasops.train import parse_args, run_config

    vit_genotype = _write_genotype(tmp_path / "v", "vit", {
        "encoder": [["mlp_r0.5", 0], ["mlp_r0.5", 1], ["msa_h8", 2], ["mlp_r0.5", 0]], "encoder_sum": [2, 3],
        "nodes": 2, "embed_dim": 16, "depth": 2, "patch_size": 2, "image_size": 8, "in_channels": 1,
        "num_classes": 10})
    with pytest.raises(SystemExit) as exc:
        parse_args(["--genotype", str(vit_genotype), "--memory-format", "channels_last"])
    assert exc.value.code == 2
    assert "--memory-format channels_last: the vit space's networks work on token tensors" in capsys.readouterr().err
    assert parse_args(["--genotype", str(vit_genotype), "--memory-format", "contiguous"]).memory_format == "contiguous"
    darts = _write_genotype(tmp_path / "d", "darts")
    configs = [run_config(parse_args(["--genotype", str(darts), "--memory-format", fmt]))
               for fmt in ("auto", "channels_last", "contiguous")]
    assert configs[0] == configs[1] == configs[2]  # where it runs, not what it computes: --resume takes either


def test_the_training_loop_reads_values_back_per_epoch_not_per_step(tmp_path):
    """The loss and accuracy sums stay on the device until the epoch ends (with no
    progress bar shown): a step never waits for the previous one's kernels; the
    evaluation's sums likewise until it ends (batch 32: half the evaluation
    batches of batch 16). Counted as the reads of a tensor's value by the host
    (helpers.HostReads)."""
    genotype = _write_genotype(tmp_path, "nb201")
    reads = {}
    for steps, batch in ((2, 16), (4, 16), (2, 32)):
        with HostReads() as counted:
            main(_tiny(genotype, "nb201", tmp_path / f"{steps}-{batch}", "--epochs", "1", "--max-steps", str(steps),
                       "--batch-size", str(batch)))
        reads[steps, batch] = counted.count
    assert reads[2, 16] == reads[4, 16] == reads[2, 32], reads


@pytest.mark.slow
def test_adamw_with_warmup_follows_the_schedule(tmp_path):
    genotype = _write_genotype(tmp_path, "darts")
    result = main(_tiny(genotype, "darts", tmp_path / "o", "--epochs", "3", "--max-steps", "1", "--optimizer",
                        "adamw", "--lr", "0.002", "--warmup-epochs", "2", "--warmup-lr", "1e-5",
                        "--weight-decay", "0.05"))
    assert [r["lr"] for r in result["metrics"]] == pytest.approx([1e-5, 1e-5 + (0.002 - 1e-5) / 2, 0.002])
    state = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=False)["optimizer"]
    assert "exp_avg_sq" in next(iter(state["state"].values()))  # Adam moments: AdamW ran
    assert state["param_groups"][0]["weight_decay"] == 0.05


@pytest.mark.slow
def test_amp_runs_in_bfloat16_on_cpu_and_stays_close(tmp_path):
    genotype = _write_genotype(tmp_path, "nb201")
    args = ["--epochs", "1", "--max-steps", "2"]
    full = main(_tiny(genotype, "nb201", tmp_path / "fp32", *args))["metrics"][0]
    amp = main(_tiny(genotype, "nb201", tmp_path / "amp", *args, "--amp"))["metrics"][0]
    assert amp["train_loss"] != full["train_loss"]
    assert amp["train_loss"] == pytest.approx(full["train_loss"], rel=0.05)
    assert amp["test_loss"] == pytest.approx(full["test_loss"], rel=0.05)


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_hold_one_model(tmp_path):
    # Node 1's conv feeds Zero ops only: a parameter no step ever uses, which
    # DistributedDataParallel must be told about (static_graph).
    genotype = _write_genotype(tmp_path, "nb201", {"arch": UNUSED_CONV_NB201})
    out = tmp_path / "ddp"
    torchrun_two_ranks("nasops.train", _tiny(genotype, "nb201", out, "--epochs", "2", "--max-steps", "2"),
                       NASOPS_TEST_DUMP_STATE=str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"state_rank{r}.pt") for r in (0, 1))
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
    saved = json.loads((out / "result.json").read_text())
    assert saved["world_size"] == 2 and saved["test_samples"] == 355  # each test image once over the ranks
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(checkpoint[k], v) for k, v in rank0.items())


# ---- TensorBoard (optional) ----------------------------------------------------------------

class _FakeWriter:
    """Stands in for torch's SummaryWriter (tensorboard is optional and not installed here)."""

    instances: list = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.flushes, self.closed = log_dir, [], 0, False
        _FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


def test_without_tensorboard_no_writer(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert runtime.open_scalar_writer(tmp_path) is None
    runtime.write_scalars(None, {"loss": 1.0}, 1)  # a no-op


@pytest.mark.slow
def test_scalars_of_search_and_train_go_to_tensorboard(monkeypatch, tmp_path):
    _FakeWriter.instances = []
    monkeypatch.setattr(runtime, "_summary_writer_class", lambda: _FakeWriter)
    search = nasops.search.main(["--space", "nb201", "--layers", "1", "--out", str(tmp_path / "s"), *TINY,
                                 "--epochs", "2", "--max-steps", "1"])
    train = main(["--genotype", str(tmp_path / "s"), "--layers", "1", *TINY, "--epochs", "2", "--max-steps", "1"])
    (searched, trained) = _FakeWriter.instances
    for writer, result, out in ((searched, search, "s"), (trained, train, "s/train-digits-0")):
        assert writer.log_dir == str(tmp_path / out) and writer.closed and writer.flushes == 2
        expected = [(k, v, r["epoch"]) for r in result["metrics"] for k, v in r.items()
                    if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        assert writer.scalars == expected
    assert ("val_acc", search["metrics"][1]["val_acc"], 2) in searched.scalars
    assert ("test_top5", train["metrics"][1]["test_top5"], 2) in trained.scalars


@pytest.mark.parametrize("command", ["search", "train"])
def test_a_failing_run_closes_its_writer(monkeypatch, tmp_path, command):
    """The writer's thread ends also when an epoch raises (Ctrl-C in an in-process run)."""
    _FakeWriter.instances = []
    monkeypatch.setattr(runtime, "_summary_writer_class", lambda: _FakeWriter)
    if command == "train":
        genotype = _write_genotype(tmp_path / "g", "nb201")
        monkeypatch.setattr(nasops.train, "_train_epoch", _interrupted)
        run, argv = main, _tiny(genotype, "nb201", tmp_path / "t", "--epochs", "1")
    else:
        monkeypatch.setattr(nasops.search, "_train_epoch", _interrupted)
        run, argv = nasops.search.main, ["--space", "nb201", "--layers", "1", "--out", str(tmp_path / "s"), *TINY,
                                         "--epochs", "1"]
    with pytest.raises(KeyboardInterrupt):
        run(argv)
    (writer,) = _FakeWriter.instances
    assert writer.closed


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt
