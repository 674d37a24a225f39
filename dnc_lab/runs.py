"""Run folders, checkpoints, status records, resume and ``load_run``.

A run lives in ``experiments/<id>/`` (the root is ``$DNCLAB_EXPERIMENTS``, default ``experiments``):

    config.yaml        the resolved config the run uses
    metrics.jsonl      one JSON object per summary: step, loss, ber, time, lr, skipped, ...
    status.json        status (running/finished/interrupted/stopped/failed), step, last metrics, pid
    checkpoints/       step-00001200.pt ...: the newest ``train.keep_checkpoints`` of them
    visdom.jsonl       the Visdom event log (written by dnc_lab.viz.dashboard)

A sweep (dnc_lab.sweep) is a folder ``experiments/<sweep>/`` marked by its ``sweep.yaml``, holding
one run folder per trial: their ids are ``<sweep>/<trial>``, and every function here takes them.

Every file that is rewritten (status, checkpoints) is written to a temporary file and renamed, so a
run killed at any moment leaves the previous version intact. Checkpoints hold only tensors and
plain Python values, and load with ``torch.load(weights_only=True)``. Each holds its format
``version`` and the resolved config it was trained with; ``check_resumable`` compares that config
with the run's config.yaml before a run resumes (see ``may_change_on_resume``).
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import socket
import time
from pathlib import Path
from typing import Any, Optional

import click
import numpy as np
import torch
import yaml

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
CHECKPOINT_RE = re.compile(r"^step-(\d+)\.pt$")
SWEEP_FILE = "sweep.yaml"  # marks a sweep folder (dnc_lab.sweep)
DONE_STATUSES = ("finished", "reached_target", "stopped", "failed")  # a sweep does not run these again


class RunError(click.ClickException):
    """A bad run id or a run that cannot be used as asked (usage error: exit code 2)."""

    exit_code = 2


class RunNotFound(RunError):
    """No run with that id (or no run folder at that path)."""


class ResumeError(RunError):
    """A checkpoint that this run cannot continue from: another format version, or a config that
    changed where it must not (the message lists every difference)."""


def experiments_root() -> Path:
    return Path(os.environ.get("DNCLAB_EXPERIMENTS", "experiments"))


def validate_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id or ""):
        raise RunError(f"run id {run_id!r} is not allowed: use 1-100 letters, digits, '-' or '_', "
                       f"starting with a letter or digit")
    return run_id


def list_runs(root: Optional[Path] = None, sweep: Optional[str] = None) -> list[Path]:
    """Run folders under the root (folders holding a config.yaml), sorted by id: the runs, and the
    trials inside each sweep folder. ``sweep``: only that sweep's trials."""
    root = root or experiments_root()
    if not root.is_dir():
        return []
    found = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or (sweep is not None and p.name != sweep):
            continue
        if (p / "config.yaml").is_file() and sweep is None:
            found.append(p)
        elif (p / SWEEP_FILE).is_file():
            found.extend(t for t in sorted(p.iterdir()) if t.is_dir() and (t / "config.yaml").is_file())
    return found


def list_sweeps(root: Optional[Path] = None) -> list[Path]:
    """Sweep folders under the root (folders holding a sweep.yaml), sorted by id."""
    root = root or experiments_root()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / SWEEP_FILE).is_file())


def run_id(run_dir: Path) -> str:
    """A run folder's id: its name, or ``<sweep>/<trial>`` for a trial of a sweep."""
    run_dir = Path(run_dir)
    if (run_dir.parent / SWEEP_FILE).is_file():
        return f"{run_dir.parent.name}/{run_dir.name}"
    return run_dir.name


