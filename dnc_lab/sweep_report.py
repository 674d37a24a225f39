"""`dnclab sweep-report`: a sweep's results per configuration, over its seeds.

Read from the trials' run folders only (metrics.jsonl, status.json, eval.jsonl, config.yaml), so a
report can be made at any time, also of a sweep still running. Per configuration:

- seeds, and how many solved (a summary's training BER at or below the target: the config's
  ``train.target_ber``, else ``--solved-ber``), failed, stopped early, not done yet;
- final training BER and loss (the last summary), eval BER per length (the trial's newest
  eval.jsonl record; a sweep writes one after training), steps and seconds to the target (over
  the seeds that reached it): each as n, mean, s.d. (over seeds, n - 1), median, min and max.

Written into the sweep folder: ``report.csv`` (a row per configuration and quantity),
``trials.csv`` (a row per trial), ``report.json`` (both), ``curves.png`` (each configuration's
learning curves: every seed, their median and 25-75% band) and ``eval_ber.png`` (eval BER
against sequence length).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dnc_lab import runs

QUANTITIES = ("final_ber", "final_loss", "steps_to_target", "seconds_to_target")


@dataclass
class TrialResult:
    id: str
    config: str
    seed: int
    status: str
    message: str
    target: float                          # the BER counted as solved
    step: int = 0
    final_ber: Optional[float] = None
    final_loss: Optional[float] = None
    steps_to_target: Optional[int] = None
    seconds_to_target: Optional[float] = None
    eval: dict[int, float] = field(default_factory=dict)    # length -> BER
    curve: list[tuple[int, Optional[float], Optional[float]]] = field(default_factory=list)  # step, ber, loss
    trained_max_length: Optional[int] = None

    @property
    def solved(self) -> bool:
        return self.steps_to_target is not None


def read_trial(run_dir: Path, trial: dict, solved_ber: float) -> TrialResult:
    status = runs.read_status(run_dir)
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        config = {}
    target = (config.get("train") or {}).get("target_ber")
    target = solved_ber if target is None else target
    result = TrialResult(id=trial["id"], config=trial["config"], seed=trial["seed"],
                         status=status.get("status", "?"), message=status.get("message") or "", target=target,
                         step=status.get("step", 0), trained_max_length=(config.get("task") or {}).get("max_length"))
    rows = runs.read_metrics(run_dir)
    result.curve = [(r["step"], r.get("ber"), r.get("loss")) for r in rows]
    if rows:
        result.final_ber, result.final_loss = rows[-1].get("ber"), rows[-1].get("loss")
    for r in rows:
        if r.get("ber") is not None and r["ber"] <= target:
            result.steps_to_target, result.seconds_to_target = r["step"], r.get("time")
            break
    records = []
    if (run_dir / "eval.jsonl").is_file():
        for line in (run_dir / "eval.jsonl").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line cut short
    if records:
        result.eval = {int(r["length"]): r["ber"] for r in records[-1]["rows"]}
    elif status.get("eval"):
        result.eval = {int(k): v for k, v in status["eval"].items()}
    return result


def stats(values: list[float]) -> Optional[dict[str, float]]:
    """n, mean, sd (sample, n - 1; None for one value), median, min, max; None for no values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {"n": len(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class ConfigSummary:
    config: str
    values: dict[str, Any]
    trials: list[TrialResult]

    def counts(self) -> dict[str, int]:
        return {"seeds": len(self.trials), "solved": sum(t.solved for t in self.trials),
                "failed": sum(t.status == "failed" for t in self.trials),
                "stopped": sum(t.status == "stopped" for t in self.trials),
                "not_done": sum(t.status not in runs.DONE_STATUSES for t in self.trials)}

    def quantity(self, name: str) -> Optional[dict]:
        return stats([getattr(t, name) for t in self.trials])

    def lengths(self) -> list[int]:
        return sorted({length for t in self.trials for length in t.eval})

    def eval_stats(self, length: int) -> Optional[dict]:
        return stats([t.eval.get(length) for t in self.trials])


def summarize(sweep_dir: Path, solved_ber: float = 0.001) -> list[ConfigSummary]:
    record = runs.read_sweep(sweep_dir)
    groups: dict[str, ConfigSummary] = {}
    for trial in record["trials"]:
        result = read_trial(sweep_dir / trial["id"], trial, solved_ber)
        groups.setdefault(trial["config"], ConfigSummary(trial["config"], trial["values"], [])).trials.append(result)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------
# Table, CSV, JSON


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _cell(s: Optional[dict], digits: int = 4) -> tuple[str, str, str]:
    """("mean ± sd", "median", "min-max") of a stats dict."""
    if s is None:
        return "-", "-", "-"
    sd = "" if s["sd"] is None else f" ± {_fmt(s['sd'], digits)}"
    return f"{_fmt(s['mean'], digits)}{sd}", _fmt(s["median"], digits), \
        f"{_fmt(s['min'], digits)}-{_fmt(s['max'], digits)}"


def table(summaries: list[ConfigSummary]) -> str:
    """The report as text: a row per configuration and quantity, then eval BER per length."""
    header = ("CONFIG", "SEEDS", "SOLVED", "FAILED", "STOPPED", "QUANTITY", "MEAN ± SD", "MEDIAN", "MIN-MAX")
    rows = []
    for s in summaries:
        c = s.counts()
        counts = (s.config, str(c["seeds"]) + (f" ({c['not_done']} not done)" if c["not_done"] else ""),
                  str(c["solved"]), str(c["failed"]), str(c["stopped"]))
        for i, name in enumerate(QUANTITIES):
            digits = {"seconds_to_target": 1, "steps_to_target": 0}.get(name, 4)
            rows.append((counts if i == 0 else ("",) * 5) + (name.replace("_", " "),) + _cell(s.quantity(name), digits))
        for length in s.lengths():
            note = " (longer than trained)" if s.trials[0].trained_max_length and \
                length > s.trials[0].trained_max_length else ""
            rows.append(("",) * 5 + (f"eval BER, length {length}{note}",) + _cell(s.eval_stats(length)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _records(summaries: list[ConfigSummary]) -> list[dict]:
    """report.csv's rows: configuration x quantity (eval BER per length included)."""
    out = []
    for s in summaries:
        quantities = [(name, s.quantity(name)) for name in QUANTITIES]
        quantities += [(f"eval_ber_{length}", s.eval_stats(length)) for length in s.lengths()]
        for name, st in quantities:
            st = st or {"n": 0}
            out.append({"config": s.config, **s.counts(), "quantity": name,
                        **{k: st.get(k) for k in ("n", "mean", "sd", "median", "min", "max")}})
    return out


def _trial_rows(summaries: list[ConfigSummary]) -> list[dict]:
    lengths = sorted({length for s in summaries for length in s.lengths()})
    return [{"trial": t.id, "config": t.config, "seed": t.seed, "status": t.status, "step": t.step,
             "solved": t.solved, **{q: getattr(t, q) for q in QUANTITIES},
             **{f"eval_ber_{length}": t.eval.get(length) for length in lengths}, "message": t.message}
            for s in summaries for t in s.trials]


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class Report:
    text: str
    files: list[Path]


def write_report(sweep_dir: Path, solved_ber: float = 0.001, plots: bool = True) -> Report:
    """Summaries of the sweep as a text table, and report.csv / trials.csv / report.json / PNGs."""
    summaries = summarize(sweep_dir, solved_ber)
    files = [sweep_dir / "report.csv", sweep_dir / "trials.csv", sweep_dir / "report.json"]
    _write_csv(files[0], _records(summaries))
    _write_csv(files[1], _trial_rows(summaries))
    files[2].write_text(json.dumps({
        "sweep": sweep_dir.name,
        "configs": [{"config": s.config, "values": s.values, **s.counts(),
                     **{name: s.quantity(name) for name in QUANTITIES},
                     "eval_ber": {str(length): s.eval_stats(length) for length in s.lengths()}}
                    for s in summaries],
        "trials": _trial_rows(summaries)}, indent=1) + "\n")
    if plots:
        files += plot(sweep_dir, summaries)
    return Report(table(summaries), files)


# ---------------------------------------------------------------------------------------------
# Plots


def _held(curve: list[tuple[int, Optional[float], Optional[float]]], index: int, steps: list[int],
          hold: bool) -> list[float]:
    """The curve's value (index 1: BER, 2: loss) at each of ``steps``: the last summary at or
    before it; after the run's last summary, held if ``hold`` (a run that reached its target
    stays solved), else NaN (a stopped run says nothing about later steps)."""
    out, j, value = [], 0, math.nan
    for step in steps:
        while j < len(curve) and curve[j][0] <= step:
            value = curve[j][index] if curve[j][index] is not None else math.nan
            j += 1
        out.append(math.nan if not j or (step > curve[-1][0] and not hold) else value)
    return out


def plot(sweep_dir: Path, summaries: list[ConfigSummary]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = [sweep_dir / "curves.png", sweep_dir / "eval_ber.png"]
    n = len(summaries)
    fig, axes = plt.subplots(2, n, figsize=(max(4.2 * n + 0.6, 6.0), 6.8), squeeze=False, sharex="col")
    for col, s in enumerate(summaries):
        steps = sorted({p[0] for t in s.trials for p in t.curve})
        for row, (index, label) in enumerate(((1, "training BER"), (2, "training loss"))):
            ax = axes[row][col]
            held = [np.array(_held(t.curve, index, steps, hold=t.status in ("finished", "reached_target")))
                    for t in s.trials if t.curve and t.status != "failed"]
            for t in s.trials:
                if t.curve:
                    xs = [p[0] for p in t.curve]
                    ys = [np.nan if p[index] is None else p[index] for p in t.curve]
                    ax.plot(xs, ys, color="tab:red" if t.status == "failed" else "tab:blue", alpha=0.25, lw=0.8)
            if held:
                stack = np.vstack(held)
                with np.errstate(all="ignore"):
                    median = np.nanmedian(stack, axis=0)
                    lo, hi = np.nanpercentile(stack, 25, axis=0), np.nanpercentile(stack, 75, axis=0)
                ax.fill_between(steps, lo, hi, color="black", alpha=0.15, lw=0, label="25-75%")
                ax.plot(steps, median, color="black", lw=1.8, label=f"median of {len(held)}")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both", lw=0.5)
            if row == 0:
                c = s.counts()
                ax.set_title(f"{s.config}\n{c['seeds']} seeds, {c['solved']} solved, {c['failed']} failed",
                             fontsize=10)
                if s.trials[0].target:
                    ax.axhline(s.trials[0].target, color="tab:green", ls=":", lw=1, label="target")
                ax.legend(fontsize=8, loc="upper right")
            if col == 0:
                ax.set_ylabel(label)
            if row == 1:
                ax.set_xlabel("step")
    fig.suptitle(f"{sweep_dir.name}: every seed (thin), median and 25-75% band over seeds\n"
                 f"(a run that ended at its target holds its last value)", fontsize=10)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(summaries):
        lengths = s.lengths()
        if not lengths:
            continue
        colour = colours[i % len(colours)]
        for t in s.trials:
            ax.scatter([L + (i - (n - 1) / 2) * 0.12 for L in t.eval], list(t.eval.values()), s=7,
                       color=colour, alpha=0.35, lw=0)
        st = [s.eval_stats(L) for L in lengths]
        ax.plot(lengths, [x["median"] for x in st], color=colour, marker="o", ms=3,
                label=f"{s.config} (median, min-max)")
        ax.fill_between(lengths, [x["min"] for x in st], [x["max"] for x in st], color=colour, alpha=0.12, lw=0)
    trained = summaries[0].trials[0].trained_max_length if summaries and summaries[0].trials else None
    if trained:
        ax.axvline(trained + 0.5, color="grey", ls=":", lw=1)
        ax.text(trained + 0.6, ax.get_ylim()[1] * 0.95, "longer than trained", fontsize=8, va="top", color="grey")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("eval BER (200 sequences per length)")
    ax.set_title(f"{sweep_dir.name}: generalisation over seeds", fontsize=10)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
