"""End to end: the search driver ``python -m nasops.search`` (in-process through
``main(argv)`` unless the test is about processes: kill and resume, torchrun)."""
from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nasops.spaces
from nasops.search import SearchError, main, parse_args
from nasops.spaces import nb201
from helpers import (HostReads, assert_same_checkpoint_model, kernel_backends, run_killed_after_epoch,
                     save_interrupted, subprocess_env, torchrun_two_ranks)

REPO = Path(__file__).resolve().parents[1]
# SPEC's ../shared/data/ next to the checkout (or to the worktree's parent).
SHARED_TABLES = [REPO.parent / "shared" / "data" / "nb201_test_accuracy.csv",
                 REPO.parent.parent / "shared" / "data" / "nb201_test_accuracy.csv"]
NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")

# Tiny networks and few steps; one thread (tiny tensors on a shared 2-core
# machine run many times faster without a thread pool).
TINY = ["--init-channels", "4", "--batch-size", "16", "--threads", "1", "--quiet"]
TINY_LAYERS = {"nb201": "1"}  # nb201 counts cells per stage; darts/rdarts count cells


def _tiny(space, out, *extra):
    return ["--space", space, "--layers", TINY_LAYERS.get(space, "3"), "--out", str(out), *TINY, *extra]


@pytest.fixture(scope="module")
def nb201_table(tmp_path_factory) -> Path:
    """The NAS-Bench-201 CSV; where the shared copy is absent, a stand-in with all
    15,625 cells and made-up accuracies in the same format."""
    for path in SHARED_TABLES:
        if path.exists():
            return path
    path = tmp_path_factory.mktemp("nb201") / "table.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["CIFAR10TestAccuracy200Epochs", "CIFAR100TestAccuracy200Epochs",
                         "ImageNetTestAccuracy200Epochs", "ArchitectureString", "UniqueString"])
        for i, ops in enumerate(itertools.product(NB201_OPS, repeat=6)):
            arch = "|{}~0|+|{}~0|{}~1|+|{}~0|{}~1|{}~2|".format(*ops)
            writer.writerow([50 + i / 1000, 20 + i / 2000, 10 + i / 4000, arch, arch])
    return path


