"""Train a found architecture from scratch: ``python -m nasops.train --genotype OUT/genotype.json``
(or ``nasops-train``).

Reads the ``genotype.json`` a search wrote (``nasops.search``), builds the
discrete network of its space (:data:`KINDS`: DARTS / RobustDARTS cell
networks, the NAS-Bench-201 cell network), trains it with its kind's usual
recipe (:data:`RECIPES`; every number can be overridden by a flag) on the
training split of the data set, and evaluates it on the held-out test split.
Writes to ``--out`` (default ``<genotype's folder>/train-<dataset>-<seed>``):

- ``result.json``   test top-1 / top-5 accuracy and loss, parameters, multiply-
  accumulates per image, the genotype, the full config; for nb201 genotypes the
  NAS-Bench-201 table's 200-epoch accuracies beside the measured one;
- ``metrics.jsonl`` one JSON object per epoch (training loss and accuracy, lr,
  drop-path probability, time, throughput; test loss and accuracies when the
  epoch was evaluated);
- ``checkpoint.pt`` everything needed to resume, rewritten atomically after
  every epoch;
- TensorBoard event files of the metrics when ``tensorboard`` is installed.

Every random draw of an epoch (augmentation, drop-path) comes from generators
seeded by (seed, epoch, rank), and the learning rate is a function of the epoch,
so a checkpoint needs no RNG state: with ``--deterministic`` a resumed run
equals an uninterrupted one bit for bit. ``torchrun --nproc_per_node=N -m
nasops.train ...`` trains data parallel (DistributedDataParallel; gloo on CPU,
NCCL on CUDA). ``main(argv)`` runs the same in-process and returns the result.

See README.md, "Training the found architecture", for every flag.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import nasops
from nasops import cuda_graphs, runtime
from nasops import data as datasets
from nasops.runtime import RunError, write_text
from nasops.search import _HelpFormatter
from nasops.spaces import nb201, vit
from nasops.spaces.discrete import DartsNetwork, NB201Network
from nasops.spaces.operations import set_recompute_depthwise


# ---- recipes and kinds ----------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """The training defaults of one kind of network; each is a flag of the same name.

    ``paper``: epochs, batch size (per process), layers and initial channels at
    the paper's scale (CIFAR and synthetic data); ``digits``: the same for the
    8x8 digits, sized for a run of a minute or two on a 2-core CPU. A None
    layers / init_channels leaves the size to the genotype's builder. Either
    may also override another field of the recipe for its scale.
    ``cutout``: whether to cut out a square of half the image side (DARTS: 16
    on 32x32). ``lr`` is reached after ``warmup_epochs`` of linear warm-up from
    ``warmup_lr``, then cosine-annealed to ``lr_min`` over the remaining epochs.
    """

    optimizer: str  # "sgd" or "adamw"
    lr: float
    lr_min: float
    weight_decay: float
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    warmup_epochs: int = 0
    warmup_lr: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    cutout: bool = False
    drop_path: float = 0.0
    auxiliary_weight: float = 0.0
    paper: dict = field(default_factory=dict)
    digits: dict = field(default_factory=dict)
    source: str = ""


RECIPES = {
    # DARTS's cnn/train.py with --auxiliary --cutout (the paper's evaluation).
    "darts": Recipe(optimizer="sgd", lr=0.025, lr_min=0.0, weight_decay=3e-4, momentum=0.9, grad_clip=5.0,
                    cutout=True, drop_path=0.2, auxiliary_weight=0.4,
                    paper=dict(epochs=600, batch_size=96, layers=20, init_channels=36),
                    digits=dict(epochs=15, batch_size=64, layers=5, init_channels=16),
                    source="DARTS (Liu et al., 2019), cnn/train.py --auxiliary --cutout"),
    # NAS-Bench-201's 200-epoch training (xautodl configs/nas-benchmark/hyper-opts/200E.config).
    "nb201": Recipe(optimizer="sgd", lr=0.1, lr_min=0.0, weight_decay=5e-4, momentum=0.9, nesterov=True,
                    paper=dict(epochs=200, batch_size=256, layers=5, init_channels=16),
                    digits=dict(epochs=40, batch_size=64, layers=2, init_channels=16),
                    source="NAS-Bench-201 (Dong & Yang, 2020), 200-epoch schedule"),
    # DASViT's retraining (paper, section IV): AdamW 1e-3, weight decay 5e-2, batch
    # 128, 500 epochs, the first 20 a warm-up from 1e-6, cosine. The paper does not
    # name the final learning rate: 0.
    "dasvit": Recipe(optimizer="adamw", lr=1e-3, lr_min=0.0, weight_decay=5e-2, warmup_epochs=20,
                     warmup_lr=1e-6,
                     paper=dict(epochs=500, batch_size=128, layers=None, init_channels=None),
                     # the paper's 4 % of the epochs warm up, at least one
                     digits=dict(epochs=20, batch_size=64, layers=None, init_channels=None, warmup_epochs=1),
                     source="DASViT (Wu et al., 2025), retraining phase"),
}


@dataclass(frozen=True)
class Kind:
    """How ``nasops.train`` trains the genotypes of a space.

    ``build(space, genotype, args, data)`` returns the discrete network of
    ``genotype`` (the ``genotype`` entry of genotype.json) for the parsed flags
    ``args`` (``args.layers``, ``args.init_channels``, ``args.auxiliary_weight``,
    ...) and ``data`` (an ImageDataset: ``in_channels``, ``num_classes``,
    ``image_size``); it raises ValueError saying what is wrong with the
    genotype. The network's ``forward(x)`` returns the logits, or in training
    mode with an auxiliary head ``(logits, auxiliary logits)``; parameters
    named ``auxiliary_head.*`` are left out of the reported count; a
    ``drop_path_prob`` attribute, if the network has one, is set before every
    epoch. ``features``: the optional regularisers it has ("auxiliary",
    "drop_path"); asking another kind for them is a flag error.
    """

    build: Callable
    recipe: Recipe
    features: frozenset = frozenset()


def _build_darts(space, genotype, args, data):
    return DartsNetwork(genotype, space=space, in_channels=data.in_channels, num_classes=data.num_classes,
                        C=args.init_channels, layers=args.layers, auxiliary=args.auxiliary_weight > 0)


def _build_nb201(space, genotype, args, data):
    if not isinstance(genotype, Mapping) or not isinstance(genotype.get("arch"), str):
        raise ValueError(f"genotype: an nb201 genotype is {{\"arch\": \"|op~0|+|op~0|op~1|+|...\"}}, "
                         f"got {json.dumps(genotype)[:200]}")
    return NB201Network(genotype["arch"], in_channels=data.in_channels, num_classes=data.num_classes,
                        C=args.init_channels, layers=args.layers)


def _build_vit(space, genotype, args, data):
    """The found encoder stacked ``--layers`` deep (default: the search's depth) at
    width ``--init-channels`` (default: the search's embedding dimension); the
    patch size and input size are the search's (other image sizes are resized)."""
    return vit.build_derived_vit(genotype, depth=args.layers, embed_dim=args.init_channels,
                                 in_channels=data.in_channels, num_classes=data.num_classes)


_DARTS_KIND = Kind(_build_darts, RECIPES["darts"], frozenset({"auxiliary", "drop_path"}))

# Space (genotype.json's "space") -> how to train its genotypes.
KINDS: dict[str, Kind] = {
    "darts": _DARTS_KIND,
    **{f"rdarts-s{i}": _DARTS_KIND for i in range(1, 5)},
    "nb201": Kind(_build_nb201, RECIPES["nb201"]),
    "vit": Kind(_build_vit, RECIPES["dasvit"]),
}

# --layers / --init-channels / --epochs / --batch-size when not given.
SIZE_FLAGS = ("epochs", "batch_size", "layers", "init_channels")

# Settings that may differ between a run and its resumption: where and how it
# runs, not what it computes.
RUNTIME_KEYS = ("out", "resume", "overwrite", "device", "data_dir", "nb201_table", "quiet", "deterministic",
                "threads", "genotype", "recompute_depthwise", "memory_format", "cuda_graphs")

OUTPUT_FILES = ("result.json", "metrics.jsonl", "checkpoint.pt")
OUTPUT_PATTERNS = (runtime.TENSORBOARD_PATTERN,)

# Test hook (environment variable, used by tests/test_train.py only; runtime.epoch_checkpointed
# is the other): save every rank's final network state to <dir>/state_rank<r>.pt.
_DUMP_STATE = "NASOPS_TEST_DUMP_STATE"

TrainError = RunError


# ---- the genotype file --------------------------------------------------------------------

def read_genotype(path: str) -> dict:
    """The parsed genotype.json at ``path`` (a file, or a folder holding one), with
    ``space`` (a key of :data:`KINDS`) and ``genotype``; TrainError naming the file
    and the problem otherwise."""
    p = Path(path)
    if p.is_dir():
        p = p / "genotype.json"
    if not p.is_file():
        raise TrainError(f"--genotype {path}: no such file (the genotype.json a search wrote)")
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainError(f"--genotype {p}: not a JSON file ({exc})") from None
    if not isinstance(doc, dict):
        raise TrainError(f"--genotype {p}: expected a JSON object with space and genotype, "
                         f"got a {type(doc).__name__}")
    for key in ("space", "genotype"):
        if key not in doc:
            raise TrainError(f"--genotype {p}: missing key {key!r} (a genotype.json has space, "
                             f"genotype, ...; this one has {', '.join(sorted(doc)) or 'nothing'})")
    space = doc["space"]
    if not isinstance(space, str):
        raise TrainError(f"--genotype {p}: space: expected the name of a space, got {space!r}")
    if space not in KINDS:
        raise TrainError(f"--genotype {p}: space {space!r} is not one nasops.train can train "
                         f"(expected one of {', '.join(KINDS)})")
    doc["path"] = str(p)
    return doc


# ---- flags --------------------------------------------------------------------------------

def _recipe_help(name: str, fmt: Callable = str) -> str:
    return "; ".join(f"{kind} {fmt(getattr(r, name))}" for kind, r in RECIPES.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nasops.train",
        description="Train a found architecture (genotype.json of nasops.search) from scratch and "
                    "evaluate it on the test split.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--genotype", required=True, metavar="FILE",
                   help="the genotype.json of a search (or its folder)")
    g.add_argument("--layers", type=int, default=None,
                   help="darts/rdarts: cells (recipe: 20 on CIFAR, 5 on digits); nb201: cells per stage "
                        "(5 on CIFAR, 2 on digits); vit: encoders (default: the search's depth)")
    g.add_argument("--init-channels", type=int, default=None,
                   help="channels C of the first cells (recipe: darts 36 on CIFAR, 16 on digits; nb201 16); "
                        "vit: the embedding dimension (default: the search's)")
    g.add_argument("--auxiliary-weight", type=float, default=None,
                   help="darts/rdarts: weight of the auxiliary head's loss; 0 = no head (recipe 0.4)")
    g.add_argument("--drop-path", type=float, default=None,
                   help="darts/rdarts: drop-path probability p; epoch e of E uses p * e / E, as DARTS "
                        "(recipe 0.2)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=list(datasets.DATASETS),
                   help="default: the one the search used (genotype.json's config), else digits")
    g.add_argument("--data-dir", default=None, help="folder of the CIFAR python batches")
    g.add_argument("--image-size", type=int, default=32, help="synthetic: image height and width")
    g.add_argument("--num-classes", type=int, default=10, help="synthetic: number of classes")
    g.add_argument("--synthetic-size", type=int, default=512, help="synthetic: images in the training split")
    g.add_argument("--crop-padding", type=int, default=None,
                   help="random crop of the image padded by this many pixels; 0 = none "
                        "(default: an eighth of the image side: 4 on CIFAR, 1 on digits)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on, except for digits)")
    g.add_argument("--cutout", type=int, default=None,
                   help="side of the Cutout square in pixels; 0 = none (default: half the image side "
                        "where the recipe cuts out: " + _recipe_help("cutout", lambda c: "yes" if c else "no")
                        + ")")

    g = p.add_argument_group("optimisation (defaults: the genotype kind's recipe)")
    g.add_argument("--epochs", type=int, default=None,
                   help="recipe: darts 600, nb201 200, dasvit 500 (digits: darts 15, nb201 40, dasvit 20)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="per process (recipe: darts 96, nb201 256, dasvit 128; digits: 64)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="at most this many training steps per epoch (quick tries and tests)")
    g.add_argument("--optimizer", default=None, choices=["sgd", "adamw"],
                   help="recipe: " + _recipe_help("optimizer"))
    g.add_argument("--lr", type=float, default=None, help="peak learning rate; recipe: " + _recipe_help("lr"))
    g.add_argument("--lr-min", type=float, default=None,
                   help="learning rate at the end of the cosine; recipe: " + _recipe_help("lr_min"))
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum (recipe 0.9)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help="SGD Nesterov momentum; recipe: " + _recipe_help("nesterov"))
    g.add_argument("--weight-decay", type=float, default=None,
                   help="recipe: " + _recipe_help("weight_decay"))
    g.add_argument("--warmup-epochs", type=int, default=None,
                   help="epochs of linear warm-up before the cosine; recipe: " + _recipe_help("warmup_epochs"))
    g.add_argument("--warmup-lr", type=float, default=None,
                   help="learning rate of the first warm-up epoch; recipe: " + _recipe_help("warmup_lr"))
    g.add_argument("--grad-clip", type=float, default=None,
                   help="max gradient norm, 0 = off; recipe: " + _recipe_help("grad_clip"))
    g.add_argument("--eval-every", type=int, default=1,
                   help="evaluate on the test split every this many epochs (0: after the last only; "
                        "the last epoch is always evaluated)")

    g = p.add_argument_group("how to run")
    g.add_argument("--seed", type=int, default=0, help="seeds the initialisation, batch order and augmentation")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: bfloat16 autocast on CPU, float16 + gradient scaler on CUDA")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms, so a resumed run equals an uninterrupted one")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: 1 for the 8x8 digits, torch's choice otherwise)")
    runtime.add_memory_format_flag(g)
    g.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: replay the network's training forward and backward from CUDA graphs "
                        "(captured at the first step; nasops.cuda_graphs): the step no longer waits for "
                        "Python and dispatch. One GPU (not under torchrun); not with --amp")
    g.add_argument("--recompute-depthwise", action="store_true",
                   help="each sep_conv and dil_conv keeps its input, not its depthwise convolutions' "
                        "outputs, and computes those again in the backward: less memory for a little "
                        "more time, same results (as nasops.search's flag)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=None, type=runtime.out_folder,
                   help="output folder (default <genotype's folder>/train-<dataset>-<seed>)")
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of another run in --out")
    g.add_argument("--nb201-table", nargs="?", const=str(nb201.BUILTIN_TABLE), default=None, metavar="CSV",
                   help="nb201: the table whose 200-epoch test accuracies are printed beside the measured "
                        "one (default, or the flag alone: the NAS-Bench-201 table shipped with nasops)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, with every unset recipe flag filled from the genotype kind's recipe.

    Raises TrainError for an unusable genotype file; flag errors exit with status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
    doc = read_genotype(args.genotype)
    args.genotype_doc = doc
    args.space = doc["space"]
    kind = KINDS[args.space]
    recipe = kind.recipe

    if args.dataset is None:
        searched = (doc.get("config") or {}).get("dataset") if isinstance(doc.get("config"), dict) else None
        args.dataset = searched if searched in datasets.DATASETS else "digits"
    sizes = recipe.digits if args.dataset == "digits" else recipe.paper
    for name in SIZE_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, sizes.get(name))
    warmup_given = args.warmup_epochs is not None
    for name in ("optimizer", "lr", "lr_min", "momentum", "nesterov", "weight_decay", "warmup_epochs",
                 "warmup_lr", "grad_clip", "drop_path", "auxiliary_weight"):
        if getattr(args, name) is None:  # a scale may override a recipe value (dasvit's warm-up)
            setattr(args, name, sizes.get(name, getattr(recipe, name)))
    # Augmentation scales with the image: DARTS' padding 4 and Cutout 16 are for 32x32.
    side = 8 if args.dataset == "digits" else 32 if args.dataset in ("cifar10", "cifar100") else args.image_size
    if args.crop_padding is None:
        args.crop_padding = side // 8
    if args.cutout is None:
        args.cutout = side // 2 if recipe.cutout else 0
    if args.flip is None:
        args.flip = args.dataset != "digits"  # a mirrored digit is another symbol (or none)
    if args.out is None:
        args.out = os.path.join(os.path.dirname(doc["path"]) or ".", f"train-{args.dataset}-{args.seed}")

    runtime.refuse_nonfinite_numbers(parser, args, allow_inf=("grad_clip",))
    runtime.refuse_below(parser, args, ("epochs", "batch_size", "layers", "init_channels", "threads", "max_steps"), 1)
    runtime.refuse_below(parser, args, ("crop_padding", "cutout", "warmup_epochs", "eval_every", "lr", "lr_min",
                                        "momentum", "weight_decay", "warmup_lr", "grad_clip", "auxiliary_weight"), 0)
    if not 0.0 <= args.drop_path < 1.0:
        parser.error(f"--drop-path: expected a probability in [0, 1), got {args.drop_path}")
    if not 0 <= args.seed <= runtime.MAX_SEED:
        parser.error(f"--seed: expected an integer in [0, {runtime.MAX_SEED}], got {args.seed}")
    if not warmup_given:  # the recipe's warm-up shortens to leave a short run one epoch of cosine
        args.warmup_epochs = min(args.warmup_epochs, args.epochs - 1)
    if args.warmup_epochs >= args.epochs:
        parser.error(f"--warmup-epochs: expected fewer than --epochs ({args.epochs}), got {args.warmup_epochs}")
    for feature, flag in (("auxiliary", "auxiliary_weight"), ("drop_path", "drop_path")):
        if getattr(args, flag) > 0 and feature not in kind.features:
            parser.error(f"--{flag.replace('_', '-')}: {args.space} networks have no "
                         f"{feature.replace('_', '-')} (got {getattr(args, flag)}; use 0)")
    runtime.refuse_memory_format(parser, args)
    if args.cuda_graphs and args.amp:
        parser.error("--cuda-graphs and --amp exclude each other: the graphs are captured without autocast")
    if args.nb201_table and args.space != "nb201":
        parser.error(f"--nb201-table: needs an nb201 genotype (this one is of space {args.space})")
    if args.space == "nb201":
        try:
            args.nb201_table = nb201.checked_table(args.nb201_table)
        except (OSError, ValueError) as exc:
            parser.error(f"--nb201-table: {exc}".replace("\n", " "))
    return args


