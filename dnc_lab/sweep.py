"""Seed and hyper-parameter sweeps on Ray Tune, each trial an ordinary run folder.

A sweep file (``configs/sweeps/*.yaml``) names a base config, the values to try and the seeds:

    config: ../copy.yaml          # the base config, relative to this file
    set: {viz.enabled: false}     # fixed values for every trial (dotted keys, as --set)
    grid: {model.nr_cells: [16, 32]}                # every combination of these values
    random: {train.lr: {loguniform: [1.0e-3, 1.0e-2]}}   # optional: `samples` draws of these
    samples: 1
    seeds: 20                     # 0..19, or a list [0, 5, 7]
    resources: {cpus: 1, gpus: 0} # per trial; gpus may be a fraction (several DNCs share a GPU)
    max_concurrent: null          # trials at once (null: as many as the resources allow)
    max_failures: 2               # retries of a trial whose process or worker dies
    eval_lengths: null            # eval BER at these lengths after training (default: trained + 2x)
    scheduler: null               # or {name: asha, grace_period: 200, reduction_factor: 3}

``dnclab sweep`` expands it into trials (configs x seeds; each trial id reads its values, e.g.
``nr_cells32-seed07``), creates every trial's run folder up front and runs them through Ray Tune:

    experiments/<sweep>/
      sweep.yaml       the sweep as resolved: source file, options, and the trial list (fixed)
      status.json      the sweep's state (running / finished / interrupted / failed), its launches
      visdom.jsonl     the sweep's dashboard: every trial's loss and BER curves, one trace per trial
      .ray/            Ray Tune's own bookkeeping, one folder per launch (not the record)
      <trial>/         an ordinary run folder: config.yaml, metrics.jsonl, checkpoints/, status.json,
                       visdom.jsonl, eval.jsonl, train.log
      report.*, *.png  written by `dnclab sweep-report` (dnc_lab/sweep_report.py)

A trial is ``dnc_lab.training.train`` on its run folder, reporting each metrics row to Tune. When a
trial's process or worker dies, Tune starts it again (``max_failures``) and it resumes from its own
newest checkpoint, exactly. A trial that stops for good (non-finite training) is recorded as failed
and the sweep goes on. ``--resume`` runs only the trials that are not done: the run folders are the
record, not Tune's experiment state, so a trial that finished just before a kill is never redone.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import ray
import yaml
from ray import tune

from dnc_lab import runs
from dnc_lab.config import ConfigError, config_from_dict, load_config, parse_override, save_config

SWEEP_FILE = runs.SWEEP_FILE  # the marker of a sweep folder: runs.list_runs looks inside those
RAY_FOLDER = ".ray"
DONE = runs.DONE_STATUSES  # trial statuses a resumed sweep skips
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


# ---------------------------------------------------------------------------------------------
# The sweep file


@dataclass
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0


@dataclass
class Scheduler:
    """Early stopping of hopeless trials with Ray Tune's ASHA, on the metric at each summary."""

    name: str = "asha"
    metric: str = "ber"
    grace_period: int = 200     # steps every trial gets before it can be stopped
    reduction_factor: float = 3.0  # keep the best 1/reduction_factor at each rung


@dataclass
class SweepSpec:
    source: Path                               # the sweep file
    config: Path                               # the base config
    fixed: dict[str, Any] = field(default_factory=dict)  # `set`
    grid: dict[str, list] = field(default_factory=dict)
    random: dict[str, dict] = field(default_factory=dict)
    samples: int = 1
    sample_seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    resources: Resources = field(default_factory=Resources)
    max_concurrent: Optional[int] = None
    max_failures: int = 2
    eval_lengths: Optional[str] = None
    scheduler: Optional[Scheduler] = None


@dataclass
class Trial:
    id: str                      # the run folder's name inside the sweep folder
    config: str                  # label of its configuration (the trial id without the seed)
    values: dict[str, Any]       # the swept values (dotted keys)
    seed: int
    overrides: list[str]         # every --set item that makes its config from the base config


SPEC_KEYS = ("config", "set", "grid", "random", "samples", "sample_seed", "seeds", "resources",
             "max_concurrent", "max_failures", "eval_lengths", "scheduler")


