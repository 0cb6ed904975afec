"""Run the benchmark comparisons side by side and write benchmarks/RESULTS.md.

    python benchmarks/report.py                       # every op, this machine's device
    python benchmarks/report.py --ops mixed_op --quick

Every ``benchmarks/bench_<op>.py`` that defines ``BENCHMARK`` (a
harness.OpBenchmark) is an op here; adding one is all it takes to get a section.
Each run replaces only its own sections of RESULTS.md (one per op and device
kind, between ``<!-- BEGIN <op> <device> -->`` markers) and keeps the others,
so CPU and GPU results and different ops live side by side.

A section states the device, versions, date, command, the read/write bandwidth
measured in the same run (timed beside the providers), and per case and mode: the median step time per
provider, nasops' speed-up over eager and over torch.compile, and the share of
the measured bandwidth it reaches (the SPEC's traffic floor moved at the
measured bandwidth, divided by the median time).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import harness  # noqa: E402
import nasops  # noqa: E402

RESULTS = HERE / "RESULTS.md"
CPU_NOISE_NOTE = (
    "This CPU is a 2-core VM that other jobs may share: absolute times are noisy; compare "
    "ratios within a table, which come from interleaved repetitions of the same run. `% BW` "
    "above 100 means the bandwidth probes (`sum`, `fill_` on all threads) fared worse than the "
    "kernel in that round-robin, not that the floor was beaten.")
# glibc malloc without mmap and without trimming: freed memory is reused, not faulted in again.
WARM_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
PREAMBLE = """# nasops benchmark results

