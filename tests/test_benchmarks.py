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
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import harness
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
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
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
        ops = {bench.op for bench in report.discover(None)}
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    listed = re.search(r"for op in ([\w ]+); do", script).group(1).split()
    assert sorted(listed) == sorted(ops)
    defined = set(re.findall(r"^stage_([\w-]+)\(\)", script, re.M))
    documented = set(re.findall(r"^#   ([\w-]+): ", script, re.M))
    assert documented == defined and {"build", "kernels", "sanitizer", "bench", "step-compile"} <= defined
