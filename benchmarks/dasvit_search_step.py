"""DASViT search step: memory and time at token ratio 0.5 vs 1.0 vs eager literal selection.

A step is what ``python -m nasops.search --method dasvit`` runs per batch
(:meth:`nasops.methods.dasvit.DasVit.step`): an architecture step on a
validation batch (forward, backward to the alphas, fairness loss, Adam) and a
weight step on a training batch (forward, backward, AdamW), on the first
stage's network (all 8 ops on every edge). Providers:

- ``ratio-1.0``: no token selection (plain DARTS mixed edges);
- ``ratio-0.5``: partial token selection with :func:`nasops.ops.topk_tokens`
  (the O(N*D) score, ``--backend``'s kernel);
- ``ratio-0.5-literal``: the same selection written as DASViT's formula reads,
  in eager PyTorch: the N x N score matrix ``Q K^T / sqrt(C)``, its mean over
  the keys, ``topk``, gather, straight-through gate.

Memory: each provider in a fresh process (``--child``) that builds the
network, the method and the batches and notes its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``; on CUDA
``torch.cuda.max_memory_allocated``): ``start``. It then takes one step on a
batch of 2, which allocates the gradients and the optimizers' state and
initialises the libraries (``warm``), and two steps on the full batches
(``peak``). ``step = peak - warm`` is what a search step needs on top of the
model, its gradients and optimizer state (activations, their gradients,
temporaries): what the token ratio acts on; ``total = peak - start`` adds the
gradients and optimizer state. On the CPU the children run with a fixed glibc
mmap threshold (``MALLOC_MMAP_THRESHOLD_``): large blocks are then always
mapped and unmapped, so the RSS follows the live memory instead of glibc's
adaptive threshold (which moved the ratio-1.0 step by +-7 % between runs).
Time: the providers in one process, one untimed step each, then steps
interleaved round-robin (rotating order); medians and ratios.

    python benchmarks/dasvit_search_step.py                      # CPU, small width, writes RESULTS.md
    python benchmarks/dasvit_search_step.py --device cuda --vit-base   # ViT-B width on a GPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import harness  # noqa: E402
import nasops  # noqa: E402
import nasops.ops  # noqa: E402
from nasops.methods.dasvit import DasVit  # noqa: E402
from nasops.ops.topk_tokens import resolve_keep  # noqa: E402
from nasops.spaces.vit import VitSearchNetwork  # noqa: E402

PROVIDERS = ("ratio-1.0", "ratio-0.5", "ratio-0.5-literal")
RESULTS = HERE / "RESULTS.md"
MMAP_THRESHOLD = 1 << 16  # bytes; a fixed value also switches glibc's adaptive threshold off
SMALL = dict(embed_dim=64, depth=2, image_size=32, patch_size=4, batch_size=64)  # DASViT searches with batch 64
VIT_BASE = dict(embed_dim=768, depth=2, image_size=224, patch_size=16, batch_size=64)


# ---- the eager literal selection (DASViT eqs. 13-15 as written) ---------------------------

def literal_topk_tokens(x, q, k, keep, *, keep_cls=True, gate="straight_through", backend=None):
    """topk_tokens's contract, computed through the (B, N, N) score matrix."""
    n = x.shape[1]
    keep = resolve_keep(keep, n)
    scores = (q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])).mean(dim=-1)  # (B, N)
    first = 1 if keep_cls else 0
    top = torch.topk(scores[:, first:].detach(), keep - first, dim=1).indices + first
    if keep_cls:
        top = torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)
    idx = torch.sort(top, dim=1).values
    x_sel = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    s_sel = torch.gather(scores, 1, idx).unsqueeze(-1)
    if gate == "straight_through":
        x_sel = x_sel * (1 + s_sel - s_sel.detach()).to(x.dtype)
    elif gate == "sigmoid":
        x_sel = x_sel * torch.sigmoid(s_sel).to(x.dtype)
    return x_sel, idx, scores.to(x.dtype)


# ---- one provider's search ----------------------------------------------------------------

def make_search(provider: str, cfg: dict, device: torch.device, seed: int = 0):
    """(method, train batch, val batch) of ``provider`` at sizes ``cfg``."""
    torch.manual_seed(seed)
    ratio = 1.0 if provider == "ratio-1.0" else 0.5
    model = VitSearchNetwork(in_channels=3, num_classes=10, embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                             image_size=cfg["image_size"], patch_size=cfg["patch_size"],
                             token_ratio=ratio).to(device)
    method = DasVit(model, epochs=1, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (cfg["batch_size"], 3, cfg["image_size"], cfg["image_size"])
    batches = [(torch.randn(shape, generator=g).to(device), torch.randint(0, 10, (shape[0],), generator=g)
                .to(device)) for _ in range(2)]
    return method, batches[0], batches[1]


def run_step(provider: str, method, train, val) -> None:
    original = nasops.ops.topk_tokens
    if provider.endswith("literal"):
        nasops.ops.topk_tokens = literal_topk_tokens
    try:
        method.step(train, val)
    finally:
        nasops.ops.topk_tokens = original
    if method.device.type == "cuda":
        torch.cuda.synchronize(method.device)


def _memory_mark(device: torch.device) -> int:
    """The peak so far (CPU: the process's peak RSS); on CUDA the memory held now,
    and the peak statistics restart from it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(provider: str, cfg: dict, device: torch.device) -> dict:
    """Memory of ``provider``'s steps in this (fresh) process (see the module docstring)."""
    method, train, val = make_search(provider, cfg, device)
    start = _memory_mark(device)
    run_step(provider, method, tuple(t[:2] for t in train), tuple(t[:2] for t in val))
    warm = _memory_mark(device)
    for _ in range(2):
        run_step(provider, method, train, val)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"provider": provider, "start": start, "warm": warm, "peak": peak, "step": peak - warm,
            "total": peak - start}


