"""The search driver: ``python -m nasops.search [flags]`` (or ``nasops-search``).

With no flags it runs a short first-order DARTS search of the DARTS cell on
scikit-learn's 8x8 digits (no download) in about two minutes on a 2-core CPU,
and writes its results to ``runs/<space>-<method>-<seed>`` (``runs/darts-darts-0``):

- ``genotype.json``  the found architecture (space, method, genotype, its
  string, seed, full config; NB201 accuracies with ``--nb201-table``);
- ``cell_<type>.png`` the picture of each searched cell, ``weights_<type>.png``
  the heatmap of its edges' op weights;
- ``metrics.jsonl``  one JSON object per epoch: losses, accuracies, lr, time,
  throughput, the current genotype and the op-weight table of every edge;
- ``checkpoint.pt``  everything needed to resume, rewritten atomically after
  every epoch.

``torchrun --nproc_per_node=N -m nasops.search ...`` runs data parallel (gloo on
CPU, nccl on CUDA): each rank sees its shard of every batch, all gradients
(weights and architecture) are averaged, only rank 0 writes, every rank ends with
the same architecture. ``main(argv)`` runs the same in-process and returns the
result (genotype, metrics, output folder).

See README.md, "The search driver", for every flag.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import nasops
from nasops import data as datasets
from nasops import methods, spaces
from nasops.spaces import nb201
from nasops.backend import resolve

# What a search that needs no flags runs: sized to take about two minutes on a
# 2-core CPU with the digits (measured in README.md).
DEFAULTS = dict(space="darts", method="darts", dataset="digits", epochs=6, batch_size=64, init_channels=8)
# --layers when not given: darts/rdarts count cells (DARTS searches with 8), nb201
# counts cells per stage (NB201 has 5, times 3 stages).
QUICK_LAYERS = {"nb201": 2}
QUICK_LAYERS_OTHER = 5

# Settings that may differ between a run and its resumption: where and how it
# runs, not what it computes.
RUNTIME_KEYS = ("out", "resume", "overwrite", "device", "backend", "data_dir", "nb201_table", "quiet",
                "deterministic", "threads")

OUTPUT_FILES = ("genotype.json", "metrics.jsonl", "checkpoint.pt")
OUTPUT_PATTERNS = ("cell_*.png", "weights_*.png", "checkpoint.pt.tmp*")

# Test hooks (environment variables, used by tests/test_search.py only):
# kill this process with SIGKILL right after the checkpoint of that (1-based) epoch is written,
_KILL_AFTER_EPOCH = "NASOPS_TEST_KILL_AFTER_EPOCH"
# and save every rank's final architecture parameters to <dir>/alphas_rank<r>.pt.
_DUMP_ALPHAS = "NASOPS_TEST_DUMP_ALPHAS"


class SearchError(RuntimeError):
    """A run that cannot start or continue, with the reason (bad out folder, checkpoint, ...)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (those flags say in words what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nasops.search",
        description="Differentiable architecture search (DARTS family) with nasops kernels.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("what to search")
    g.add_argument("--space", default=DEFAULTS["space"], choices=list(spaces.SPACES), help="search space")
    g.add_argument("--method", default=DEFAULTS["method"], choices=list(methods.METHODS),
                   help="search method")
    g.add_argument("--second-order", action="store_true",
                   help="DARTS's unrolled (second-order, finite-difference) architecture gradient")
    g.add_argument("--layers", type=int, default=None,
                   help=f"darts/rdarts: cells in the search network (default {QUICK_LAYERS_OTHER}; DARTS "
                        f"uses 8); nb201: cells per stage (default {QUICK_LAYERS['nb201']}; NB201 uses 5)")
    g.add_argument("--init-channels", type=int, default=DEFAULTS["init_channels"],
                   help="channels of the first cell (C)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=DEFAULTS["dataset"], choices=list(datasets.DATASETS),
                   help="digits: sklearn's 8x8 digits (no download); cifar10/cifar100: pickle batches "
                        "in --data-dir; synthetic: random images for benchmarks")
    g.add_argument("--data-dir", default=None, help="folder of the CIFAR python batches")
    g.add_argument("--train-portion", type=float, default=0.5,
                   help="share of the training set for the weights; the rest trains the architecture")
    g.add_argument("--image-size", type=int, default=32, help="synthetic: image height and width")
    g.add_argument("--num-classes", type=int, default=10, help="synthetic: number of classes")
    g.add_argument("--synthetic-size", type=int, default=512, help="synthetic: number of images")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="search epochs (DARTS: 50)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="per rank, for the train and the validation batches alike")
    g.add_argument("--max-steps", type=int, default=None,
                   help="at most this many steps per epoch (quick tries and tests)")
    g.add_argument("--lr", type=float, default=0.025, help="weight SGD learning rate (cosine start)")
    g.add_argument("--lr-min", type=float, default=0.001,
                   help="weight learning rate at the end of the cosine")
    g.add_argument("--momentum", type=float, default=0.9, help="weight SGD momentum")
    g.add_argument("--weight-decay", type=float, default=3e-4, help="weight SGD weight decay")
    g.add_argument("--grad-clip", type=float, default=5.0, help="max norm of the weight gradient")
    g.add_argument("--arch-lr", type=float, default=3e-4, help="architecture Adam learning rate")
    g.add_argument("--arch-betas", type=float, nargs=2, default=(0.5, 0.999), metavar=("B1", "B2"),
                   help="architecture Adam betas")
    g.add_argument("--arch-weight-decay", type=float, default=1e-3, help="architecture Adam weight decay")

    g = p.add_argument_group("how to run")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the split, the batch order and the initialisation")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--backend", default="auto", choices=["auto", *nasops.backend.BACKENDS],
                   help="kernels of the nasops ops (nasops.set_backend)")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: bfloat16 autocast on CPU, float16 + gradient scaler on CUDA")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms, so a resumed run equals an uninterrupted one")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (torch.set_num_threads). Default: 1 for the 8x8 digits "
                        "(ops that small lose more to a thread pool than they gain, badly so on a busy "
                        "machine), torch's choice otherwise")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=None, help="output folder (default runs/<space>-<method>-<seed>)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of another run in --out")
    g.add_argument("--nb201-table", nargs="?", const=str(nb201.BUILTIN_TABLE), default=None, metavar="CSV",
                   help="nb201: the table of 200-epoch test accuracies the found cell is looked up in "
                        "(default, or the flag alone: the NAS-Bench-201 table shipped with nasops)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = os.path.join("runs", f"{args.space}-{args.method}-{args.seed}")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    if args.layers is None:
        args.layers = QUICK_LAYERS.get(args.space, QUICK_LAYERS_OTHER)
    if args.nb201_table and args.space != "nb201":
        parser.error(f"--nb201-table needs --space nb201 (got --space {args.space})")
    if args.space == "nb201":
        # Read now, so that a wrong table stops the run before the search, not after.
        args.nb201_table = args.nb201_table or str(nb201.BUILTIN_TABLE)
        if not os.path.isfile(args.nb201_table):
            parser.error(f"--nb201-table: no such file {args.nb201_table!r} (the NB201 accuracy CSV)")
        try:
            table = nb201.load_table(args.nb201_table)
        except (OSError, ValueError) as exc:
            parser.error(f"--nb201-table: {exc}".replace("\n", " "))
        if len(table) != nb201.NUM_ARCHITECTURES:
            parser.error(f"--nb201-table: {args.nb201_table} has {len(table)} architectures, "
                         f"expected all {nb201.NUM_ARCHITECTURES} of NAS-Bench-201")
    for name in ("epochs", "batch_size", "layers", "init_channels", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps: expected >= 1, got {args.max_steps}")
    if not 0.0 < args.train_portion < 1.0:
        parser.error(f"--train-portion: expected a fraction in (0, 1), got {args.train_portion}")
    args.arch_betas = tuple(args.arch_betas)
    return args


def run_config(args: argparse.Namespace) -> dict:
    """The settings that decide what a run computes (compared on --resume)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_KEYS}


# ---- the run -----------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Run a search (the CLI). Returns {"genotype", "genotype_str", "metrics", "out", ...}."""
    args = parse_args(argv)
    try:
        return _run(args)
    except SearchError as exc:
        if __name__ == "__main__" or argv is None:
            print(f"nasops.search: error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        raise


def _run(args) -> dict:
    rank, world_size, device = _setup_distributed(args.device)
    # main() may run in-process (tests, notebooks): leave the process-wide
    # settings as they were found.
    saved_backend = nasops.backend._override
    saved_deterministic = (torch.are_deterministic_algorithms_enabled(),
                           torch.is_deterministic_algorithms_warn_only_enabled())
    saved_threads = torch.get_num_threads()
    threads = args.threads or (1 if args.dataset == "digits" and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        return _search(args, rank, world_size, device)
    finally:
        nasops.backend._override = saved_backend
        torch.use_deterministic_algorithms(saved_deterministic[0], warn_only=saved_deterministic[1])
        torch.set_num_threads(saved_threads)
        if world_size > 1:
            dist.destroy_process_group()


def _search(args, rank: int, world_size: int, device: torch.device) -> dict:
    is_main = rank == 0
    if args.deterministic:
        _make_deterministic()
    try:
        resolve(args.backend, device)  # an unusable backend fails here, with the reason
    except ValueError as exc:
        raise SearchError(str(exc)) from None
    if args.backend != "auto":
        nasops.set_backend(args.backend)
    amp = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None

    try:
        data = datasets.load(args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                             num_classes=args.num_classes, synthetic_size=args.synthetic_size, seed=args.seed)
        train_idx, val_idx = datasets.split(len(data), args.train_portion, args.seed)
        train_loader = datasets.ShardedLoader(data, train_idx, args.batch_size, seed=args.seed,
                                              rank=rank, world_size=world_size)
        val_loader = datasets.ShardedLoader(data, val_idx, args.batch_size, seed=args.seed + 1,
                                            rank=rank, world_size=world_size)
    except (OSError, ValueError) as exc:
        raise SearchError(str(exc)) from None
    steps = min(len(train_loader), len(val_loader))
    if args.max_steps:
        steps = min(steps, args.max_steps)

    out = Path(args.out)
    config = run_config(args)
    checkpoint = _prepare_out(out, args, config)  # every rank checks; only rank 0 clears
    if world_size > 1:
        dist.barrier()

    _seed_everything(args.seed)

    model = spaces.build(args.space, in_channels=data.in_channels, num_classes=data.num_classes,
                            C=args.init_channels, layers=args.layers).to(device)
    if world_size > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    method = methods.get(args.method)(
        model, epochs=args.epochs, device=device, amp=amp, lr=args.lr, lr_min=args.lr_min,
        momentum=args.momentum, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        arch_lr=args.arch_lr, arch_betas=args.arch_betas, arch_weight_decay=args.arch_weight_decay,
        second_order=args.second_order)

    history: list[dict] = []
    start_epoch = 0
    if checkpoint is not None:
        try:
            start_epoch, history = _restore(checkpoint, model, method, device)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise SearchError(f"--resume: the checkpoint {out / 'checkpoint.pt'} does not fit this "
                              f"network and method ({type(exc).__name__}: {exc})") from None
        if is_main:
            _write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            print(f"resuming {out} after epoch {start_epoch} of {args.epochs}", flush=True)

    for epoch in range(start_epoch, args.epochs):
        record = _train_epoch(args, epoch, steps, model, method, train_loader, val_loader,
                              world_size, device, show=is_main and not args.quiet)
        history.append(record)
        if is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            _save_checkpoint(out / "checkpoint.pt", model, method, epoch + 1, history, config)
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f} "
                  f"acc {record['train_acc']:.4f} | val loss {record['val_loss']:.4f} "
                  f"acc {record['val_acc']:.4f} | lr {record['lr']:.5f} | {record['time']:.1f} s | "
                  f"{record['genotype_str']}", flush=True)
            if os.environ.get(_KILL_AFTER_EPOCH) == str(epoch + 1):
                os.kill(os.getpid(), signal.SIGKILL)

    result = {"space": args.space, "method": args.method, "genotype": model.genotype(),
              "genotype_str": model.genotype_str(), "seed": args.seed, "epochs": args.epochs,
              "world_size": world_size, "config": config}
    if args.nb201_table:
        result["nb201"] = nb201.lookup(result["genotype_str"], args.nb201_table)
    if is_main:
        _write_outputs(out, model, result)
        if "nb201" in result:
            print(f"NAS-Bench-201 200-epoch test accuracy of {result['genotype_str']}: "
                  + ", ".join(f"{k} {v}" for k, v in result["nb201"].items()), flush=True)
        print(f"genotype: {result['genotype_str']}\noutputs in {out}/", flush=True)
    if os.environ.get(_DUMP_ALPHAS):
        torch.save([a.detach().cpu() for a in model.arch_parameters()],
                   os.path.join(os.environ[_DUMP_ALPHAS], f"alphas_rank{rank}.pt"))
    return {**result, "metrics": history, "out": str(out)}


def _train_epoch(args, epoch, steps, model, method, train_loader, val_loader, world_size, device, show):
    from tqdm import tqdm

    model.train()
    lr = method.lr
    sums = torch.zeros(6, dtype=torch.float64)  # train loss, correct, count; val loss, correct, count
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show, leave=False,
               unit="step", dynamic_ncols=True)
    batches = zip(train_loader.epoch(epoch), val_loader.epoch(epoch))
    for _, (train_batch, val_batch) in zip(range(steps), batches):
        s = method.step(train_batch, val_batch)
        sums += torch.tensor([s.train_loss, s.train_correct, s.train_count,
                              s.val_loss, s.val_correct, s.val_count], dtype=torch.float64)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}",
                        val_acc=f"{sums[4] / sums[5]:.3f}",
                        samples_s=f"{world_size * (sums[2] + sums[5]) / elapsed:.0f}")
        bar.update()
    bar.close()
    if world_size > 1:
        reduced = sums.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(reduced)
        sums = reduced.cpu()
        # BatchNorm running statistics are per rank; keep rank 0's so that every
        # rank holds (and rank 0 checkpoints) one model.
        for b in model.buffers():
            dist.broadcast(b.data, src=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    method.end_epoch()
    return {
        "epoch": epoch + 1,
        "train_loss": (sums[0] / sums[2]).item(), "train_acc": (sums[1] / sums[2]).item(),
        "val_loss": (sums[3] / sums[5]).item(), "val_acc": (sums[4] / sums[5]).item(),
        "lr": lr, "steps": steps, "time": seconds,
        "samples_per_s": (sums[2] + sums[5]).item() / seconds,
        "genotype": model.genotype(), "genotype_str": model.genotype_str(),
        "edge_weights": model.edge_weights(),
    }


# ---- setup --------------------------------------------------------------------------------

def _setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        raise SearchError(f"--device: expected auto, cpu, cuda or cuda:N, got {device_arg!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise SearchError(f"--device: expected auto, cpu, cuda or cuda:N, got {device_arg!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SearchError(f"--device {device_arg}: no CUDA device is visible to torch")
        if world_size > 1:  # one GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # the CUDA RNG state we checkpoint is the current device's
    if world_size == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _make_deterministic() -> None:
    # warn_only: a few CUDA kernels (pooling backward) have no deterministic
    # variant; torch names them in a warning instead of stopping the search.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ---- output folder and checkpoints -----------------------------------------------------------

def _run_files(out: Path) -> list[Path]:
    found = [out / name for name in OUTPUT_FILES if (out / name).exists()]
    for pattern in OUTPUT_PATTERNS:
        found += sorted(out.glob(pattern))
    return found


def _prepare_out(out: Path, args, config: dict):
    """Check --out against --resume/--overwrite; returns the checkpoint to resume or None."""
    if args.resume:
        path = out / "checkpoint.pt"
        if not path.exists():
            raise SearchError(f"--resume: no checkpoint at {path}; start a new run without --resume")
        try:
            # weights_only: a pickle may run code when loaded; only tensors, plain
            # Python values and the numpy RNG state (_CHECKPOINT_GLOBALS) load.
            with torch.serialization.safe_globals(_CHECKPOINT_GLOBALS):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            saved = checkpoint["config"]
        except pickle.UnpicklingError as exc:
            # torch's message is long and suggests weights_only=False: keep the
            # line that names what was refused (a global or class: the file
            # would run code), else the one saying why the file is unreadable.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            refused = [line for line in lines if "GLOBAL" in line or "allowlisted" in line]
            if refused:
                raise SearchError(f"--resume: refused to load the checkpoint {path}: it holds objects a "
                                  f"nasops.search checkpoint never holds, and loading them could run code "
                                  f"({refused[0]})") from None
            detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
            raise SearchError(f"--resume: cannot read the checkpoint {path} (UnpicklingError: {detail}); "
                              f"it is not a nasops.search checkpoint or it is damaged") from None
        except Exception as exc:  # any unreadable file is the same problem to the user
            raise SearchError(f"--resume: cannot read the checkpoint {path} ({type(exc).__name__}: {exc}); "
                              f"it is not a nasops.search checkpoint or it is damaged") from None
        pairs = {k: (saved.get(k, "<unset>"), config.get(k, "<unset>")) for k in sorted(set(saved) | set(config))}
        differ = {k: (a, b) for k, (a, b) in pairs.items() if a != b}
        if differ:
            lines = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise SearchError(f"--resume: the checkpoint {path} is of a different run ({lines}); "
                              f"resume with the same settings, or start anew with --overwrite")
        return checkpoint
    existing = _run_files(out) if out.is_dir() else []
    if existing and not args.overwrite:
        names = ", ".join(p.name for p in existing)
        raise SearchError(f"--out {out} holds the files of another run ({names}); "
                          f"pass --resume to continue it or --overwrite to replace it")
    if not dist.is_initialized() or dist.get_rank() == 0:
        for p in existing:
            p.unlink()
        out.mkdir(parents=True, exist_ok=True)
    return None


# What a checkpoint may hold besides tensors and plain Python values: the
# pickled numpy RNG state (np.random.get_state(): a uint32 ndarray).
_CHECKPOINT_GLOBALS = [(np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct,
                       np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: touching every GPU would open a context on
        # each of them from every DDP process.
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _save_checkpoint(path: Path, model, method, epoch: int, history: list, config: dict) -> None:
    state = {
        "epoch": epoch, "config": config, "model": model.state_dict(),
        "alphas": [a.detach().clone() for a in model.arch_parameters()],
        "method": method.state_dict(), "rng": _rng_states(), "history": history,
        "nasops_version": nasops.__version__,
    }
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the old or the new checkpoint, never half of one


def _restore(checkpoint: dict, model, method, device) -> tuple[int, list]:
    model.load_state_dict(checkpoint["model"])
    with torch.no_grad():
        for a, saved in zip(model.arch_parameters(), checkpoint["alphas"]):
            a.copy_(saved.to(device))
    method.load_state_dict(checkpoint["method"])
    _set_rng_states(checkpoint["rng"])
    return checkpoint["epoch"], list(checkpoint["history"])


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_outputs(out: Path, model, result: dict) -> None:
    from nasops.spaces import plot
    _write_text(out / "genotype.json", json.dumps(result, indent=2) + "\n")
    for cell_type, table in model.edge_weights().items():
        plot.plot_cell(result["genotype"], cell_type, str(out / f"cell_{cell_type}.png"))
        plot.plot_edge_weights(table, str(out / f"weights_{cell_type}.png"),
                               f"{result['space']} {cell_type} cell: op weights")


if __name__ == "__main__":
    main()