def resolve_run_dir(run: str) -> Path:
    """A run id (under the root; ``<sweep>/<trial>`` for a sweep's trial) or a path to a run folder
    -> the folder; RunNotFound otherwise."""
    path = Path(run)
    if (path / "config.yaml").is_file():
        return path
    if all(RUN_ID_RE.match(part) for part in run.split("/", 1)):
        candidate = experiments_root() / run
        if (candidate / "config.yaml").is_file():
            return candidate
    ids = [run_id(p) for p in list_runs()]
    close = difflib.get_close_matches(run, ids, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else (
        f"; runs there: {', '.join(ids[-5:])}" if ids else "; there are no runs yet")
    if (experiments_root() / run / SWEEP_FILE).is_file():
        hint = f"; {run!r} is a sweep: its trials are {run}/<trial> (see `dnclab runs {run}`)"
    raise RunNotFound(f"no run {run!r} in {experiments_root()}/ (and no run folder at that path){hint}")


def create_run_dir(task_name: str, run_id: Optional[str] = None) -> Path:
    """Make a new, empty run folder. Never reuses an existing one.

    Without ``run_id`` the id is the next free number and the task, e.g. ``00012-copy``.
    """
    root = experiments_root()
    root.mkdir(parents=True, exist_ok=True)
    if run_id is not None:
        validate_run_id(run_id)
        path = root / run_id
        try:
            path.mkdir()
        except FileExistsError:
            raise RunError(f"run {run_id!r} already exists in {root}/; choose another --run-id, "
                           f"or continue it with `dnclab resume {run_id}`") from None
        return path
    while True:  # mkdir is the atomic claim: two runs started at once get different numbers
        numbers = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"^(\d+)-", p.name))]
        path = root / f"{max(numbers, default=-1) + 1:05d}-{task_name.replace('_', '-')}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


# ---------------------------------------------------------------------------------------------
# Small atomic files


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_status(run_dir: Path, **fields: Any) -> dict:
    """Update status.json with ``fields`` (merged into what is there)."""
    status = read_status(run_dir)
    status.update(fields, updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    atomic_write_text(run_dir / "status.json", json.dumps(status, indent=1) + "\n")
    return status


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def is_alive(status: dict) -> bool:
    """Whether the process that last wrote a 'running' status still runs (on this host)."""
    if status.get("status") != "running" or status.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(status["pid"]), 0)
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return True


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a kill
    return rows


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics after ``step``: a resumed run recomputes them from its checkpoint."""
    rows = read_metrics(run_dir)
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write ``checkpoints/step-<step>.pt`` atomically, then delete all but the newest ``keep``
    (and any temporary file a killed process left behind)."""
    folder = run_dir / "checkpoints"
    folder.mkdir(exist_ok=True)
    for stale in folder.glob(".step-*.pt.tmp*"):
        stale.unlink(missing_ok=True)
    path = folder / f"step-{step:08d}.pt"
    tmp = folder / f".{path.name}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


# Version 2: the checkpoint holds "config" (the resolved config it was trained with), and
# rmsprop's state is dnc_lab.optim.RMSprop's ("ms", "mom") for both styles.
CHECKPOINT_VERSION = 2

# What may differ between the config a checkpoint was trained with and the one it resumes with.
# Allowed: what says how long to train, how to watch it and how to execute the same computation:
# every viz.* key, every train.* key except the two that fix the optimiser state's layout, and the
# model keys that choose a backend without changing the parameters. Refused: every other model.*
# and task.* key (they define the parameters' shapes and meaning, and the data). An allowed change
# is reported when the run resumes, so none passes silently.
RESUME_MODEL_KEYS_ALLOWED = frozenset({"backend", "native", "checkpoint_steps"})
RESUME_TRAIN_KEYS_FIXED = frozenset({"optimizer", "tf_style"})


def may_change_on_resume(section: str, key: str) -> bool:
    """Whether ``section.key`` may differ from the checkpoint's config when a run resumes."""
    if section == "viz":
        return True
    if section == "train":
        return key not in RESUME_TRAIN_KEYS_FIXED
    return section == "model" and key in RESUME_MODEL_KEYS_ALLOWED