Written by `python benchmarks/report.py` (see its docstring); one section per op
and device kind. Times are medians of steps timed in blocks (one untimed step,
then three timed) interleaved round-robin over the providers; a step is what
training runs: forward, and for `fwd+bwd` a backward with a fixed upstream
gradient, grads set to None between steps. `x eager` and
`x compile` are speed-ups of the nasops kernel (higher is better); `% BW` is
the SPEC traffic floor at the read/write bandwidth measured in the same run,
divided by the median time (100 % = at the floor).
"""


def discover(ops: list[str] | None) -> list[harness.OpBenchmark]:
    found = []
    for path in sorted(HERE.glob("bench_*.py")):
        module = importlib.import_module(path.stem)
        bench = getattr(module, "BENCHMARK", None)
        if bench is not None and (not ops or bench.op in ops):
            found.append(bench)
    missing = set(ops or []) - {b.op for b in found}
    if missing:
        raise SystemExit(f"report.py: no BENCHMARK for {sorted(missing)} in {HERE}/bench_*.py")
    return found


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def fmt_mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f}"


def run_op(bench: harness.OpBenchmark, device: str, quick: bool, progress=None) -> dict:
    """The op's tables and the bandwidths measured beside each case and mode:
    ``table`` / ``bandwidths`` (each step timed call by call, as a program calls the
    op) and on CUDA ``device_table`` / ``device_bandwidths`` / ``device_notes`` (the
    same steps replayed from CUDA graphs: the device's own time). ``progress``
    gets the result so far after each case (a run cut short keeps those rows)."""
    reps, warmup = (3, 1) if quick else (9, 2)
    kernels = [f"nasops-{b}" for b in harness.kernel_backends(device)]
    header = ["case", "mode", "eager ms", "compile ms"]
    for k in kernels:
        header += [f"{k} ms", "x eager", "x compile", "% BW"]
    per_provider = "(eager / compile / " + " / ".join(kernels) + ")"
    device_header = list(header)
    header += [("page faults / step " if device == "cpu" else "peak MiB ") + per_provider]
    rows, bandwidths, device_rows, device_bandwidths, device_notes = [], [], [], [], []
    for case in bench.cases(quick):
        inputs = case.make_inputs(device, torch.float32)
        fns = harness.providers(case, device)
        # A probe buffer the size of the forward's inputs (K*N elements).
        probe_bytes = case.floor_bytes("fwd", torch.float32)[0]
        probes = harness.bandwidth_probes(device, probe_bytes)
        label = case.group.replace(f"{bench.op} ", "")
        for mode in harness.MODES:
            start = time.perf_counter()
            faults: dict[str, list[int]] = {}
            times = harness.time_providers(fns, inputs, mode, device, warmup=warmup, reps=reps,
                                           probes=probes, faults=faults)
            med, bandwidth, floor = medians_and_floor(times, probes, probe_bytes, case, mode)
            bandwidths.append(bandwidth)
            row = speedup_row(label, mode, med, floor, kernels)
            if device == "cpu":
                row.append(" / ".join(f"{harness.median(faults[name]):.0f}" for name in fns))
            else:
                peaks = [harness.peak_memory_bytes(fn, inputs, mode, device) for fn in fns.values()]
                row.append(" / ".join(fmt_mib(p) for p in peaks))
            rows.append(row)
            print(f"  {case.group} {mode}: " + ", ".join(f"{n} {fmt_ms(t)} ms" for n, t in med.items())
                  + f"; floor {fmt_ms(floor)} ms ({time.perf_counter() - start:.0f} s)", flush=True)
            if device.startswith("cuda"):
                replays = harness.capture_providers(fns, inputs, mode, probes)
                for name, reason in replays.items():
                    if isinstance(reason, str):
                        device_notes.append(f"{label} {mode}, {name}: not captured ({reason})")
                device_times = harness.time_replays({n: r for n, r in replays.items() if callable(r)}, reps)
                dmed, dband, dfloor = medians_and_floor(device_times, probes, probe_bytes, case, mode)
                if dband is not None:
                    device_bandwidths.append(dband)
                device_rows.append(speedup_row(label, mode, dmed, dfloor, kernels))
                print(f"  {case.group} {mode}, device time: "
                      + ", ".join(f"{n} {fmt_ms(t)} ms" for n, t in dmed.items()), flush=True)
                del replays
        del inputs, fns, probes
        result = {"table": harness.markdown_table(header, rows), "bandwidths": bandwidths}
        if device_rows:
            result.update(device_table=harness.markdown_table(device_header, device_rows),
                          device_bandwidths=device_bandwidths, device_notes=device_notes)
        if progress is not None:
            progress(result)
    return result


def medians_and_floor(times: dict[str, list[float]], probes, probe_bytes: int, case, mode: str):
    """(median seconds per provider, the bandwidth probes' bytes per second, the case's
    traffic floor in seconds at that bandwidth) from ``times``, which holds providers
    and probes alike; bandwidth and floor are None when a probe has no time."""
    med = {name: harness.median(ts) for name, ts in times.items()}
    if not all(name in med for name in probes):
        return {n: t for n, t in med.items() if n not in probes}, None, None
    bandwidth = {name: probe_bytes / med.pop(name) for name in probes}
    return med, bandwidth, harness.floor_seconds(*case.floor_bytes(mode, torch.float32), bandwidth)


def speedup_row(label: str, mode: str, med: dict[str, float], floor: float | None,
                kernels: list[str]) -> list[str]:
    """A table row: eager and compile times, then per nasops kernel its time, its
    speed-ups over eager and compile and its share of the bandwidth floor; "n/a"
    where a provider has no time (its capture failed) or the floor is unknown."""
    def ms(name):
        return fmt_ms(med[name]) if name in med else "n/a"

    def ratio(num, den):
        return f"{med[num] / med[den]:.2f}" if num in med and den in med else "n/a"

    row = [label, mode, ms("eager"), ms("compile")]
    for k in kernels:
        row += [ms(k), ratio("eager", k), ratio("compile", k),
                f"{100 * floor / med[k]:.0f}" if floor is not None and k in med else "n/a"]
    return row


def versions() -> str:
    parts = [f"torch {torch.__version__}", f"nasops {nasops.__version__}", f"Python {platform.python_version()}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    return ", ".join(parts)


def section(bench, kind, device, quick, command, measured: dict) -> str:
    """The op's RESULTS.md section from :func:`run_op`'s ``measured``."""
    bandwidths, table = measured["bandwidths"], measured["table"]
    notes = []
    if kind.startswith("cpu"):
        notes.append(CPU_NOISE_NOTE)
    if kind == "cpu":
        notes.append("PyTorch's CPU allocator does not cache: a fresh multi-MiB tensor is new "
                     "pages from the OS, and on this VM first-touch page faults can cost more "
                     "than the arithmetic, so allocation weighs heavily (eager allocates a "
                     "temporary per `*` and `+`, torch.compile and nasops only their outputs). "
                     "The `cpu-warm-allocator` section repeats the run without page faults.")
    if kind == "cpu-warm-allocator":
        notes.append("Run with glibc tunables " + " ".join(f"{k}={v}" for k, v in WARM_ALLOCATOR_ENV.items())
                     + ": freed memory stays in the heap, so these times are the kernels' "
                     "own, as with a caching allocator.")
    memory = ("peak MiB: torch.cuda.max_memory_allocated above the inputs during one step."
              if kind == "cuda" else
              "page faults / step: median minor page faults of the process during a step (a "
              "fault is a 4 KiB page touched for the first time); they stand in for peak "
              "memory, which PyTorch's CPU allocator keeps no statistics of.")
    noise = "\n" + "\n\n".join(notes) + "\n" if notes else ""
    return "\n".join([
        f"<!-- BEGIN {bench.op} {kind} -->",
        f"## {bench.op} on {kind}",
        "",
        bench.description,
        "",
        f"- device: {harness.device_name(device)}",
        f"- versions: {versions()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`" + (" (quick: fewer repetitions)" if quick else ""),
        f"- bandwidth, timed in the same round-robin as each row's providers (that row's `% BW` "
        f"uses its own) on a float32 buffer the size of the case's inputs: read "
        f"{_span(bandwidths, 'read')} GB/s (`x.sum()`), write {_span(bandwidths, 'write')} GB/s "
        f"(`x.fill_()`)",
        f"- {memory}",
        noise,
        table,
        *device_time_part(measured),
        f"<!-- END {bench.op} {kind} -->",
    ])


def device_time_part(measured: dict) -> list[str]:
    """The device-time table (CUDA) and what it means; nothing without one."""
    if "device_table" not in measured:
        return []
    bandwidths = measured["device_bandwidths"]
    probe = (f"read {_span(bandwidths, 'read')} GB/s, write {_span(bandwidths, 'write')} GB/s"
             if bandwidths else "not measured (a probe's capture failed)")
    lines = ["", "Device time: the same steps captured in CUDA graphs and replayed (10 replays "
             "per timing, CUDA events, interleaved; medians): the kernels' own time, as a graphed "
             "search (`--cuda-graphs`) runs them, without the per-call host costs above. The "
             "bandwidth probes replayed the same way: " + probe + ". A working set that fits the "
             "L2 cache (H200: 60 MB) is served partly from it on replays, for the kernels and "
             "the probes alike.", "", measured["device_table"]]
    if measured["device_notes"]:
        lines += ["", *(f"- {note}" for note in measured["device_notes"])]
    return lines


def _span(bandwidths: list[dict], key: str) -> str:
    values = sorted(b[key] / 1e9 for b in bandwidths)
    return f"{values[0]:.1f}-{values[-1]:.1f} (median {harness.median(values):.1f})"


def update_results(path: Path, sections: dict[tuple[str, str], str]) -> None:
    text = path.read_text() if path.exists() else PREAMBLE
    for (op, kind), body in sections.items():
        pattern = re.compile(rf"<!-- BEGIN {re.escape(op)} {kind} -->.*?<!-- END {re.escape(op)} {kind} -->",
                             re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: body, text)
        else:
            text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text.rstrip("\n") + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", help="ops to run (default: every bench_<op>.py)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--warm-allocator", action="store_true",
                        help="CPU: keep freed memory in glibc's heap (no mmap, no trim), so fresh "
                             "tensors cost no page faults, as with a caching allocator; re-runs "
                             "this script with the glibc tunables set")
    args = parser.parse_args(argv)
    if args.warm_allocator and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        # glibc reads these at process start only.
        os.environ.update(WARM_ALLOCATOR_ENV)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    command = "python benchmarks/report.py " + " ".join(sys.argv[1:] if argv is None else argv)
    benches = discover(args.ops)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.warm_allocator and kind == "cpu":
        kind = "cpu-warm-allocator"
    sections = {}
    for bench in benches:
        print(f"{bench.op}:", flush=True)

        def write(measured, bench=bench):  # after every case: a run cut short keeps its rows
            sections[(bench.op, kind)] = section(bench, kind, args.device, args.quick, command.strip(), measured)
            update_results(args.out, sections)
        run_op(bench, args.device, args.quick, progress=write)
    print(f"wrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
