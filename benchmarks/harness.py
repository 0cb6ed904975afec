"""Shared benchmark machinery for every nasops op.

An op's benchmark module (``benchmarks/bench_<op>.py``) defines a module-level
``BENCHMARK = OpBenchmark(...)``: a list of :class:`Case` (one per shape and
variant, each with an eager implementation as a paper's code writes it, the
nasops call, and the SPEC's traffic floor). This module then provides:

- the providers: ``eager``, ``compile`` (``torch.compile`` of the eager code)
  and ``nasops-<backend>`` for every compiled/Triton backend usable on the
  device (:func:`providers`);
- a training-like step (:func:`run_step`): grads of the leaves set to None,
  forward, and for mode ``fwd+bwd`` a backward with a fixed upstream gradient;
- timing (:func:`time_providers`): warm-up, then blocks of steps interleaved
  round-robin over providers so that a noisy, shared machine slows them alike;
  the median is reported; on CUDA also the device's own time, each step
  captured in a CUDA graph and its replays timed (:func:`capture_providers`,
  :func:`time_replays`);
- the bandwidth of the same machine measured in the same run
  (:func:`bandwidth_probes`): a ``sum`` (read) and a ``fill_`` (write) of a
  buffer the size of the case's inputs, timed in the same round-robin;
- peak memory per provider (:func:`peak_memory_bytes`): on CUDA the peak of
  ``torch.cuda.max_memory_allocated`` above the inputs during one step; on the
  CPU ``None`` (PyTorch's CPU allocator keeps no statistics), where the page
  faults per step (``time_providers(faults=...)``) show what allocation cost;
- markdown tables (:func:`markdown_table`).

Used by pytest-benchmark suites (``pytest benchmarks/bench_<op>.py``) and by
``benchmarks/report.py`` (side-by-side table in RESULTS.md).
"""
from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

import nasops

MODES = ("fwd", "fwd+bwd")


@dataclass
class Inputs:
    """What a case's step needs: ``leaves`` get ``.grad = None`` before every
    step; ``grad_out`` is the upstream gradient of the output for backward."""
    args: dict
    leaves: list[torch.Tensor]
    grad_out: torch.Tensor


@dataclass
class Case:
    """One benchmarked configuration of an op.

    make_inputs(device, dtype) -> Inputs; eager(args) and nasops(args, backend)
    return the op's output tensor; floor_bytes[mode] = (read, written) bytes of
    the SPEC's traffic floor for that mode.
    """
    group: str
    make_inputs: Callable[[str, torch.dtype], Inputs]
    eager: Callable[[dict], torch.Tensor]
    nasops: Callable[[dict, str], torch.Tensor]
    floor_bytes: Callable[[str, torch.dtype], dict[str, tuple[int, int]]]
    params: dict = field(default_factory=dict)


@dataclass
class OpBenchmark:
    op: str
    cases: Callable[[bool], list[Case]]  # quick -> cases
    description: str = ""


# ---- providers -----------------------------------------------------------------

def kernel_backends(device: str) -> list[str]:
    """nasops backends worth timing on ``device``: compiled kernels, and Triton on
    a GPU (not the CPU interpreter, which runs every program in Python)."""
    avail = {name for name, info in nasops.backends().items() if info["available"]}
    if device == "cpu":
        return [b for b in ("cpu",) if b in avail]
    return [b for b in ("cuda", "triton") if b in avail]


def providers(case: Case, device: str) -> dict[str, Callable[[dict], torch.Tensor]]:
    """Provider name -> fn(args) for one case (a fresh torch.compile per case)."""
    found = {"eager": case.eager, "compile": torch.compile(case.eager, dynamic=False)}
    for backend in kernel_backends(device):
        found[f"nasops-{backend}"] = (lambda b: lambda args: case.nasops(args, b))(backend)
    return found


# ---- one step, timing ----------------------------------------------------------------

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clear_grads(inputs: Inputs) -> None:
    for t in inputs.leaves:
        t.grad = None


