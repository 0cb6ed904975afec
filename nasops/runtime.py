"""What every long-running command of nasops (``nasops.search``, and the
commands that train or evaluate what it finds) needs around its loop: the
process group under torchrun, the process-wide settings of a run, the end of an
epoch on every rank, seeding and determinism, RNG states for
checkpoints, and files written atomically so that a kill at any moment leaves
the old or the new file, never a torn one.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import pickle
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import nasops.backend


class RunError(RuntimeError):
    """A run that cannot start or continue, with the reason (bad out folder, checkpoint, device, ...)."""


def refuse_nonfinite_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace,
                             allow_inf: tuple[str, ...] = ()) -> None:
    """A flag error for any float flag of ``parser`` given nan or +-inf (``float()``
    takes them, and a range check lets nan through: every comparison with it is
    false); inf passes for the flags (dests) in ``allow_inf``, where it means "no
    limit" (a gradient clip's max norm)."""
    for action in parser._actions:
        if action.type is not float:
            continue
        value = getattr(args, action.dest, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and (math.isnan(v) or (math.isinf(v) and action.dest not in allow_inf)):
                parser.error(f"{action.option_strings[-1]}: expected a finite number, got {v}")


def refuse_below(parser: argparse.ArgumentParser, args: argparse.Namespace, names, minimum: int) -> None:
    """A flag error for the first of the flags (dests) ``names`` whose value is below
    ``minimum``; a flag left at None (not given, no default) passes."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')}: expected >= {minimum}, got {value}")


# --memory-format auto, per device type: channels_last where the whole step
# measured faster on the CPU (benchmarks/RESULTS.md: the search step, "Whole
# search steps": eager PyTorch and nasops both 1.5-1.9x; the train step of a
# found network, "The train step": 1.2-1.5x). CUDA stays contiguous until measured
# on a GPU (bench_search_step.py and bench_train_step.py print both layouts there).
AUTO_MEMORY_FORMAT = {"cpu": "channels_last", "cuda": "contiguous"}
# Spaces whose networks work on token tensors (B, N, C): no channels_last layout
# there (only the patch embedding is a convolution), auto is contiguous.
TOKEN_SPACES = ("vit",)


def add_memory_format_flag(group) -> None:
    """--memory-format, as nasops.search and nasops.train take it."""
    group.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                       help="layout of the network's feature maps; auto: "
                            + ", ".join(f"{k} on {d}" for d, k in AUTO_MEMORY_FORMAT.items())
                            + f" (what measured faster); contiguous for {', '.join(TOKEN_SPACES)} networks")


def refuse_memory_format(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a flag error for channels_last on a token network (``args.space``)."""
    if args.space in TOKEN_SPACES and args.memory_format == "channels_last":
        parser.error(f"--memory-format channels_last: the {args.space} space's networks work on token "
                     f"tensors (B, N, C), which have no channels_last layout; use auto or contiguous")


def memory_format(args: argparse.Namespace, device: torch.device) -> torch.memory_format:
    """The feature-map layout of ``args.memory_format`` for a network of ``args.space``
    on ``device`` (auto: AUTO_MEMORY_FORMAT; contiguous for TOKEN_SPACES)."""
    name = args.memory_format
    if name == "auto":
        name = "contiguous" if args.space in TOKEN_SPACES else AUTO_MEMORY_FORMAT[device.type]
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun.

    ``device_arg``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``;
    under torchrun each process takes ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        raise RunError(f"--device: expected auto, cpu, cuda or cuda:N, got {device_arg!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"--device: expected auto, cpu, cuda or cuda:N, got {device_arg!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {device_arg}: no CUDA device is visible to torch")
        if world_size > 1:  # one GPU per process
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # the CUDA RNG state we checkpoint is the current device's
    if world_size == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


@contextlib.contextmanager
def run_settings(args, device: torch.device, world_size: int):
    """The process-wide settings of one run of nasops.search or nasops.train, put
    back as found when it ends (``main()`` may run in-process: tests, notebooks):
    the thread count (--threads; by default 1 for the 8x8 digits on the CPU, ops
    that small lose more to a thread pool than they gain), the deterministic mode
    (:func:`make_deterministic`'s switches) and the nasops backend the run may
    set; the process group is destroyed."""
    saved_backend = nasops.backend._override
    saved_deterministic = (torch.are_deterministic_algorithms_enabled(),
                           torch.is_deterministic_algorithms_warn_only_enabled(),
                           torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                           os.environ.get(_CUBLAS_WORKSPACE))
    saved_threads = torch.get_num_threads()
    threads = args.threads or (1 if args.dataset == "digits" and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        nasops.backend._override = saved_backend
        algorithms, warn_only, cudnn_deterministic, cudnn_benchmark, workspace = saved_deterministic
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, cudnn_benchmark
        if workspace is None:
            os.environ.pop(_CUBLAS_WORKSPACE, None)
        else:
            os.environ[_CUBLAS_WORKSPACE] = workspace
        torch.set_num_threads(saved_threads)
        if world_size > 1:
            dist.destroy_process_group()


def end_epoch_on_ranks(sums: torch.Tensor, model: torch.nn.Module, world_size: int,
                       device: torch.device) -> torch.Tensor:
    """An epoch's end on every rank: ``sums`` (a CPU tensor of per-rank sums) summed
    over the ranks, and the model's buffers made rank 0's; on CUDA, the queued work
    finished, so that the epoch's time is measured after it. Returns the sums."""
    if world_size > 1:
        reduced = sums.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(reduced)
        sums = reduced.cpu()
        # BatchNorm running statistics are per rank; keep rank 0's so that every
        # rank holds, evaluates and (rank 0) checkpoints one model.
        for b in model.buffers():
            dist.broadcast(b.data, src=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sums


# cuBLAS is deterministic with a fixed workspace, set through the environment.
_CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"


def make_deterministic() -> None:
    # warn_only: a few CUDA kernels (pooling backward) have no deterministic
    # variant; torch names them in a warning instead of stopping the run.
    os.environ.setdefault(_CUBLAS_WORKSPACE, ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# The largest --seed: NumPy takes 32-bit seeds, and the loaders derive a few
# from --seed by small offsets.
MAX_SEED = 2**31 - 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: touching every GPU would open a context on
        # each of them from every DDP process.
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def write_atomic(path: Path, write) -> None:
    """``write(tmp)`` to ``<path>.tmp<pid>``, then ``os.replace`` it onto ``path``.
    An exception (Ctrl-C included) removes the temporary file; what a SIGKILL
    leaves, :func:`prepare_out` removes when the folder is next used."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a kill leaves the old or the new file."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` atomically: a kill leaves the old or the new file, never half of one."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def temporary_files(out: Path) -> list[Path]:
    """The ``<name>.tmp<pid>`` files of atomic writes that a killed process left in ``out``."""
    return sorted(p for p in out.glob("*.tmp*") if re.fullmatch(r".+\.tmp\d+", p.name)) if out.is_dir() else []


def out_folder(text: str) -> str:
    """argparse type of ``--out``: a folder name, not an empty string (which would be
    the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder name, got an empty string")
    return text


# What a checkpoint may hold besides tensors and plain Python values: the
# pickled numpy RNG state of rng_states() (np.random.get_state(): a uint32 ndarray).
# numpy._core.multiarray by import, not attribute: NumPy 2 moved numpy.core
# there, and NumPy 1.26 has a numpy._core stub whose multiarray is imported only
# on demand (np._core.multiarray failed there once anything had imported np._core).
CHECKPOINT_GLOBALS = [importlib.import_module("numpy._core.multiarray")._reconstruct,
                      np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: Path, flag: str = "--resume") -> dict:
    """Read a checkpoint written by :func:`save_atomic`; RunError naming ``flag`` otherwise.

    Loaded with ``weights_only=True``: unpickling a file from elsewhere could
    run code, so only tensors, plain Python values and CHECKPOINT_GLOBALS load;
    a file holding anything else is refused, naming what it holds.
    """
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is long and suggests weights_only=False: keep the line
        # that names what was refused (a global or class: the file would run
        # code), else the one saying why the file is unreadable.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        refused = [line for line in lines if "GLOBAL" in line or "allowlisted" in line]
        if refused:
            raise RunError(f"{flag}: refused to load the checkpoint {path}: it holds objects a nasops "
                           f"checkpoint never holds, and loading them could run code ({refused[0]})") from None
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
        raise RunError(f"{flag}: cannot read the checkpoint {path} (UnpicklingError: {detail}); "
                       f"it is not a nasops checkpoint or it is damaged") from None
    except Exception as exc:  # any unreadable file is the same problem to the user
        raise RunError(f"{flag}: cannot read the checkpoint {path} ({type(exc).__name__}: {exc}); "
                       f"it is not a nasops checkpoint or it is damaged") from None


def config_differences(saved: dict, config: dict) -> dict:
    """``{key: (saved value, current value)}`` for every setting that differs
    (a key missing on one side reads ``"<unset>"``): what a resume must refuse."""
    pairs = {k: (saved.get(k, "<unset>"), config.get(k, "<unset>")) for k in sorted(set(saved) | set(config))}
    return {k: (a, b) for k, (a, b) in pairs.items() if a != b}


def prepare_out(out: Path, args, config: dict, run_files, program: str, needs=()) -> dict | None:
    """Check ``--out`` against ``--resume`` / ``--overwrite`` for ``program``
    (``nasops.search``, ``nasops.train``): returns the checkpoint to resume, or
    None for a new run, whose folder is then created and emptied of the files of
    an earlier run (``run_files(out)``; on rank 0 only, every rank checks).

    A resumed checkpoint must hold a ``config`` dict equal to ``config`` and
    the keys ``needs``; a folder with another run's files needs
    ``--overwrite``. RunError otherwise, naming the flag and what to do. What a
    run stopped before its first checkpoint leaves is removed, not counted as a
    run: the temporary files of an atomic write that a kill interrupted, and
    TensorBoard event files (opened at the start, their first scalars written
    after the first checkpoint).
    """
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: is a file, not a folder")
    leftovers = temporary_files(out)
    existing = [p for p in run_files(out) if p not in leftovers] if out.is_dir() else []
    if not (out / "checkpoint.pt").exists() and all(p.match(TENSORBOARD_PATTERN) for p in existing):
        leftovers, existing = leftovers + existing, []
    names = ", ".join(p.name for p in existing)
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    if args.resume:
        path = out / "checkpoint.pt"
        if not path.exists() and existing:
            raise RunError(f"--resume: no checkpoint at {path}: the run there stopped before it "
                           f"checkpointed its first epoch ({names} left); start it again with --overwrite")
        if not path.exists():
            raise RunError(f"--resume: no checkpoint at {path}; start a new run without --resume")
        checkpoint = load_checkpoint(path)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), dict):
            missing = ["config"]
        else:
            missing = [k for k in needs if k not in checkpoint]
        if missing:
            raise RunError(f"--resume: the file {path} is not a {program} checkpoint (no {', '.join(missing)})")
        differ = config_differences(checkpoint["config"], config)
        if differ:
            lines = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise RunError(f"--resume: the checkpoint {path} is of a different run ({lines}); "
                           f"resume with the same settings, or start anew with --overwrite")
        if main_rank:
            for p in leftovers:
                p.unlink(missing_ok=True)
        return checkpoint
    if existing and not args.overwrite:
        raise RunError(f"--out {out} holds the files of another run ({names}); "
                       f"pass --resume to continue it or --overwrite to replace it")
    if main_rank:
        for p in existing + leftovers:
            p.unlink(missing_ok=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    return None


# ---- TensorBoard (optional) ---------------------------------------------------------------

# Event files the scalar writer leaves in a run folder (a new run replaces them with the rest).
TENSORBOARD_PATTERN = "events.out.tfevents.*"


def progress_bar(total: int, desc: str, show: bool):
    """The per-epoch progress bar of a run, drawn only where it can redraw itself:
    when ``show`` and stderr is a terminal. Redirected to a file (nohup, a batch
    job's log) a bar leaves every update behind on one ever longer line; the
    epoch's summary line, printed by the caller, is what a log needs."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=None if show else True, leave=False, unit="step",
                dynamic_ncols=True)


class EpochProgress:
    """An epoch's :func:`progress_bar` whose figures are read at most every
    ``every`` seconds and at the last step: a loop keeps its sums on the device,
    and each read of them waits for the queued kernels, so reading every step
    would keep the host from running ahead of a GPU. ``start``: when the epoch
    began (its time is measured from there)."""

    def __init__(self, steps: int, desc: str, show: bool, every: float = 0.5):
        self.bar = progress_bar(steps, desc, show)
        self.steps, self.every = steps, every
        self.start = self.shown = time.perf_counter()

    def step(self, step: int, figures) -> None:
        """Step ``step`` (from 0) done; ``figures(seconds since start)`` -> the bar's
        postfix, called only when the bar is drawn and due."""
        now = time.perf_counter()
        if not self.bar.disable and (now - self.shown >= self.every or step + 1 == self.steps):
            self.shown = now
            self.bar.set_postfix(**figures(now - self.start))
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _summary_writer_class():
    """torch's SummaryWriter, or None when the ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def open_scalar_writer(out: Path):
    """A TensorBoard writer whose event files go straight into the run folder
    ``out`` (``tensorboard --logdir runs/`` then shows every run), or None when
    tensorboard is not installed: it is optional, and nothing else needs it."""
    writer_class = _summary_writer_class()
    return None if writer_class is None else writer_class(log_dir=str(out))


@contextlib.contextmanager
def scalar_writer(out: Path, enabled: bool = True):
    """:func:`open_scalar_writer` for the block (None when not ``enabled``, e.g. on
    ranks other than 0), closed when it ends, also by an exception: the writer
    runs a thread."""
    writer = open_scalar_writer(out) if enabled else None
    try:
        yield writer
    finally:
        if writer is not None:
            writer.close()


# Test hook (tests/helpers.py, run_killed_after_epoch): a driver run with this
# set to N kills itself with SIGKILL right after epoch N's checkpoint is written
# ("N:SIGINT": interrupts itself, as Ctrl-C does).
_KILL_AFTER_EPOCH = "NASOPS_TEST_KILL_AFTER_EPOCH"


def epoch_checkpointed(epoch: int) -> None:
    """Where a driver has written the checkpoint of (1-based) ``epoch``: the kill test hook."""
    when, _, how = os.environ.get(_KILL_AFTER_EPOCH, "").partition(":")
    if when == str(epoch):
        os.kill(os.getpid(), getattr(signal, how or "SIGKILL"))


def interrupted_message(program: str, out) -> str:
    """What a driver prints when Ctrl-C stops it (instead of a traceback)."""
    return (f"{program}: interrupted; the epochs checkpointed in {out} are kept: the same command "
            f"with --resume continues after the last one")


def write_scalars(writer, record: dict, step: int) -> None:
    """Every number of a metrics record (not ``epoch`` itself) as a scalar at
    ``step``, flushed so that a killed run keeps what it wrote. No-op without a writer."""
    if writer is None:
        return
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, step)
    writer.flush()