def _is_png(path: Path) -> bool:
    import matplotlib.image

    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
    image = matplotlib.image.imread(path)
    return image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50 and image.std() > 0


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _comparable(records):
    """Metrics without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("second_order", [False, True], ids=["first-order", "second-order"])
@pytest.mark.parametrize("space", nasops.spaces.SPACES)
def test_tiny_search_writes_every_output(tmp_path, space, second_order, nb201_table, capsys):
    out = tmp_path / "run"
    extra = ["--epochs", "1", "--max-steps", "1"] + (["--second-order"] if second_order else [])
    if space == "nb201" and not second_order:
        extra += ["--nb201-table", str(nb201_table)]
    result = main(_tiny(space, out, *extra))

    saved = json.loads((out / "genotype.json").read_text())
    assert saved["space"] == space and saved["method"] == "darts" and saved["seed"] == 0
    assert saved["genotype"] == result["genotype"] and saved["genotype_str"] == result["genotype_str"]
    assert saved["config"]["second_order"] is second_order and saved["config"]["layers"] == int(
        TINY_LAYERS.get(space, "3"))

    records = _metrics(out)
    assert len(records) == 1 and records[0]["epoch"] == 1 and records[0]["steps"] == 1
    assert 0 <= records[0]["train_acc"] <= 1 and records[0]["train_loss"] > 0
    assert records[0]["genotype_str"] == saved["genotype_str"]
    tables = records[0]["edge_weights"]
    for cell_type, table in tables.items():
        for edge in table:
            assert sum(edge["ops"].values()) == pytest.approx(1.0, abs=1e-5)
        assert _is_png(out / f"cell_{cell_type}.png") and _is_png(out / f"weights_{cell_type}.png")
    assert sorted(tables) == sorted(nasops.spaces.build(space, in_channels=1, num_classes=10, C=4,
                                                        layers=1).cell_types)

    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["space"] == space
    assert not list(out.glob("*.tmp*"))

    if space == "nb201":  # the table given, else the one shipped with nasops
        table = nb201_table if "--nb201-table" in extra else nb201.BUILTIN_TABLE
        with (gzip.open(table, "rt") if table.suffix == ".gz" else open(table)) as f:
            row = next(r for r in csv.DictReader(f) if r["ArchitectureString"] == saved["genotype_str"])
        assert saved["nb201"]["cifar10"] == pytest.approx(float(row["CIFAR10TestAccuracy200Epochs"]))
        assert saved["nb201"]["cifar100"] == pytest.approx(float(row["CIFAR100TestAccuracy200Epochs"]))
        printed = f"cifar10 {float(row['CIFAR10TestAccuracy200Epochs']):.2f} %, cifar100 "
        assert printed in capsys.readouterr().out


@pytest.mark.parametrize("flag,value,choices", [
    ("--space", "bogus", "darts"), ("--method", "bogus", "darts"), ("--dataset", "bogus", "digits"),
    ("--backend", "bogus", "eager")])
def test_unknown_choice_lists_the_choices(flag, value, choices, capsys):
    with pytest.raises(SystemExit) as exc:
        main([flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid choice: '{value}'" in err and choices in err


def test_bad_flag_combinations_are_refused(capsys, nb201_table):
    for argv, message in [(["--resume", "--overwrite"], "exclude each other"),
                          (["--nb201-table", str(nb201_table)], "needs --space nb201"),
                          (["--space", "nb201", "--nb201-table", "/nonexistent.csv"], "no such file"),
                          (["--epochs", "0"], "--epochs: expected >= 1"),
                          (["--train-portion", "1.5"], "--train-portion")]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_bad_device_is_refused(tmp_path):
    with pytest.raises(SearchError, match="--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"):
        main(["--device", "tpu", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SearchError, match="no CUDA device"):
            main(["--device", "cuda", "--out", str(tmp_path)])


def test_command_line_errors_exit_with_status_1_and_the_reason(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nasops.search", "--resume", "--out", str(tmp_path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(f"no checkpoint at {tmp_path / 'checkpoint.pt'}; "
                                        f"start a new run without --resume")


def test_flags_of_another_method_are_refused(capsys):
    """Unrefused, they would be ignored: --evaluate-only without --method hardexit
    would start a whole search."""
    for argv, message in [
            (["--evaluate-only", "--checkpoint", "x.pt"],
             "--checkpoint, --evaluate-only: flags of --method hardexit, not of --method darts"),
            (["--method", "midas", "--token-ratio", "0.5", "--lambda-target", "0.1"],
             "--token-ratio: flags of --method dasvit, not of --method midas"),
            (["--method", "hardexit", "--midas-grid", "2"], "--midas-grid: flags of --method midas, not of "
                                                             "--method hardexit")]:
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv
    # a method's own flags, also at their default values, and flags no method owns
    assert parse_args(["--method", "midas", "--midas-grid", "2", "--seed", "3"]).midas_grid == "2"


def test_seed_out_of_range_is_a_flag_error(capsys):
    from nasops.runtime import MAX_SEED

    for seed in ("-1", str(MAX_SEED + 1)):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--seed", seed])
        assert exc.value.code == 2
        assert f"--seed: expected an integer in [0, {MAX_SEED}], got {seed}" in capsys.readouterr().err


def test_numbers_no_run_can_use_are_flag_errors(capsys):
    """Numbers float() takes but no search can use. Before: a negative learning rate,
    momentum or weight decay was a traceback from the optimizer; a negative --lr-min
    turned the cosine schedule's end into gradient ascent; --grad-clip 0 zeroed every
    weight gradient and a negative one flipped its sign; nan ran a search of nans."""
    for argv, message in [
        (["--lr", "-1"], "--lr: expected >= 0, got -1.0"),
        (["--lr-min", "-0.001"], "--lr-min: expected >= 0, got -0.001"),
        (["--momentum", "-0.5"], "--momentum: expected >= 0, got -0.5"),
        (["--weight-decay", "-1"], "--weight-decay: expected >= 0, got -1.0"),
        (["--arch-lr", "-1"], "--arch-lr: expected >= 0, got -1.0"),
        (["--arch-weight-decay", "-1"], "--arch-weight-decay: expected >= 0, got -1.0"),
        (["--grad-clip", "0"], "--grad-clip: expected > 0 (inf: no clipping), got 0.0"),
        (["--grad-clip", "-5"], "--grad-clip: expected > 0 (inf: no clipping), got -5.0"),
        (["--arch-betas", "0.5", "1"], "--arch-betas: expected two numbers in [0, 1), got 0.5 1.0"),
        (["--arch-betas", "-0.1", "0.9"], "--arch-betas: expected two numbers in [0, 1), got -0.1 0.9"),
        (["--arch-betas", "nan", "0.9"], "--arch-betas: expected a finite number, got nan"),
        (["--lr", "nan"], "--lr: expected a finite number, got nan"),
        (["--arch-lr", "inf"], "--arch-lr: expected a finite number, got inf"),
        (["--grad-clip", "nan"], "--grad-clip: expected a finite number, got nan"),
    ]:
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, argv
    # inf: a clip's "no limit"
    assert parse_args(["--grad-clip", "inf"]).grad_clip == float("inf")
    assert parse_args(["--method", "hardexit", "--arch-grad-clip", "inf"]).arch_grad_clip == float("inf")


def test_every_float_flag_refuses_nan_and_inf(capsys):
    """Every float flag, a method's too (and one added later): a range check lets nan
    through (every comparison with it is false), so the driver refuses nan and inf
    for all of them at once (inf only where it means no limit: the gradient clips)."""
    from nasops.search import build_parser

    parser = build_parser()
    owner = {dest: name for name, dests in parser.method_flags.items() for dest in dests}
    method_argv = {"dasvit": ["--method", "dasvit", "--space", "vit"]}
    floats = [a for a in parser._actions if a.type is float]
    assert len(floats) >= 20
    for action in floats:
        flag = action.option_strings[-1]
        method = owner.get(action.dest)
        argv = method_argv.get(method, ["--method", method] if method else [])
        for value in ("nan", "inf"):
            if value == "inf" and action.dest in ("grad_clip", "arch_grad_clip"):
                continue
            count = action.nargs if isinstance(action.nargs, int) else 1
            with pytest.raises(SystemExit):
                parse_args([*argv, flag, *[value] * count])
            assert f"{flag}: expected a finite number, got {value}" in capsys.readouterr().err


def test_console_scripts_exit_with_status_0_after_a_run(tmp_path, monkeypatch):
    """pip's wrapper runs sys.exit(<entry point>()): a result returned there is an error exit.
    The entry points as pyproject.toml declares them (installed metadata may be an old build's)."""
    import importlib
    import re

    declared = re.search(r"^\[project\.scripts\]\n((?:.+\n)+)", (REPO / "pyproject.toml").read_text(), re.M)
    scripts = dict(re.findall(r'^(\S+) = "([^"]+)"$', declared.group(1), re.M))
    assert set(scripts) == {"nasops-search", "nasops-train"}
    out = tmp_path / "run"
    for name, argv in (("nasops-search", _tiny("darts", out, "--epochs", "1", "--max-steps", "1")),
                       ("nasops-train", ["--genotype", str(out / "genotype.json"), "--out", str(tmp_path / "t"),
                                         "--layers", "2", *TINY, "--epochs", "1", "--max-steps", "1"])):
        monkeypatch.setattr(sys, "argv", [name, *argv])
        with pytest.raises(SystemExit) as exc:
            module, function = scripts[name].split(":")
            sys.exit(getattr(importlib.import_module(module), function)())
        assert exc.value.code is None, name


def test_a_run_puts_the_process_settings_back(monkeypatch):
    """main() may run in-process (tests, notebooks): what a run switches —
    --deterministic, --backend, --threads — is as it was afterwards."""
    import argparse

    import nasops.backend
    from nasops import runtime

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, nasops.backend._override, torch.get_num_threads())
    with runtime.run_settings(argparse.Namespace(threads=1, dataset="digits"), torch.device("cpu"), 1):
        runtime.make_deterministic()
        nasops.set_backend("eager")
        assert torch.get_num_threads() == 1 and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, nasops.backend._override, torch.get_num_threads()) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True], ids=["log-file", "terminal"])
