"""The search driver: ``python -m nasops.search [flags]`` (or ``nasops-search``).

With no flags it runs a short first-order DARTS search of the DARTS cell on
scikit-learn's 8x8 digits (no download) in about two minutes on a 2-core CPU,
and writes its results to ``runs/<space>-<method>-<seed>`` (``runs/darts-darts-0``):

- ``genotype.json``  the found architecture (space, method, genotype, its
  string, seed, full config; for nb201 the found cell's NAS-Bench-201 accuracies);
- ``cell_<type>.png`` the picture of each searched cell, ``weights_<type>.png``
  the heatmap of its edges' op weights;
- ``metrics.jsonl``  one JSON object per epoch: losses, accuracies, lr, time,
  throughput, the current genotype and the op-weight table of every edge;
- ``checkpoint.pt``  everything needed to resume, rewritten atomically after
  every epoch;
- TensorBoard event files of the numbers in metrics.jsonl, when ``tensorboard``
  is installed.

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
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import nasops
from nasops import data as datasets
from nasops import methods, runtime, spaces
from nasops.backend import resolve
from nasops.methods.darts import RunContext
from nasops.runtime import write_text
from nasops.spaces import nb201, vit
from nasops.spaces.base import set_recompute_edges
from nasops.spaces.operations import set_recompute_depthwise

# What a search that needs no flags runs: sized to take about two minutes on a
# 2-core CPU with the digits (measured in README.md).
DEFAULTS = dict(space="darts", method="darts", dataset="digits", epochs=6, batch_size=64, init_channels=8)
# --layers when not given: darts/rdarts count cells (DARTS searches with 8), nb201
# counts cells per stage (NB201 has 5, times 3 stages), vit counts encoders (DASViT's
# first stage has 2).
QUICK_LAYERS = {"nb201": 2, "vit": 2}
QUICK_LAYERS_OTHER = 5


def _cell_count(text: str) -> int | str:
    """--recompute-edges CELLS: a positive number of cells, or "all" (the flag alone)."""
    if text == "all":
        return text
    try:
        cells = int(text)
    except ValueError:
        cells = 0
    if cells < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of cells or 'all', got {text!r}")
    return cells


def default_layers(space: str) -> int:
    """--layers of a run of ``space`` that does not give it (a method's
    ``check_args`` runs before the driver fills it in, and may need it)."""
    return QUICK_LAYERS.get(space, QUICK_LAYERS_OTHER)

# Settings that may differ between a run and its resumption: where and how it
# runs, not what it computes.
RUNTIME_KEYS = ("out", "resume", "overwrite", "device", "backend", "data_dir", "nb201_table", "quiet",
                "deterministic", "threads", "memory_format", "compile", "recompute_edges",
                "recompute_depthwise", "cuda_graphs")

# --compile needs this torch or newer: torch.compile 2.11 could not trace the
# search networks (id() and truth values of traced values) and one compiled run
# left the eager losses by 5e-4; 2.13 and 2.14.1 pass the tests (CPU, 2026-12-05).
COMPILE_MIN_TORCH = (2, 13)

OUTPUT_FILES = ("genotype.json", "metrics.jsonl", "checkpoint.pt")

# Test hook (environment variable, used by the tests only; runtime.epoch_checkpointed
# is the other): save every rank's final architecture parameters to
# <dir>/alphas_rank<r>.pt (and its whole network state to <dir>/model_rank<r>.pt).
_DUMP_ALPHAS = "NASOPS_TEST_DUMP_ALPHAS"

# The vit space's size flags (None for every other space).
VIT_FLAGS = ("embed_dim", "patch_size", "input_size", "encoder_nodes")


# A run that cannot start or continue, with the reason (bad out folder, checkpoint, ...).
SearchError = runtime.RunError


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
                        f"uses 8); nb201: cells per stage (default {QUICK_LAYERS['nb201']}; NB201 uses 5); "
                        f"vit: encoders (default {QUICK_LAYERS['vit']}; dasvit: from --stage-depths)")
    g.add_argument("--init-channels", type=int, default=DEFAULTS["init_channels"],
                   help="channels of the first cell (C); not used by vit")
    g.add_argument("--embed-dim", type=int, default=None,
                   help=f"vit: token width (default {vit.DEFAULT_EMBED_DIM}; ViT-B: 768)")
    g.add_argument("--patch-size", type=int, default=None,
                   help="vit: patch side (default: a 4x4 grid of patches, 2 on the 8x8 digits; ViT-B: 16)")
    g.add_argument("--input-size", type=int, default=None,
                   help="vit: resize the images to this side first (default: their own size; DASViT: 224)")
    g.add_argument("--encoder-nodes", type=int, default=None,
                   help=f"vit: intermediate nodes per encoder (default {vit.DEFAULT_NODES})")

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
                   help="floor of the weights' cosine (per epoch, as DARTS: reached after the last epoch)")
    g.add_argument("--momentum", type=float, default=0.9, help="weight SGD momentum")
    g.add_argument("--weight-decay", type=float, default=3e-4, help="weight SGD weight decay")
    g.add_argument("--grad-clip", type=float, default=5.0, help="max norm of the weight gradient (inf: no clipping)")
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
    runtime.add_memory_format_flag(g)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile what a step runs of the search network (fullgraph; on CUDA "
                        "mode=reduce-overhead, CUDA graphs); the first steps "
                        "pay the compilation")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: replay the search network's forward and backward from CUDA graphs "
                        "(captured in the first step; nasops.cuda_graphs): the step no longer "
                        "waits for Python and dispatch. Not with --compile or --amp")
    g.add_argument("--recompute-edges", nargs="?", const="all", default=None, type=_cell_count,
                   metavar="CELLS",  # "all" (the flag alone) or a number
                   help="each mixed edge keeps its input and recomputes its ops' outputs in the "
                        "backward (a DARTS edge keeps its parameter-free ops' outputs): less memory "
                        "for more time, same results. With CELLS, only the edges of the first CELLS "
                        "cells, which hold the largest maps (with --recompute-depthwise for the "
                        "others: e.g. 3 of the DARTS space's 8 cells, through the first reduction)")
    g.add_argument("--recompute-depthwise", action="store_true",
                   help="each sep_conv and dil_conv keeps its input, not its depthwise convolutions' "
                        "outputs, and computes those again in the backward: less memory for a little "
                        "more time (one more depthwise convolution each), same results; in the cells "
                        "that --recompute-edges CELLS leaves (an edge that recomputes does them too)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=None, type=runtime.out_folder,
                   help="output folder (default runs/<space>-<method>-<seed>)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of another run in --out")
    g.add_argument("--nb201-table", nargs="?", const=str(nb201.BUILTIN_TABLE), default=None, metavar="CSV",
                   help="nb201: the table of 200-epoch test accuracies the found cell is looked up in "
                        "(default, or the flag alone: the NAS-Bench-201 table shipped with nasops)")

    # Each method adds its own group; remember whose flags are whose, so that a
    # run's config holds only its own method's.
    p.method_flags = {}
    for name, cls in methods.METHODS.items():
        before = {a.dest for a in p._actions}
        cls.add_arguments(p)
        p.method_flags[name] = {a.dest for a in p._actions} - before
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    method = methods.get(args.method)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    for owner, flags in _given_method_flags(argv).items():
        if owner != args.method:
            parser.error(f"{', '.join(flags)}: flags of --method {owner}, not of --method {args.method}")
    if not 0 <= args.seed <= runtime.MAX_SEED:
        parser.error(f"--seed: expected an integer in [0, {runtime.MAX_SEED}], got {args.seed}")
    if args.space == "vit":
        args.embed_dim = vit.DEFAULT_EMBED_DIM if args.embed_dim is None else args.embed_dim
        args.encoder_nodes = vit.DEFAULT_NODES if args.encoder_nodes is None else args.encoder_nodes
    else:
        given = [f"--{n.replace('_', '-')}" for n in VIT_FLAGS if getattr(args, n) is not None]
        if given:
            parser.error(f"{', '.join(given)}: only for --space vit (got --space {args.space})")
    runtime.refuse_memory_format(parser, args)
    if args.nb201_table and args.space != "nb201":
        parser.error(f"--nb201-table needs --space nb201 (got --space {args.space})")
    if args.space == "nb201":
        try:
            args.nb201_table = nb201.checked_table(args.nb201_table)
        except (OSError, ValueError) as exc:
            parser.error(f"--nb201-table: {exc}".replace("\n", " "))
    runtime.refuse_below(parser, args, ("epochs", "batch_size", "layers", "init_channels", "threads",
                                        *VIT_FLAGS, "max_steps"), 1)
    runtime.refuse_nonfinite_numbers(parser, args, allow_inf=("grad_clip", "arch_grad_clip"))
    # Below 0 the optimizers raise (a traceback) or, for the schedule's end, climb the loss.
    runtime.refuse_below(parser, args, ("lr", "lr_min", "momentum", "weight_decay", "arch_lr",
                                        "arch_weight_decay"), 0)
    if args.grad_clip <= 0:  # 0 would zero every gradient, a negative norm flip its sign
        parser.error(f"--grad-clip: expected > 0 (inf: no clipping), got {args.grad_clip}")
    if not all(0 <= b < 1 for b in args.arch_betas):
        parser.error(f"--arch-betas: expected two numbers in [0, 1), got {' '.join(map(str, args.arch_betas))}")
    if not 0.0 < args.train_portion < 1.0:
        parser.error(f"--train-portion: expected a fraction in (0, 1), got {args.train_portion}")
    args.arch_betas = tuple(args.arch_betas)
    if args.compile and torch.torch_version.TorchVersion(torch.__version__) < COMPILE_MIN_TORCH:
        parser.error(f"--compile: needs torch >= {'.'.join(map(str, COMPILE_MIN_TORCH))}, this is "
                     f"{torch.__version__} (older torch.compile cannot trace the search networks); "
                     f"run without --compile, or with --cuda-graphs on CUDA")
    if args.cuda_graphs:
        if args.compile:
            parser.error("--cuda-graphs and --compile exclude each other: on CUDA --compile replays CUDA graphs "
                         "itself (mode=reduce-overhead)")
        if args.amp:
            parser.error("--cuda-graphs and --amp exclude each other: the graphs are captured without autocast")
    if args.recompute_depthwise and args.recompute_edges == "all":
        parser.error("--recompute-depthwise and --recompute-edges (every edge) exclude each other: "
                     "--recompute-edges recomputes every op of an edge, its depthwise convolutions "
                     "included; --recompute-edges CELLS leaves cells to --recompute-depthwise")
    if method.spaces is not None and args.space not in method.spaces:
        parser.error(f"--method {args.method} searches the spaces {', '.join(method.spaces)}; "
                     f"got --space {args.space}")
    try:
        method.check_args(args)  # before the default --layers: a method may set it
    except ValueError as exc:
        parser.error(str(exc))
    if args.layers is None:
        args.layers = default_layers(args.space)
    if args.out is None:
        evaluated = method.evaluation_checkpoint(args)
        args.out = (os.path.dirname(os.path.abspath(evaluated)) if evaluated
                    else os.path.join("runs", f"{args.space}-{args.method}-{args.seed}"))
    return args


def _given_method_flags(argv) -> dict[str, list[str]]:
    """The method flags on the command line (not those left at their defaults),
    by the method that owns them: another method's flag would be ignored
    silently, e.g. --evaluate-only without --method hardexit starting a search."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # a flag not given leaves no attribute
    given = vars(parser.parse_args(argv))
    options = {a.dest: (a.option_strings or [a.dest])[-1] for a in parser._actions}
    return {owner: [options[d] for d in sorted(flags) if d in given]
            for owner, flags in parser.method_flags.items() if flags & given.keys()}


