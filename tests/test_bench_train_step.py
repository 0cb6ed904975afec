"""benchmarks/bench_train_step.py stays runnable: one round of the smallest network per
provider, float32 and --amp, the RESULTS.md sections. (The measurements themselves
are not tests: see benchmarks/RESULTS.md, "Train step".)"""
from __future__ import annotations

import importlib

import pytest
import torch

import nasops.backend
from helpers import benchmark_module

bench_train_step = benchmark_module("bench_train_step")


def test_benchmark_writes_a_section_per_precision_and_keeps_the_others(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\n<!-- BEGIN search_step cpu -->\nkept\n<!-- END search_step cpu -->\n")
    threads = torch.get_num_threads()
    for extra in ([], ["--amp"]):
        bench_train_step.main(["--device", "cpu", "--networks", "darts-v2 digits", "nb201-best digits",
                               "--rounds", "1", "--out", str(out), *extra])
    assert torch.get_num_threads() == threads and nasops.backend._override is None  # put back
    text = out.read_text()
    assert "kept" in text
    for kind, precision in (("cpu", "float32"), ("cpu-amp", "autocast bfloat16")):
        section = text.split(f"<!-- BEGIN train_step {kind} -->")[1].split(f"<!-- END train_step {kind} -->")[0]
        assert precision in section
        header = next(line for line in section.splitlines() if line.startswith("| network"))
        assert header.count("|") - 1 == 2 + 4 + 3 + 1  # network, threads, 4 times, 3 ratios, per round
        for network in ("darts-v2 digits", "nb201-best digits"):
            row = next(line for line in section.splitlines() if line.startswith(f"| {network} | 1 |"))
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert all(float(t) > 0 for t in cells[2:6])


def test_providers_run_their_ops_in_their_layout(monkeypatch):
    """torch-* run PyTorch's ops (the eager backend), nasops-* nasops' (the CPU depthwise
    kernel on channels_last maps); each network and batch in its provider's layout."""
    depthwise = importlib.import_module("nasops.ops.depthwise_conv2d")  # nasops.ops.depthwise_conv2d: the op

    seen = []
    kernels = depthwise._kernels

    def recording_kernels(backend, x, *args):
        found = kernels(backend, x, *args)
        seen.append((nasops.backend._override, x.is_contiguous(memory_format=torch.channels_last), found is not None))
        return found

    monkeypatch.setattr(depthwise, "_kernels", recording_kernels)
    for provider, expected in (("torch-nhwc", ("eager", True, False)), ("nasops-nchw", (None, False, False)),
                               ("nasops-nhwc", (None, True, True))):
        seen.clear()
        bench_train_step.build("darts-v2 digits", provider, torch.device("cpu"))()
        assert seen and set(seen) == {expected}, provider


def test_graphed_providers_replay_every_step_and_are_cuda_only(tmp_path, capsys):
    """nasops-graphs-*: the network graphed once (nasops.cuda_graphs, here with a CPU
    stand-in for the capture), every train step a replay; refused on the CPU and with --amp."""
    captures = []

    def capture(module, sample_args, num_warmup_iters, allow_unused_input, pool=None):
        captures.append(tuple(sample_args[0].shape))
        own = type(module).forward
        module.forward = lambda x: own(module, x)  # the "replay": the module's own forward

    step = bench_train_step.build("darts-v2 digits", "nasops-graphs-nhwc", torch.device("cpu"),
                                  graph_options=dict(capture=capture, device_type="cpu"))
    for _ in range(3):
        step()
    assert captures == [(64, 1, 8, 8)] and (step.graphed.replayed, step.graphed.eager) == (3, 0)
    assert bench_train_step.build("darts-v2 digits", "nasops-nhwc", torch.device("cpu")).graphed is None
    for argv in (["--providers", "nasops-graphs-nchw"], ["--device", "cpu", "--amp", "--providers", "nasops-graphs-nhwc"]):
        with pytest.raises(SystemExit) as exc:
            bench_train_step.main([*argv, "--out", str(tmp_path / "R.md")])
        assert exc.value.code == 2 and "CUDA graphs need --device cuda" in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists()
    assert [p for p in bench_train_step.PROVIDERS if p not in bench_train_step.GRAPHED] == [
        "torch-nchw", "torch-nhwc", "nasops-nchw", "nasops-nhwc"]


def test_the_table_gives_each_graphed_provider_its_speed_up_over_the_same_without_graphs():
    times = {"nasops-nchw": [0.4, 0.4], "nasops-nhwc": [0.3, 0.3], "nasops-graphs-nchw": [0.1, 0.1],
             "nasops-graphs-nhwc": [0.2, 0.2]}
    section = bench_train_step.report({"darts-v2 8 cells": times}, torch.device("cpu"), "cmd")
    header, _, row = [line for line in section.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
    assert cells["nasops-graphs-nchw x nasops-nchw"] == "4.00" and cells["nasops-graphs-nhwc x nasops-nhwc"] == "1.50"
    assert cells["nasops-nhwc x nasops-nchw"] == "1.33"
