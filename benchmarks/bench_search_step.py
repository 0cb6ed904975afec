"""The whole search step, side by side: what a user of ``python -m nasops.search`` waits for.

    python benchmarks/bench_search_step.py                     # this machine's device, full run
    python benchmarks/bench_search_step.py --quick             # fewer steps, batch 16 only
    python benchmarks/bench_search_step.py --device cuda --max-batch   # GPU: also the largest batch

Every provider is the driver's own code path: the network is built by the
method's ``build_model``, laid out, recomputed and compiled by the driver's
``_prepare_network`` (--memory-format, --recompute-edges, --compile, --cuda-graphs), and a
step is the method's ``step(train_batch, val_batch)`` (architecture step on a
validation batch, then weight step on a training batch, gradients set to None
as training does), on synthetic CIFAR-sized data (3x32x32, 10 classes).

Providers (PROVIDERS; add one with a line):
- ``eager-nchw``: the eager reference ops (``--backend eager``) on contiguous
  maps, as the DARTS code runs;
- ``eager-nhwc``: the same in channels_last, the best plain PyTorch;
- ``nasops``: the driver's defaults (nasops kernels, --memory-format auto);
- ``nasops-compile``: the same with --compile;
- ``nasops-recompute``: the same with --recompute-edges (memory against time);
  ``nasops-recompute-dw``: with --recompute-depthwise (less memory for less time);
  ``nasops-recompute-large`` (DARTS-space networks): --recompute-edges for the cells
  through the first reduction cell, which hold the largest maps, and
  --recompute-depthwise in the others (the point between the two);
- ``nasops-torch-bn``: nasops' default with PyTorch's BatchNorm in place of the
  search ops' AffineFreeBatchNorm2d (which keeps its output for the backward,
  not its input): what that layer saves in memory, and whether it costs time
  (the same kernels, one C++ autograd node); ``nasops-graphs-torch-bn``: the
  same with --cuda-graphs (the device's time, once the host no longer hides it);
- ``nasops-graphs`` (CUDA): the same with
  --cuda-graphs, the network's forward and backward replayed from CUDA graphs;
  ``nasops-graphs-recompute``: with --recompute-edges too (``-dw``: --recompute-depthwise;
  ``-large``: as ``nasops-recompute-large``); ``nasops-graphs-nhwc``: in
  channels_last (the device's time per layout, once the host no longer hides it);
  ``nasops-graphs-triton-dw``: with the depthwise convolutions (ReLU fused) on
  their Triton kernels, every other op as in ``nasops-graphs`` (``auto`` does not
  pick them on CUDA before this measures them: nasops/ops/depthwise_conv2d.py,
  ``use_depthwise_backend``); ``nasops-triton-dw`` (CUDA): the same without graphs
  (its device time by op, --profile).
On CUDA also ``nasops-nchw`` and ``nasops-nhwc``, which decide --memory-format
auto there (runtime.AUTO_MEMORY_FORMAT). Token networks (DASViT's vit space)
have no layout to choose: ``eager`` replaces the two eager providers there.

Methods (METHODS; a new one joins with a line): the driver flags that select
them and the kind of network (feature maps or tokens), which decides the
default providers: DARTS first and second order, MIDAS and hard exit on the
DARTS space, DASViT on the vit space. DARTS' network is sized by --layers and
--init-channels; the others carry small sizes of their own.

Time: every provider gets its own network (same seed, same initialisation);
after warm-up steps (compilation for ``nasops-compile``), rounds of one step
per provider, the order rotated every round, so a noisy machine slows all
alike; the median per provider is reported, with its ratio to the eager
providers. Memory: a fresh process per provider runs a few steps; on the CPU
its peak resident set size (VmHWM: getrusage's ru_maxrss survives execve and
would report this script's own peak), and the peak during the steps minus the
resident set before the first step (the steps' own working memory); on CUDA
``torch.cuda.max_memory_allocated``. ``--max-batch`` (CUDA) predicts the largest batch
per provider from one step's peak at batch 64, then grows the batch from just
under that by 1/8 until a step runs out of memory and bisects (to ~3 %).

Results replace this script's section of benchmarks/RESULTS.md (between
``<!-- BEGIN search_step <device> -->`` markers) and a plot
benchmarks/search_step_<device>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import nasops  # noqa: E402
from nasops import methods, runtime, search  # noqa: E402
from nasops.spaces.darts import reduction_cells  # noqa: E402
from nasops.spaces.operations import use_depthwise_backend, use_torch_batch_norm  # noqa: E402

# provider -> driver flags that select it
PROVIDERS = {
    "eager-nchw": ["--backend", "eager", "--memory-format", "contiguous"],
    "eager-nhwc": ["--backend", "eager", "--memory-format", "channels_last"],
    "nasops": [],
    "nasops-compile": ["--compile"],
    "nasops-recompute": ["--recompute-edges"],
    "nasops-recompute-dw": ["--recompute-depthwise"],
    "nasops-recompute-large": ["--recompute-edges", "<first stage>", "--recompute-depthwise"],
    "nasops-torch-bn": [],  # + MODEL_CHANGES
    "nasops-graphs-torch-bn": ["--cuda-graphs"],  # + MODEL_CHANGES
    "nasops-graphs": ["--cuda-graphs"],
    "nasops-graphs-recompute": ["--cuda-graphs", "--recompute-edges"],
    "nasops-graphs-recompute-dw": ["--cuda-graphs", "--recompute-depthwise"],
    "nasops-graphs-recompute-large": ["--cuda-graphs", "--recompute-edges", "<first stage>", "--recompute-depthwise"],
    "nasops-graphs-nhwc": ["--cuda-graphs", "--memory-format", "channels_last"],
    "nasops-graphs-triton-dw": ["--cuda-graphs"],  # + MODEL_CHANGES
    "nasops-triton-dw": [],  # + MODEL_CHANGES
    "nasops-nchw": ["--memory-format", "contiguous"],
    "nasops-nhwc": ["--memory-format", "channels_last"],
    "eager": ["--backend", "eager"],  # token spaces: no layout to choose
}
# Providers per kind of network: feature maps (a layout to choose) or tokens (none).
DEFAULT_PROVIDERS = {
    ("maps", "cpu"): ["eager-nchw", "eager-nhwc", "nasops", "nasops-compile", "nasops-recompute",
                      "nasops-recompute-dw", "nasops-recompute-large"],
    ("maps", "cuda"): ["eager-nchw", "eager-nhwc", "nasops-nchw", "nasops-nhwc", "nasops-graphs",
                       "nasops-compile", "nasops-recompute", "nasops-recompute-dw", "nasops-graphs-recompute",
                       "nasops-graphs-recompute-dw", "nasops-graphs-recompute-large"],
    ("tokens", "cpu"): ["eager", "nasops", "nasops-compile", "nasops-recompute"],
    ("tokens", "cuda"): ["eager", "nasops", "nasops-compile", "nasops-recompute"],
}


def _triton_depthwise(net) -> int:
    return use_depthwise_backend(net, "triton")


# Providers whose network the benchmark changes after the method built it.
MODEL_CHANGES = {"nasops-torch-bn": use_torch_batch_norm,
                 "nasops-graphs-torch-bn": use_torch_batch_norm,
                 "nasops-triton-dw": _triton_depthwise,
                 "nasops-graphs-triton-dw": _triton_depthwise}
# Layout providers -> the plain provider a token network (no layout) runs instead.
LAYOUT_PROVIDERS = {"eager-nchw": "eager", "eager-nhwc": "eager", "nasops-nchw": "nasops",
                    "nasops-nhwc": "nasops", "nasops-graphs-nhwc": "nasops-graphs"}
GRAPHED_PROVIDERS = ("nasops-graphs", "nasops-graphs-recompute", "nasops-graphs-recompute-dw",
                     "nasops-graphs-recompute-large",
                     "nasops-graphs-nhwc", "nasops-graphs-torch-bn", "nasops-graphs-triton-dw")
# method -> driver flags, and the kind of network. Methods on the DARTS space take
# their size from --layers and --init-channels (NETWORK, by default the DARTS
# paper's search network: 8 cells, C = 16); the others carry small sizes of
# their own, so that a CPU run stays within minutes.
METHODS = {
    "darts-1st": {"flags": ["--method", "darts", "--space", "darts"], "kind": "maps"},
    "darts-2nd": {"flags": ["--method", "darts", "--space", "darts", "--second-order"], "kind": "maps"},
    # DASViT's search step (benchmarks/dasvit_search_step.py's SMALL): width 64,
    # 4x4 patches of 32x32 (64 tokens + CLS), one stage of depth 2, token ratio 0.5.
    "dasvit": {"flags": ["--method", "dasvit", "--space", "vit", "--embed-dim", "64", "--patch-size", "4",
                         "--stage-depths", "2", "--stage-keep", "--token-ratio", "0.5"], "kind": "tokens", "sized": False},
    # MIDAS on the DARTS network of 5 cells, C = 8 (per-sample, per-patch attention edges, 2x2).
    "midas": {"flags": ["--method", "midas", "--space", "darts", "--layers", "5", "--init-channels", "8"],
              "kind": "maps", "sized": False},
    # hard exit on the DARTS network of 5 cells, C = 8 (per-sample mixing, exit heads).
    "hardexit": {"flags": ["--method", "hardexit", "--space", "darts", "--layers", "5", "--init-channels", "8"],
                 "kind": "maps", "sized": False},
}
NETWORK = {"layers": 8, "init_channels": 16}
IMAGE = (3, 32, 32)
NUM_CLASSES = 10
# Steps before timing: the first ones compile (one graph per requires_grad
# pattern: architecture step, weight step; more for the second order).
WARMUP = {"nasops-compile": 3}
# The CIFAR-10 search of the DARTS paper, for the projection of a whole search.
SEARCH_EPOCHS, SEARCH_STEPS_PER_EPOCH = 50, 25000 // 64


class _Data:
    """What a method's build_model reads of a data set."""
    in_channels, num_classes, image_size = IMAGE[0], NUM_CLASSES, IMAGE[1]
    images = torch.empty(0, *IMAGE)  # hardexit reads the image shape


