"""Calibration, threshold sweep, deployment rule and report of hard-exit DARTS
(seed 004, 1.11-1.16; SPEC 4.4). :func:`evaluate` runs it all for a trained
:class:`~nasops.methods.hardexit.HardExitNetwork`; :func:`write_run_folder` writes
the run folder's files.

Protocol (choices where the seed is silent):

- Every exit's logits and stop probability are computed once at full depth on
  the two held-out splits (:func:`nasops.methods.hardexit.data_splits`). The
  dual rule (exit at the first i with ``s_i >= tau_s`` and ``max softmax(y_i / T)
  >= tau_c``, else at N) is then simulated for every sweep point: hard-exit
  inference returns exactly the exit node's full-depth prediction (tested), so
  the simulation is the hard run's result. The chosen point is then run for
  real with :func:`~nasops.methods.hardexit.hard_exit_inference`, and the
  report states whether the two agree (``hard_matches_sweep``,
  ``hard_mismatches``). They cannot agree in rdarts-s4, whose ``noise`` op
  draws new noise on every pass (a tiny run: 29 of 45 samples differed).
- Calibration split: the temperature T* minimising the mean NLL of all exits'
  ``softmax(y_i / T)`` (golden-section search over log T in [0.05, 20]); per exit
  the quantiles (0.1, 0.25, 0.5, 0.75, 0.9) of s_i and of c_i = max softmax(y_i /
  T*); threshold candidates: the pooled quantiles (0.25, 0.5, 0.75) of s_i over
  exits 1..N-1 for tau_s, (0.25, 0.5, 0.75, 0.9) of c_i for tau_c, added to the
  grids, and T* added to the temperature grid.
- Selection split: the sweep over tau_s x tau_c x T; each point's top-1, top-5
  (top-min(5, classes)), mean / P90 (the smallest cost that at least 90 % of the
  samples stay within) / worst normalised cost (the largest on the split; any
  input that no exit takes runs to full depth, C_N = 1), saving = 1 - mean cost,
  exit fractions and ECE (15 equal-width confidence bins; confidence = c_e at
  the point's T). Full depth (every sample at exit N) is a candidate too.
  The accuracy-compute Pareto frontier: points no other point beats on both
  (cost lower or equal, top-1 higher or equal, one strictly).
- Deployment rule (seed 1.16): of the candidates with top-1 >= the accuracy
  target, the lowest mean cost (ties: higher top-1, then grid order); none
  meets it: the most accurate (ties: the cheaper), with ``target_met: false``.
  The numbers at the chosen point are measured on the split where it was
  chosen (a held-out test set belongs to the final training of the cell).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nasops
from nasops.methods.hardexit import HardExitNetwork, data_splits, exit_distribution, hard_exit_inference
from nasops.runtime import write_atomic, write_text

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
TAU_S_CANDIDATE_QUANTILES = (0.25, 0.5, 0.75)
TAU_C_CANDIDATE_QUANTILES = (0.25, 0.5, 0.75, 0.9)
ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)


# ---- evaluation passes ----------------------------------------------------------------------

@torch.no_grad()
def collect_exits(model: HardExitNetwork, data, indices: torch.Tensor, batch_size: int, device):
    """Full-depth pass: (logits (N, n, classes) float32, stop probabilities (n, N-1), labels (n,))."""
    logits, stops, labels = [], [], []
    for start in range(0, len(indices), batch_size):
        x, y = data.batch(indices[start:start + batch_size])
        out = model.forward_exits(x.to(device))
        logits.append(torch.stack([t.float() for t in out.logits]).cpu())
        stops.append(torch.sigmoid(out.stop_logits.float()).cpu())
        labels.append(y)
    return torch.cat(logits, 1), torch.cat(stops), torch.cat(labels)


def confidence(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``max softmax(logits / T)`` over the last dimension."""
    return F.softmax(logits / temperature, dim=-1).amax(-1)