def run_config(args: argparse.Namespace) -> dict:
    """What decides what a run computes (compared on --resume): the flags, less where
    and how it runs, plus the space and the genotype itself (not its file's path)."""
    config = {k: v for k, v in sorted(vars(args).items())
              if k not in RUNTIME_KEYS and k != "genotype_doc"}
    config["genotype"] = args.genotype_doc["genotype"]
    return config


def learning_rate(epoch: int, *, epochs: int, lr: float, lr_min: float, warmup_epochs: int = 0,
                  warmup_lr: float = 0.0) -> float:
    """The learning rate of ``epoch`` (0-based; one value per epoch, as DARTS steps its
    scheduler): ``warmup_lr`` at epoch 0 rising linearly to ``lr`` at ``warmup_epochs``,
    then cosine-annealed to ``lr_min``, as CosineAnnealingLR over the remaining epochs
    (its closed form: ``lr_min + (lr - lr_min)(1 + cos(pi t / T)) / 2``)."""
    if epoch < warmup_epochs:
        return warmup_lr + (lr - warmup_lr) * epoch / warmup_epochs
    t, T = epoch - warmup_epochs, epochs - warmup_epochs
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t / T)) / 2


def model_cost(model: torch.nn.Module, sample: torch.Tensor) -> dict:
    """``params`` (without ``auxiliary_head.*``, as the papers count), ``params_auxiliary``,
    and ``macs``: multiply-accumulates of one image through the network in eval mode, of
    the convolutions, linear layers and matrix products (what papers call FLOPs or MAdds;
    counted by torch's FlopCounterMode, which counts 2 per multiply-accumulate, halved).
    Normalisations, activations, pooling and additions are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("auxiliary_head."))
    aux = sum(p.numel() for n, p in model.named_parameters() if n.startswith("auxiliary_head."))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(sample[:1])
    finally:
        model.train(was_training)
    return {"params": params, "params_auxiliary": aux, "macs": counter.get_total_flops() // 2}


# ---- the run -----------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Train (the CLI). Returns the result (result.json's content) plus ``metrics`` and ``out``."""
    args = None
    try:
        args = parse_args(argv)
        return _run(args)
    except TrainError as exc:
        if __name__ == "__main__" or argv is None:
            print(f"nasops.train: error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
    except KeyboardInterrupt:
        if (__name__ == "__main__" or argv is None) and args is not None:
            print("\n" + runtime.interrupted_message("nasops.train", args.out), file=sys.stderr)
            raise SystemExit(130) from None  # the shell's status for a SIGINT
        raise


def cli() -> None:
    """The ``nasops-train`` command: :func:`main` without its result. A console
    script exits with what its function returns, and a returned dict would be
    printed as an error with status 1."""
    main()


def load_trained(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The network a ``nasops.train`` run trained, with the weights of its last
    finished epoch, in eval mode on ``device``: a plain ``nn.Module`` of
    ``nasops.spaces.discrete`` (DARTS, NB201) or ``nasops.spaces.vit``, for
    inference, fine-tuning or export in the caller's own code.

    ``path``: the run's ``--out`` folder or its ``checkpoint.pt``. The network
    takes what ``nasops.data`` fed it: ``(B, in_channels, image_size,
    image_size)`` images whose pixels in [0, 1] are normalised per channel as
    ``(pixel - mean) / std``, and returns the logits of ``num_classes``
    classes; ``model.inputs`` (and ``result.json``'s ``inputs``) holds those
    numbers. Raises TrainError naming the file when it is not the checkpoint of
    a training run (a search's checkpoint: train its genotype first).
    """
    path = Path(path)
    file = path / "checkpoint.pt" if path.is_dir() else path
    if not file.is_file():
        raise TrainError(f"path: no checkpoint at {file} (expected a nasops.train --out folder or its checkpoint.pt)")
    checkpoint = runtime.load_checkpoint(file, flag="path")
    if "method" in checkpoint:
        raise TrainError(f"path: {file} is the checkpoint of a search; train its genotype first "
                         f"(python -m nasops.train --genotype {file.parent})")
    if not {"config", "model", "inputs"} <= checkpoint.keys():
        raise TrainError(f"path: {file} is not the checkpoint of a nasops.train run of this version "
                         f"(it lacks {sorted({'config', 'model', 'inputs'} - checkpoint.keys())})")
    config, inputs = checkpoint["config"], checkpoint["inputs"]
    data = argparse.Namespace(in_channels=inputs["in_channels"], num_classes=inputs["num_classes"])
    model = KINDS[config["space"]].build(config["space"], config["genotype"], argparse.Namespace(**config), data)
    model.load_state_dict(checkpoint["model"])
    model.inputs = dict(inputs)
    return model.to(device).eval()


def _run(args) -> dict:
    rank, world_size, device = runtime.setup_distributed(args.device)
    with runtime.run_settings(args, device, world_size):
        return _train(args, rank, world_size, device)


def _epoch_seeds(seed: int, epoch: int, rank: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (the global RNGs, the augmentation) of (seed, epoch, rank)."""
    a, b = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    return int(a), int(b)


def _train(args, rank: int, world_size: int, device: torch.device) -> dict:
    is_main = rank == 0
    if args.deterministic:
        runtime.make_deterministic()
    amp = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None
    doc = args.genotype_doc
    if args.cuda_graphs:
        _refuse_cuda_graphs(args, device, world_size)

    try:
        kwargs = dict(data_dir=args.data_dir, image_size=args.image_size, num_classes=args.num_classes,
                      synthetic_size=args.synthetic_size, seed=args.seed)
        train_data = datasets.load(args.dataset, split="train", **kwargs)
        test_data = datasets.load(args.dataset, split="test", **kwargs)
        loader = datasets.ShardedLoader(train_data, torch.arange(len(train_data)), args.batch_size,
                                        seed=args.seed, rank=rank, world_size=world_size)
    except (OSError, ValueError) as exc:
        raise TrainError(str(exc)) from None
    steps = min(len(loader), args.max_steps) if args.max_steps else len(loader)

    runtime.seed_everything(args.seed)
    try:
        model = KINDS[args.space].build(args.space, doc["genotype"], args, train_data)
    except ValueError as exc:
        raise TrainError(f"--genotype {doc['path']}: {exc}") from None
    cost = model_cost(model, test_data.batch(torch.arange(1))[0])
    fmt = runtime.memory_format(args, device)
    model = model.to(device, memory_format=fmt)
    if args.recompute_depthwise and not set_recompute_depthwise(model):
        raise TrainError(f"--recompute-depthwise: the genotype of {doc['path']} has no sep_conv or dil_conv op")

    out = Path(args.out)
    config = run_config(args)
    checkpoint = runtime.prepare_out(out, args, config, _run_files, "nasops.train", needs=("optimizer",))
    if world_size > 1:
        dist.barrier()

    optimizer = _optimizer(args, model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    history: list[dict] = []
    start_epoch = 0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scaler.load_state_dict(checkpoint["scaler"])
            start_epoch, history = checkpoint["epoch"], list(checkpoint["history"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise TrainError(f"--resume: the checkpoint {out / 'checkpoint.pt'} does not fit this "
                             f"network ({type(exc).__name__}: {exc})") from None
        if is_main:
            write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            print(f"resuming {out} after epoch {start_epoch} of {args.epochs}", flush=True)

    graphed = graph_training(model, optimizer) if args.cuda_graphs else None
    network = model
    if world_size > 1:
        # static_graph: the set of parameters a training step uses never changes, and
        # some may never be used (e.g. the convs of an NB201 node whose outputs all go
        # to Zero ops); DDP then needs no per-step search for unused parameters.
        network = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)
    if is_main:
        print(f"training {args.space} genotype of {doc['path']} on {args.dataset}: "
              f"{cost['params'] / 1e6:.3f} M parameters, {cost['macs'] / 1e6:.2f} M MACs per image",
              flush=True)
    with runtime.scalar_writer(out, is_main) as writer:
        for epoch in range(start_epoch, args.epochs):
            record = _train_epoch(args, epoch, steps, network, model, optimizer, scaler, loader, train_data,
                                  amp, fmt, rank, world_size, device, show=is_main and not args.quiet)
            if args.eval_every and (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                record.update(_evaluate(model, test_data, args.batch_size, amp, fmt, rank, world_size, device))
            history.append(record)
            if is_main:
                # The checkpoint first: a kill between the two leaves a metrics.jsonl one
                # line short, which --resume writes again from the checkpoint's history.
                runtime.save_atomic({
                    "epoch": epoch + 1, "config": config, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "history": history,
                    "inputs": train_data.describe(), "nasops_version": nasops.__version__}, out / "checkpoint.pt")
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                runtime.write_scalars(writer, record, epoch + 1)
                test = (f" | test loss {record['test_loss']:.4f} top-1 {record['test_acc']:.4f} "
                        f"top-5 {record['test_top5']:.4f}" if "test_acc" in record else "")
                print(f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f} "
                      f"acc {record['train_acc']:.4f}{test} | lr {record['lr']:.5f} | "
                      f"{record['time']:.1f} s", flush=True)
                runtime.epoch_checkpointed(epoch + 1)

    if graphed is not None:
        counts = {"captures": graphed.captures, "replayed": graphed.replayed, "eager": graphed.eager}
        graphed.release()  # the graphs' memory goes back now (main() may run in-process)
    final = history[-1]
    result = {
        "space": args.space, "genotype": doc["genotype"], "genotype_str": doc.get("genotype_str"),
        "genotype_file": doc["path"], "dataset": args.dataset, "test_samples": final["test_samples"],
        "test_acc": final["test_acc"], "test_top5": final["test_top5"], "test_loss": final["test_loss"],
        **cost, "flops": 2 * cost["macs"], "epochs": args.epochs, "seed": args.seed,
        "world_size": world_size, "train_time": sum(r["time"] for r in history),
        "memory_format": "channels_last" if fmt == torch.channels_last else "contiguous", "config": config,
        "recipe": KINDS[args.space].recipe.source, "inputs": train_data.describe(),
    }
    if graphed is not None:
        result["cuda_graphs"] = counts
    table = _nb201_accuracies(args, doc)
    if table is not None:
        result["nb201"] = table
    if is_main:
        write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
        print(f"test top-1 {100 * result['test_acc']:.2f} % top-5 {100 * result['test_top5']:.2f} % "
              f"({result['test_samples']} {args.dataset} test images) | {cost['params'] / 1e6:.3f} M parameters"
              f" | {cost['macs'] / 1e6:.2f} M MACs per image", flush=True)
        if table is not None:
            print(f"NAS-Bench-201 200-epoch test accuracy of {doc['genotype']['arch']} (C=16, N=5): "
                  + ", ".join(f"{k} {v:.2f} %" for k, v in table.items())
                  + f"; measured here: {args.dataset} {100 * result['test_acc']:.2f} %", flush=True)
        print(f"outputs in {out}/", flush=True)
    if os.environ.get(_DUMP_STATE):
        torch.save(model.state_dict(), os.path.join(os.environ[_DUMP_STATE], f"state_rank{rank}.pt"))
    return {**result, "metrics": history, "out": str(out)}


def _optimizer(args, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def _refuse_cuda_graphs(args, device: torch.device, world_size: int) -> None:
    """TrainError where --cuda-graphs cannot run: not a CUDA device; under torchrun
    (DistributedDataParallel around a graphed network is untested here)."""
    if device.type != "cuda":
        raise TrainError(f"--cuda-graphs: needs a CUDA device, got --device {args.device} ({device})")
    if world_size > 1:
        raise TrainError(f"--cuda-graphs: one process only, got {world_size} under torchrun "
                         f"(DistributedDataParallel around a graphed network is untested); train on one GPU, "
                         f"or without --cuda-graphs")


def graph_training(model, optimizer, **options) -> cuda_graphs.GraphedForward:
    """--cuda-graphs: ``model``'s training calls replayed from CUDA graphs
    (:func:`nasops.cuda_graphs.graph_network`, one pair: every parameter trains;
    evaluation runs the network's own forward). A DARTS network's drop-path
    probability becomes a device tensor that each epoch fills (a replay reads it
    there; a Python float would stay the capture's value), so the graphs are
    captured once for the whole run; their drop-path draws come from the graphs'
    own random offsets (and are made at probability 0 too), so a graphed run equals
    an eager one in distribution, not draw for draw. ``options``: graph_network's
    (benchmarks/bench_train_step.py's CPU tests pass a stand-in capture)."""
    if hasattr(model, "drop_path_prob"):
        device = next(model.parameters()).device
        model.drop_path_prob = torch.tensor(float(model.drop_path_prob), device=device)
    return cuda_graphs.graph_network(model, [p for g in optimizer.param_groups for p in g["params"]], **options)


def train_step(network, x, y, *, optimizer, scaler, amp, auxiliary_weight: float, grad_clip: float,
               params) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step of ``network`` on the batch ``(x, y)``, as ``nasops.train``
    runs it (benchmarks/bench_train_step.py times this function): gradients set to
    None, the forward under ``amp``'s autocast (None: off), cross-entropy (plus
    ``auxiliary_weight`` times the auxiliary head's, when the network returns its
    logits too), the backward through ``scaler``, the gradient norm of ``params``
    clipped to ``grad_clip`` (0: off), the optimizer's step. Returns the loss and
    the logits (not yet synchronised: reading them waits for the device)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        out = network(x)
    logits, logits_aux = out if isinstance(out, tuple) else (out, None)
    loss = F.cross_entropy(logits.float(), y)
    if logits_aux is not None:
        loss = loss + auxiliary_weight * F.cross_entropy(logits_aux.float(), y)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def _train_epoch(args, epoch, steps, network, model, optimizer, scaler, loader, train_data, amp, fmt,
                 rank, world_size, device, show):
    lr = learning_rate(epoch, epochs=args.epochs, lr=args.lr, lr_min=args.lr_min,
                       warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    drop_prob = args.drop_path * epoch / args.epochs  # DARTS: linear from 0
    if isinstance(getattr(model, "drop_path_prob", None), torch.Tensor):
        model.drop_path_prob.fill_(drop_prob)  # --cuda-graphs: the graphs read it on the device
    elif hasattr(model, "drop_path_prob"):
        model.drop_path_prob = drop_prob
    global_seed, augment_seed = _epoch_seeds(args.seed, epoch, rank)
    runtime.seed_everything(global_seed)
    augment_rng = torch.Generator().manual_seed(augment_seed)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    network.train()
    # The loss and correct answers are summed on the device and read back only for a
    # shown progress bar (runtime.EpochProgress) and at the epoch's end: read every
    # step, the host would wait for each step's kernels before launching the next
    # step's (and augmenting its batch), which CUDA graphs make short.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0

    def figures(seconds):
        return dict(loss=f"{loss_sum.item() / count:.3f}", acc=f"{correct.item() / count:.3f}",
                    samples_s=f"{world_size * count / seconds:.0f}")
    progress = runtime.EpochProgress(steps, f"epoch {epoch + 1}/{args.epochs}", show)
    for step, (x, y) in zip(range(steps), loader.epoch(epoch)):
        x = datasets.augment(x, generator=augment_rng, crop_padding=args.crop_padding, flip=args.flip,
                             cutout=args.cutout, fill=train_data.black)
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        loss, logits = train_step(network, x, y, optimizer=optimizer, scaler=scaler, amp=amp,
                                  auxiliary_weight=args.auxiliary_weight, grad_clip=args.grad_clip, params=params)
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
        progress.step(step, figures)
    progress.close()
    sums = torch.tensor([loss_sum.item(), correct.item(), count], dtype=torch.float64)
    sums = runtime.end_epoch_on_ranks(sums, model, world_size, device)
    seconds = time.perf_counter() - progress.start
    return {"epoch": epoch + 1, "train_loss": (sums[0] / sums[2]).item(), "train_acc": (sums[1] / sums[2]).item(),
            "lr": lr, "drop_path": drop_prob, "steps": steps, "time": seconds,
            "samples_per_s": sums[2].item() / seconds}


def _evaluate(model, data, batch_size, amp, fmt, rank, world_size, device) -> dict:
    """Loss, top-1 and top-5 accuracy over the whole split (each sample once over the ranks)."""
    model.eval()
    k = min(5, data.num_classes)
    # Summed on the device and read once (a read per batch would wait for its kernels).
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1, top-k
    count = 0
    with torch.no_grad():
        for x, y in datasets.eval_batches(data, batch_size, rank=rank, world_size=world_size):
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x).float()
            top = logits.topk(k, dim=1).indices
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (top[:, 0] == y).sum(),
                                 (top == y[:, None]).any(1).sum()]).double()
            count += len(y)
    sums = torch.cat([sums, sums.new_full((1,), count)])  # ..., count
    if world_size > 1:
        dist.all_reduce(sums)
    sums = sums.cpu()
    return {"test_loss": (sums[0] / sums[3]).item(), "test_acc": (sums[1] / sums[3]).item(),
            "test_top5": (sums[2] / sums[3]).item(), "test_samples": int(sums[3])}


def _nb201_accuracies(args, doc) -> dict | None:
    """The NB201 table's accuracies of the genotype (--nb201-table, by default the
    shipped table); None for other spaces."""
    if args.space != "nb201":
        return None
    try:
        return nb201.lookup(doc["genotype"]["arch"], args.nb201_table)
    except (KeyError, ValueError) as exc:
        raise TrainError(f"--nb201-table {args.nb201_table}: {exc}") from None


# ---- output folder ----------------------------------------------------------------------

def _run_files(out: Path) -> list[Path]:
    found = [out / name for name in OUTPUT_FILES if (out / name).exists()]
    for pattern in OUTPUT_PATTERNS:
        found += sorted(out.glob(pattern))
    return found


if __name__ == "__main__":
    cli()