def run_config(args: argparse.Namespace) -> dict:
    """The settings that decide what a run computes (compared on --resume): the
    common flags (the vit size flags for --space vit only) and the run's own
    method's, not where or how it runs."""
    method_flags = build_parser().method_flags
    others = set().union(*(flags for name, flags in method_flags.items() if name != args.method))
    if args.space != "vit":
        others |= set(VIT_FLAGS)
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_KEYS and k not in others}


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
    except KeyboardInterrupt:
        if __name__ == "__main__" or argv is None:
            print("\n" + runtime.interrupted_message("nasops.search", args.out), file=sys.stderr)
            raise SystemExit(130) from None  # the shell's status for a SIGINT
        raise


def cli() -> None:
    """The ``nasops-search`` command: :func:`main` without its result. A console
    script exits with what its function returns, and a returned dict would be
    printed as an error with status 1."""
    main()


def _run(args) -> dict:
    rank, world_size, device = runtime.setup_distributed(args.device)
    with runtime.run_settings(args, device, world_size):
        return _search(args, rank, world_size, device)


def _search(args, rank: int, world_size: int, device: torch.device) -> dict:
    is_main = rank == 0
    if args.deterministic:
        runtime.make_deterministic()
    try:
        resolve(args.backend, device)  # an unusable backend fails here, with the reason
    except ValueError as exc:
        raise SearchError(str(exc)) from None
    if args.backend != "auto":
        nasops.set_backend(args.backend)
    if args.cuda_graphs and device.type != "cuda":
        raise SearchError(f"--cuda-graphs: needs a CUDA device, got --device {args.device} ({device})")
    amp = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None

    method_cls = methods.get(args.method)
    evaluated = method_cls.evaluation_checkpoint(args)
    if evaluated:  # no search: the finished run's settings, its state, then finish()
        evaluation, args = _evaluation_checkpoint(Path(evaluated), args, method_cls)
    try:
        data = datasets.load(args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                             num_classes=args.num_classes, synthetic_size=args.synthetic_size, seed=args.seed)
        train_idx, val_idx = method_cls.search_split(
            args, *datasets.split(len(data), args.train_portion, args.seed))
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
    if evaluated:
        checkpoint = _prepare_evaluation_out(out, Path(evaluated), evaluation)
    else:
        # Every rank checks; only rank 0 clears.
        checkpoint = runtime.prepare_out(out, args, config, _run_files, "nasops.search")
    if world_size > 1:
        dist.barrier()

    runtime.seed_everything(args.seed)

    try:
        model = method_cls.build_model(args, data).to(device)
    except ValueError as exc:  # sizes that do not fit the data, e.g. a patch that does not divide the image
        raise SearchError(str(exc)) from None
    if world_size > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)
    method = method_cls.from_args(model, args, device=device, amp=amp)
    _prepare_network(method, args, device)

    history: list[dict] = []
    start_epoch = 0
    if checkpoint is not None:
        try:
            start_epoch, history = _restore(checkpoint, method)
        except (KeyError, RuntimeError, ValueError) as exc:
            flag, path = ("--checkpoint", evaluated) if evaluated else ("--resume", out / "checkpoint.pt")
            raise SearchError(f"{flag}: the checkpoint {path} does not fit this "
                              f"network and method ({type(exc).__name__}: {exc})") from None
        if evaluated:
            if is_main:
                print(f"evaluating {evaluated} (epoch {start_epoch} of {args.epochs})", flush=True)
        elif is_main:
            write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            print(f"resuming {out} after epoch {start_epoch} of {args.epochs}", flush=True)

    # None without tensorboard; an evaluation (no epochs) writes no event file
    with runtime.scalar_writer(out, is_main and not evaluated) as writer:
        for epoch in range(start_epoch, args.epochs):
            method.begin_epoch(epoch)
            _prepare_network(method, args, device)  # a method may have built a new network
            record = _train_epoch(args, epoch, steps, method, train_loader, val_loader,
                                  world_size, device, show=is_main and not args.quiet)
            history.append(record)
            if is_main:
                # The checkpoint first: a kill between the two leaves a metrics.jsonl one
                # line short, which --resume writes again from the checkpoint's history.
                _save_checkpoint(out / "checkpoint.pt", method, epoch + 1, history, config)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                runtime.write_scalars(writer, record, epoch + 1)
                print(f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f} "
                      f"acc {record['train_acc']:.4f} | val loss {record['val_loss']:.4f} "
                      f"acc {record['val_acc']:.4f} | lr {record['lr']:.5f} | {record['time']:.1f} s | "
                      f"{record['genotype_str']}", flush=True)
                runtime.epoch_checkpointed(epoch + 1)

    run = RunContext(args=args, data=data, train_loader=train_loader, val_loader=val_loader,
                     device=device, rank=rank, world_size=world_size)
    result = {"space": args.space, "method": args.method, **method.finish(run), "seed": args.seed,
              "epochs": args.epochs, "world_size": world_size, "config": config}
    if args.nb201_table:
        result["nb201"] = nb201.lookup(result["genotype_str"], args.nb201_table)
    if is_main:
        write_text(out / "genotype.json", json.dumps(result, indent=2) + "\n")
        method.write_outputs(out, {**result, "metrics": history})
        if "nb201" in result:
            print(f"NAS-Bench-201 200-epoch test accuracy of {result['genotype_str']}: "
                  + ", ".join(f"{k} {v:.2f} %" for k, v in result["nb201"].items()), flush=True)
        print(f"genotype: {result['genotype_str']}\noutputs in {out}/", flush=True)
    if os.environ.get(_DUMP_ALPHAS):
        torch.save([a.detach().cpu() for a in method.model.arch_parameters()],
                   os.path.join(os.environ[_DUMP_ALPHAS], f"alphas_rank{rank}.pt"))
        torch.save({k: v.detach().cpu() for k, v in method.model.state_dict().items()},
                   os.path.join(os.environ[_DUMP_ALPHAS], f"model_rank{rank}.pt"))
    return {**result, "metrics": history, "out": str(out)}


