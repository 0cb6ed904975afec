"""The train step of ``python -m nasops.train``, side by side per layout: what a user
training a found cell from scratch waits for (the longest part of a NAS run: DARTS
trains its cell for 600 epochs).

    python benchmarks/bench_train_step.py            # this machine's device; writes RESULTS.md
    python benchmarks/bench_train_step.py --quick    # fewer rounds, the small networks only

Every provider builds its network as ``nasops.train`` does (``KINDS[space].build``
with the sizes below), lays it out and times ``nasops.train.train_step``: the
forward (with the auxiliary head and drop-path where the kind has them), the
cross-entropy, the backward, gradient clipping and the optimizer's step, the
gradients set to None first. Synthetic batches; one network per provider (same
seed, same initialisation).

Providers (PROVIDERS): ``torch-nchw``, PyTorch's ops for every nasops op
(``nasops.set_backend("eager")``) on contiguous maps, as DARTS' ``train.py``
runs; ``torch-nhwc``, the same in channels_last; ``nasops-nchw``, nasops' ops on
contiguous maps (``nasops.train`` before --memory-format: the CPU depthwise
kernel takes channels_last maps only, so PyTorch's convolution ran);
``nasops-nhwc``, in channels_last: ``--memory-format auto`` on the CPU. On CUDA also
``nasops-graphs-nchw`` and ``nasops-graphs-nhwc``: the same with the network's
forward and backward replayed from CUDA graphs, as ``nasops.train --cuda-graphs``
graphs it (``nasops.train.graph_training``; the optimizer step and clipping stay
eager): how far the train step is bound by the host. Graphs replay float32 only
(no ``--amp``).

Networks (NETWORKS): DARTS-V2's cell (Liu et al., 2019) and NAS-Bench-201's best
CIFAR-10 cell, at the digits recipe (8x8, one thread: nasops.train's default
there) and CIFAR-sized; ``--full`` adds DARTS' CIFAR-10 recipe (20 cells, C = 36,
batch 96). Time: one untimed step per provider, then rounds of one step per
provider in rotating orders (``harness.provider_orders``), medians, and the
ratio of nasops-nhwc to nasops-nchw per round. Results replace this script's
section of benchmarks/RESULTS.md (``<!-- BEGIN train_step <device> -->``; with
``--amp``: ``<device>-amp``). On CUDA its contiguous and channels_last rows decide
``--memory-format auto`` there (``nasops.runtime.AUTO_MEMORY_FORMAT``).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import harness  # noqa: E402
import nasops  # noqa: E402
from nasops.spaces.discrete import DARTS_V2  # noqa: E402
from nasops.train import KINDS, graph_training, train_step  # noqa: E402

# provider -> (nasops backend, layout, replayed from CUDA graphs)
PROVIDERS = {
    "torch-nchw": ("eager", torch.contiguous_format, False),
    "torch-nhwc": ("eager", torch.channels_last, False),
    "nasops-nchw": (None, torch.contiguous_format, False),
    "nasops-nhwc": (None, torch.channels_last, False),
    "nasops-graphs-nchw": (None, torch.contiguous_format, True),  # CUDA
    "nasops-graphs-nhwc": (None, torch.channels_last, True),  # CUDA
}
GRAPHED = [p for p, (_, _, graphed) in PROVIDERS.items() if graphed]
NB201_BEST = {"arch": "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|"
                      "nor_conv_3x3~2|"}
# name -> space, genotype, sizes (layers, C, image channels and side, batch), threads (None: torch's)
NETWORKS = {
    "darts-v2 digits": ("darts", DARTS_V2, dict(layers=5, C=16, channels=1, side=8, batch=64), 1),
    "darts-v2 8 cells": ("darts", DARTS_V2, dict(layers=8, C=16, channels=3, side=32, batch=64), None),
    "nb201-best digits": ("nb201", NB201_BEST, dict(layers=2, C=16, channels=1, side=8, batch=64), 1),
    "nb201-best cifar": ("nb201", NB201_BEST, dict(layers=5, C=16, channels=3, side=32, batch=64), None),
    "darts-v2 cifar recipe": ("darts", DARTS_V2, dict(layers=20, C=36, channels=3, side=32, batch=96), None),
}
QUICK = ("darts-v2 digits", "nb201-best digits")
FULL_ONLY = ("darts-v2 cifar recipe",)
# DARTS' CIFAR-10 recipe: SGD, auxiliary head 0.4, drop-path (0.2 at the end: 0.1 mid-run), clip 5.
RECIPE = dict(lr=0.025, momentum=0.9, weight_decay=3e-4, auxiliary_weight=0.4, drop_path=0.1, grad_clip=5.0)


def build(network: str, provider: str, device: torch.device, amp: torch.dtype | None = None,
          graph_options: dict | None = None):
    """``step()``, one train_step of ``provider`` on ``network`` (under ``amp``'s
    autocast, as ``nasops.train --amp``: float16 with a gradient scaler on CUDA,
    bfloat16 on the CPU; None: float32). A graphed provider's ``step.graphed`` is
    its :class:`~nasops.cuda_graphs.GraphedForward` (``graph_options``: its
    options; the tests' CPU stand-in)."""
    space, genotype, sizes, _ = NETWORKS[network]
    backend, layout, graphed = PROVIDERS[provider]
    torch.manual_seed(0)
    args = argparse.Namespace(init_channels=sizes["C"], layers=sizes["layers"], auxiliary_weight=0.4)
    data = argparse.Namespace(in_channels=sizes["channels"], num_classes=10)
    model = KINDS[space].build(space, genotype, args, data).to(device, memory_format=layout).train()
    if hasattr(model, "drop_path_prob"):
        model.drop_path_prob = RECIPE["drop_path"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=RECIPE["lr"], momentum=RECIPE["momentum"],
                                weight_decay=RECIPE["weight_decay"])
    replay = graph_training(model, optimizer, **(graph_options or {})) if graphed else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    g = torch.Generator().manual_seed(1)
    shape = (sizes["batch"], sizes["channels"], sizes["side"], sizes["side"])
    x = torch.randn(shape, generator=g).to(device).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (sizes["batch"],), generator=g).to(device)

    def step():
        nasops.set_backend(backend)
        try:
            train_step(model, x, y, optimizer=optimizer, scaler=scaler, amp=amp,
                       auxiliary_weight=RECIPE["auxiliary_weight"], grad_clip=RECIPE["grad_clip"], params=params)
        finally:
            nasops.set_backend(None)
        harness.sync(str(device))
    step.graphed = replay
    return step


