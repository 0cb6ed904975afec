"""benchmarks/bench_search_step.py stays runnable: a tiny network, one step per
provider, the memory processes, the RESULTS.md section and the plot; and the
parts only a GPU run uses (the GPU tables, the largest-batch search) on made-up
inputs. (The measurements themselves are not tests: see benchmarks/RESULTS.md.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
bench_search_step = benchmark_module("bench_search_step")


def test_benchmark_runs_every_method_and_writes_its_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\n<!-- BEGIN mixed_op cpu -->\nkept\n<!-- END mixed_op cpu -->\n")
    chosen = ["eager-nchw", "eager-nhwc", "nasops-recompute"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_search_step.py"), "--device", "cpu",
           "--methods", "darts-1st", "dasvit", "hardexit", "--providers", *chosen, "--batch-sizes", "4",
           "--steps", "1", "--warmup", "0", "--memory-steps", "1", "--layers", "3", "--init-channels", "4",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "kept" in text  # other sections stay
    section = text.split("<!-- BEGIN search_step cpu -->")[1].split("<!-- END search_step cpu -->")[0]
    # the token network (dasvit) runs no layout provider: a table of its own
    # columns: times, ratios to the first provider, and (maps) nasops' ratio to eager-nhwc
    for method, providers, columns in (("darts-1st", chosen, 3 + 2 + 1), ("hardexit", chosen, 3 + 2 + 1),
                                       ("dasvit", ["eager", "nasops-recompute"], 2 + 1)):
        rows = [line for line in section.splitlines() if line.startswith(f"| {method} | 4 |")]
        assert len(rows) == 2, section  # the time table and the memory table
        time_cells, memory_cells = rows[0].split("|")[3:-1], rows[1].split("|")[3:-1]
        assert len(time_cells) == columns, rows[0]
        assert all(float(c) > 0 for c in time_cells), rows[0]
        assert len(memory_cells) == len(providers) and all("(" in c for c in memory_cells), rows[1]
    assert "| method | batch | eager s | nasops-recompute s | nasops-recompute x eager |" in section
    assert (tmp_path / "search_step_cpu.png").stat().st_size > 1000


def test_method_providers():
    assert bench_search_step.method_providers("dasvit", "cpu", None) == [
        "eager", "nasops", "nasops-compile", "nasops-recompute"]
    assert bench_search_step.method_providers("darts-2nd", "cpu", None)[:2] == ["eager-nchw", "eager-nhwc"]
    # a token network has no layout: the layout providers stand for the plain ones
    assert bench_search_step.method_providers("dasvit", "cuda", ["eager-nchw", "eager-nhwc", "nasops-nchw",
                                                                  "nasops"]) == ["eager", "nasops"]
    assert bench_search_step.method_providers("midas", "cpu", ["eager-nhwc", "nasops", "eager-nhwc"]) == [
        "eager-nhwc", "nasops"]
    # --cuda-graphs: CUDA only, for every method
    assert {"nasops-graphs", "nasops-graphs-recompute"} <= set(
        bench_search_step.method_providers("darts-2nd", "cuda", None))
    assert bench_search_step.method_providers("darts-1st", "cpu", ["nasops", "nasops-graphs",
                                                                  "nasops-graphs-recompute"]) == ["nasops"]
    assert bench_search_step.method_providers("midas", "cuda", ["nasops-nchw", "nasops-graphs"]) == [
        "nasops-nchw", "nasops-graphs"]
    assert bench_search_step.method_providers("hardexit", "cuda", ["nasops-nchw", "nasops-graphs"]) == [
        "nasops-nchw", "nasops-graphs"]
    assert bench_search_step.method_providers("darts-1st", "cpu", ["nasops-torch-bn", "nasops-graphs-torch-bn"]) == [
        "nasops-torch-bn"]
    # a token network has no channels_last to graph: the graphed nhwc provider stands for the plain one
    assert bench_search_step.method_providers("dasvit", "cuda", ["nasops-graphs", "nasops-graphs-nhwc"]) == [
        "nasops-graphs"]
    # DARTS' size comes from --layers / --init-channels, the others carry their own
    assert bench_search_step.method_flags("darts-1st")[-4:] == ["--layers", "8", "--init-channels", "16"]
    assert "--embed-dim" in bench_search_step.method_flags("dasvit")
    # -large: the cells through the first reduction cell (8 cells: 3; MIDAS' 5: 2), on DARTS-space networks only
    assert bench_search_step.provider_flags("nasops-recompute-large", "darts-1st") == [
        "--recompute-edges", "3", "--recompute-depthwise"]
    assert bench_search_step.provider_flags("nasops-graphs-recompute-large", "midas")[1:3] == ["--recompute-edges", "2"]
    assert "nasops-recompute-large" in bench_search_step.method_providers("darts-2nd", "cpu", None)
    assert bench_search_step.method_providers("dasvit", "cpu", ["nasops", "nasops-recompute-large"]) == ["nasops"]


def test_largest_batch_doubles_then_bisects():
    for limit_fit in (1, 37, 64, 100, 127, 128, 1000):
        calls = []

        def fits(b, limit_fit=limit_fit):
            calls.append(b)
            return b <= limit_fit

        assert bench_search_step.largest_batch(fits, start=64, limit=4096) == limit_fit
        assert len(calls) <= 2 * 12
    assert bench_search_step.largest_batch(lambda b: False) == 0
    assert bench_search_step.largest_batch(lambda b: True, limit=512) == 512
    for limit_fit in (37, 100, 1000):
        found = bench_search_step.largest_batch(lambda b, f=limit_fit: b <= f, resolution=8)
        assert limit_fit - 8 < found <= limit_fit


def test_largest_batch_from_a_prediction_takes_few_calls():
    for limit_fit in (1, 500, 1100, 1300, 5000):
        calls = []

        def fits(b, limit_fit=limit_fit):
            calls.append(b)
            return b <= limit_fit

        found = bench_search_step.largest_batch(fits, start=1000, resolution=1000 // 32, growth=1.125)
        assert limit_fit - 1000 // 32 < found <= limit_fit
        if 1000 <= limit_fit <= 1125:  # the prediction was good: a handful of fresh processes
            assert len(calls) <= 6
    # growth by a factor that rounds to the same size still moves
    assert bench_search_step.largest_batch(lambda b: b <= 5, start=1, growth=1.1) == 5
    # a prediction beyond the limit starts at the limit
    assert bench_search_step.largest_batch(lambda b: b <= 20000, start=18000, limit=16384) == 16384


def test_predicted_largest_batch_scales_the_activations_only():
    # 1 GiB before the step, 1 GiB + 64 x 10 MiB at its peak: 10 MiB a sample
    gib, mib = 1 << 30, 1 << 20
    assert bench_search_step.predicted_largest_batch(gib + 640 * mib, gib, 64, 11 * gib) == 1024
    assert bench_search_step.predicted_largest_batch(gib, gib, 64, 2 * gib) >= 1


def test_gpu_report_has_the_projection_and_the_largest_batches(monkeypatch):
    import harness
    monkeypatch.setattr(harness, "device_name", lambda device: "a test GPU")
    results = {("darts-1st", 64): {
        "time": {"eager-nchw": [0.2, 0.2, 0.2], "nasops-nchw": [0.1, 0.1, 0.1]},
        "memory": {"eager-nchw": {"peak_cuda": 3 * 2**30, "cuda_before": 0},
                   "nasops-nchw": {"error": "out of memory"}}}}
    text = bench_search_step.report(results, torch.device("cuda"), "cmd", False, None,
                                    {("darts-1st", "eager-nchw"): 96, ("darts-1st", "nasops-nchw"): 160})
    assert "<!-- BEGIN search_step cuda -->" in text and "a test GPU" in text
    assert "| darts-1st | 64 | 0.200 | 0.100 | 2.00 |" in text
    assert "| darts-1st | 64 | 3072 | out of memory |" in text
    # 0.1 s x 390 steps x 50 epochs = 0.54 GPU-hours
    assert "| darts-1st | 64 | nasops-nchw | 0.54 |" in text
    assert "| darts-1st | nasops-nchw | 160 |" in text
    assert "- plot: `search_step_cuda.png`" in text
    # --plot elsewhere: the section names that plot
    text = bench_search_step.report(results, torch.device("cuda"), "cmd", False, None, None, "bn.png")
    assert "- plot: `bn.png`" in text


def test_recompute_table_takes_the_time_ratio_per_round(monkeypatch):
    """--recompute-edges against the default: the median of the per-round ratios
    (1.2, 1.5, 1.1 -> 1.2) on a machine that slows down round by round, where the
    ratio of the two medians (3.0 / 2.0) pairs steps of different rounds."""
    import harness
    monkeypatch.setattr(harness, "device_name", lambda device: "a test device")
    results = {("darts-1st", 16): {
        "time": {"nasops": [1.0, 2.0, 3.0], "nasops-recompute": [1.2, 3.0, 3.3],
                 "nasops-recompute-dw": [1.1, 2.1, 3.0], "nasops-recompute-large": [1.3, 2.4, 3.3]},
        "memory": {"nasops": {"peak_rss": 2000, "rss_before": 100},
                   "nasops-recompute": {"peak_rss": 900, "rss_before": 100},
                   "nasops-recompute-dw": {"peak_rss": 1500, "rss_before": 100},
                   "nasops-recompute-large": {"peak_rss": 1100, "rss_before": 100}}}}
    text = bench_search_step.report(results, torch.device("cpu"), "cmd", False, None, None)
    assert "| darts-1st | 16 | --recompute-edges | 1.20 | 1.10-1.50 (3) | 1.50 | 55 % |" in text
    assert "| darts-1st | 16 | --recompute-depthwise | 1.05 | 1.00-1.10 (3) | 1.05 | 25 % |" in text
    assert "| darts-1st | 16 | --recompute-edges 3 --recompute-depthwise | 1.20 | 1.10-1.30 (3) | 1.20 | 45 % |" in text
    # On CUDA the default is the provider of --memory-format auto's layout; no memory: n/a.
    layout = bench_search_step.runtime.AUTO_MEMORY_FORMAT["cuda"]
    default = "nasops-nhwc" if layout == "channels_last" else "nasops-nchw"
    results = {("darts-1st", 64): {
        "time": {"eager-nchw": [1.0, 1.0], default: [0.5, 0.5], "nasops-recompute": [0.6, 0.7]},
        "memory": {}}}
    text = bench_search_step.report(results, torch.device("cuda"), "cmd", False, None, None)
    assert "| darts-1st | 64 | --recompute-edges | 1.30 | 1.20-1.40 (2) | 1.30 | n/a |" in text
    # Without a recompute provider there is no such table.
    del results[("darts-1st", 64)]["time"]["nasops-recompute"]
    assert "recompute x nasops" not in bench_search_step.report(results, torch.device("cuda"), "cmd", False,
                                                                 None, None)


def test_torch_bn_provider_runs_pytorchs_batch_norm(monkeypatch):
    """nasops-torch-bn: nasops' default network with nn.BatchNorm2d where the
    search ops have AffineFreeBatchNorm2d (the layers it compares)."""
    from nasops.spaces.operations import AffineFreeBatchNorm2d
    monkeypatch.setitem(bench_search_step.NETWORK, "layers", 3)
    monkeypatch.setitem(bench_search_step.NETWORK, "init_channels", 4)
    norms = {}
    for provider in ("nasops", "nasops-torch-bn"):
        method, _ = bench_search_step.build(provider, "darts-1st", 4, torch.device("cpu"), 1)
        norms[provider] = [type(m) for m in method.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms["nasops"]) == len(norms["nasops-torch-bn"])
    assert AffineFreeBatchNorm2d in norms["nasops"] and AffineFreeBatchNorm2d not in norms["nasops-torch-bn"]