def load_sweep(path: str | Path, overrides: tuple[str, ...] = ()) -> tuple[SweepSpec, list[Trial]]:
    """Read and check a sweep file; expand it (plus ``--set`` items for every trial) into trials.

    Raises ConfigError naming the file, the key and the problem; every trial's config is checked
    as ``dnclab train`` checks one, so a bad value stops the sweep before anything runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    spec = parse_spec(raw, path)
    return spec, expand(spec, overrides)


def parse_spec(raw: Any, path: Path) -> SweepSpec:
    """The sweep file's mapping -> SweepSpec, each key checked (one error line per problem)."""
    def bad(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {problem}")

    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(SPEC_KEYS)}, got {type(raw).__name__}")
    for key in raw:
        if key not in SPEC_KEYS:
            import difflib
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise bad(str(key), f"unknown key{hint}; allowed: {', '.join(SPEC_KEYS)}")
    if not isinstance(raw.get("config"), str):
        raise bad("config", f"expected the path of the base config (relative to this file), got {raw.get('config')!r}")
    config = (path.parent / raw["config"]).resolve()
    if not config.is_file():
        raise bad("config", f"{raw['config']!r}: no such file ({config})")

    def mapping(key: str) -> dict:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise bad(key, f"expected a mapping of dotted keys (section.key) to values, got {value!r}")
        for dotted in value:
            parse_override(f"{dotted}=0")  # the key's shape: section.key with a known section
            if dotted == "train.seed":
                raise bad(f"{key}.train.seed", "seeds are given by the sweep's `seeds` key")
        return value

    fixed, grid, rand = mapping("set"), mapping("grid"), mapping("random")
    for dotted, values in grid.items():
        if not isinstance(values, list) or not values:
            raise bad(f"grid.{dotted}", f"expected a non-empty list of values, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise bad(f"grid.{dotted}", f"values repeat in {values!r}")
    for dotted, dist in rand.items():
        _check_distribution(dist, lambda problem, d=dotted: bad(f"random.{d}", problem))
    for dotted in fixed:
        if dotted in grid or dotted in rand:
            raise bad(f"set.{dotted}", "also swept in grid/random; give it in one place")
    for dotted in grid:
        if dotted in rand:
            raise bad(f"grid.{dotted}", "also in random; give it in one place")

    samples = _int(raw.get("samples", 1), "samples", bad, minimum=1)
    if samples > 1 and not rand:
        raise bad("samples", f"{samples} samples but no `random` values to draw")
    sample_seed = _int(raw.get("sample_seed", 0), "sample_seed", bad, minimum=0)
    seeds = raw.get("seeds", 1)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise bad("seeds", f"{seeds}: expected a number of seeds >= 1 or a list of seeds")
        seeds = list(range(seeds))
    elif isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in seeds):
        if len(set(seeds)) != len(seeds):
            raise bad("seeds", f"{seeds}: a seed appears twice")
    else:
        raise bad("seeds", f"{seeds!r}: expected a number of seeds (0..n-1) or a non-empty list of integers >= 0")

    res = raw.get("resources") or {}
    if not isinstance(res, dict) or set(res) - {"cpus", "gpus"}:
        raise bad("resources", f"{res!r}: expected a mapping with cpus and/or gpus")
    resources = Resources(cpus=_number(res.get("cpus", 1.0), "resources.cpus", bad, positive=True),
                          gpus=_number(res.get("gpus", 0.0), "resources.gpus", bad, positive=False))
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None:
        max_concurrent = _int(max_concurrent, "max_concurrent", bad, minimum=1)
    max_failures = _int(raw.get("max_failures", 2), "max_failures", bad, minimum=0)
    eval_lengths = raw.get("eval_lengths")
    if eval_lengths is not None:
        from dnc_lab.training import parse_lengths
        try:
            parse_lengths(str(eval_lengths))
        except ValueError as e:
            raise bad("eval_lengths", str(e)) from None
        eval_lengths = str(eval_lengths)
    return SweepSpec(source=path, config=config, fixed=fixed, grid=grid, random=rand, samples=samples,
                     sample_seed=sample_seed, seeds=seeds, resources=resources, max_concurrent=max_concurrent,
                     max_failures=max_failures, eval_lengths=eval_lengths,
                     scheduler=_scheduler(raw.get("scheduler"), bad))