def _train_epoch(args, epoch, steps, method, train_loader, val_loader, world_size, device, show):
    model = method.model
    model.train()
    lr = method.lr
    # The loss and correct-answer sums stay on the device, read back only for a shown
    # progress bar (runtime.EpochProgress) and at the epoch's end: read every step, the
    # host would wait for each step's kernels before launching the next step's.
    device_sums = torch.zeros(4, dtype=torch.float64, device=device)  # train loss, correct; val loss, correct
    train_count = val_count = 0

    def figures(seconds):
        loss, acc, _, val_acc = device_sums.tolist()
        return dict(loss=f"{loss / train_count:.3f}", acc=f"{acc / train_count:.3f}",
                    val_acc=f"{val_acc / val_count:.3f}",
                    samples_s=f"{world_size * (train_count + val_count) / seconds:.0f}")
    progress = runtime.EpochProgress(steps, f"epoch {epoch + 1}/{args.epochs}", show)
    fmt = runtime.memory_format(args, device)
    batches = ((_in_format(t, fmt), _in_format(v, fmt))
               for t, v in zip(train_loader.epoch(epoch), val_loader.epoch(epoch)))
    for step, (train_batch, val_batch) in zip(range(steps), batches):
        s = method.step(train_batch, val_batch)
        device_sums += torch.stack([s.train_loss, s.train_correct, s.val_loss, s.val_correct]).double()
        train_count += s.train_count
        val_count += s.val_count
        progress.step(step, figures)
    progress.close()
    loss, correct, val_loss, val_correct = device_sums.tolist()
    sums = torch.tensor([loss, correct, train_count, val_loss, val_correct, val_count], dtype=torch.float64)
    sums = runtime.end_epoch_on_ranks(sums, model, world_size, device)
    seconds = time.perf_counter() - progress.start
    method.end_epoch()
    return {
        "epoch": epoch + 1,
        "train_loss": (sums[0] / sums[2]).item(), "train_acc": (sums[1] / sums[2]).item(),
        "val_loss": (sums[3] / sums[5]).item(), "val_acc": (sums[4] / sums[5]).item(),
        "lr": lr, "steps": steps, "time": seconds,
        "samples_per_s": (sums[2] + sums[5]).item() / seconds,
        **method.describe(),
    }