def measure_memory(providers, cfg, device, backend, threads) -> dict:
    results = {}
    for provider in providers:
        cmd = [sys.executable, __file__, "--child", provider, "--device", str(device), "--backend", backend,
               "--config", json.dumps(cfg)]
        if threads:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ)
        if device.type == "cpu":
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{provider}: the memory run failed:\n{proc.stderr[-3000:]}")
        results[provider] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def measure_time(providers, cfg, device, reps: int) -> dict:
    searches = {p: make_search(p, cfg, device) for p in providers}
    for p in providers:  # settle: first-touch allocations, optimizer state
        run_step(p, *searches[p])
    times = {p: [] for p in providers}
    for r in range(reps):
        order = providers[r % len(providers):] + providers[:r % len(providers)]
        for p in order:
            start = time.perf_counter()
            run_step(p, *searches[p])
            times[p].append(time.perf_counter() - start)
    return times


# ---- the report --------------------------------------------------------------------------

def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def section(kind, cfg, device, backend, memory, times, command) -> str:
    tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
    base_step, base_total = memory["ratio-1.0"]["step"], memory["ratio-1.0"]["total"]
    base_time = statistics.median(times["ratio-1.0"])
    if kind == "cuda":
        how = "`torch.cuda.max_memory_allocated` above the memory held before"
    else:
        how = (f"peak RSS (`ru_maxrss`) above its value before, glibc mmap threshold fixed at "
               f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', MMAP_THRESHOLD)} B")
    lines = [
        f"<!-- BEGIN dasvit-search-step {kind} -->",
        f"## DASViT search step on {kind}",
        "",
        f"- Device: {harness.device_name(str(device))} ({os.cpu_count()} cores); torch {torch.__version__}, "
        f"nasops {nasops.__version__}, Python {platform.python_version()}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `{command}`",
        f"- Network: the first stage (depth {cfg['depth']}, 2 nodes, 5 edges per encoder, all 8 ops), "
        f"embed dim {cfg['embed_dim']}, {cfg['image_size']}x{cfg['image_size']}x3 images, patch "
        f"{cfg['patch_size']} ({tokens} tokens), batch {cfg['batch_size']} (train and validation), "
        f"first order, fp32, topk_tokens backend `{backend}`",
        f"- Step = architecture step + weight step (`DasVit.step`). Memory, each provider in a fresh "
        f"process: {how}. `step`: two steps after a warm-up step on 2 samples (which allocated the "
        f"gradients and optimizer state); `total`: from before the warm-up (gradients and optimizer "
        f"state included). Time: median of {len(times['ratio-1.0'])} interleaved steps per provider.",
        "",
        "| provider | step MiB | x ratio-1.0 | total MiB | x ratio-1.0 | median step ms | x ratio-1.0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in PROVIDERS:
        m, t = memory[p], statistics.median(times[p])
        lines.append(f"| {p} | {_mib(m['step'])} | {m['step'] / base_step:.2f} | {_mib(m['total'])} | "
                     f"{m['total'] / base_total:.2f} | {1e3 * t:.1f} | {t / base_time:.2f} |")
    lines.append(f"<!-- END dasvit-search-step {kind} -->")
    return "\n".join(lines)


def update_results(path: Path, kind: str, body: str) -> None:
    import report  # the marker-section writer of the op benchmarks

    report.update_results(path, {("dasvit-search-step", kind): body})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", help="nasops backend for topk_tokens and mixed_op")
    parser.add_argument("--vit-base", action="store_true",
                        help=f"ViT-Base width: {VIT_BASE} (default: {SMALL})")
    parser.add_argument("--config", default=None, help="JSON of the sizes (overrides)")
    parser.add_argument("--reps", type=int, default=7, help="timed steps per provider")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file ('-': print only)")
    parser.add_argument("--child", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = dict(VIT_BASE if args.vit_base else SMALL)
    if args.config:
        cfg.update(json.loads(args.config))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend != "auto":
        nasops.set_backend(args.backend)
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(child(args.child, cfg, device)))
        return
    memory = measure_memory(list(PROVIDERS), cfg, device, args.backend, args.threads)
    times = measure_time(list(PROVIDERS), cfg, device, args.reps)
    command = "python benchmarks/dasvit_search_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    kind = "cuda" if device.type == "cuda" else "cpu"
    body = section(kind, cfg, device, args.backend, memory, times, command.strip())
    print(body)
    if str(args.out) != "-":
        update_results(args.out, kind, body)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