def test_progress_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch, terminal):
    """A bar redrawn into a log file (nohup, a batch job) leaves every update on
    one ever longer line; there only the epoch's summary line belongs."""
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    tiny = [a for a in _tiny("darts", tmp_path / "run", "--epochs", "1", "--max-steps", "2") if a != "--quiet"]
    main(tiny)
    assert ("step/s" in stderr.getvalue()) == terminal
    assert "epoch 1/1: train loss" in capsys.readouterr().out


def test_epoch_progress_reads_its_figures_at_most_twice_a_second_and_at_the_last_step(monkeypatch):
    """runtime.EpochProgress (both loops' bar): the figures, whose reads wait for the
    device, are asked for only when 0.5 s have passed since the last drawing or the
    epoch's last step is done, with the seconds since the epoch began."""
    from nasops import runtime

    clock = iter([10.0, 10.1, 10.3, 10.6, 10.7, 10.8])  # the start, then after each of 5 steps
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(clock))
    progress = runtime.EpochProgress(5, "epoch 1/1", show=True)

    class Bar:
        disable, updates, postfixes = False, 0, []

        def update(self):
            Bar.updates += 1

        def set_postfix(self, **figures):
            Bar.postfixes.append(figures)
    progress.bar = Bar()
    asked = []
    for step in range(5):
        progress.step(step, lambda seconds: asked.append(round(seconds, 6)) or {"step": step})
    assert asked == [0.6, 0.8] and Bar.postfixes == [{"step": 2}, {"step": 4}] and Bar.updates == 5