# ---- how the network runs: --memory-format, --recompute-*, --compile, --cuda-graphs ----------

def _prepare_network(method, args, device: torch.device) -> None:
    """Lay out, recompute, compile or graph ``method.model`` as the flags say; once per
    network (the driver calls this again after every ``begin_epoch``). The layout
    change keeps the parameter objects (Module.to moves their data), so the
    method's optimizers still hold them."""
    model = method.model
    if getattr(model, "_nasops_prepared", False):
        return
    model.to(memory_format=runtime.memory_format(args, device))
    if args.recompute_edges is not None:
        try:
            edges = set_recompute_edges(model, True, cells=None if args.recompute_edges == "all"
                                        else args.recompute_edges)
        except ValueError as exc:  # more cells than the network has
            reason = str(exc).removeprefix("cells: ")
            raise SearchError(f"--recompute-edges {args.recompute_edges}: {reason}") from None
        if not edges:
            raise SearchError(f"--recompute-edges: the {type(model).__name__} of --method {args.method} "
                              f"has no mixed edge that can recompute")
    if args.recompute_depthwise and not set_recompute_depthwise(model, True):
        where = "" if args.recompute_edges is None else \
            f" outside the cells that --recompute-edges {args.recompute_edges} recomputes"
        raise SearchError(f"--recompute-depthwise: the {type(model).__name__} of --space {args.space} "
                          f"has no sep_conv or dil_conv op{where}")
    if args.compile:
        method.compile_network(fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else None)
    if args.cuda_graphs:
        method.graph_network()
    model._nasops_prepared = True