def simulate_exits(stop_prob, logits, *, tau_s: float, tau_c: float, temperature: float) -> torch.Tensor:
    """The dual rule on full-depth outputs: (n,) 0-based exit index of each sample."""
    conf = confidence(logits[:-1], temperature).T  # (n, N-1)
    fire = (stop_prob >= tau_s) & (conf >= tau_c)
    fire = torch.cat([fire, torch.ones_like(fire[:, :1])], dim=1)
    return fire.to(torch.uint8).argmax(1)  # the first exit that fires


# ---- metrics --------------------------------------------------------------------------------

def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 80) -> float:
    """T minimising ``CE(logits / T, labels)`` (convex in 1/T: golden-section on log T)."""
    logits, labels = logits.double(), labels.long()

    def nll(log_t):
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    lo, hi = math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def reliability_bins(conf: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin ((lo, hi], the first [0, hi]): count, mean confidence, accuracy."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(conf.double().clamp(0, 1), edges[1:-1], right=False)
    table = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        table.append({"lo": edges[b].item(), "hi": edges[b + 1].item(), "count": n,
                      "confidence": conf[mask].double().mean().item() if n else None,
                      "accuracy": correct[mask].double().mean().item() if n else None})
    return table


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE = sum_b (n_b / n) |accuracy_b - confidence_b| over equal-width bins."""
    n = conf.numel()
    if n == 0:
        return 0.0
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
               for b in reliability_bins(conf, correct, bins) if b["count"])


def p90(values: torch.Tensor) -> float:
    """The smallest value that at least 90 % of ``values`` do not exceed."""
    ordered = values.double().sort().values
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)].item()


def point_metrics(exit_index, logits, labels, costs, temperature) -> dict:
    """Metrics of the samples leaving at ``exit_index``, from the full-depth
    ``logits`` (N, n, classes) of every exit (module doc)."""
    return prediction_metrics(logits[exit_index, torch.arange(labels.numel())], exit_index, labels, costs,
                              temperature)


def prediction_metrics(chosen, exit_index, labels, costs, temperature) -> dict:
    """Metrics of the predictions ``chosen`` (n, classes) made at ``exit_index`` (n,)."""
    n, n_exits = labels.numel(), costs.numel()
    correct = chosen.argmax(1) == labels
    k = min(5, chosen.shape[1])
    top5 = (chosen.topk(k, dim=1).indices == labels[:, None]).any(1)
    cost = costs.double()[exit_index]
    counts = torch.bincount(exit_index, minlength=n_exits)
    return {"top1": correct.double().mean().item(), "top5": top5.double().mean().item(),
            "mean_cost": cost.mean().item(), "p90_cost": p90(cost), "worst_cost": cost.max().item(),
            "saving": 1 - cost.mean().item(),
            "ece": expected_calibration_error(confidence(chosen, temperature), correct),
            "exit_fractions": (counts.double() / n).tolist()}


def pareto_flags(points: list[dict]) -> list[bool]:
    """Per point: on the frontier (no other point has cost <= and top-1 >=, one strictly)."""
    flags = []
    for p in points:
        dominated = any(o["mean_cost"] <= p["mean_cost"] and o["top1"] >= p["top1"]
                        and (o["mean_cost"] < p["mean_cost"] or o["top1"] > p["top1"]) for o in points)
        flags.append(not dominated)
    return flags


def choose_point(points: list[dict], target: float) -> tuple[int, bool]:
    """(index, target met) by the deployment rule (module doc)."""
    if not points:
        raise ValueError("points: expected at least one candidate")
    feasible = [i for i, p in enumerate(points) if p["top1"] >= target]
    if feasible:
        return min(feasible, key=lambda i: (points[i]["mean_cost"], -points[i]["top1"], i)), True
    return min(range(len(points)), key=lambda i: (-points[i]["top1"], points[i]["mean_cost"], i)), False


def sweep(stop_prob, logits, labels, costs, tau_s_grid, tau_c_grid, temperature_grid) -> list[dict]:
    """Every (T, tau_s, tau_c) of the grids (in that nesting order), then full depth."""
    points = []
    for temperature in temperature_grid:
        for tau_s in tau_s_grid:
            for tau_c in tau_c_grid:
                exits = simulate_exits(stop_prob, logits, tau_s=tau_s, tau_c=tau_c, temperature=temperature)
                points.append({"tau_s": tau_s, "tau_c": tau_c, "temperature": temperature, "full_depth": False,
                               **point_metrics(exits, logits, labels, costs, temperature)})
    last = torch.full_like(labels, logits.shape[0] - 1)
    points.append({"tau_s": None, "tau_c": None, "temperature": 1.0, "full_depth": True,
                   **point_metrics(last, logits, labels, costs, 1.0)})
    return points


def _quantiles(values: torch.Tensor, qs=QUANTILES) -> dict[str, float]:
    if values.numel() == 0:
        return {}
    result = torch.quantile(values.double().flatten(), torch.tensor(qs, dtype=torch.float64))
    return {f"q{round(100 * q)}": v for q, v in zip(qs, result.tolist())}


def calibrate(logits, stop_prob, labels) -> dict:
    """The calibration summary and threshold candidates (module doc)."""
    n_exits = logits.shape[0]
    pooled_labels = labels.repeat(n_exits)
    temperature = fit_temperature(logits.reshape(-1, logits.shape[-1]), pooled_labels)
    conf = confidence(logits, temperature)  # (N, n)
    per_exit = []
    for i in range(n_exits):
        per_exit.append({
            "exit": i + 1,
            "accuracy": (logits[i].argmax(1) == labels).double().mean().item(),
            "nll_t1": F.cross_entropy(logits[i], labels).item(),
            "nll_calibrated": F.cross_entropy(logits[i] / temperature, labels).item(),
            "stop_quantiles": _quantiles(stop_prob[:, i]) if i < n_exits - 1 else None,
            "confidence_quantiles": _quantiles(conf[i]),
        })
    flat = logits.reshape(-1, logits.shape[-1])
    return {
        "temperature": temperature,
        "nll_t1": F.cross_entropy(flat, pooled_labels).item(),
        "nll_calibrated": F.cross_entropy(flat / temperature, pooled_labels).item(),
        "per_exit": per_exit,
        "candidates": {
            "tau_s": sorted({round(v, 4) for v in _quantiles(stop_prob, TAU_S_CANDIDATE_QUANTILES).values()}),
            "tau_c": sorted({round(v, 4) for v in _quantiles(conf[:-1], TAU_C_CANDIDATE_QUANTILES).values()}),
        },
    }


# ---- the whole evaluation ---------------------------------------------------------------------

def evaluate(model: HardExitNetwork, run) -> dict:
    """Calibration, sweep, deployment rule and the real hard-exit run at the chosen
    point; ``run`` is the driver's RunContext. Returns the report (see write_run_folder)."""
    args, device = run.args, run.device
    model = model.to(device).eval()
    splits = data_splits(args, len(run.data))
    costs = model.exit_costs.double().cpu()
    batch = args.eval_batch_size

    cal_logits, cal_stop, cal_labels = collect_exits(model, run.data, splits["calibration"], batch, device)
    calibration = calibrate(cal_logits, cal_stop, cal_labels)
    grids = {
        "tau_s": sorted(set(args.tau_s_grid) | set(calibration["candidates"]["tau_s"])),
        "tau_c": sorted(set(args.tau_c_grid) | set(calibration["candidates"]["tau_c"])),
        "temperature": sorted(set(args.temperature_grid) | {round(calibration["temperature"], 4)}),
    }

    logits, stop_prob, labels = collect_exits(model, run.data, splits["selection"], batch, device)
    points = sweep(stop_prob, logits, labels, costs, grids["tau_s"], grids["tau_c"], grids["temperature"])
    for p, flag in zip(points, pareto_flags(points)):
        p["on_frontier"] = flag
    full_depth = points[-1]
    target = args.accuracy_target if args.accuracy_target is not None else max(0.0, full_depth["top1"] - 0.01)
    index, target_met = choose_point(points, target)
    best = points[index]

    # The chosen point for real: compacted batches, nothing computed past a sample's exit.
    tau_s = math.inf if best["full_depth"] else best["tau_s"]
    tau_c = math.inf if best["full_depth"] else best["tau_c"]
    hard_logits, hard_exits, node_batches = [], [], []
    start = time.perf_counter()
    for s in range(0, len(splits["selection"]), batch):
        x, _ = run.data.batch(splits["selection"][s:s + batch])
        result = hard_exit_inference(model, x.to(device), tau_s=tau_s, tau_c=tau_c,
                                     temperature=best["temperature"])
        hard_logits.append(result.logits.cpu())
        hard_exits.append(result.exit_index.cpu())
        node_batches.append(result.node_batches)
    seconds = time.perf_counter() - start
    hard_logits, hard_exits = torch.cat(hard_logits), torch.cat(hard_exits)
    simulated = simulate_exits(stop_prob, logits, tau_s=tau_s, tau_c=tau_c, temperature=best["temperature"])
    full_logits_at_exit = logits[hard_exits, torch.arange(len(labels))]
    agree = (hard_exits == simulated) & (hard_logits.argmax(1) == full_logits_at_exit.argmax(1))

    chosen_conf = confidence(hard_logits, best["temperature"])
    correct = hard_logits.argmax(1) == labels
    n_exits = model.num_exits
    counts = torch.bincount(hard_exits, minlength=n_exits)
    evaluations = torch.tensor([sum(b[i] if i < len(b) else 0 for b in node_batches) for i in range(n_exits)])
    q = exit_distribution(stop_prob)
    soft_probs = (q.T[:, :, None] * F.softmax(logits, dim=-1)).sum(0)
    chosen = {
        **{k: v for k, v in best.items() if k != "on_frontier"},
        **prediction_metrics(hard_logits, hard_exits, labels, costs, best["temperature"]),
        "exit_counts": counts.tolist(),
        "exit_accuracy": [(correct[hard_exits == i].double().mean().item() if counts[i] else None)
                          for i in range(n_exits)],
        "exit_ece": [(expected_calibration_error(chosen_conf[hard_exits == i], correct[hard_exits == i])
                      if counts[i] else None) for i in range(n_exits)],
        "node_evaluations": evaluations.tolist(),
        "mean_flops": (model.exit_flops.cpu()[hard_exits].double().mean().item()),
        "hard_matches_sweep": bool(agree.all()),
        "hard_mismatches": int((~agree).sum()),
        "hard_inference_seconds": seconds,
    }
    summary = {
        "splits": {k: len(v) for k, v in splits.items()},
        "exits": n_exits,
        "costs": {"flops": model.exit_flops.cpu().tolist(), "normalised": costs.tolist(),
                  "plain_flops": model.plain_flops, "plain_normalised": model.plain_flops / model.exit_flops[-1].item(),
                  "unit": "FLOPs per sample of conv and linear layers (2 per multiply-accumulate)"},
        "calibration": calibration,
        "grids": grids,
        "accuracy_target": target,
        "accuracy_target_default": args.accuracy_target is None,
        "target_met": target_met,
        "chosen": chosen,
        "full_depth": {k: v for k, v in full_depth.items() if k not in ("tau_s", "tau_c", "on_frontier")},
        "soft": {"top1": (soft_probs.argmax(1) == labels).double().mean().item(),
                 "expected_cost": (q * costs[None]).sum(1).mean().item()},
        "exit_accuracy_full_depth": [(logits[i].argmax(1) == labels).double().mean().item()
                                     for i in range(n_exits)],
        "reliability": reliability_bins(chosen_conf, correct),
        "sweep": {"points": len(points), "frontier": [p for p in points if p["on_frontier"]]},
    }
    return {"summary": summary, "points": points, "protocol": _protocol(args, splits, grids),
            "env": env_info(device)}


def compact(report: dict) -> dict:
    """The report's headline, for genotype.json."""
    s = report["summary"]
    c = s["chosen"]
    return {"tau_s": c["tau_s"], "tau_c": c["tau_c"], "temperature": c["temperature"],
            "full_depth": c["full_depth"], "top1": c["top1"], "top5": c["top5"], "mean_cost": c["mean_cost"],
            "saving": c["saving"], "accuracy_target": s["accuracy_target"], "target_met": s["target_met"],
            "full_depth_top1": s["full_depth"]["top1"]}


def _protocol(args, splits, grids) -> dict:
    return {
        "seed": args.seed,
        "split_seed": args.seed,
        "split": ("driver: datasets.split(len(data), train_portion, seed) into weights' and architecture "
                  "halves; the held-out share of the architecture half is a torch.randperm seeded with "
                  "seed, split in two: calibration, selection"),
        "train_portion": args.train_portion,
        "holdout_portion": args.holdout_portion,
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "deterministic": bool(args.deterministic),
        "evaluate_only": bool(args.evaluate_only),
        "checkpoint": args.checkpoint,
        "epochs": args.epochs,
        "lambda_schedule": {"target": args.lambda_target, "ramp": args.lambda_ramp,
                            "warmup_epochs": args.warmup_epochs, "ramp_epochs": args.lambda_ramp_epochs},
        "evaluation_network": "EMA" if args.ema_decay > 0 else "live",
        "ema_decay": args.ema_decay,
        "calibration": "temperature by NLL over all exits; quantiles of s and c give threshold candidates",
        "selection": "sweep of tau_s x tau_c x T; rule: lowest mean cost with top-1 >= accuracy target",
        "grids": grids,
        "eval_batch_size": args.eval_batch_size,
    }


def env_info(device) -> dict:
    import numpy

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "numpy": numpy.__version__, "nasops": nasops.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "nasops_backends": {k: v["available"] for k, v in nasops.backends().items()},
            "nasops_backend": nasops.backend.resolve(None, torch.device(device)),
            "cuda": torch.version.cuda, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def pip_freeze() -> str:
    """``name==version`` of every installed distribution (importlib.metadata), sorted."""
    from importlib import metadata

    seen = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name and name.lower() not in seen:
            seen[name.lower()] = f"{name}=={dist.version}"
    return "".join(line + "\n" for _, line in sorted(seen.items()))


# ---- files --------------------------------------------------------------------------------------

POINT_COLUMNS = ("tau_s", "tau_c", "temperature", "full_depth", "top1", "top5", "mean_cost", "p90_cost",
                 "worst_cost", "saving", "ece", "on_frontier")


def _csv(rows: list[dict], columns) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def epoch_rows(metrics: list[dict]) -> tuple[list[dict], list[str]]:
    """train_epoch_metrics.csv: the scalar fields of every epoch record, the
    per-exit lists spread into ``q_exit<i>`` / ``acc_exit<i>`` columns."""
    columns = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "lambda", "expected_cost",
               "delta_alpha_sq", "steps", "time", "samples_per_s"]
    n = max((len(r.get("exit_distribution") or []) for r in metrics), default=0)
    columns += [f"q_exit{i + 1}" for i in range(n)] + [f"acc_exit{i + 1}" for i in range(n)] + ["genotype_str"]
    rows = []
    for r in metrics:
        row = {k: r.get(k) for k in columns}
        for i, v in enumerate(r.get("exit_distribution") or []):
            row[f"q_exit{i + 1}"] = v
        for i, v in enumerate(r.get("exit_accuracy") or []):
            row[f"acc_exit{i + 1}"] = v
        rows.append(row)
    return rows, columns