def _int(value: Any, key: str, bad, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad(key, f"{value!r}: expected an integer >= {minimum}")
    return value


def _number(value: Any, key: str, bad, positive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise bad(key, f"{value!r}: expected a number {'> 0' if positive else '>= 0'}")
    return float(value)


def _check_distribution(dist: Any, bad) -> None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise bad(f"{dist!r}: expected one of {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, "
                  f"{{randint: [lo, hi]}} (hi included) or {{choice: [a, b, ...]}}")
    (kind, args), = dist.items()
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise bad(f"choice: expected a non-empty list, got {args!r}")
        return
    numeric = isinstance(args, list) and len(args) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if not numeric or args[0] >= args[1]:
        raise bad(f"{kind}: expected [lo, hi] with lo < hi, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise bad(f"loguniform: expected lo > 0, got {args!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise bad(f"randint: expected integers, got {args!r}")


def _scheduler(raw: Any, bad) -> Optional[Scheduler]:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("name") != "asha":
        raise bad("scheduler", f"{raw!r}: expected null (no early stopping) or a mapping with name: asha")
    unknown = set(raw) - {"name", "metric", "grace_period", "reduction_factor"}
    if unknown:
        raise bad(f"scheduler.{sorted(unknown)[0]}", "unknown key; allowed: name, metric, grace_period, "
                                                     "reduction_factor")
    metric = raw.get("metric", "ber")
    if metric not in ("ber", "loss"):
        raise bad("scheduler.metric", f"{metric!r}: expected 'ber' or 'loss'")
    factor = _number(raw.get("reduction_factor", 3.0), "scheduler.reduction_factor", bad, positive=True)
    if factor <= 1:
        raise bad("scheduler.reduction_factor", f"{factor}: expected a number > 1")
    return Scheduler(metric=metric, grace_period=_int(raw.get("grace_period", 200), "scheduler.grace_period",
                                                      bad, minimum=1), reduction_factor=factor)


def _set_item(dotted: str, value: Any) -> str:
    """A --set item; the value as JSON, which YAML reads back as the same scalar."""
    return f"{dotted}={json.dumps(value)}"


def _label(value: Any) -> str:
    """A value as part of a trial id: 0.005 -> 0p005, True -> true, 'lstm' -> lstm."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}".replace("+", "").replace(".", "p")
    else:
        text = str(value)
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _draw(dist: dict, rng: random.Random) -> Any:
    (kind, args), = dist.items()
    if kind == "choice":
        return rng.choice(args)
    if kind == "randint":
        return rng.randint(args[0], args[1])
    if kind == "loguniform":
        return float(f"{math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))):.4g}")
    return float(f"{rng.uniform(args[0], args[1]):.4g}")


def expand(spec: SweepSpec, overrides: tuple[str, ...] = ()) -> list[Trial]:
    """Configurations (grid combinations x random samples) x seeds, each config checked."""
    for item in overrides:
        section, key, _ = parse_override(item)
        dotted = f"{section}.{key}"
        if dotted == "train.seed":
            raise ConfigError(f"--set {item}: seeds are given by the sweep file's `seeds` key")
        if dotted in spec.grid or dotted in spec.random:
            raise ConfigError(f"--set {item}: {spec.source} sweeps {dotted}; change it there")
    keys = list(spec.grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(spec.grid[k] for k in keys))]
    if spec.random:
        rng = random.Random(spec.sample_seed)
        drawn = [{k: _draw(d, rng) for k, d in spec.random.items()} for _ in range(spec.samples)]
        combos = [{**combo, **sample, "#sample": i} for combo in combos for i, sample in enumerate(drawn)]
    # Short keys in ids (nr_cells32) unless two swept keys share their last part.
    names = {k: k.split(".")[-1] for k in keys}
    if len(set(names.values())) < len(names):
        names = {k: k.replace(".", "-") for k in keys}
    labels = []
    for combo in combos:
        parts = [f"{names[k]}{_label(combo[k])}" for k in keys]
        if "#sample" in combo:
            parts.append(f"r{combo['#sample']}")
        labels.append("-".join(parts))
    if len(set(labels)) < len(labels) or any(len(label) > 80 for label in labels):
        labels = [f"c{i}" for i in range(len(combos))]  # values that do not make distinct short ids
    width = len(str(max(spec.seeds)))

    base = yaml.safe_load(spec.config.read_text())
    fixed = [_set_item(k, v) for k, v in spec.fixed.items()]
    for item, key in zip(fixed, spec.fixed):
        _check_config(base, spec, [item], f"set.{key}")
    trials = []
    for combo, label in zip(combos, labels):
        values = {k: v for k, v in combo.items() if k != "#sample"}
        swept = [_set_item(k, v) for k, v in values.items()]
        for item, key in zip(swept, values):
            _check_config(base, spec, fixed + [item], ("grid." if key in spec.grid else "random.") + key)
        for seed in spec.seeds:
            items = fixed + swept + list(overrides) + [f"train.seed={seed}"]
            _check_config(base, spec, items, f"trial {label or 'seed'} with seed {seed}")
            trial_id = f"{label}-seed{seed:0{width}d}" if label else f"seed{seed:0{width}d}"
            trials.append(Trial(id=trial_id, config=label or "base", values=values, seed=seed, overrides=items))
    return trials


def _check_config(base: Any, spec: SweepSpec, items: list[str], where: str) -> None:
    try:
        config_from_dict(base, source=str(spec.config), overrides=items)
    except ConfigError as e:
        message = e.message
        for item in items:  # "--set model.nr_cells="x": ..." reads better as the sweep file's key
            message = message.replace(f"--set {item}: ", "")
        raise ConfigError(f"{spec.source}: {where}: {message}") from None


# ---------------------------------------------------------------------------------------------
# Creating and reading a sweep folder


def create_sweep(spec: SweepSpec, trials: list[Trial], overrides: tuple[str, ...] = (),
                 sweep_id: Optional[str] = None) -> Path:
    """The sweep folder with sweep.yaml and every trial's run folder (config.yaml, status 'created')."""
    name = spec.source.stem.replace("_", "-")
    sweep_dir = runs.create_run_dir(name, sweep_id)
    base = yaml.safe_load(spec.config.read_text())
    record = {
        "source": str(spec.source), "config": str(spec.config), "overrides": list(overrides),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "options": {"resources": {"cpus": spec.resources.cpus, "gpus": spec.resources.gpus},
                    "max_concurrent": spec.max_concurrent, "max_failures": spec.max_failures,
                    "eval_lengths": spec.eval_lengths,
                    "scheduler": None if spec.scheduler is None else vars(spec.scheduler)},
        "trials": [vars(t) for t in trials],
    }
    for trial in trials:
        run_dir = sweep_dir / trial.id
        run_dir.mkdir()
        # The trial's own Visdom env (its memory snapshots), apart from its sibling trials'.
        cfg = config_from_dict(base, source=str(spec.config),
                               overrides=trial.overrides + [_set_item("viz.env", f"{sweep_dir.name}-{trial.id}")])
        save_config(cfg, run_dir / "config.yaml")
        runs.write_status(run_dir, status="created", task=cfg.task.name, step=0, steps=cfg.train.steps,
                          sweep=sweep_dir.name, seed=trial.seed, values=trial.values)
    # Written last: a folder with sweep.yaml is a complete sweep.
    runs.atomic_write_text(sweep_dir / SWEEP_FILE, yaml.safe_dump(record, sort_keys=False))
    return sweep_dir


# ---------------------------------------------------------------------------------------------
# One trial, in a Ray worker


def run_trial(config: dict, hook: Optional[Callable[[Path, dict], None]] = None) -> None:
    """Ray Tune's trainable: train the trial's run folder (resuming from its newest checkpoint if
    it has one) and report every metrics row. ``config``: {"sweep_dir": ..., "trial": id, ...}.

    hook(run_dir, row), if given, is called after each report in the worker (tests use it to kill
    the worker mid-run).
    """
    import torch

    from dnc_lab import training

    run_dir = Path(config["sweep_dir"]) / config["trial"]
    status = runs.read_status(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    use_gpu = config.get("gpus", 0) > 0 and torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
    lengths = config.get("eval_lengths") or default_eval_lengths(cfg)
    if status.get("status") in DONE:  # trained by an earlier launch: do not train it again
        if not trial_done(run_dir):  # killed between training and its evaluation
            evaluate_trial(run_dir, lengths, device)
        tune.report(_final_row(run_dir, status))
        return
    checkpoints = runs.list_checkpoints(run_dir)
    if not checkpoints:  # an earlier attempt died before its first checkpoint: start the record afresh
        from dnc_lab.viz import eventlog

        runs.truncate_metrics(run_dir, 0)
        eventlog.truncate(run_dir / eventlog.LOG_NAME, 0)
    runs.write_status(run_dir, attempts=int(status.get("attempts", 0)) + 1,
                      node=ray.get_runtime_context().get_node_id())  # which machine of a cluster ran it

    with open(run_dir / "train.log", "a") as log:
        def echo(text: str) -> None:
            log.write(text + "\n")
            log.flush()

        stopped: list[str] = []

        def report(row: dict) -> Optional[str]:
            if stopped:
                return stopped[0]
            try:
                tune.report({k: (math.nan if v is None else v) for k, v in row.items()})
            except SystemExit:  # Tune stopped this trial (its scheduler, or the sweep is ending)
                stopped.append(f"stopped by Ray Tune at step {row['step']}")
                return stopped[0]  # training ends cleanly: status 'stopped', a checkpoint written
            if hook is not None:
                hook(run_dir, row)
            return None

        echo(f"--- attempt {int(status.get('attempts', 0)) + 1} on {socket.gethostname()} (pid {os.getpid()}), "
             + (f"from the checkpoint at step {checkpoints[-1][0]}" if checkpoints else "from the start"))
        try:
            result = training.train(run_dir, cfg, device, resume=bool(checkpoints), progress=False, echo=echo,
                                    on_summary=report)
        except training.TrainingError as e:  # deterministic: a retry would fail the same way
            echo(f"failed: {e}")
            tune.report({"step": runs.read_status(run_dir).get("step", 0), "trial_status": "failed", "ber": math.nan,
                         "loss": math.nan, "message": str(e)})
            return
        if result.status == "stopped":
            # Tune stopped it: its scheduler, or the sweep is ending. Not done until the driver says
            # the scheduler decided it (Progress.settle); a resumed sweep continues it otherwise.
            runs.write_status(run_dir, status="interrupted", message=result.message)
        if result.status in ("finished", "reached_target"):
            evaluate_trial(run_dir, lengths, device)
        echo(f"{result.status}: {result.message}")
    if not stopped:  # once Tune has stopped a trial it takes no more reports
        tune.report(_final_row(run_dir, runs.read_status(run_dir)))


def default_eval_lengths(cfg) -> str:
    """`dnclab eval`'s default: the trained lengths and twice the longest."""
    return f"{cfg.task.min_length}-{cfg.task.max_length},{2 * cfg.task.max_length}"


def trial_done(run_dir: Path) -> bool:
    """Whether a sweep has nothing left to do for this trial: it failed or was stopped early, or it
    trained to the end and has its evaluation (eval.jsonl)."""
    status = runs.read_status(run_dir).get("status")
    if status in ("finished", "reached_target"):
        return (run_dir / "eval.jsonl").is_file()
    return status in DONE


def evaluate_trial(run_dir: Path, lengths: str, device, batch_size: int = 200, seed: int = 1234) -> dict:
    """`dnclab eval`'s record (same defaults) appended to the run's eval.jsonl; returns it."""
    from dnc_lab.tasks import make_task
    from dnc_lab.training import evaluate, parse_lengths

    model, raw = runs.load_run(run_dir, device=device)
    cfg = config_from_dict(raw)
    rows = evaluate(model, make_task(cfg.task, device), parse_lengths(lengths), batch_size, seed, device)
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "step": runs.list_checkpoints(run_dir)[-1][0],
              "seed": seed, "batch_size": batch_size, "rows": rows}
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def _final_row(run_dir: Path, status: dict) -> dict:
    rows = runs.read_metrics(run_dir)
    last = rows[-1] if rows else {"step": status.get("step", 0)}
    return {**{k: (math.nan if v is None else v) for k, v in last.items()},
            "trial_status": status.get("status", "?"), "done": True}


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class SweepOutcome:
    sweep_dir: Path
    counts: dict[str, int]   # trial status -> number of trials
    seconds: float


class Progress:
    """What the sweep command prints: one line per trial state change, with the overall count and
    an ETA; also feeds the sweep's dashboard. Driven by SweepCallback, a Ray Tune callback."""

    def __init__(self, sweep_dir: Path, trials: list[str], echo, dashboard=None, lengths: Optional[str] = None):
        self.sweep_dir, self.echo, self.dashboard, self.lengths = sweep_dir, echo, dashboard, lengths
        self.total = len(trials)
        self.pending = set(trials)
        self.state = {t: runs.read_status(sweep_dir / t).get("status", "created") for t in trials}
        self.fraction = {t: 0.0 for t in trials}  # of the trial's steps done, in this launch
        self.stopped_by_scheduler: dict[str, str] = {}  # trial -> why
        self.last_step: dict[str, int] = {}
        self.started = time.monotonic()

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for state in self.state.values():
            counts[state] = counts.get(state, 0) + 1
        return counts

    def eta(self) -> str:
        # Work done in this launch, in trials (a running trial counts the fraction of its steps):
        # what is left takes as long per trial as what was done.
        done = sum(self.fraction[t] for t in self.pending)
        left = sum(1 - self.fraction[t] for t in self.pending)
        if done <= 0:
            return "ETA ?"
        seconds = (time.monotonic() - self.started) * left / done
        return f"ETA {_duration(seconds)}"

    def line(self, trial: str, text: str) -> None:
        counts = self.counts()
        finished = sum(counts.get(s, 0) for s in DONE)
        extra = ", ".join(f"{counts[s]} {s}" for s in ("running", "failed", "stopped") if counts.get(s))
        self.echo(f"[{finished}/{self.total} done{', ' + extra if extra else ''}; {self.eta()}] {trial}: {text}")

    # -- events --------------------------------------------------------------------------------
    def started_trial(self, trial: str) -> None:
        status = runs.read_status(self.sweep_dir / trial)
        checkpoints = runs.list_checkpoints(self.sweep_dir / trial)
        self.state[trial] = "running"
        self.line(trial, "started" + (f", resuming from its checkpoint at step {checkpoints[-1][0]}"
                                      if checkpoints else "") + (f" (attempt {status.get('attempts', 0) + 1})"
                                                                  if status.get("attempts") else ""))

    def result(self, trial: str, row: dict) -> None:
        if row.get("done"):
            return
        steps = runs.read_status(self.sweep_dir / trial).get("steps") or 1
        self.last_step[trial] = int(row.get("step", 0))
        self.fraction[trial] = min(1.0, row.get("step", 0) / steps)
        if self.dashboard is not None and "loss" in row and "ber" in row:
            values = {f"{name}/{trial}": row[name] for name in ("loss", "ber")
                      if isinstance(row[name], (int, float)) and math.isfinite(row[name])}
            if values:
                self.dashboard.log_scalars(int(row["step"]), values)

    def retried(self, trial: str, reason: str, attempt: int, of: int) -> None:
        checkpoints = runs.list_checkpoints(self.sweep_dir / trial)
        at = f"its checkpoint at step {checkpoints[-1][0]}" if checkpoints else "the start (no checkpoint yet)"
        self.line(trial, f"{reason}; retry {attempt} of {of}, from {at}")

    def completed(self, trial: str, scheduler: Optional[Scheduler]) -> None:
        status = runs.read_status(self.sweep_dir / trial)
        self.fraction[trial] = 1.0
        step = self.last_step.get(trial, status.get("step", 0))
        if status.get("status") not in ("finished", "reached_target", "failed") and step < status.get("steps", 0):
            # Tune stopped it at a summary; its worker is still ending the run (and must be let to:
            # Tune's loop waits for this callback), so its status is written later, by settle().
            if scheduler is None:
                self.state[trial] = "interrupted"
                self.line(trial, f"stopped by Ray Tune at step {step}")
            else:
                self.state[trial] = "stopped"
                self.stopped_by_scheduler[trial] = (
                    f"stopped early by ASHA at step {step} ({scheduler.metric} not among the best "
                    f"1/{scheduler.reduction_factor:g} at a rung)")
                self.line(trial, self.stopped_by_scheduler[trial])
            return
        self.state[trial] = status.get("status") if status.get("status") in DONE else "finished"
        if self.state[trial] == "failed":
            self.line(trial, f"FAILED at step {status.get('step')}: {status.get('message')}")
            return
        last, eval_ber = status.get("last") or {}, status.get("eval_ber")
        self.line(trial, f"{self.state[trial]} at step {status.get('step')}"
                         + (f", BER {last['ber']:.4f}" if last.get("ber") is not None else "")
                         + (f", eval BER {eval_ber:.4f}" if eval_ber is not None else ""))

    def settle(self) -> None:
        """After Tune is done (or interrupted), when no worker writes any more: the trials its
        scheduler stopped are 'stopped' (done); those it stopped because the sweep ended stay
        'interrupted', so that --resume continues them."""
        for trial, message in self.stopped_by_scheduler.items():
            status = runs.read_status(self.sweep_dir / trial)
            if status.get("status") not in ("finished", "reached_target", "failed"):
                runs.write_status(self.sweep_dir / trial, status="stopped", message=message)
        for trial in self.pending:  # trained to the end, but its worker ended before its evaluation
            run_dir = self.sweep_dir / trial
            if runs.read_status(run_dir).get("status") in ("finished", "reached_target") and not trial_done(run_dir):
                evaluate_trial(run_dir, self.eval_lengths(run_dir), "cpu")

    def eval_lengths(self, run_dir: Path) -> str:
        return self.lengths or default_eval_lengths(load_config(run_dir / "config.yaml"))

    def errored(self, trial: str, reason: str) -> None:
        """Failed for good after its retries (the worker kept dying, or an unexpected exception)."""
        run_dir = self.sweep_dir / trial
        status = runs.read_status(run_dir)
        if status.get("status") not in DONE:
            status = runs.write_status(run_dir, status="failed", message=reason)
        self.state[trial] = status["status"]
        self.fraction[trial] = 1.0
        self.line(trial, f"FAILED: {status.get('message')}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _error_reason(trial) -> str:
    """One line saying why a Tune trial failed: the exception's last line, or the actor's fate."""
    text = ""
    try:  # the driver's own copy first: the storage copy is synced later
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        pass
    if not text:
        try:
            text = trial.get_error() or ""
        except Exception:  # the storage copy is not there yet
            text = ""
    last = re.sub(r"\x1b\[[0-9;]*m", "", text.split("Failure # ")[-1])  # no terminal colours
    lines = [line.strip() for line in last.splitlines()[1:] if line.strip()]
    if not lines:
        return "failed (no error recorded by Ray)"
    reason = lines[-1]  # an exception in the trial: its traceback ends with "Type: message"
    if "actor died" in last or "worker process has died" in last:
        pid = re.search(r"\bpid: (\d+)", last)
        detail = re.search(r"Worker exit detail: (.*?)(?: Some common causes|$)", last, re.S)
        reason = f"its worker process{f' (pid {pid.group(1)})' if pid else ''} died" + (
            f": {' '.join(detail.group(1).split())}" if detail else "")
    return reason[:300]


_LIVE: dict[str, tuple[Progress, Optional[Scheduler], int]] = {}  # this process's sweeps, by folder


class SweepCallback(tune.Callback):
    """Drives the Progress registered in _LIVE under ``key`` (the sweep folder). It holds only the
    key: Tune pickles its callbacks with the experiment state."""

    def __init__(self, key: str):
        self.key = key

    def _get(self) -> tuple[Optional[Progress], Optional[Scheduler], int]:
        return _LIVE.get(self.key, (None, None, 0))

    def on_trial_start(self, iteration, trials, trial, **info):
        progress, _, _ = self._get()
        if progress:
            progress.started_trial(trial.config["trial"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        progress, _, _ = self._get()
        if progress:
            progress.result(trial.config["trial"], result)

    def on_trial_recover(self, iteration, trials, trial, **info):
        progress, _, max_failures = self._get()
        if progress:
            progress.retried(trial.config["trial"], _error_reason(trial), trial.num_failures, max_failures)

    def on_trial_complete(self, iteration, trials, trial, **info):
        progress, scheduler, _ = self._get()
        if progress:
            progress.completed(trial.config["trial"], scheduler)

    def on_trial_error(self, iteration, trials, trial, **info):
        progress, _, _ = self._get()
        if progress:
            progress.errored(trial.config["trial"], _error_reason(trial))


def run_sweep(sweep_dir: Path, address: Optional[str] = None, max_concurrent: Optional[int] = None,
              cpus: Optional[float] = None, gpus: Optional[float] = None, echo=print,
              hook: Optional[Callable[[Path, dict], None]] = None) -> SweepOutcome:
    """Run every trial of the sweep that is not done yet through Ray Tune; returns the counts.

    max_concurrent, cpus, gpus: instead of the sweep file's max_concurrent and resources (per trial).

    address: a Ray cluster to join ("host:port", or "auto"); default $RAY_ADDRESS, else a local Ray
    started here and shut down at the end. A Ray already initialised in this process is used as it is.
    hook: see run_trial.
    """
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: none of Tune's own tables; we print lines
    record = runs.read_sweep(sweep_dir)
    options = record["options"]
    options["resources"] = {"cpus": options["resources"]["cpus"] if cpus is None else cpus,
                            "gpus": options["resources"]["gpus"] if gpus is None else gpus}
    trial_ids = [t["id"] for t in record["trials"]]
    todo = [t for t in trial_ids if not trial_done(sweep_dir / t)]
    status = runs.read_status(sweep_dir)
    if runs.is_alive(status):
        raise runs.RunError(f"sweep {sweep_dir.name!r} is still running (pid {status['pid']}); stop it first")
    launch = int(status.get("launches", 0)) + 1
    started = time.monotonic()
    if not todo:
        echo(f"sweep {sweep_dir.name}: all {len(trial_ids)} trials are done")
        return SweepOutcome(sweep_dir, Progress(sweep_dir, trial_ids, echo).counts(), 0.0)
    runs.write_status(sweep_dir, status="running", pid=os.getpid(), host=socket.gethostname(), launches=launch,
                      trials=len(trial_ids))
    scheduler = None if options["scheduler"] is None else Scheduler(**options["scheduler"])
    limit = max_concurrent or options["max_concurrent"]
    dashboard = _sweep_dashboard(sweep_dir, record)
    progress = Progress(sweep_dir, todo, echo, dashboard, options.get("eval_lengths"))
    echo(f"sweep {sweep_dir.name}: {len(todo)} of {len(trial_ids)} trials to run"
         + (f" ({len(trial_ids) - len(todo)} done before)" if len(todo) < len(trial_ids) else "")
         + f", {options['resources']['cpus']:g} CPU{'s' if options['resources']['cpus'] != 1 else ''}"
         + (f" and {options['resources']['gpus']:g} GPU" if options['resources']['gpus'] else "") + " each"
         + (f", at most {limit} at once" if limit else ""))

    _LIVE[str(sweep_dir.resolve())] = (progress, scheduler, options["max_failures"])
    own_ray = not ray.is_initialized()
    outcome_status = "failed"
    try:
        if own_ray:
            address = address or os.environ.get("RAY_ADDRESS") or "local"
            if address == "local":
                ray.init(address="local", include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, configure_logging=True,
                         object_store_memory=128 * 1024 ** 2)  # trials pass no objects; keep /dev/shm free
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            alive = sum(node["Alive"] for node in ray.nodes())
            echo(f"Ray: {'a local instance' if address == 'local' else 'cluster at ' + address}, {alive} "
                 f"node{'s' if alive != 1 else ''} so far, {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                 f"{ray.cluster_resources().get('GPU', 0):g} GPUs")
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # failures are reported by Progress
        logging.getLogger("ray.train").setLevel(logging.CRITICAL)
        resources = {"cpu": options["resources"]["cpus"], "gpu": options["resources"]["gpus"]}
        trainable = tune.with_resources(tune.with_parameters(run_trial, hook=hook), resources)
        tune_config = tune.TuneConfig(
            # One worker process runs trial after trial (no new process, no torch import, per trial);
            # not with a scheduler: in Ray 2.60, reusing the worker of a trial it stopped hung the sweep.
            max_concurrent_trials=limit, reuse_actors=scheduler is None,
            trial_name_creator=lambda t: t.config["trial"], trial_dirname_creator=lambda t: t.config["trial"])
        if scheduler is not None:
            from ray.tune.schedulers import ASHAScheduler

            steps = max(runs.read_status(sweep_dir / t).get("steps", 1) for t in todo)
            tune_config.scheduler = ASHAScheduler(  # max_t past the last step: a trial's end is its own
                time_attr="step", metric=scheduler.metric, mode="min", max_t=steps + 1,
                grace_period=scheduler.grace_period, reduction_factor=scheduler.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space={"sweep_dir": str(sweep_dir.resolve()), "gpus": resources["gpu"],
                         "eval_lengths": options.get("eval_lengths"), "trial": tune.grid_search(todo)},
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=f"launch-{launch}", storage_path=str((sweep_dir / RAY_FOLDER).resolve()), verbose=0,
                failure_config=tune.FailureConfig(max_failures=options["max_failures"]),
                callbacks=[SweepCallback(str(sweep_dir.resolve()))]))
        tuner.fit()
        outcome_status = "finished"
    except KeyboardInterrupt:
        outcome_status = "interrupted"
        echo(f"sweep {sweep_dir.name}: interrupted; continue with `dnclab sweep --resume {sweep_dir.name}`")
        raise
    finally:
        _LIVE.pop(str(sweep_dir.resolve()), None)
        if own_ray:
            ray.shutdown()
        progress.settle()
        if dashboard is not None:
            dashboard.close()
        runs.write_status(sweep_dir, status=outcome_status, pid=None)
    counts = Progress(sweep_dir, trial_ids, echo).counts()
    seconds = time.monotonic() - started
    echo(f"sweep {sweep_dir.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
         + f" in {_duration(seconds)}; summary: `dnclab sweep-report {sweep_dir.name}`")
    left = [t for t in todo if not trial_done(sweep_dir / t)]
    if left:  # Tune ended early (Ctrl-C stops it gracefully)
        runs.write_status(sweep_dir, status="interrupted")
        echo(f"sweep {sweep_dir.name}: {len(left)} trials not done; continue with "
             f"`dnclab sweep --resume {sweep_dir.name}`")
    return SweepOutcome(sweep_dir, counts, seconds)


def _sweep_dashboard(sweep_dir: Path, record: dict):
    """The sweep's dashboard (env: the sweep id): each trial's loss and BER as one trace, so the
    seeds' curves overlay. Logged to <sweep>/visdom.jsonl; `dnclab viz --run SWEEP` replays it."""
    from dnc_lab.viz.dashboard import Dashboard, env_name

    first = sweep_dir / record["trials"][0]["id"] / "config.yaml"
    viz = load_config(first).viz
    return Dashboard(sweep_dir, env=env_name(sweep_dir.name), server=viz.server, port=viz.port,
                     enabled=viz.enabled, queue_size=max(viz.queue_size, 256), timeout_s=viz.timeout_s)
