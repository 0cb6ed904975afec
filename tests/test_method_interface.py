"""The contract between the search driver and a method (nasops.methods.darts.Darts's
"what the driver asks of a method"), checked with a toy method registered for the test."""
from __future__ import annotations

import json

import pytest
import torch

from nasops import methods
from nasops.methods.darts import Darts
from nasops.search import build_parser, main, parse_args, run_config

TINY = ["--space", "nb201", "--layers", "1", "--init-channels", "4", "--batch-size", "16", "--threads", "1",
        "--quiet", "--epochs", "2", "--max-steps", "1"]


class ToyMethod(Darts):
    """DARTS with one flag of its own, limited to nb201, that records the driver's calls."""

    name = "toy"
    spaces = ("nb201",)
    output_patterns = ("toy_*.txt",)
    calls: list = []

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("toy")
        g.add_argument("--toy-scale", type=float, default=1.0, help="a toy hyperparameter")

    @classmethod
    def check_args(cls, args):
        if args.toy_scale <= 0:
            raise ValueError(f"--toy-scale: expected > 0, got {args.toy_scale}")

    @classmethod
    def from_args(cls, model, args, *, device, amp):
        method = super().from_args(model, args, device=device, amp=amp)
        method.scale = args.toy_scale
        return method

    def begin_epoch(self, epoch):
        ToyMethod.calls.append(("begin_epoch", epoch))

    def describe(self):
        return {**super().describe(), "toy_scale": self.scale}

    def finish(self, run):
        ToyMethod.calls.append(("finish", len(run.val_loader) > 0, run.world_size))
        return {**super().finish(run), "toy_result": 42}

    def write_outputs(self, out, result):
        (out / "toy_report.txt").write_text(str(result["toy_result"]))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "toy", ToyMethod)
    ToyMethod.calls = []
    return ToyMethod


def test_a_methods_flags_enter_only_its_own_runs_config(toy):
    assert "toy" in build_parser().method_flags and build_parser().method_flags["toy"] == {"toy_scale"}
    darts = run_config(parse_args(["--space", "nb201"]))
    assert "toy_scale" not in darts and darts["lr"] == 0.025  # the common flags stay
    mine = run_config(parse_args(["--space", "nb201", "--method", "toy", "--toy-scale", "2"]))
    assert mine["toy_scale"] == 2.0 and mine["method"] == "toy"


def test_a_method_refuses_other_spaces_and_bad_flags_naming_them(toy, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--method", "toy", "--space", "darts"])
    assert exc.value.code == 2
    assert "--method toy searches the spaces nb201; got --space darts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--method", "toy", "--space", "nb201", "--toy-scale", "-1"])
    assert "--toy-scale: expected > 0, got -1.0" in capsys.readouterr().err


def test_the_driver_calls_the_method_hooks_and_keeps_its_outputs(toy, tmp_path):
    result = main([*TINY, "--method", "toy", "--toy-scale", "3", "--out", str(tmp_path / "run")])
    assert ToyMethod.calls == [("begin_epoch", 0), ("begin_epoch", 1), ("finish", True, 1)]
    assert result["toy_result"] == 42 and result["genotype_str"].startswith("|")
    assert [r["toy_scale"] for r in result["metrics"]] == [3.0, 3.0]  # describe() feeds every record
    saved = json.loads((tmp_path / "run" / "genotype.json").read_text())
    assert saved["toy_result"] == 42 and saved["config"]["toy_scale"] == 3.0
    assert (tmp_path / "run" / "toy_report.txt").read_text() == "42"
    # the method's files count as the run's: a new run refuses them, --overwrite removes them
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "toy_report.txt").write_text("x")
    with pytest.raises(RuntimeError, match="toy_report.txt"):
        main([*TINY, "--out", str(tmp_path / "other")])
    main([*TINY, "--out", str(tmp_path / "other"), "--overwrite", "--epochs", "1"])
    assert not (tmp_path / "other" / "toy_report.txt").exists()


def test_resume_starts_the_epoch_hook_where_the_run_stopped(toy, tmp_path):
    out = str(tmp_path / "run")
    main([*TINY, "--method", "toy", "--out", out, "--epochs", "1"])
    with pytest.raises(RuntimeError, match="different run"):  # --epochs is part of the config
        main([*TINY, "--method", "toy", "--out", out, "--resume"])
    ToyMethod.calls = []
    state = torch.load(f"{out}/checkpoint.pt", weights_only=False)
    state["config"]["epochs"] = 2
    torch.save(state, f"{out}/checkpoint.pt")
    main([*TINY, "--method", "toy", "--out", out, "--resume"])
    assert ToyMethod.calls[0] == ("begin_epoch", 1)