def write_run_folder(out: Path, report: dict, result: dict) -> None:
    """protocol.json, env_info.json, config.json, pip_freeze.txt,
    train_epoch_metrics.csv, summary.json, pareto.csv, pareto.png,
    reliability.png and exit_histogram.png in ``out``."""
    out = Path(out)
    summary = report["summary"]

    def dump(name, obj):
        write_text(out / name, json.dumps(obj, indent=2) + "\n")

    dump("protocol.json", report["protocol"])
    dump("env_info.json", report["env"])
    dump("config.json", result["config"])
    write_text(out / "pip_freeze.txt", pip_freeze())
    rows, columns = epoch_rows(result.get("metrics", []))
    write_text(out / "train_epoch_metrics.csv", _csv(rows, columns))
    dump("summary.json", {"space": result["space"], "method": result["method"],
                          "genotype_str": result["genotype_str"], **summary})
    write_text(out / "pareto.csv", _csv(report["points"], POINT_COLUMNS))
    _plot_pareto(report["points"], summary, out / "pareto.png")
    _plot_reliability(summary["reliability"], summary["chosen"], out / "reliability.png")
    _plot_exit_histogram(summary, out / "exit_histogram.png")


def _save(fig, path: Path) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _figure():
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.6))
    return fig, fig.add_subplot(1, 1, 1)