def config_changes(trained: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed): one ``section.key: old -> new`` line per key whose value differs between
    the config a checkpoint was trained with and the current one. Keys only one side has (the
    schema grew or shrank between versions) are not compared."""
    refused, allowed = [], []
    for section in sorted(set(trained) & set(current)):
        old, new = trained[section] or {}, current[section] or {}
        for key in sorted(set(old) & set(new)):
            if old[key] != new[key]:
                line = f"{section}.{key}: {old[key]!r} -> {new[key]!r}"
                (allowed if may_change_on_resume(section, key) else refused).append(line)
    return refused, allowed


def check_resumable(run_dir: Path, state: dict, current: dict) -> list[str]:
    """Raise ResumeError unless checkpoint ``state`` can continue with the resolved config
    ``current`` (a nested dict); return the allowed changes (to report them)."""
    version = state.get("version")
    at = f"run {run_dir.name!r}, checkpoint of step {state.get('step', '?')}"
    if version != CHECKPOINT_VERSION:
        raise ResumeError(f"{at}: checkpoint format version {version}, but this dnc_lab reads version "
                          f"{CHECKPOINT_VERSION} only; train the run again (its config.yaml is still there), or "
                          f"resume it with the dnc_lab release that wrote it")
    refused, allowed = config_changes(state["config"], current)
    if refused:
        raise ResumeError(f"{at}: {run_dir / 'config.yaml'} no longer matches the config the checkpoint was trained "
                          f"with, in keys that cannot change on resume (the model, the task, the optimiser): "
                          + "; ".join(refused) + ". Restore those values, or start a new run with `dnclab train`")
    return allowed


def load_checkpoint(run_dir: Path, path: Optional[Path] = None, map_location: Any = "cpu") -> dict:
    """The newest readable checkpoint (or ``path``); RunError if there is none."""
    candidates = [path] if path is not None else [p for _, p in reversed(list_checkpoints(run_dir))]
    if not candidates:
        raise RunError(f"run {run_dir.name!r} has no checkpoint yet ({run_dir / 'checkpoints'} is empty)")
    errors = []
    for candidate in candidates:
        try:
            return torch.load(candidate, map_location=map_location, weights_only=True)
        except Exception as e:  # a damaged file: fall back to the previous one
            errors.append(f"{candidate.name}: {e}")
    raise RunError(f"no readable checkpoint in {run_dir / 'checkpoints'}: {'; '.join(errors)}")


def checkpoint_path(run_dir: Path, checkpoint: str | int | Path) -> Path:
    """A checkpoint given as a step number or a file path; RunError if it does not exist."""
    if str(checkpoint).isdigit():
        path = run_dir / "checkpoints" / f"step-{int(checkpoint):08d}.pt"
    else:
        path = Path(checkpoint)
    if not path.is_file():
        steps = [s for s, _ in list_checkpoints(run_dir)]
        raise RunError(f"checkpoint {str(checkpoint)!r} not found in run {run_dir.name!r}; steps there: {steps}")
    return path


def capture_rng(task_generator: torch.Generator) -> dict:
    """Every RNG's state as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "task": task_generator.get_state(),
    }


def restore_rng(state: dict, task_generator: torch.Generator) -> bool:
    """Restore every RNG; False if the task generator's state is from another kind of device."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    try:
        task_generator.set_state(state["task"])
    except RuntimeError:  # a CPU generator's state given to a CUDA one, or the reverse
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Loading a trained model


def load_run(path_or_id: str | Path, checkpoint: Optional[str | Path] = None,
             device: str | torch.device = "cpu"):
    """(model, config): the run's DNC from its newest checkpoint, in eval mode, and its resolved
    config as a nested dict. ``checkpoint`` picks another file (a path, or a step number)."""
    from dnc_lab.config import load_config
    from dnc_lab.training import build_model  # the DNC, or the DNC behind a learned input embedding

    run_dir = resolve_run_dir(str(path_or_id))
    cfg = load_config(run_dir / "config.yaml")
    path = None if checkpoint is None else checkpoint_path(run_dir, checkpoint)
    state = load_checkpoint(run_dir, path, map_location=device)
    model = build_model(cfg, torch.device(device))
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg.to_dict()


# ---------------------------------------------------------------------------------------------
# Sweeps (made and run by dnc_lab.sweep)


def read_sweep(sweep_dir: Path) -> dict:
    try:
        return yaml.safe_load((sweep_dir / SWEEP_FILE).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RunError(f"{sweep_dir / SWEEP_FILE}: cannot read the sweep record: {e}") from None


def resolve_sweep_dir(sweep: str) -> Path:
    """A sweep id (under the experiments root) or a sweep folder; RunNotFound otherwise."""
    for candidate in (Path(sweep), experiments_root() / sweep):
        if (candidate / SWEEP_FILE).is_file():
            return candidate
    found = [p.name for p in list_sweeps()]
    hint = f"; sweeps there: {', '.join(found[-5:])}" if found else "; there are no sweeps yet"
    raise RunNotFound(f"no sweep {sweep!r} in {experiments_root()}/{hint}")