def _in_format(batch, fmt: torch.memory_format):
    """(images in ``fmt``, labels): the network's layout from its first layer on."""
    x, y = batch
    return (x.contiguous(memory_format=fmt) if x.dim() == 4 else x), y


# ---- output folder and checkpoints -----------------------------------------------------------

def _run_files(out: Path) -> list[Path]:
    found = [out / name for name in OUTPUT_FILES if (out / name).exists()]
    # Every method's files count as a run's: --out may hold a run of another method.
    patterns = {runtime.TENSORBOARD_PATTERN,
                *(p for cls in methods.METHODS.values() for p in cls.output_patterns)}
    for pattern in sorted(patterns):
        found += sorted(p for p in out.glob(pattern) if p not in found)
    return found


def _evaluation_checkpoint(path: Path, args, method_cls) -> tuple[dict, argparse.Namespace]:
    """The checkpoint of a finished run of this method, and ``args`` with its
    settings (all but the method's ``evaluation_keys`` and the runtime flags)."""
    checkpoint = runtime.load_checkpoint(path, flag="--checkpoint")
    saved = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict) or "method" not in saved or "epoch" not in checkpoint:
        raise SearchError(f"--checkpoint: the file {path} is not a nasops.search checkpoint (no config)")
    if saved["method"] != args.method:
        raise SearchError(f"--checkpoint: {path} is a checkpoint of --method {saved['method']}, "
                          f"not --method {args.method}")
    if checkpoint["epoch"] != saved.get("epochs"):
        raise SearchError(f"--checkpoint: {path} stopped after epoch {checkpoint['epoch']} of "
                          f"{saved.get('epochs')}; finish that run with --resume first")
    merged = argparse.Namespace(**vars(args))
    for key, value in saved.items():
        if key not in RUNTIME_KEYS and key not in method_cls.evaluation_keys:
            setattr(merged, key, value)
    return checkpoint, merged


def _prepare_evaluation_out(out: Path, path: Path, checkpoint: dict) -> dict:
    """An evaluation writes genotype.json and the method's files into --out, which
    may be the checkpoint's folder or one without another run's checkpoint."""
    other = out / "checkpoint.pt"
    if other.exists() and not other.samefile(path):
        raise SearchError(f"--out {out} holds another run's checkpoint; evaluate --checkpoint {path} "
                          f"into its own folder or a folder without a checkpoint")
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    return checkpoint


def _save_checkpoint(path: Path, method, epoch: int, history: list, config: dict) -> None:
    # The architecture parameters are part of the network's state dict.
    runtime.save_atomic({
        "epoch": epoch, "config": config, "model": method.model.state_dict(),
        "method": method.state_dict(), "rng": runtime.rng_states(), "history": history,
        "nasops_version": nasops.__version__,
    }, path)


def _restore(checkpoint: dict, method) -> tuple[int, list]:
    method.load_state_dict(checkpoint["method"])  # first: a method may rebuild its network here
    method.model.load_state_dict(checkpoint["model"])
    runtime.set_rng_states(checkpoint["rng"])
    return checkpoint["epoch"], list(checkpoint["history"])


if __name__ == "__main__":
    cli()