def method_flags(method: str) -> list[str]:
    """The driver flags of ``method``, with NETWORK's size for the DARTS-space ones."""
    spec = METHODS[method]
    size = ["--layers", str(NETWORK["layers"]), "--init-channels", str(NETWORK["init_channels"])]
    return [*spec["flags"], *(size if spec.get("sized", True) else [])]


def provider_flags(provider: str, method: str) -> list[str]:
    """The driver flags of ``provider`` for ``method``: PROVIDERS', with "<first stage>"
    the number of cells through the first reduction cell of its DARTS network."""
    flags = method_flags(method)
    layers = int(flags[flags.index("--layers") + 1]) if "--layers" in flags else None
    return [str(reduction_cells(layers)[0] + 1) if f == "<first stage>" else f for f in PROVIDERS[provider]]


def method_providers(method: str, device_kind: str, chosen: list[str] | None) -> list[str]:
    """The providers to run for ``method``: ``chosen`` (--providers) or the default
    set of its kind of network. A token network has no layout: there the layout
    providers stand for the plain ones (LAYOUT_PROVIDERS: eager-nchw, eager-nhwc ->
    eager; nasops-nchw, nasops-nhwc -> nasops; nasops-graphs-nhwc -> nasops-graphs). The graphed
    providers run on CUDA only, the ``-large`` ones (the cells through the first reduction) only on
    DARTS-space networks."""
    kind = METHODS[method]["kind"]
    chosen = list(DEFAULT_PROVIDERS[(kind, device_kind)]) if chosen is None else chosen
    if kind == "tokens":
        chosen = [LAYOUT_PROVIDERS.get(p, p) for p in chosen]
    if "--layers" not in method_flags(method):
        chosen = [p for p in chosen if "<first stage>" not in PROVIDERS[p]]
    if device_kind != "cuda":
        chosen = [p for p in chosen if p not in GRAPHED_PROVIDERS]
    return list(dict.fromkeys(chosen))


