"""Hard-exit inference against full depth: realised saving vs the cost model's prediction (issue #13).

    python benchmarks/hardexit_throughput.py                   # trains a digits run first (~2 min on 2 CPU cores)
    python benchmarks/hardexit_throughput.py --checkpoint runs/x/checkpoint.pt --device cuda

Without ``--checkpoint`` it first runs a short hardexit search on the 8x8 digits
(``TRAIN_FLAGS``: nb201, C=16, 2 cells per stage = 6 exits) into ``--run-dir``
(reused when it already holds a finished run), so the exits are meaningful. It
then loads the finished run (EMA network, :func:`nasops.methods.hardexit.load_run`)
and the thresholds its deployment rule chose (``summary.json``), and times, on
``--rounds`` batches of ``--batch-size`` held-out images (the run's calibration and
selection splits, repeated in a fixed shuffled order to fill them):

- ``full``:  full depth as the cost model counts it (C_N): every node and every
  exit head (``forward_exits``);
- ``plain``: the search network alone at full depth (``forward_plain``: no
  intermediate exit or stop heads), what a deployment without early exits runs;
- ``hard``:  ``hard_exit_inference`` at the chosen (tau_s, tau_c, T): samples
  leave after the node where they meet the rule, the rest go on as a compacted batch.

One timed pass runs every batch once; the providers take turns pass by pass
(rotating which goes first), after ``--warmup`` untimed passes each; medians of
``--repeats`` passes, in wall time and, on the CPU, in this process's CPU time
(``time.process_time``: on a shared machine the other tenants' load leaves it
alone; with one thread it is the time the inference computed). Predicted saving
= 1 - mean(c_e) over exactly the timed samples (c_e = C_e / C_N from the FLOP
count, e the exit each sample took); realised saving = 1 - t_hard / t_full; the
target is realised / predicted >= 0.8 on the CPU (0.85 on a GPU). Against
``plain`` both are restated with C_plain in place of C_N.

Where the two differ, the per-node times tell why: the full-depth pass is also
timed node by node, and the saving these time shares predict for the same exits
(``time_share_saving``) is what a cost model in seconds would have said; hard
exit's own overhead (heads, decisions, compaction) is the gap between that and
the realised saving. ``--results`` replaces this run's section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import harness  # noqa: E402
import report  # noqa: E402
from nasops.methods.hardexit import data_splits, hard_exit_inference, load_run  # noqa: E402

TRAIN_FLAGS = ["--method", "hardexit", "--space", "nb201", "--layers", "2", "--init-channels", "16",
               "--epochs", "12", "--lambda-target", "1.0", "--seed", "0", "--quiet"]
SECTION = "hardexit"


def train(run_dir: Path) -> Path:
    checkpoint = run_dir / "checkpoint.pt"
    if (run_dir / "summary.json").exists():
        print(f"reusing the finished run in {run_dir}", flush=True)
        return checkpoint
    from nasops.search import main
    main([*TRAIN_FLAGS, "--out", str(run_dir), "--overwrite"])
    return checkpoint


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint) if args.checkpoint else train(Path(args.run_dir))
    model, run_args, data = load_run(checkpoint, device=device, data_dir=args.data_dir)
    summary = json.loads((checkpoint.parent / "summary.json").read_text())
    chosen = summary["chosen"]
    tau_s = math.inf if chosen["full_depth"] else chosen["tau_s"]
    tau_c = math.inf if chosen["full_depth"] else chosen["tau_c"]
    temperature = chosen["temperature"]

    splits = data_splits(run_args, len(data))
    held = torch.cat([splits["calibration"], splits["selection"]])
    order = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(0))]
    total = args.rounds * args.batch_size
    order = order.repeat(math.ceil(total / len(order)))[:total]
    batches = [data.batch(order[r * args.batch_size:(r + 1) * args.batch_size])[0].to(device)
               for r in range(args.rounds)]

    # The exits the timed samples take, and the cost model's prediction for them.
    with torch.no_grad():
        exits = torch.cat([hard_exit_inference(model, x, tau_s=tau_s, tau_c=tau_c,
                                               temperature=temperature).exit_index.cpu() for x in batches])
    costs = model.exit_costs.double().cpu()
    plain_ratio = model.plain_flops / model.exit_flops[-1].item()  # C_plain / C_N
    mean_cost = costs[exits].mean().item()

    @torch.no_grad()
    def run_full():
        for x in batches:
            model.forward_exits(x)

    @torch.no_grad()
    def run_plain():
        for x in batches:
            model.forward_plain(x)

    @torch.no_grad()
    def run_hard():
        for x in batches:
            hard_exit_inference(model, x, tau_s=tau_s, tau_c=tau_c, temperature=temperature)

    @torch.no_grad()
    def node_times():
        """CPU (or synchronised wall) seconds of the stem + controller and of each node and head."""
        clock = time.process_time if device.type == "cpu" else time.perf_counter
        spent = [0.0] * (model.num_exits + 1)
        for x in batches:
            sync(device)
            start = clock()
            state, mixing, _ = model.begin(x)
            sync(device)
            spent[0] += clock() - start
            for i in range(model.num_exits):
                start = clock()
                state = model.node(i, state, mixing)
                model.exit(i, state)
                sync(device)
                spent[i + 1] += clock() - start
        return spent

    providers = {"full": run_full, "plain": run_plain, "hard": run_hard}
    names = list(providers)
    for _ in range(args.warmup):
        for name in names:
            providers[name]()
    sync(device)
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % 3:] + names[:r % 3]:
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            providers[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    shares = [statistics.median(column) for column in zip(*(node_times() for _ in range(args.repeats)))]
    cumulative = [sum(shares[:i + 2]) / sum(shares) for i in range(model.num_exits)]  # stem + nodes 1..i
    time_share_cost = sum(cumulative[e] for e in exits.tolist()) / len(exits)
    medians = {name: statistics.median(t) for name, t in times.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu_times.items()}
    predicted = 1 - mean_cost
    realised = 1 - medians["hard"] / medians["full"]
    realised_cpu = 1 - cpu_medians["hard"] / cpu_medians["full"]
    predicted_plain = 1 - mean_cost / plain_ratio
    realised_plain = 1 - medians["hard"] / medians["plain"]
    return {
        "cpu_median_s": cpu_medians, "realised_saving_cpu_time": realised_cpu,
        "realised_over_predicted_cpu_time": realised_cpu / predicted if predicted > 0 else float("nan"),
        "node_time_shares": [t / sum(shares) for t in shares],
        "time_share_costs": cumulative, "time_share_saving": 1 - time_share_cost,
        "device": harness.device_name(str(device)), "threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint), "batch_size": args.batch_size, "rounds": args.rounds,
        "repeats": args.repeats, "thresholds": {"tau_s": chosen["tau_s"], "tau_c": chosen["tau_c"],
                                                "temperature": temperature},
        "selection_top1": chosen["top1"], "full_depth_top1": summary["full_depth"]["top1"],
        "exit_fractions": (torch.bincount(exits, minlength=len(costs)).double() / len(exits)).tolist(),
        "costs": costs.tolist(), "plain_over_full_flops": plain_ratio,
        "median_s": medians, "spread_s": {n: (min(t), max(t)) for n, t in times.items()},
        "samples_per_s": {n: total / m for n, m in medians.items()},
        "predicted_saving": predicted, "realised_saving": realised,
        "realised_over_predicted": realised / predicted if predicted > 0 else float("nan"),
        "predicted_saving_vs_plain": predicted_plain, "realised_saving_vs_plain": realised_plain,
        "realised_over_predicted_vs_plain": realised_plain / predicted_plain if predicted_plain > 0
        else float("nan"),
    }


def markdown(result: dict, command: str, kind: str) -> str:
    m, cpu, sps = result["median_s"], result["cpu_median_s"], result["samples_per_s"]
    samples = result["batch_size"] * result["rounds"]
    rows = ["| provider | median wall s per pass | min-max wall s | samples/s (wall) | median CPU s per pass "
            "| FLOPs (C_N = 1) |", "|---|---|---|---|---|---|"]
    flops = {"full": "1.000", "plain": f"{result['plain_over_full_flops']:.3f}",
             "hard": f"{1 - result['predicted_saving']:.3f} (mean c_e)"}
    for name in ("full", "plain", "hard"):
        lo, hi = result["spread_s"][name]
        rows.append(f"| {name} | {m[name]:.4f} | {lo:.4f}-{hi:.4f} | {sps[name]:.0f} | {cpu[name]:.4f} "
                    f"| {flops[name]} |")
    target = 0.85 if kind.startswith("cuda") else 0.8

    def verdict(ratio):
        return "met" if ratio >= target else "NOT met"
    return "\n".join([
        f"<!-- BEGIN {SECTION} {kind} -->",
        f"## Hard-exit inference on {kind}",
        "",
        "Hard-exit DARTS (`--method hardexit`, issue #13): throughput of hard-exit inference at the "
        "thresholds the run's deployment rule chose, against full depth, and the saving the FLOP cost "
        "model predicts for the same samples (see `benchmarks/hardexit_throughput.py`).",
        "",
        f"- device: {result['device']}",
        f"- versions: {report.versions()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`",
        f"- run: digits, `{' '.join(TRAIN_FLAGS)}`; chosen tau_s={result['thresholds']['tau_s']}, "
        f"tau_c={result['thresholds']['tau_c']}, T={result['thresholds']['temperature']:.4g}: top-1 "
        f"{result['selection_top1']:.4f} on the selection split (full depth {result['full_depth_top1']:.4f})",
        f"- timed: {result['rounds']} batches of {result['batch_size']} held-out images per pass "
        f"({samples} samples), medians of {result['repeats']} passes, providers in rotating order",
        "- exit fractions of the timed samples: "
        + ", ".join(f"{f:.3f}" for f in result["exit_fractions"])
        + "; normalised costs c_i: " + ", ".join(f"{c:.3f}" for c in result["costs"]),
        "",
        *rows,
        "",
        f"**Saving vs full depth (C_N): predicted {result['predicted_saving']:.3f}, realised "
        f"{result['realised_saving']:.3f} in wall time ({100 * result['realised_over_predicted']:.0f} % of "
        f"the prediction: {verdict(result['realised_over_predicted'])}) and "
        f"{result['realised_saving_cpu_time']:.3f} in CPU time "
        f"({100 * result['realised_over_predicted_cpu_time']:.0f} %: "
        f"{verdict(result['realised_over_predicted_cpu_time'])}); target {100 * target:.0f} %.** "
        f"Against the plain search network (C_plain = {result['plain_over_full_flops']:.3f} C_N): predicted "
        f"{result['predicted_saving_vs_plain']:.3f}, realised {result['realised_saving_vs_plain']:.3f} "
        f"({100 * result['realised_over_predicted_vs_plain']:.0f} %).",
        "",
        "Time shares of the full-depth pass (stem + controller, then node i with its head): "
        + ", ".join(f"{100 * t:.1f} %" for t in result["node_time_shares"])
        + "; FLOP shares of the nodes: "
        + ", ".join(f"{100 * (c - p):.1f} %" for c, p in zip(result["costs"], [0.0] + result["costs"][:-1]))
        + f". A cost model in these seconds would have predicted a saving of "
        f"{result['time_share_saving']:.3f} for the same exits.",
        f"<!-- END {SECTION} {kind} -->",
    ])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a finished hardexit run's checkpoint.pt")
    parser.add_argument("--run-dir", default="runs/hardexit-bench", help="where to train one without --checkpoint")
    parser.add_argument("--data-dir", default=None, help="the run's --data-dir (CIFAR runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4, help="batches per timed pass")
    parser.add_argument("--repeats", type=int, default=15, help="timed passes per provider")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per provider")
    parser.add_argument("--kind", default=None,
                        help="section name (default: cpu-<threads>t or cuda)")
    parser.add_argument("--results", type=Path, default=None,
                        help="replace this kind's section of this file (benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    result = measure(args)
    kind = args.kind or ("cuda" if args.device.startswith("cuda") else f"cpu-{result['threads']}t")
    command = "python benchmarks/hardexit_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result, command.strip(), kind)
    print(json.dumps(result, indent=1))
    print(text)
    if args.results:
        report.update_results(args.results, {(SECTION, kind): text})
    return result


if __name__ == "__main__":
    main()
