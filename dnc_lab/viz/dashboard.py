"""Streams a run's curves and memory views to Visdom without ever holding up training.

    dash = Dashboard(run_dir, env="copy-001", server="http://localhost", port=8097,
                     model_dims={"nr_cells": N, "cell_size": W, "read_heads": R, "num_writes": Wh})
    dash.log_scalars(step, {"loss": ..., "ber": ...})        # or {"eval_ber": ...}
    dash.log_snapshot(step, loss, views, inputs, targets, outputs, mask)
    dash.close()

On the training thread each call only writes one line to `<run_dir>/visdom.jsonl` (the event
log; see `eventlog`) and puts the event on a bounded queue. A sender thread turns events into
Visdom messages (`figures`) and posts them with a timeout (`client`):

- Queue full (server slow): the oldest snapshot is dropped (else the oldest event) and counted.
- Several snapshots waiting: only the newest is drawn, the others count as dropped; curve points
  are never skipped, they are gathered and appended in one message per window.
- Server down, refusing or not answering within `timeout_s`: one warning, then a new try at most
  every `retry_s`; meanwhile snapshots are dropped and curve points kept, so when the server comes
  back the curves are redrawn whole.
- `close()` gives the sender a bounded time to finish (default `close_timeout()`), then leaves
  it (it is a daemon thread).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from dnc_lab.viz import eventlog
from dnc_lab.viz.client import VisdomConnection, VisdomUnavailable
from dnc_lab.viz.figures import curve_append, curve_draw, curve_of, snapshot_figures

logger = logging.getLogger(__name__)


class _OutOfTime(Exception):
    """close()'s deadline passed while the sender was still posting."""


def env_name(name: str) -> str:
    """Visdom env name for a run: Visdom groups env names at `_`, so `_` becomes `-`."""
    return str(name).replace("_", "-")


class CurveBook:
    """Every curve point seen, per window and trace, and how much the server already has.

    points[win][trace] = (steps, values); delivered[(win, trace)] = how many points were sent;
    drawn = windows the server holds (a window not drawn gets a full redraw, not an append).
    """

    def __init__(self):
        self.points: dict[str, dict[str, tuple[list, list]]] = {}
        self.delivered: dict[tuple[str, str], int] = {}
        self.drawn: set[str] = set()

    def add(self, event: dict) -> None:
        step = event["step"]
        for name, value in event["values"].items():
            win, trace = curve_of(name)
            steps, values = self.points.setdefault(win, {}).setdefault(trace, ([], []))
            if steps and steps[-1] >= step:
                # Steps going back: a resumed run redoes them from its checkpoint. Keep the
                # curve as the run now has it (like metrics.jsonl) and redraw the window whole.
                keep = next(i for i, s in enumerate(steps) if s >= step)
                del steps[keep:], values[keep:]
                self.drawn.discard(win)
            steps.append(step)
            values.append(value)

    def messages(self, env: str) -> tuple[list, list]:
        """(messages bringing the server up to date, marks to pass to `sent` once they are)."""
        messages, marks = [], []
        for win, traces in self.points.items():
            counts = {t: len(traces[t][0]) for t in traces}
            if win not in self.drawn:
                messages.extend(curve_draw(env, win, traces))
            else:
                for trace, (steps, values) in traces.items():
                    done = self.delivered.get((win, trace), 0)
                    if done < len(steps):
                        messages.extend(curve_append(env, win, trace, steps[done:], values[done:]))
            marks.append((win, counts))
        return messages, marks

    def sent(self, marks: list) -> None:
        for win, counts in marks:
            self.drawn.add(win)
            for trace, count in counts.items():
                self.delivered[(win, trace)] = count

    def server_lost(self) -> None:
        """The server may have restarted empty: redraw every window in full next time."""
        self.drawn.clear()
        self.delivered.clear()