def build(provider: str, method: str, batch: int, device: torch.device, threads: int | None):
    """(method object, driver args) for ``provider`` x ``method``, as the driver builds them."""
    flags = [*method_flags(method), *provider_flags(provider, method), "--batch-size", str(batch),
             "--device", str(device), "--dataset", "synthetic", "--out", os.devnull]
    if threads:
        flags += ["--threads", str(threads)]
    args = search.parse_args(flags)
    torch.manual_seed(0)
    cls = methods.get(args.method)
    model = cls.build_model(args, _Data()).to(device)
    if provider in MODEL_CHANGES:
        MODEL_CHANGES[provider](model)
    model.train()
    method = cls.from_args(model, args, device=device, amp=None)
    search._prepare_network(method, args, device)
    return method, args


def batches(batch: int, device: torch.device, count: int = 2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, *IMAGE, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g))
            for _ in range(count)]


def run_step(method, args, data, device) -> None:
    """One search step as the driver runs it (backend and layout of the provider)."""
    nasops.set_backend(args.backend)
    fmt = runtime.memory_format(args, device)
    train, val = (search._in_format(b, fmt) for b in data)
    method.step(train, val)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- time: every provider in one process, interleaved ---------------------------------------

def time_providers(providers, method, batch, device, steps, warmup, threads, profile=False):
    """Median-ready step times per provider (and, with ``profile``, where one more
    step's time goes per op category: profile_step)."""
    built = {p: build(p, method, batch, device, threads) for p in providers}
    data = batches(batch, device)
    for p, (m, args) in built.items():
        for _ in range(warmup + WARMUP.get(p, 0)):
            run_step(m, args, data, device)
    times = {p: [] for p in providers}
    for r in range(steps):
        order = providers[r % len(providers):] + providers[:r % len(providers)]
        for p in order:
            m, args = built[p]
            start = time.perf_counter()
            run_step(m, args, data, device)
            times[p].append(time.perf_counter() - start)
        print(f"    round {r + 1}/{steps}: " + ", ".join(f"{p} {times[p][-1]:.2f} s" for p in providers),
              flush=True)
    profiles = {p: profile_step(*built[p], data, device) for p in providers} if profile else None
    nasops.set_backend(None)
    return times, profiles


