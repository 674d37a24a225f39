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
    connection = VisdomConnection(server, port, timeout_s=timeout_s)
    try:
        connection.open_env(env)
        for endpoint, body in messages:
            connection.post(endpoint, body)
    finally:
        connection.close()
    windows = list(dict.fromkeys(body["win"] for _, body in messages))
    return ReplayResult(connection.url, env, windows, count, shown)
