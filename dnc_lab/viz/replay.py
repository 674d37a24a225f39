"""Redraws a run's dashboard in Visdom from its event log (`<run_dir>/visdom.jsonl`).

Every window is sent as a full drawing (`events` endpoint, fixed window name), never as an
append: curves are drawn whole from all their logged points, and the memory windows from one
snapshot (the last one, or the last at or before `step`). A window sent again replaces itself, so
replaying twice, or replaying over the live stream of the same run, gives the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import yaml

from dnc_lab.viz import eventlog
from dnc_lab.viz.client import VisdomConnection
from dnc_lab.viz.dashboard import CurveBook, env_name
from dnc_lab.viz.figures import snapshot_figures
from dnc_lab.viz.generalisation import generalisation_figure


class ReplayError(RuntimeError):
    """The run has nothing to replay (no event log, or an unreadable one)."""


@dataclass
class ReplayResult:
    url: str
    env: str
    windows: list[str]          # names of the windows drawn
    events: int                 # events read from the log
    snapshot_step: int | None   # step of the memory snapshot shown (None: the run had none yet)


def run_viz_settings(run_dir: Path) -> dict:
    """The `viz` section of the run's resolved config.yaml ({} when absent or unreadable)."""
    try:
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    viz = config.get("viz") if isinstance(config, dict) else None
    return viz if isinstance(viz, dict) else {}


def default_env(run_dir: Path) -> str:
    """The env the run streamed to: its config's viz.env, else the run id with `_` -> `-`."""
    return env_name(run_viz_settings(run_dir).get("env") or Path(run_dir).name)


def replay_messages(env: str, events: Iterable[dict], step: int | None = None
                    ) -> tuple[list, int | None, int]:
    """(messages that draw every window of the run into env, step of the snapshot shown,
    number of events). Holds one snapshot at a time, however long the log."""
    curves = CurveBook()
    snapshot = generalisation = None
    count = 0
    for count, event in enumerate(events, start=1):
        if event["kind"] == "scalars":
            curves.add(event)
        elif event["kind"] == "generalisation":
            generalisation = event  # the newest `dnclab eval` figure
        elif step is None or event["step"] <= step:
            snapshot = event
    messages, _ = curves.messages(env)  # a fresh book: every window drawn in full
    if snapshot is not None:
        messages += snapshot_figures(env, snapshot)
    if generalisation is not None:
        messages += generalisation_figure(env, generalisation)
    return messages, None if snapshot is None else snapshot["step"], count


def replay(run_dir: Path, env: str | None = None, server: str = "http://localhost",
           port: int = 8097, timeout_s: float = 5.0, step: int | None = None) -> ReplayResult:
    """Draw the run's dashboard into `env` (default: the run's own env). Raises ReplayError when
    there is nothing to replay and client.VisdomUnavailable when no server answers."""
    run_dir = Path(run_dir)
    log_path = run_dir / eventlog.LOG_NAME
    if not log_path.is_file():
        raise ReplayError(f"run {run_dir.name} has no dashboard events ({log_path} is missing): "
                          "it was made before dashboards existed, or has not summarized yet")
    env = env_name(env) if env else default_env(run_dir)
    try:
        with open(log_path, encoding="utf-8") as lines:
            messages, shown, count = replay_messages(
                env, eventlog.iter_events(lines, log_path), step)
    except ValueError as exc:
        raise ReplayError(str(exc)) from exc
    if not count:
        raise ReplayError(f"{log_path} holds no events yet")
    url, windows = _draw(env, messages, server, port, timeout_s)
    return ReplayResult(url, env, windows, count, shown)


def traced_event(run_dir: Path, length: int, seed: int = 1234) -> dict:
    """A memory snapshot of the run's model (newest checkpoint) traced on one fresh sequence of
    ``length`` (the task's unit), drawn as ``dnclab eval`` draws its sequences (same seed rule): what
    the dashboard's memory windows show at a length the run may never have trained on. Its step is
    the checkpoint's. Raises ReplayError for a task without lengths or a length it cannot make."""
    import torch

    from dnc_lab import runs
    from dnc_lab.config import config_from_dict
    from dnc_lab.tasks import make_task
    from dnc_lab.training import is_categorical, objective_for, trace_sample

    checkpoints = runs.list_checkpoints(run_dir)
    if not checkpoints:
        raise ReplayError(f"run {run_dir.name} has no checkpoint to trace yet")
    model, config = runs.load_run(run_dir)
    cfg = config_from_dict(config)
    task = make_task(cfg.task)
    if getattr(task, "length_meaning", None) is None:
        raise ReplayError(f"--length does not apply to task {cfg.task.name!r}: its sequences have their own lengths")
    generator = torch.Generator().manual_seed(seed * 100_003 + length)
    try:
        batch = task.sample(1, generator, length=length)
    except ValueError as exc:
        raise ReplayError(f"run {run_dir.name}: {exc}") from None
    sample, logits = trace_sample(model, batch, is_categorical(task))
    steps = logits.shape[1]  # the trace ends at the last answer step
    loss = objective_for(task).loss(logits, batch.targets[:, :steps], batch.mask[:, :steps]).item()
    dims = {"nr_cells": cfg.model.nr_cells, "cell_size": cfg.model.cell_size,
            "read_heads": cfg.model.read_heads, "num_writes": cfg.model.num_writes}
    return eventlog.snapshot_event(checkpoints[-1][0], loss, dims=dims, **sample)


def show_length(run_dir: Path, length: int, seed: int = 1234, env: str | None = None,
                server: str = "http://localhost", port: int = 8097, timeout_s: float = 5.0) -> ReplayResult:
    """Draw the memory windows of ``traced_event`` into ``env`` (default: the run's env with
    ``-length<L>`` appended, so the training dashboard stays as it was). Nothing is logged."""
    run_dir = Path(run_dir)
    event = traced_event(run_dir, length, seed)
    env = env_name(env) if env else f"{default_env(run_dir)}-length{length}"
    messages = snapshot_figures(env, event)
    url, windows = _draw(env, messages, server, port, timeout_s)
    return ReplayResult(url, env, windows, 1, event["step"])


def _draw(env: str, messages: list, server: str, port: int, timeout_s: float) -> tuple[str, list[str]]:
    """Post `messages` into `env` on the server: (its url, the names of the windows drawn)."""
    connection = VisdomConnection(server, port, timeout_s=timeout_s)
    try:
        connection.open_env(env)
        for endpoint, body in messages:
            connection.post(endpoint, body)
    finally:
        connection.close()
    return connection.url, list(dict.fromkeys(body["win"] for _, body in messages))