# Op categories of a step's profile: the first pattern an op's name contains wins.
CATEGORIES = [
    ("convolution", ("convolution", "conv2d", "conv_depthwise", "depthwise")),  # + nasops' Triton kernels
    ("batch norm", ("batch_norm",)),
    ("relu", ("clamp_min", "relu", "threshold_backward")),
    ("pooling", ("pool2d",)),
    ("mixed edge sum (nasops kernels)", ("nasops::", "_MixedOp")),
    ("elementwise mul / add / sum (eager weighted sums, node sums, grad accumulation)",
     ("aten::mul", "aten::add", "aten::sum", "MulBackward", "AddBackward")),
    ("allocation, copies, layout", ("aten::empty", "aten::copy_", "aten::clone", "aten::contiguous",
                                    "aten::fill_", "aten::zero", "aten::resize_")),
]


def profile_step(method, args, data, device) -> dict[str, float]:
    """Self time (CPU; device time on CUDA) of one step by op category, in seconds;
    'total' is the whole step's."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_step(method, args, data, device)
    cuda = device.type == "cuda"
    sums = {name: 0.0 for name, _ in CATEGORIES}
    sums["other"] = 0.0
    total = 0.0
    for event in prof.key_averages():
        t = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
        total += t
        category = next((name for name, patterns in CATEGORIES if any(p in event.key for p in patterns)), "other")
        sums[category] += t
    sums["total"] = total
    return sums


# ---- memory: a fresh process per provider ----------------------------------------------------

def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS
    (Linux: clear_refs 5), so that the steps' peak is not an import's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_memory(provider, method, batch, device, steps, threads) -> dict:
    """Runs in the fresh process: peak memory of ``steps`` steps."""
    m, args = build(provider, method, batch, device, threads)
    data = batches(batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    before = _status_bytes("VmRSS")
    setup_peak = _status_bytes("VmHWM")
    reset = _reset_peak_rss()
    for _ in range(steps + WARMUP.get(provider, 0)):
        run_step(m, args, data, device)
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across execve, so a
    # process started from a big one (this benchmark's parent) reports the
    # parent's peak. VmHWM is this process's own: up to the setup (imports, the
    # network), then, after the reset, the steps'.
    steps_peak = _status_bytes("VmHWM")
    result = {"peak_rss": max(setup_peak, steps_peak) if reset else steps_peak, "rss_before": before,
              "steps_peak_rss": steps_peak if reset else None}
    if device.type == "cuda":
        result.update(peak_cuda=torch.cuda.max_memory_allocated(device), cuda_before=base)
    return result


def measure_memory(provider, method, batch, device, steps, threads) -> dict:
    cmd = [sys.executable, __file__, "--child-memory", provider, method, str(batch), str(device),
           str(steps), str(threads or 0), str(NETWORK["layers"]), str(NETWORK["init_channels"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        out_of_memory = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
        return {"error": "out of memory" if out_of_memory else proc.stderr.strip().splitlines()[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


LARGEST_BATCH_LIMIT = 1 << 15  # --max-batch looks no further


def largest_batch(fits, start: int = 64, limit: int = 1 << 14, resolution: int = 1,
                  growth: float = 2.0) -> int:
    """The largest batch size b <= limit with fits(b), to within ``resolution``
    (the answer is a size that fits, at most resolution - 1 below the true
    largest), assuming fits is monotone (True up to some size, False beyond):
    growing from ``start`` by ``growth`` until a size fails, then bisection.
    0 when not even 1 fits. A ``start`` just under a predicted answer with a
    small ``growth`` needs few calls of ``fits`` (each a fresh process here)."""
    low_fit, high = 0, None
    b = min(start, limit)
    while b <= limit:
        if fits(b):
            low_fit = b
            if b == limit:
                break
            b = min(limit, max(b + 1, int(b * growth)))
        else:
            high = b
            break
    if high is None:
        return low_fit
    lo, hi = low_fit + 1, high  # the largest fit is in [low_fit, high)
    while hi - lo >= resolution:
        mid = (lo + hi) // 2
        if fits(mid):
            low_fit, lo = mid, mid + 1
        else:
            hi = mid
    return low_fit


def predicted_largest_batch(peak_bytes: int, before_bytes: int, batch: int, free_bytes: int) -> int:
    """The batch whose step would fill ``free_bytes``, from one step's peak at ``batch``,
    assuming the step's memory above ``before_bytes`` (what was allocated before it:
    the network's weights) grows in proportion to the batch (activations do; the
    optimizer state the first step creates is small beside them)."""
    per_sample = max(1, peak_bytes - before_bytes) / batch
    return max(1, int((free_bytes - before_bytes) / per_sample))


# ---- report ----------------------------------------------------------------------------------

def fmt_mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _plotted_memory(m: dict) -> float:
    """CUDA: max_memory_allocated; CPU: the steps' own peak resident memory."""
    if not m or "error" in m:
        return 0
    if "peak_cuda" in m:
        return m["peak_cuda"]
    return (m.get("steps_peak_rss") or m["peak_rss"]) - m["rss_before"]