class Dashboard:
    """Live Visdom dashboard of one run (contract in .notes/COMMON.md; see module docstring)."""

    retry_s = 10.0  # while the server is down, try again at most this often

    def __init__(self, run_dir: Path, env: str, server: str = "http://localhost",
                 port: int = 8097, enabled: bool = True, queue_size: int = 64,
                 timeout_s: float = 2.0, model_dims: dict | None = None):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size!r}")
        self.run_dir = Path(run_dir)
        self.env = env_name(env)
        self.model_dims = dict(model_dims or {})
        self.timeout_s = float(timeout_s)
        log_path = self.run_dir / eventlog.LOG_NAME
        # A resumed run already has a log: its curves are drawn again, continued, on first send.
        self._earlier_log_bytes = log_path.stat().st_size if log_path.is_file() else 0
        self.log = eventlog.EventLog(log_path)
        self.port = int(port)
        self.connection = VisdomConnection(server, port, timeout_s=timeout_s)
        self.enabled = bool(enabled)
        self._queue: deque = deque()
        self._queue_size = int(queue_size)
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = float("inf")  # monotonic time after which the sender gives up
        self._stats = {"sent": 0, "dropped": 0, "failed": 0}
        self._warned = False
        self._snapshot_warned = False
        self._closed = False
        self._thread = None
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name=f"visdom-{self.env}",
                                            daemon=True)
            self._thread.start()

    # -------------------------------------------------------------- training thread side
    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Curve points at `step` (e.g. {"loss": .., "ber": ..}; eval values as "eval_ber")."""
        self._emit(eventlog.scalars_event(step, scalars))

    def log_snapshot(self, step: int, loss: float, views: dict[str, np.ndarray],
                     inputs: np.ndarray, targets: np.ndarray, outputs: np.ndarray,
                     mask: np.ndarray) -> None:
        """Memory views of one traced sample: views as from `DNC.trace` (one row per time step),
        inputs [T, in], targets [T, out], outputs [T, out] (probabilities), mask [T]."""
        if not self.model_dims:
            raise ValueError("Dashboard needs model_dims (nr_cells, cell_size, read_heads, "
                             "num_writes) to log memory snapshots")
        try:
            event = eventlog.snapshot_event(step, loss, views, self.model_dims,
                                            inputs, targets, outputs, mask)
        except (KeyError, ValueError, TypeError) as exc:
            # Views that do not fit model_dims: a bug to report, not a reason to stop training.
            if not self._snapshot_warned:
                self._snapshot_warned = True
                logger.warning("Visdom dashboard: memory snapshot of step %s not recorded "
                               "(%s: %s); further failures are not reported", step,
                               type(exc).__name__, exc)
            return
        self._emit(event)

    def _emit(self, event: dict) -> None:
        if self._closed:
            raise RuntimeError("Dashboard is closed")
        self.log.write(event)
        if not self.enabled:
            return
        with self._cond:
            if len(self._queue) >= self._queue_size:
                self._drop_one()
            self._queue.append(event)
            self._cond.notify()

    def _drop_one(self) -> None:
        """Make room: drop the oldest snapshot (figures go stale anyway), else the oldest event."""
        for i, queued in enumerate(self._queue):
            if queued["kind"] == "snapshot":
                del self._queue[i]
                break
        else:
            self._queue.popleft()
        self._stats["dropped"] += 1

    @property
    def stats(self) -> dict[str, int]:
        """Events sent to the server, dropped unsent, and failed sending attempts."""
        with self._cond:
            return dict(self._stats)

    @staticmethod
    def close_timeout(timeout_s: float) -> float:
        """How long close() waits for the sender by default: a few request timeouts."""
        return 3 * timeout_s + 2.0

    def close(self, timeout: float | None = None) -> dict[str, int]:
        """Flush what is queued (bounded by `timeout` seconds), stop the sender, close the log.
        Returns the final stats."""
        if self._closed:
            return self.stats
        self._closed = True
        if self._thread is not None:
            wait = self.close_timeout(self.timeout_s) if timeout is None else timeout
            with self._cond:
                self._closing = True
                self._deadline = time.monotonic() + wait
                self._cond.notify()
            self._thread.join(wait)
            if self._thread.is_alive():
                logger.warning("Visdom sender still busy after %.1f s; leaving it behind "
                               "(every event is in %s)", wait, self.log.path)
        self.log.close()
        if self._thread is None or not self._thread.is_alive():
            self.connection.close()
        return self.stats

    def __enter__(self) -> "Dashboard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ sender thread
    def _run(self) -> None:
        curves = CurveBook()
        pending_scalars = 0  # scalar events whose points the server does not have yet
        down_since = None    # monotonic time of the last failure; None while the server answers
        connected = False    # the env was opened on the server and nothing failed since
        for event in self._earlier_events():
            if event["kind"] == "scalars":
                curves.add(event)
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                batch = list(self._queue)
                self._queue.clear()
                closing = self._closing
            for event in batch:
                if event["kind"] == "scalars":
                    curves.add(event)
                    pending_scalars += 1
            snapshots = [e for e in batch if e["kind"] == "snapshot"]
            newest = snapshots[-1] if snapshots else None
            dropped = max(len(snapshots) - 1, 0)  # superseded by the newest

            now = time.monotonic()
            may_try = now < self._deadline and (
                down_since is None or now - down_since >= self.retry_s)
            if may_try and (pending_scalars or newest is not None):
                try:
                    self._deliver(curves, newest, first=not connected)
                    connected = True
                    with self._cond:
                        self._stats["sent"] += pending_scalars + (newest is not None)
                    pending_scalars = 0
                    if down_since is not None and self._warned:
                        logger.warning("Visdom server at %s answers again; env %r resumed",
                                       self.connection.url, self.env)
                    down_since = None
                except VisdomUnavailable as exc:
                    connected = False
                    curves.server_lost()
                    down_since = time.monotonic()
                    dropped += newest is not None
                    with self._cond:
                        self._stats["failed"] += 1
                    self._warn(exc)
                except _OutOfTime:
                    dropped += newest is not None
                except Exception:  # a bug in figure making must never stop training
                    logger.exception("Visdom dashboard: could not draw an event; skipped")
                    dropped += newest is not None
            else:
                dropped += newest is not None  # not now: a stale figure; curve points wait
            with self._cond:
                self._stats["dropped"] += dropped
                if closing and (not self._queue or time.monotonic() >= self._deadline):
                    # Whatever did not reach the server by now stays only in the event log.
                    self._stats["dropped"] += pending_scalars + len(self._queue)
                    self._queue.clear()
                    return

    def _earlier_events(self) -> list[dict]:
        """Events logged before this Dashboard started (a resumed run), [] if unreadable."""
        if not self._earlier_log_bytes:
            return []
        try:
            with open(self.log.path, "rb") as f:
                text = f.read(self._earlier_log_bytes).decode("utf-8", errors="replace")
            return [e for e in eventlog.parse_events(text, self.log.path)]
        except (OSError, ValueError) as exc:
            logger.warning("Visdom dashboard: earlier curves not shown (%s)", exc)
            return []

    def _deliver(self, curves: CurveBook, snapshot: dict | None, first: bool) -> None:
        """Post pending curve points and the snapshot's figures; raise VisdomUnavailable on the
        first failure (or once close()'s deadline has passed)."""
        if first:
            self.connection.open_env(self.env)
        messages, marks = curves.messages(self.env)
        if snapshot is not None:
            messages += snapshot_figures(self.env, snapshot)
        for endpoint, body in messages:
            if time.monotonic() > self._deadline:
                raise _OutOfTime()
            self.connection.post(endpoint, body)
        curves.sent(marks)

    def _warn(self, exc: Exception) -> None:
        from dnc_lab.runs import run_id  # a sweep's trial is <sweep>/<trial>

        if self._warned:
            return
        self._warned = True
        logger.warning(
            "Visdom server at %s: %s. Training goes on without the live dashboard; every event "
            "is still written to %s. Start a server with `dnclab server --port %s`, then replay "
            "this run with `dnclab viz --run %s`.",
            self.connection.url, exc, self.log.path, self.port, run_id(self.run_dir))