def test_missing_cifar_batches_are_named(tmp_path):
    with pytest.raises(SearchError, match="data_batch_1"):
        main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_an_out_that_cannot_be_a_folder_is_refused(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a folder")
    for extra in ([], ["--resume"]):
        with pytest.raises(SearchError, match=rf"--out {file}: is a file, not a folder"):
            main(_tiny("darts", file, "--epochs", "1", "--max-steps", "1", *extra))
    with pytest.raises(SearchError, match=rf"--out {file / 'run'}: cannot create the folder \(Not a directory\)"):
        main(_tiny("darts", file / "run", "--epochs", "1", "--max-steps", "1"))
    with pytest.raises(SystemExit):  # not the current folder
        parse_args(["--out", ""])
    assert "argument --out: expected a folder name, got an empty string" in capsys.readouterr().err


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path, monkeypatch):
    """Ctrl-C while the first checkpoint is written: no run file is left (the checkpoint
    is written before the epoch's metrics line), so the same command starts again; what
    a SIGKILL leaves (the write's temporary file) is taken away by the next run, and
    --resume on a folder that has run files but no checkpoint says to start anew."""
    out = tmp_path / "run"
    base = _tiny("darts", out, "--epochs", "1", "--max-steps", "1")
    with save_interrupted(monkeypatch), pytest.raises(KeyboardInterrupt):
        main(base)
    assert sorted(p.name for p in out.iterdir()) == []  # no metrics line, no torn temporary file
    (out / "checkpoint.pt.tmp4242").write_bytes(b"what a SIGKILL left")
    (out / "events.out.tfevents.1.host").write_bytes(b"")  # with tensorboard: opened at the start
    main(base)
    assert sorted(p.name for p in out.iterdir() if ".tmp" in p.name or "tfevents" in p.name) == []
    (out / "checkpoint.pt.tmp4243").write_bytes(b"what a SIGKILL left")
    main(base + ["--resume"])
    assert not (out / "checkpoint.pt.tmp4243").exists()
    (out / "checkpoint.pt").unlink()
    with pytest.raises(SearchError, match=r"--resume: no checkpoint at .*: the run there stopped before it "
                                          r"checkpointed its first epoch \(.*metrics.jsonl.* left\); start it "
                                          r"again with --overwrite"):
        main(base + ["--resume"])


def test_out_dir_resume_and_overwrite_rules(tmp_path):
    out = tmp_path / "run"
    base = _tiny("darts", out, "--epochs", "1", "--max-steps", "1")
    with pytest.raises(SearchError, match="no checkpoint"):
        main(base + ["--resume"])
    main(base)
    first = (out / "genotype.json").read_text()

    with pytest.raises(SearchError, match="holds the files of another run.*--resume.*--overwrite"):
        main(base)
    with pytest.raises(SearchError, match=r"different run \(init_channels: checkpoint 4, now 5"):
        main(base + ["--resume", "--init-channels", "5"])
    done = main(base + ["--resume"])  # finished run: nothing left to do, outputs rewritten
    assert len(done["metrics"]) == 1 and (out / "genotype.json").read_text() == first

    (out / "notes.txt").write_text("mine")
    main(base + ["--overwrite", "--seed", "1"])
    assert json.loads((out / "genotype.json").read_text())["seed"] == 1 and len(_metrics(out)) == 1
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces run files only

    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(SearchError, match="does not fit this network"):
        main(base + ["--resume", "--seed", "1"])

    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SearchError, match="cannot read the checkpoint"):
        main(base + ["--resume", "--seed", "1"])
    for state in ({"model": {}}, {"config": "darts"}, [1, 2]):  # readable, but not a search's
        torch.save(state, out / "checkpoint.pt")
        with pytest.raises(SearchError, match=r"not a nasops.search checkpoint \(no config\)"):
            main(base + ["--resume", "--seed", "1"])