def time_network(network: str, providers, device: torch.device, rounds: int,
                 amp: torch.dtype | None = None) -> dict[str, list[float]]:
    threads = NETWORKS[network][3]
    saved = torch.get_num_threads()
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        steps = {p: build(network, p, device, amp) for p in providers}
        for step in steps.values():  # warm-up: first touches, optimizer state
            step()
        times = {p: [] for p in providers}
        for order in harness.provider_orders(list(providers), rounds):
            for p in order:
                start = time.perf_counter()
                steps[p]()
                times[p].append(time.perf_counter() - start)
        return times
    finally:
        torch.set_num_threads(saved)


def _graph_pairs(providers) -> list[tuple[str, str]]:
    """(graphed provider, the same provider without graphs) for the columns of the graphs' speed-up."""
    return [(p, p.replace("-graphs", "")) for p in providers if p in GRAPHED and p.replace("-graphs", "") in providers]


def report(results: dict, device: torch.device, command: str, amp: torch.dtype | None = None) -> str:
    kind = device.type + ("-amp" if amp else "")
    providers = list(next(iter(results.values())))
    rows = []
    for network, times in results.items():
        med = {p: statistics.median(t) for p, t in times.items()}
        row = [network, NETWORKS[network][3] or torch.get_num_threads()]
        row += [f"{med[p]:.4f}" for p in providers]
        for base in ("torch-nchw", "torch-nhwc", "nasops-nchw"):
            if base in med and "nasops-nhwc" in med:
                row.append(f"{med[base] / med['nasops-nhwc']:.2f}")
        if "nasops-nchw" in times and "nasops-nhwc" in times:
            per_round = [a / b for a, b in zip(times["nasops-nchw"], times["nasops-nhwc"])]
            row.append(f"{statistics.median(per_round):.2f} ({min(per_round):.2f}-{max(per_round):.2f})")
        row += [f"{med[eager] / med[graphed]:.2f}" for graphed, eager in _graph_pairs(providers)]
        rows.append(row)
    header = ["network", "threads", *(f"{p} s" for p in providers)]
    header += [f"nasops-nhwc x {b}" for b in ("torch-nchw", "torch-nhwc", "nasops-nchw")
               if b in providers and "nasops-nhwc" in providers]
    if "nasops-nchw" in providers and "nasops-nhwc" in providers:
        header.append("per round (range)")
    header += [f"{graphed} x {eager}" for graphed, eager in _graph_pairs(providers)]
    sizes = "; ".join(f"{n}: {NETWORKS[n][2]['layers']} cells{' per stage' if NETWORKS[n][0] == 'nb201' else ''}, "
                      f"C = {NETWORKS[n][2]['C']}, "
                      f"{NETWORKS[n][2]['channels']}x{NETWORKS[n][2]['side']}x{NETWORKS[n][2]['side']}, "
                      f"batch {NETWORKS[n][2]['batch']}" for n in results)
    lines = [
        f"<!-- BEGIN train_step {kind} -->",
        f"## Train step on {kind} (bench_train_step.py)",
        "",
        "One step of `python -m nasops.train` (`nasops.train.train_step`: forward with the auxiliary head "
        "and drop-path 0.1, backward, clipping, SGD) on the found network; median seconds per step over "
        "interleaved rounds, `x` columns are speed-ups of nasops' default on this device (higher is "
        "better); see the script's docstring.",
        "",
        f"- device: {harness.device_name(str(device))}",
        f"- versions: torch {torch.__version__}, nasops {nasops.__version__}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`",
        f"- networks: {sizes}; " + (f"autocast {str(amp).removeprefix('torch.')} (--amp)" if amp else "float32"),
        "",
        harness.markdown_table(header, rows),
        f"<!-- END train_step {kind} -->",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=None,
                        help="default: all but the CIFAR recipe (--full: all; --quick: the digits ones)")
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=None,
                        help="default: all that run on the device (graphs: CUDA, float32)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, --quick 3)")
    parser.add_argument("--amp", action="store_true",
                        help="as nasops.train --amp: float16 autocast and a gradient scaler on CUDA, bfloat16 "
                             "on the CPU (its own section, train_step <device>-amp)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    networks = args.networks or [n for n in NETWORKS if (n in QUICK if args.quick else
                                                         args.full or n not in FULL_ONLY)]
    rounds = args.rounds or (3 if args.quick else 7)
    amp = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None
    graphs_run = device.type == "cuda" and amp is None
    providers = args.providers or [p for p in PROVIDERS if graphs_run or p not in GRAPHED]
    refused = [p for p in providers if p in GRAPHED and not graphs_run]
    if refused:
        parser.error(f"--providers {' '.join(refused)}: CUDA graphs need --device cuda and replay float32 "
                     f"(not with --amp)")
    results = {}
    for network in networks:
        results[network] = time_network(network, providers, device, rounds, amp)
        print(f"{network}: " + ", ".join(f"{p} {statistics.median(t):.4f} s" for p, t in results[network].items()),
              flush=True)
    from report import update_results
    command = ("python benchmarks/bench_train_step.py " + " ".join(argv)).strip()
    body = report(results, device, command, amp)
    update_results(args.out, {("train_step", device.type + ("-amp" if amp else "")): body})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