def _plot_pareto(points, summary, path):
    fig, ax = _figure()
    sweep = [p for p in points if not p["full_depth"]]
    ax.scatter([p["mean_cost"] for p in sweep], [p["top1"] for p in sweep], s=10, color="#9ecae1",
               label="sweep points")
    frontier = sorted((p for p in points if p["on_frontier"]), key=lambda p: p["mean_cost"])
    ax.plot([p["mean_cost"] for p in frontier], [p["top1"] for p in frontier], "-o", color="#08519c",
            markersize=4, label="Pareto frontier")
    full = summary["full_depth"]
    ax.scatter([full["mean_cost"]], [full["top1"]], marker="s", color="black", label="full depth", zorder=3)
    chosen = summary["chosen"]
    ax.scatter([chosen["mean_cost"]], [chosen["top1"]], marker="*", s=180, color="#e6550d", zorder=4,
               label=f"chosen (tau_s={chosen['tau_s']}, tau_c={chosen['tau_c']}, T={chosen['temperature']:.3g})")
    ax.axhline(summary["accuracy_target"], color="#e6550d", linestyle=":", linewidth=1, label="accuracy target")
    ax.set_xlabel("mean compute (FLOPs / full depth)")
    ax.set_ylabel("top-1 accuracy (selection split)")
    ax.set_title("hard-exit accuracy vs compute")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def _plot_reliability(bins, chosen, path):
    fig, ax = _figure()
    filled = [b for b in bins if b["count"]]
    width = bins[0]["hi"] - bins[0]["lo"]
    ax.bar([b["lo"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           color="#6baed6", edgecolor="#08519c", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.scatter([b["confidence"] for b in filled], [b["accuracy"] for b in filled], color="#e6550d", s=12,
               zorder=3, label="(mean confidence, accuracy)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence max softmax(y_e / T), T = {chosen['temperature']:.3g}")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability at the chosen thresholds (ECE {chosen['ece']:.3f})")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def _plot_exit_histogram(summary, path):
    fig, ax = _figure()
    chosen = summary["chosen"]
    n = len(chosen["exit_fractions"])
    ax.bar(range(1, n + 1), chosen["exit_fractions"], color="#74c476", edgecolor="#238b45")
    for i, (f, c) in enumerate(zip(chosen["exit_fractions"], summary["costs"]["normalised"])):
        ax.text(i + 1, f, f"C={c:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(1, n + 1))
    ax.set_xlabel("exit node")
    ax.set_ylabel("fraction of samples")
    ax.set_title(f"exit depth at the chosen thresholds (mean compute {chosen['mean_cost']:.3f})")
    fig.tight_layout()
    _save(fig, path)
