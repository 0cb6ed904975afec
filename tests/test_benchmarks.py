"""The benchmark suites stay runnable: one small case of each, timing disabled.

(Timing itself is not a test: see benchmarks/RESULTS.md and benchmarks/report.py.)
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_suite_runs_one_case_per_provider():
    # The first shape of each op, forward+backward, every provider.
    selection = "(darts-edge-wK or (darts-edge and grid1) or (197 and literal)) and bwd"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--benchmark-disable",
         "-k", selection, str(ROOT / "benchmarks")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
    for suite in ("mixed_op", "patch_attention_mixed_op", "topk_tokens"):
        passed = [line for line in proc.stdout.splitlines()
                  if f"::test_{suite}[" in line and "PASSED" in line]
        assert len(passed) >= 3, f"{suite}: {len(passed)} providers passed"  # eager, compile, nasops
