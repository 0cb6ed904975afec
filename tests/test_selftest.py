"""``python -m nasops.selftest`` (issue #10, item 10): passes on this machine's
kernels, covers every op and kernel backend, and fails (exit status 1, the
op named) when a kernel is wrong."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import kernel_backends
from nasops import selftest
from nasops.ops import rows

ROOT = Path(__file__).resolve().parents[1]
ALL_OPS = {"mixed_op", "patch_pool", "patch_softmax_attention", "patch_attention_mixed_op", "topk_tokens",
           "gather_rows/scatter_rows"}


def _table_rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ALL_OPS]


def test_selftest_passes_on_every_op_and_kernel_backend(capsys):
    assert selftest.main(["--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("selftest: PASS")
    seen = {(row[0], word) for row in _table_rows(out) for word in row if word in ("cpu", "cuda", "triton")}
    assert {op for op, _ in seen} == ALL_OPS
    assert {backend for _, backend in seen} == set(kernel_backends())


def test_selftest_fails_on_a_wrong_kernel(monkeypatch, capsys):
    gather, scatter = rows._KERNELS["cpu"]

    def off_by_one(x, idx):  # the rows after the right ones
        return gather(x, torch.remainder(idx + 1, x.shape[0]))

    monkeypatch.setitem(rows._KERNELS, "cpu", (off_by_one, scatter))
    assert selftest.main(["--backends", "cpu", "--dtypes", "float32", "bfloat16"]) == 1
    out = capsys.readouterr().out
    failed = [row for row in _table_rows(out) if "FAIL:" in row]
    assert {row[0] for row in failed} == {"gather_rows/scatter_rows"} and len(failed) == 2, out
    assert out.strip().splitlines()[-1].startswith("selftest: FAIL (2 of ")


def test_selftest_reports_a_kernel_that_raises(monkeypatch, capsys):
    def broken(x, idx):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(rows._KERNELS, "cpu", (broken, rows._KERNELS["cpu"][1]))
    assert selftest.main(["--backends", "cpu", "--dtypes", "float32", "--ops", "gather_rows/scatter_rows"]) == 1
    assert "raised RuntimeError: planted failure" in capsys.readouterr().out


def test_selftest_without_a_kernel_backend_fails(capsys):
    assert selftest.main(["--device", "meta"]) == 1
    assert "selftest: FAIL (no kernel backend to test on meta)" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "nasops.selftest", "--ops", "gather_rows/scatter_rows",
                           "--dtypes", "float32"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("selftest: PASS")