class _CodeInAPickle:
    """Unpickling this runs os.mkdir(path): what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    """Issue #10 item 7: --resume loads with weights_only=True; a pickle with a
    payload is refused, with the reason, and its code never runs."""
    out, marker = tmp_path / "run", tmp_path / "payload_ran"
    out.mkdir()
    torch.save({"epoch": 1, "config": {}, "history": [], "x": _CodeInAPickle(marker)}, out / "checkpoint.pt")
    with pytest.raises(SearchError, match=r"refused to load the checkpoint .*could run code \(.*mkdir"):
        main(_tiny("darts", out, "--epochs", "1", "--resume"))
    assert not marker.exists()


def test_nb201_table_is_on_by_default_from_the_package(tmp_path):
    """Issue #10 item 8: --space nb201 looks the found cell up in the shipped table
    (also with the flag alone); another CSV is still accepted."""
    builtin = str(nb201.BUILTIN_TABLE)
    assert parse_args(["--space", "nb201"]).nb201_table == builtin
    assert parse_args(["--space", "nb201", "--nb201-table"]).nb201_table == builtin
    assert parse_args(["--space", "nb201", "--nb201-table", "--epochs", "2"]).epochs == 2
    assert parse_args(["--space", "darts"]).nb201_table is None
    custom = tmp_path / "table.csv"
    with gzip.open(nb201.BUILTIN_TABLE, "rt") as f:
        custom.write_text(f.read())
    assert parse_args(["--space", "nb201", "--nb201-table", str(custom)]).nb201_table == str(custom)


def test_a_wrong_nb201_table_is_a_one_line_error_before_the_search(tmp_path, capsys):
    excerpt = REPO / "tests" / "data" / "nb201_excerpt.csv"
    other = tmp_path / "other.csv"
    other.write_text("epoch,loss\n1,0.5\n")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    damaged = tmp_path / "damaged.csv.gz"
    data = bytearray(gzip.compress(b"ArchitectureString,x\n" * 50))
    data[10] = 0xFF  # an invalid deflate block: zlib.error, not gzip's own errors
    damaged.write_bytes(bytes(data))
    cases = [(other, "lacks the NB201 table columns"), (binary, "is not a CSV table"),
             (damaged, "is not a CSV table (error: "), (excerpt, "has 7 architectures, expected all 15625")]
    for table, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["--space", "nb201", "--nb201-table", str(table), "--out", str(tmp_path / "never")])
        assert exc.value.code == 2 and not (tmp_path / "never").exists()
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("python -m nasops.search: error: --nb201-table: "), err
        assert message in err[-1] and "Traceback" not in "\n".join(err), err
        assert f"--nb201-table: {table} " in err[-1], err  # the flag, then the file it names


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    args = ["--epochs", "3", "--max-steps", "2", "--deterministic"]
    full = main(_tiny("darts", tmp_path / "full", *args))

    out = tmp_path / "killed"
    run_killed_after_epoch("nasops.search", _tiny("darts", out, *args), epoch=1)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert len(_metrics(out)) == 1 and not (out / "genotype.json").exists()

    resumed = main(_tiny("darts", out, *args, "--resume"))
    assert resumed["genotype"] == full["genotype"]
    assert _comparable(_metrics(out)) == _comparable(_metrics(tmp_path / "full"))
    _, full_state = assert_same_checkpoint_model(out, tmp_path / "full")
    assert any(name.startswith("alphas_") for name in full_state["model"])  # weights and architecture alike

    # Ctrl-C after epoch 2: no traceback, the way on named, and the same end.
    out = tmp_path / "interrupted"
    stderr = run_killed_after_epoch("nasops.search", _tiny("darts", out, *args), epoch=2, how="SIGINT")
    assert "Traceback" not in stderr and stderr.strip().endswith(
        f"nasops.search: interrupted; the epochs checkpointed in {out} are kept: "
        f"the same command with --resume continues after the last one")
    assert len(_metrics(out)) == 2 and not list(out.glob("*.tmp*"))
    assert main(_tiny("darts", out, *args, "--resume"))["genotype"] == full["genotype"]


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_end_with_identical_alphas(tmp_path):
    out = tmp_path / "ddp"
    torchrun_two_ranks("nasops.search", _tiny("darts", out, "--epochs", "2", "--max-steps", "2", "--second-order"),
                       NASOPS_TEST_DUMP_ALPHAS=str(tmp_path))
    rank0 = torch.load(tmp_path / "alphas_rank0.pt")
    rank1 = torch.load(tmp_path / "alphas_rank1.pt")
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)
    assert any(a.abs().max() > 0 for a in rank0)
    saved = json.loads((out / "genotype.json").read_text())
    assert saved["world_size"] == 2
    assert torch.equal(torch.load(out / "checkpoint.pt", weights_only=False)["model"]["alphas_normal"], rank0[0])
    # each rank saw its own half of every batch: 2 steps x 16 samples x 2 ranks per split
    assert _metrics(out)[0]["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", kernel_backends("cpu"))
def test_kernel_backend_gives_the_eager_loss_curve(tmp_path, backend):
    # nb201 (18 mixed edges at --layers 1): Triton's CPU interpreter costs ms per launch.
    args = ["--epochs", "3", "--max-steps", "1"]
    eager = main(_tiny("nb201", tmp_path / "eager", *args, "--backend", "eager"))
    kernel = main(_tiny("nb201", tmp_path / backend, *args, "--backend", backend))
    for e, k in zip(eager["metrics"], kernel["metrics"]):
        for key in ("train_loss", "val_loss"):
            assert k[key] == pytest.approx(e[key], rel=1e-4, abs=1e-5), (key, e["epoch"])
    alphas = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"]["alphas_normal"]
              for name in ("eager", backend)]
    torch.testing.assert_close(alphas[1], alphas[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_amp_runs_in_bfloat16_on_cpu_and_stays_close(tmp_path):
    args = ["--epochs", "1", "--max-steps", "2"]
    full = main(_tiny("darts", tmp_path / "fp32", *args))["metrics"][0]
    amp = main(_tiny("darts", tmp_path / "amp", *args, "--amp"))["metrics"][0]
    assert amp["train_loss"] != full["train_loss"]  # autocast really changed the arithmetic
    assert amp["train_loss"] == pytest.approx(full["train_loss"], rel=0.05)
    assert amp["val_loss"] == pytest.approx(full["val_loss"], rel=0.05)


def test_synthetic_data_of_any_size_runs(tmp_path):
    result = main(_tiny("nb201", tmp_path / "syn", "--dataset", "synthetic", "--image-size", "12",
                        "--num-classes", "5", "--synthetic-size", "64", "--epochs", "1", "--max-steps", "1"))
    record = result["metrics"][0]
    assert record["steps"] == 1 and record["samples_per_s"] > 0
    saved = json.loads((tmp_path / "syn" / "genotype.json").read_text())
    assert saved["config"]["dataset"] == "synthetic" and saved["config"]["image_size"] == 12


@pytest.mark.parametrize("argv", [_tiny("darts", "{out}", "--method", "darts", "--epochs", "2"),
                                  _tiny("darts", "{out}", "--method", "darts", "--second-order", "--epochs", "2"),
                                  _tiny("darts", "{out}", "--method", "midas", "--epochs", "2"),
                                  _tiny("darts", "{out}", "--method", "hardexit", "--epochs", "2"),
                                  ["--method", "dasvit", "--space", "vit", "--out", "{out}", *TINY, "--epochs", "3"]],
                         ids=["darts", "darts-second-order", "midas", "hardexit", "dasvit"])
def test_the_search_loop_reads_values_back_per_epoch_not_per_step(tmp_path, monkeypatch, argv):
    """A method's step leaves its losses and correct answers on the device and the
    driver sums them there (with no progress bar shown): a step never waits for the
    previous one's kernels, so the host runs ahead of a GPU. Counted over the
    epochs (2; DASViT's 3 stages 3; not the end of the search: hard exit's report
    reads on purpose) as the host's reads of tensor values (helpers.HostReads); the
    same for 2 and 4 steps an epoch."""
    import nasops.search

    counted = HostReads()
    train_epoch = nasops.search._train_epoch

    def counting(*args, **kwargs):
        with counted:
            return train_epoch(*args, **kwargs)
    monkeypatch.setattr(nasops.search, "_train_epoch", counting)
    reads = {}
    for steps in (2, 4):
        counted.count = 0
        out = str(tmp_path / str(steps))
        main([a.replace("{out}", out) for a in argv] + ["--max-steps", str(steps)])
        reads[steps] = counted.count
    assert reads[2] == reads[4] > 0, reads
