"""The MIDAS search step against the DARTS search step (same space, batch, backend).

A search step is what ``python -m nasops.search`` runs per batch pair:
``method.step(train_batch, val_batch)`` = one architecture step (forward and
backward on the validation batch, Adam update) and one weight step (forward
and backward on the training batch, SGD update), first order. Both methods get
the same network size, data and backend, built by the driver's own
``build_model``/``from_args`` from the driver's flags and laid out as the driver
lays it out (``--memory-format auto``: channels_last on the CPU). Steps are timed in
blocks interleaved round-robin (benchmarks/harness.py, ``provider_orders``):
one untimed step, then ``block`` timed ones, per method per round; medians and
the MIDAS/DARTS ratio are reported, of wall time and of the process's CPU time
(``time.process_time``). On a shared machine other jobs stretch the wall time
of whichever step they overlap; the CPU time of a one-thread step is what the
step itself cost (with more threads it also counts the pool's spinning).

Configurations:
- ``driver-default``: the driver with no flags (darts space, digits 8x8, C=8,
  5 cells, batch 64, one thread, as the driver sets for digits);
- ``darts-c16-32px``: the DARTS paper's search network (C=16, 8 cells) on
  32x32 synthetic 3-channel images, batch 16, one thread (on this project's
  shared 2-core machine, with other jobs running, a two-thread step at batch
  32 took 88 s, a one-thread step at batch 16 9 s: the thread pool waits on
  the other jobs, and the ratio drowns in that noise);
- ``nb201-c16-32px``: NB201 (C=16, 5 cells per stage) on the same images.

    python benchmarks/bench_midas_step.py [--configs driver-default ...] [--reps 8]
        [--backend auto] [--write benchmarks/RESULTS.md]

``--write`` replaces the block between ``<!-- BEGIN midas step -->`` and
``<!-- END midas step -->`` in RESULTS.md (appends it if missing).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import nasops  # noqa: E402
from nasops import data as datasets  # noqa: E402
from nasops import methods, runtime  # noqa: E402
from nasops import search  # noqa: E402
from nasops.search import parse_args  # noqa: E402

CONFIGS = {
    "driver-default": ["--space", "darts"],
    "darts-c16-32px": ["--space", "darts", "--dataset", "synthetic", "--image-size", "32", "--init-channels",
                       "16", "--layers", "8", "--batch-size", "16", "--threads", "1"],
    "nb201-c16-32px": ["--space", "nb201", "--dataset", "synthetic", "--image-size", "32", "--init-channels",
                       "16", "--layers", "5", "--batch-size", "16", "--threads", "1"],
}
BEGIN, END = "<!-- BEGIN midas step -->", "<!-- END midas step -->"


def build(method: str, flags: list[str], device: torch.device):
    """(method object, train batch, val batch) as the driver would build them."""
    args = parse_args([*flags, "--method", method])
    data = datasets.load(args.dataset, image_size=args.image_size, num_classes=args.num_classes,
                         synthetic_size=max(args.synthetic_size, 4 * args.batch_size), seed=args.seed)
    train_idx, val_idx = datasets.split(len(data), args.train_portion, args.seed)
    train = next(datasets.ShardedLoader(data, train_idx, args.batch_size, seed=0).epoch(0))
    val = next(datasets.ShardedLoader(data, val_idx, args.batch_size, seed=1).epoch(0))
    runtime.seed_everything(args.seed)
    cls = methods.get(method)
    model = cls.build_model(args, data).to(device)
    model.train()
    built = cls.from_args(model, args, device=device, amp=None)
    search._prepare_network(built, args, device)  # the driver's layout (--memory-format auto)
    fmt = runtime.memory_format(args, device)
    return built, search._in_format(train, fmt), search._in_format(val, fmt), args


def time_config(name: str, flags: list[str], reps: int, block: int, backend: str, device: torch.device) -> dict:
    if backend != "auto":
        nasops.set_backend(backend)
    built = {m: build(m, flags, device) for m in ("darts", "midas")}
    args = built["darts"][3]
    threads = args.threads or (1 if args.dataset == "digits" and device.type == "cpu" else None)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        steps = {m: (lambda b=b: b[0].step(b[1], b[2])) for m, b in built.items()}
        for fn in steps.values():  # warm-up
            fn()
            fn()
        wall = {m: [] for m in steps}
        cpu = {m: [] for m in steps}
        for order in harness.provider_orders(list(steps), -(-reps // block)):
            for m in order:
                steps[m]()  # settles the heap after the other method's step
                for _ in range(block):
                    harness.sync(str(device))
                    start, start_cpu = time.perf_counter(), time.process_time()
                    steps[m]()
                    harness.sync(str(device))
                    wall[m].append(time.perf_counter() - start)
                    cpu[m].append(time.process_time() - start_cpu)
        med = {m: harness.median(wall[m]) for m in steps}
        med_cpu = {m: harness.median(cpu[m]) for m in steps}
        return {"config": name, "flags": " ".join(flags), "threads": torch.get_num_threads(),
                "darts_s": med["darts"], "midas_s": med["midas"], "ratio": med["midas"] / med["darts"],
                "darts_cpu_s": med_cpu["darts"], "midas_cpu_s": med_cpu["midas"],
                "cpu_ratio": med_cpu["midas"] / med_cpu["darts"], "reps": len(wall["darts"]),
                "backend": nasops.backend.resolve(None if backend == "auto" else backend, device),
                "layout": str(runtime.memory_format(args, device)).removeprefix("torch.")}
    finally:
        torch.set_num_threads(saved_threads)


def section(rows: list[dict], device: torch.device, command: str) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = harness.markdown_table(
        ["config", "driver flags", "backend", "layout", "threads", "steps", "DARTS wall (s)", "MIDAS wall (s)",
         "MIDAS / DARTS wall", "DARTS CPU (s)", "MIDAS CPU (s)", "MIDAS / DARTS CPU"],
        [[r["config"], f"`{r['flags']}`", r["backend"], r["layout"], r["threads"], r["reps"], f"{r['darts_s']:.3f}",
          f"{r['midas_s']:.3f}", f"{r['ratio']:.2f}x", f"{r['darts_cpu_s']:.3f}", f"{r['midas_cpu_s']:.3f}",
          f"{r['cpu_ratio']:.2f}x"] for r in rows])
    return "\n".join([
        BEGIN, "## MIDAS search step vs DARTS search step", "",
        f"- device: {harness.device_name(str(device)).rsplit(',', 1)[0]} (threads per run: the table); "
        f"torch {torch.__version__}, Python "
        f"{platform.python_version()}; {date}",
        f"- command: `{command}`",
        "- a step = `method.step(train_batch, val_batch)`: architecture step (forward + backward on the "
        "validation batch, Adam) + weight step (forward + backward on the training batch, SGD), first order; "
        "medians of steps timed in interleaved blocks (benchmarks/bench_midas_step.py).",
        "", table, "", END])


def write(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    runtime.write_text(path, new)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--reps", type=int, default=8, help="timed steps per method and config")
    p.add_argument("--block", type=int, default=2, help="timed steps per block")
    p.add_argument("--backend", default="auto", choices=["auto", *nasops.backend.BACKENDS])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--write", type=Path, default=None, help="RESULTS.md to update")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    rows = []
    for name in a.configs:
        row = time_config(name, CONFIGS[name], a.reps, a.block, a.backend, device)
        print(f"{name}: DARTS {row['darts_s'] * 1e3:.1f} ms, MIDAS {row['midas_s'] * 1e3:.1f} ms, "
              f"ratio {row['ratio']:.2f}x; CPU time {row['darts_cpu_s'] * 1e3:.1f} / {row['midas_cpu_s'] * 1e3:.1f} ms, "
              f"ratio {row['cpu_ratio']:.2f}x ({row['backend']}, {row['threads']} threads)", flush=True)
        rows.append(row)
    if a.write:
        command = "python benchmarks/bench_midas_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write(a.write, section(rows, device, command.strip()))
    return rows


if __name__ == "__main__":
    main()
