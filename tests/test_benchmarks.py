"""The benchmark suites stay runnable: one small case of each, timing disabled.

(Timing itself is not a test: see benchmarks/RESULTS.md and benchmarks/report.py.)
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_suite_runs_one_case_per_provider():
    # The first shape of each op, forward+backward, every provider.
    selection = "(darts-edge-wK or (darts-edge and grid1) or (197 and literal) or dwconv-darts-edge-3x3) and bwd"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--benchmark-disable",
         "-k", selection, str(ROOT / "benchmarks")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
    for suite in ("mixed_op", "patch_attention_mixed_op", "topk_tokens", "depthwise_conv2d"):
        passed = [line for line in proc.stdout.splitlines()
                  if f"::test_{suite}[" in line and "PASSED" in line]
        assert len(passed) >= 3, f"{suite}: {len(passed)} providers passed"  # eager, compile, nasops


def test_provider_orders_put_every_provider_in_every_position_and_after_every_other():
    harness = benchmark_module("harness")
    names = ["eager", "compile", "nasops-cpu"]
    orders = harness.provider_orders(names, 2 * len(names))
    assert all(sorted(order) == sorted(names) for order in orders)
    positions = {(i, name) for order in orders for i, name in enumerate(order)}
    assert positions == {(i, name) for i in range(len(names)) for name in names}
    # Within a repetition, and from the last of one to the first of the next.
    sequence = [name for order in orders for name in order]
    followers = {(a, b) for a, b in zip(sequence, sequence[1:]) if a != b}
    assert followers == {(a, b) for a in names for b in names if a != b}


def test_gpu_session_names_existing_ops_and_stages():
    """benchmarks/gpu_session.sh runs on a lent GPU only: its op list must name every
    BENCHMARK of benchmarks/bench_*.py (report.py --ops refuses another name) and its
    documented stages must exist."""
    import re
    ops = {bench.op for bench in benchmark_module("report").discover(None)}
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    listed = re.search(r"for op in ([\w ]+); do", script).group(1).split()
    assert sorted(listed) == sorted(ops)
    defined = set(re.findall(r"^stage_([\w-]+)\(\)", script, re.M))
    documented = set(re.findall(r"^#   ([\w-]+): ", script, re.M))
    assert documented == defined and {"build", "kernels", "sanitizer", "bench", "step-compile"} <= defined


def test_replays_are_timed_per_replay_round_robin():
    """time_replays with a stand-in for CUDA events: each timing covers ``block``
    replays after an untimed one, and reports seconds per replay."""
    harness = benchmark_module("harness")
    calls, clock = [], [0.0]

    class Event:
        def record(self):
            self.at = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):  # milliseconds, as CUDA events
            return (end.at - self.at) * 1e3

    def replay(name, seconds):
        def run():
            calls.append(name)
            clock[0] += seconds
        return run

    times = harness.time_replays({"a": replay("a", 2e-3), "b": replay("b", 5e-3)}, reps=4, block=3,
                                 timer=lambda: (Event(), Event()))
    assert times["a"] == pytest.approx([2e-3] * 4) and times["b"] == pytest.approx([5e-3] * 4)
    assert len(times["a"]) == len(times["b"]) == 4 and calls.count("a") == calls.count("b") == 4 * (1 + 3)
    assert calls[:4] in (["a"] * 4, ["b"] * 4)  # an untimed replay, then the block, per timing


def test_a_step_that_cannot_be_captured_is_reported_not_timed():
    """On the CPU no CUDA graph can be captured: every provider and probe gets the
    reason instead of a replay (on a GPU, a host sync inside an op would)."""
    harness = benchmark_module("harness")
    import torch
    x = torch.randn(8, requires_grad=True)
    inputs = harness.Inputs(args={"x": x}, leaves=[x], grad_out=torch.ones(8))
    replays = harness.capture_providers({"eager": lambda a: a["x"] * 2}, inputs, "fwd+bwd",
                                        {"read": lambda: x.sum()})
    assert set(replays) == {"eager", "read"} and all(isinstance(r, str) and r for r in replays.values())
    assert x.grad is None


def test_op_sections_show_the_device_time_table_when_measured():
    report = benchmark_module("report")
    bench = report.discover(["mixed_op"])[0]
    kernels = ["nasops-cuda"]
    per_call = report.speedup_row("edge", "fwd", {"eager": 4e-4, "compile": 2e-4, "nasops-cuda": 1e-4},
                                  5e-5, kernels)
    assert per_call == ["edge", "fwd", "0.40", "0.20", "0.10", "4.00", "2.00", "50"]
    # a provider whose capture failed, and no floor (a probe's capture failed)
    device = report.speedup_row("edge", "fwd", {"eager": 4e-5, "nasops-cuda": 1e-5}, None, kernels)
    assert device == ["edge", "fwd", "0.04", "n/a", "0.01", "4.00", "n/a", "n/a"]
    measured = {"table": "PER-CALL TABLE", "bandwidths": [{"read": 1e12, "write": 2e12}]}
    text = report.section(bench, "cuda", "cpu", True, "cmd", measured)
    assert "PER-CALL TABLE" in text and "Device time" not in text
    measured.update(device_table="DEVICE TABLE", device_bandwidths=[{"read": 3e12, "write": 4e12}],
                    device_notes=["edge fwd, compile: not captured (RuntimeError: x)"])
    text = report.section(bench, "cuda", "cpu", True, "cmd", measured)
    assert text.index("PER-CALL TABLE") < text.index("DEVICE TABLE") < text.index("<!-- END mixed_op cuda -->")
    assert "read 3000.0-3000.0 (median 3000.0) GB/s" in text and "- edge fwd, compile: not captured" in text


def test_an_op_report_is_written_case_by_case():
    """report.run_op hands the table so far to ``progress`` after every case, so that a
    run cut short (a device session's deadline) keeps the rows it finished."""
    report = benchmark_module("report")
    bench = report.discover(["depthwise_conv2d"])[0]
    seen = []
    final = report.run_op(bench, "cpu", quick=True, progress=seen.append)
    cases = len(bench.cases(True))
    assert len(seen) == cases and seen[-1] == final and "device_table" not in final  # CPU: no graphs
    rows = [m["table"].count("\n") - 1 for m in seen]  # header and rule lines aside
    assert rows == [2 * (i + 1) for i in range(cases)]  # fwd and fwd+bwd per case
