"""Every Triton kernel compiles for sm_90 (H100) on a machine without a GPU
(issue #10, item 9): tests/triton_sm90.py, run in a subprocess without
TRITON_INTERPRET (this process has it set, and Triton reads it at import),
with a fresh Triton cache so that ptxas reports every variant's registers and
spills; the table is printed into the test output (benchmarks/RESULTS.md keeps
a copy).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def launched_kernels() -> dict[str, set[str]]:
    """Module -> the Triton kernels its launchers launch (``name[grid](...)``)."""
    found = {}
    for path in sorted((ROOT / "nasops" / "triton").glob("*.py")):
        source = path.read_text()
        jitted = set(re.findall(r"@triton\.jit\s*\ndef (\w+)", source))
        launched = {name for name in jitted if re.search(rf"\b{name}\[", source)}
        if launched:
            found[path.stem] = launched
    return found


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # compile everything: ptxas reports each variant
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_sm90.py"), "--json", str(out / "report.json")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc.stdout, json.loads((out / "report.json").read_text())


def test_every_triton_kernel_compiles_for_sm90(compiled, capsys):
    stdout, report = compiled
    with capsys.disabled():  # the registers and spills table, in the test log
        print("\n" + stdout)
    names = {r["kernel"] for r in report["records"]}
    expected = launched_kernels()
    assert set(expected) == {"rows", "topk_tokens", "patch_attention", "mixed_op", "depthwise_conv2d"}, expected
    for module, kernels in expected.items():
        assert kernels <= names, f"{module}: never compiled {sorted(kernels - names)}"
    for record in report["records"]:
        assert record.get("registers", 0) > 0, f"no ptxas report for {record['kernel']}"
        assert ".target sm_90" in record["ptx"]


def test_float64_kernels_take_no_float32_scalars(compiled):
    """Issue #10 item 2 on the real compile: Triton types a Python float parameter
    float32; a kernel working in float64 must not get one."""
    _, report = compiled
    float64 = [r for r in report["records"] if any(t == "*fp64" for t in r["signature"].values())]
    assert len(float64) >= 10
    for r in float64:
        scalars = {p: t for p, t in r["signature"].items() if t == "fp32"}
        assert not scalars, f"{r['kernel']}: float32 scalar parameters {scalars}"