def plot(results: dict, path: Path, device_kind: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    providers = sorted({p for k in keys for p in results[k]["time"]}, key=list(PROVIDERS).index)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        xs = [j + i * width for j in range(len(keys))]
        axes[0].bar(xs, [statistics.median(results[k]["time"][p]) if p in results[k]["time"] else 0
                         for k in keys], width, label=p)
        mem = [results[k]["memory"].get(p, {}) for k in keys]
        axes[1].bar(xs, [_plotted_memory(m) / 2**20 for m in mem], width, label=p)
    for ax, title in zip(axes, ["step time (s, median)", "steps' peak memory (MiB)"]):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{m}\nbatch {b}" for m, b in keys], fontsize=8)
        ax.set_title(f"search step on {device_kind}: {title}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tables(results: dict, cuda: bool) -> tuple[list[str], list[str]]:
    """Markdown lines of the time and the memory tables, one pair per set of
    providers (methods of one kind of network share theirs)."""
    groups: dict[tuple, list] = {}
    for key, res in results.items():
        groups.setdefault(tuple(res["time"]), []).append((key, res))
    time_lines, memory_lines = [], []
    for providers, entries in groups.items():
        providers = list(providers)
        base = "eager-nchw" if "eager-nchw" in providers else providers[0]
        best_eager = "eager-nhwc" if "eager-nhwc" in providers else base
        vs_best = [p for p in providers if p.startswith("nasops")] if best_eager != base else []
        header = ["method", "batch"] + [f"{p} s" for p in providers] + [
            f"{p} x {base}" for p in providers if p != base] + [f"{p} x {best_eager}" for p in vs_best]
        mem_header = ["method", "batch"] + [f"{p} MiB" for p in providers]
        rows, mem_rows = [], []
        for (method, batch), res in entries:
            med = {p: statistics.median(res["time"][p]) for p in providers}
            rows.append([method, str(batch)] + [f"{med[p]:.3f}" for p in providers]
                        + [f"{med[base] / med[p]:.2f}" for p in providers if p != base]
                        + [f"{med[best_eager] / med[p]:.2f}" for p in vs_best])
            cells = []
            for p in providers:
                m = res["memory"].get(p)
                if not m:
                    cells.append("n/a")
                elif "error" in m:
                    cells.append(m["error"])
                elif cuda:
                    cells.append(fmt_mib(m["peak_cuda"]))
                else:
                    steps_peak = m.get("steps_peak_rss") or m["peak_rss"]
                    cells.append(f"{fmt_mib(m['peak_rss'])} ({fmt_mib(steps_peak - m['rss_before'])})")
            mem_rows.append([method, str(batch)] + cells)
        time_lines += [table(rows, header), ""]
        memory_lines += [table(mem_rows, mem_header), ""]
    return time_lines[:-1], memory_lines[:-1]


# The recomputing providers, each against nasops' default (its flags name it in the table).
RECOMPUTE_PROVIDERS = ("nasops-recompute", "nasops-recompute-dw", "nasops-recompute-large")


def _recompute_table(results: dict, cuda: bool) -> list[str]:
    """Markdown lines of the recomputing providers against nasops' default (issue
    14's trade-off: peak memory against step time), for the results that ran them.

    The time ratio is taken per round, then its median: a round runs both
    providers back to back, so a machine that speeds up or slows down between
    rounds moves both alike (the ratio of the two medians may pair steps of
    different rounds)."""
    # On CUDA the maps' providers name their layout: the default is --memory-format auto's.
    auto_layout = runtime.AUTO_MEMORY_FORMAT["cuda" if cuda else "cpu"]
    rows = []
    for (method, batch), res in results.items():
        times = res["time"]
        default = "nasops" if "nasops" in times else \
            "nasops-nhwc" if auto_layout == "channels_last" else "nasops-nchw"
        for provider in RECOMPUTE_PROVIDERS:
            if default not in times or provider not in times:
                continue
            flag = " ".join(provider_flags(provider, method))
            ratios = [r / n for n, r in zip(times[default], times[provider])]
            peaks = []
            for p in (default, provider):
                m = res["memory"].get(p) or {}
                peaks.append(m.get("peak_cuda" if cuda else "peak_rss"))
            less = (f"{100 * (1 - peaks[1] / peaks[0]):.0f} %"
                    if all(isinstance(v, int) and v > 0 for v in peaks) else "n/a")
            rows.append([method, str(batch), flag, f"{statistics.median(ratios):.2f}",
                         f"{min(ratios):.2f}-{max(ratios):.2f} ({len(ratios)})",
                         f"{statistics.median(times[provider]) / statistics.median(times[default]):.2f}",
                         less])
    if not rows:
        return []
    return ["", "Recomputation against nasops' default (`nasops`; on CUDA the provider of "
            "--memory-format auto's layout): step time ratio per round (median, and "
            "range over the rounds), the ratio of the two medians, and how much less peak memory "
            + ("(`max_memory_allocated`)." if cuda else "(the process's peak resident set)."), "",
            table(rows, ["method", "batch", "flag", "recompute x nasops, per round", "range (rounds)",
                         "ratio of medians", "less peak memory"])]


def report(results: dict, device: torch.device, command: str, quick: bool,
           threads: int | None, max_batches: dict | None, plot_name: str | None = None) -> str:
    """This script's RESULTS.md section. ``results``: (method, batch) -> {"time":
    {provider: [seconds]}, "memory": {provider: {...}}, "profile": ...}; the
    providers of a result are its "time" keys, in order. ``plot_name``: the
    plot's file name (default search_step_<device>.png)."""
    import datetime

    import harness
    from report import versions

    kind = device.type
    cuda = kind == "cuda"
    time_tables, memory_tables = _tables(results, cuda)
    others = [f"{m}: `{' '.join(method_flags(m))}`" for m in dict.fromkeys(m for m, _ in results)
              if not METHODS[m].get("sized", True)]
    lines = [
        f"<!-- BEGIN search_step {kind} -->",
        f"## Search step on {kind} (bench_search_step.py)",
        "",
        "The whole search step of `python -m nasops.search` (see the script's docstring): "
        "median seconds per step, interleaved rounds; `x` columns are speed-ups (higher is "
        "better) over eager channels-first and over eager channels_last (token networks: over eager).",
        "",
        f"- device: {harness.device_name(str(device))}",
        f"- versions: {versions()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`" + (" (quick)" if quick else ""),
        f"- threads: {threads or torch.get_num_threads()}; glibc tunables: "
        + (" ".join(f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
                    if k in os.environ) or "none"),
        f"- network: DARTS space {NETWORK['layers']} cells, C = {NETWORK['init_channels']}"
        + (f"; {'; '.join(others)}" if others else "") + f"; synthetic "
        f"{IMAGE[0]}x{IMAGE[1]}x{IMAGE[2]} images, {NUM_CLASSES} classes; float32",
        f"- plot: `{plot_name or f'search_step_{kind}.png'}`",
        "",
        *time_tables,
        "",
        "Peak memory, a fresh process per provider: "
        + ("`torch.cuda.max_memory_allocated`." if cuda else
           "peak resident set size of the process (its VmHWM, imports included); in "
           "parentheses the steps' own memory: the peak during the steps (VmHWM, reset before "
           "the first step) minus the resident set before it."),
        "",
        *memory_tables,
        *_recompute_table(results, cuda),
    ]
    if cuda:
        proj = []
        for (method, batch), res in results.items():
            for p in res["time"]:
                hours = statistics.median(res["time"][p]) * SEARCH_STEPS_PER_EPOCH * SEARCH_EPOCHS / 3600
                proj.append([method, str(batch), p, f"{hours:.2f}"])
        lines += ["", f"A whole search projected from the step time: {SEARCH_EPOCHS} epochs of "
                  f"{SEARCH_STEPS_PER_EPOCH} steps (CIFAR-10, 25,000 + 25,000 images, batch 64).", "",
                  table(proj, ["method", "batch", "provider", "GPU-hours"])]
    for (method, batch), res in results.items():
        if res.get("profile"):
            prof = res["profile"]
            providers = list(res["time"])
            cats = [name for name, _ in CATEGORIES] + ["other"]
            prows = [[c] + [f"{prof[p][c]:.2f} ({100 * prof[p][c] / prof[p]['total']:.0f} %)" for p in providers]
                     for c in cats]
            prows.append(["total (profiled step)"] + [f"{prof[p]['total']:.2f}" for p in providers])
            lines += ["", f"Where one step's time goes, {method}, batch {batch} (torch.profiler, self "
                      f"{'device' if cuda else 'CPU'} seconds by op category; the profiler slows the "
                      f"step):", "", table(prows, ["category"] + providers)]
    if max_batches:
        lines += ["", "Largest batch that fits (predicted from one step's peak at batch 64, then tried "
                  "from 0.9x the prediction growing by 1/8 and bisected to ~3 %; one step in a fresh "
                  "process per try):", "",
                  table([[m, p, str(b)] for (m, p), b in max_batches.items()], ["method", "provider", "batch"])]
    lines.append(f"<!-- END search_step {kind} -->")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-memory":
        provider, method, batch, device, steps, threads, layers, channels = argv[1:9]
        NETWORK.update(layers=int(layers), init_channels=int(channels))
        threads = int(threads) or None
        if threads:
            torch.set_num_threads(threads)
        print(json.dumps(child_memory(provider, method, int(batch), torch.device(device), int(steps), threads)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=None)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                        help="default: 16 64 on the CPU, 64 on CUDA; --quick: 16 (CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 5, --quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per provider first")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of each memory process")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--max-batch", action="store_true", help="CUDA: the largest batch per provider")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default torch's)")
    parser.add_argument("--layers", type=int, default=NETWORK["layers"], help="cells of the search network")
    parser.add_argument("--init-channels", type=int, default=NETWORK["init_channels"], help="its C")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step per provider: its time by op category")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=None, help="default: search_step_<device>.png beside --out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    kind = device.type
    NETWORK.update(layers=args.layers, init_channels=args.init_channels)
    batches_ = args.batch_sizes or ([16] if args.quick and kind == "cpu" else [16, 64] if kind == "cpu" else [64])
    steps = args.steps or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_search_step.py " + " ".join(argv)
    results = {}
    for method in args.methods:
        providers = method_providers(method, kind, args.providers)
        for batch in batches_:
            print(f"{method}, batch {batch}:", flush=True)
            times, profiles = time_providers(providers, method, batch, device, steps, args.warmup, args.threads,
                                             profile=args.profile)
            memory = {} if args.no_memory else {
                p: measure_memory(p, method, batch, device, args.memory_steps, args.threads) for p in providers}
            results[(method, batch)] = {"time": times, "memory": memory, "profile": profiles}
            print("  median: " + ", ".join(f"{p} {statistics.median(t):.3f} s" for p, t in times.items())
                  + ("\n  memory: " + json.dumps(memory) if memory else ""), flush=True)
    max_batches = None
    if args.max_batch and kind == "cuda":
        max_batches = {}
        torch.cuda.empty_cache()  # the timed networks' cached blocks would shrink every child's room
        for method in args.methods:
            for p in method_providers(method, kind, args.providers):
                def fits(b, p=p, method=method):
                    return "error" not in measure_memory(p, method, b, device, 1, args.threads)
                # Predicted from one step's peak at batch 64, then checked: starting just
                # under the prediction and growing by 1/8 takes ~5 fresh processes, not the
                # ~12 of doubling from 64 (each several seconds of a device session).
                probe = measure_memory(p, method, 64, device, 1, args.threads)
                start, resolution = 64, 8
                if "error" not in probe:
                    free, _ = torch.cuda.mem_get_info(device)
                    guess = predicted_largest_batch(probe["peak_cuda"], probe["cuda_before"], 64, free)
                    start = min(LARGEST_BATCH_LIMIT, max(8, int(0.9 * guess) // 8 * 8))
                    resolution = max(8, start // 32)
                    print(f"  predicted largest batch {method} {p}: {guess}", flush=True)
                max_batches[(method, p)] = largest_batch(fits, start=start, limit=LARGEST_BATCH_LIMIT,
                                                         resolution=resolution, growth=1.125)
                print(f"  largest batch {method} {p}: {max_batches[(method, p)]}", flush=True)
    from report import update_results
    plot_path = args.plot or args.out.parent / f"search_step_{kind}.png"
    body = report(results, device, command.strip(), args.quick, args.threads, max_batches, plot_path.name)
    update_results(args.out, {("search_step", kind): body})
    plot(results, plot_path, kind)
    print(f"wrote {args.out} and {plot_path}")


if __name__ == "__main__":
    main()