def run_step(fn: Callable[[dict], torch.Tensor], inputs: Inputs, mode: str) -> None:
    """One training-like step: grads set to None, forward, backward for fwd+bwd.
    The forward runs with autograd on in both modes, as in training."""
    clear_grads(inputs)
    y = fn(inputs.args)
    if mode == "fwd+bwd":
        y.backward(inputs.grad_out)


def time_providers(fns: dict[str, Callable], inputs: Inputs, mode: str, device: str, *,
                   warmup: int = 2, reps: int = 9, block: int = 3,
                   probes: dict[str, Callable] | None = None,
                   faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
    """Seconds per step of each provider (and per call of each bandwidth probe,
    under the probe's name), ``reps`` steps each.

    The steps run in blocks: a provider runs one untimed step and then ``block``
    timed ones, and the blocks go round-robin (in the orders of
    :func:`provider_orders`), so that a noisy, shared machine slows every
    provider alike while each timed step follows a step of its own, as in
    training. On the CPU that matters: glibc hands a step's allocations the
    memory the previous step freed, and after another provider's step that is
    often fresh pages from the OS (measured: nasops' mixed_op step at 0 page
    faults run alone, 4000-8000 a step interleaved step by step with
    torch.compile's). Gradients are cleared between steps, untimed.

    With ``faults``, also the process's minor page faults during each timed
    step, per provider: first touches of fresh pages, which on the CPU can cost
    more than a step's arithmetic.
    """
    probes = probes or {}
    for fn in fns.values():
        for _ in range(warmup):
            run_step(fn, inputs, mode)
            clear_grads(inputs)
    time_probes(probes, device)
    sync(device)
    times = {name: [] for name in [*fns, *probes]}
    rounds = -(-reps // block)
    for order in provider_orders(list(fns), rounds):
        for name in order:
            fn = fns[name]
            run_step(fn, inputs, mode)  # settles the heap after the previous provider
            clear_grads(inputs)
            for _ in range(block):
                sync(device)
                faults_before = minor_page_faults()
                start = time.perf_counter()
                run_step(fn, inputs, mode)
                sync(device)
                times[name].append(time.perf_counter() - start)
                if faults is not None:
                    faults.setdefault(name, []).append(minor_page_faults() - faults_before)
                clear_grads(inputs)
        for _ in range(block):
            for name, seconds in time_probes(probes, device).items():
                times[name].append(seconds)
    return times


# ---- device time: CUDA-graph replays -----------------------------------------------------

def capture_step(step: Callable[[], object], warmup: int = 2) -> Callable[[], None]:
    """``step`` captured in a CUDA graph (after ``warmup`` runs on a side stream, as
    capture needs); returns the graph's replay. A replay runs the step's kernels
    with no host work between them: its time is the device's time for the step,
    what a graphed search (``--cuda-graphs``) pays, not the per-call host costs
    (Python, autograd, dispatch, launches) that dominate small ops timed call by
    call. Tensors the capture allocates (outputs, ``.grad`` set to None before)
    stay in the graph's memory pool and are rewritten by every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            step()
    finally:
        # A failed capture's exit raises before it switches back from the capture stream.
        torch.cuda.set_stream(stream)
    return graph.replay


def capture_providers(fns: dict[str, Callable], inputs: Inputs, mode: str,
                      probes: dict[str, Callable] | None = None) -> dict[str, Callable | str]:
    """Each provider's step (grads set to None first, as :func:`run_step`) and each
    probe captured by :func:`capture_step`: name -> replay, or the reason the
    capture failed (an op that syncs with the host cannot be captured)."""
    replays: dict[str, Callable | str] = {}
    steps = {name: (lambda fn=fn: run_step(fn, inputs, mode)) for name, fn in fns.items()}
    for name, step in {**steps, **(probes or {})}.items():
        clear_grads(inputs)
        try:
            replays[name] = capture_step(step)
        except Exception as exc:  # reported in the table instead of a time
            replays[name] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
    clear_grads(inputs)
    return replays


def time_replays(replays: dict[str, Callable], reps: int, block: int = 10,
                 timer: Callable[[], tuple] | None = None) -> dict[str, list[float]]:
    """Seconds per replay of each graph: ``reps`` timings of ``block`` back-to-back
    replays (one untimed replay first), round-robin over the graphs in the orders of
    :func:`provider_orders`. ``timer`` makes a (start, end) pair of CUDA events
    (tests pass a stand-in)."""
    timer = timer or (lambda: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
    times: dict[str, list[float]] = {name: [] for name in replays}
    if not replays:  # nothing could be captured
        return times
    for order in provider_orders(list(replays), reps):
        for name in order:
            replay = replays[name]
            replay()
            start, end = timer()
            start.record()
            for _ in range(block):
                replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / block)
    return times


def provider_orders(names: list[str], reps: int) -> list[list[str]]:
    """The order of the providers in each round: the given cyclic order and its
    reverse in turn, each rotated, so that every provider runs in every
    position and right after each of the others."""
    orders = []
    for rep in range(reps):
        cycle = names if rep % 2 == 0 else names[::-1]
        shift = rep // 2 % len(names)
        orders.append(cycle[shift:] + cycle[:shift])
    return orders


def minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# ---- bandwidth and memory ---------------------------------------------------------------

def bandwidth_probes(device: str, nbytes: int) -> dict[str, Callable[[], object]]:
    """Zero-argument steps that read (``x.sum()``) and write (``x.fill_``) a float32
    buffer of ``nbytes``, both on all intra-op threads; timed beside the
    providers, nbytes / time is the bandwidth they see. Size the buffer like the
    case's inputs, so that the same cache levels serve both (this machine's L3
    is 480 MiB)."""
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    return {"read": lambda: x.sum(), "write": lambda: x.fill_(1.0)}


def time_probes(probes: dict[str, Callable], device: str) -> dict[str, float]:
    """One timing (seconds) of each probe."""
    result = {}
    for name, fn in probes.items():
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        result[name] = time.perf_counter() - start
    return result


def floor_seconds(read_bytes: int, write_bytes: int, bandwidth: dict[str, float]) -> float:
    """Time to move the traffic floor at the measured bandwidths."""
    return read_bytes / bandwidth["read"] + write_bytes / bandwidth["write"]


def peak_memory_bytes(fn: Callable, inputs: Inputs, mode: str, device: str) -> int | None:
    """Peak bytes allocated during one step above what was allocated before it
    (CUDA); None on the CPU, whose allocator keeps no statistics."""
    if not device.startswith("cuda"):
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_step(fn, inputs, mode)
    sync(device)
    return torch.cuda.max_memory_allocated() - before


# ---- reporting ----------------------------------------------------------------------------

def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- pytest-benchmark (the bench_<op>.py test functions) ------------------------------

BENCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BENCH_PROVIDERS = ["eager", "compile"] + [
    f"nasops-{b}" for b in (("cpu",) if BENCH_DEVICE == "cpu" else ("cuda", "triton"))]
_live_case: dict = {}  # the current case's inputs and providers: one case in memory at a time


def benchmark_step(benchmark, case: Case, mode: str, provider: str, device: str = BENCH_DEVICE) -> None:
    """Time ``provider`` on ``case`` with pytest-benchmark, grouped per case and mode."""
    import pytest

    if _live_case.get("group") != case.group:
        _live_case.clear()
        _live_case.update(group=case.group, inputs=case.make_inputs(device, torch.float32),
                          providers=providers(case, device))
    inputs, fns = _live_case["inputs"], _live_case["providers"]
    if provider not in fns:
        pytest.skip(f"{provider} is not available on {device}")
    fn = fns[provider]
    benchmark.group = f"{case.group} {mode}"

    def step():
        run_step(fn, inputs, mode)
        sync(device)

    benchmark.pedantic(step, rounds=5, warmup_rounds=2, iterations=1)
