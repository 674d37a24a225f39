"""The run's dashboard event log: `<run_dir>/visdom.jsonl`, one JSON object per line.

Everything the live dashboard shows is first written here, whether or not a Visdom server is up,
so `dnclab viz --run ID` can redraw any run later. Events hold data, not plots: figures are made
from events by `dnc_lab.viz.figures`, the same way live and on replay.

Two kinds of event from training (arrays are nested lists, rounded to 4 decimals to keep the file small):

    {"kind": "scalars", "step": 200, "time": 1764100000.0, "values": {"loss": 0.31, "ber": 0.12}}

    {"kind": "snapshot", "step": 200, "time": ..., "loss": 0.31,
     "dims": {"nr_cells": N, "cell_size": W, "read_heads": R, "num_writes": Wh},
     "views": {                                  # batch element 0; T = time steps of the sample
        "memory": [N, W],                        # after the last step
        "link_matrix": [Wh, N, N],               # after the last step; [h, i, j]: i written after j
        "precedence": [T, Wh, N], "write_weights": [T, Wh, N],
        "read_weights": [T, R, N], "usage_vector": [T, N],
        "write_gate": [T, Wh], "allocation_gate": [T, Wh], "free_gates": [T, R],
        "read_modes": [T, R, 1 + 2*Wh],          # per head: Wh backward, Wh forward, content
        # only from models with Csordás & Schmidhuber's variants (masked_lookup, link_sharpness):
        "read_masks": [T, R, W], "write_masks": [T, Wh, W],
        "forward_sharpness": [T, R], "backward_sharpness": [T, R]},
     "inputs": [T, in], "targets": [T, out], "outputs": [T, out],   # outputs: probabilities
     "mask": [T]}

A view the model did not report is simply absent. A scalar value may be null (NaN loss).
`dnclab eval` adds a third kind, "generalisation" (error against length; see
`dnc_lab.viz.generalisation`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

LOG_NAME = "visdom.jsonl"
KINDS = ("scalars", "snapshot", "generalisation")  # generalisation: see dnc_lab.viz.generalisation
DECIMALS = 4


def _rounded(array: Any, decimals: int = DECIMALS) -> list:
    """Nested lists of floats rounded to `decimals`, NaN/inf as None (valid JSON)."""
    arr = np.round(np.asarray(array, dtype=np.float64), decimals)
    if np.isfinite(arr).all():
        return arr.tolist()
    return np.where(np.isfinite(arr), arr, None).tolist()


def _scalar(value: float) -> float | None:
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None


def scalars_event(step: int, scalars: dict[str, float]) -> dict:
    return {"kind": "scalars", "step": int(step), "time": round(time.time(), 3),
            "values": {str(k): _scalar(v) for k, v in scalars.items()}}


def _view(views: dict, key: str, *shape: int) -> np.ndarray | None:
    """views[key] (flattened per time step) reshaped to `shape`; None when the model has no such view."""
    return None if key not in views else np.asarray(views[key]).reshape(shape)


LINK_SIDE_MAX = 256


def pool_link(link: np.ndarray, side: int = LINK_SIDE_MAX) -> tuple[np.ndarray, int]:
    """[H, N, N] -> ([H, M, M], f): the maximum over f×f blocks of slots, f the smallest block that
    gives M = ceil(N / f) <= side (f = 1: unchanged). A 1024-cell link matrix would put a million
    numbers into every snapshot, swamping the log and the browser; the maximum keeps every link visible."""
    h, n, _ = link.shape
    f = -(-n // side)
    if f == 1:
        return link, 1
    m = -(-n // f)
    padded = np.zeros((h, m * f, m * f), dtype=link.dtype)
    padded[:, :n, :n] = link
    return padded.reshape(h, m, f, m, f).max(axis=(2, 4)), f


def snapshot_event(step: int, loss: float, views: dict[str, np.ndarray], dims: dict[str, int],
                   inputs: np.ndarray, targets: np.ndarray, outputs: np.ndarray,
                   mask: np.ndarray) -> dict:
    """An event from one traced sample (see module docstring for shapes).

    `views` are the DNC's debug views, one row per time step, flattened as the model reports
    them (memory [T, N*W], link_matrix [T, Wh*N*N], ...); `dims` gives N, W, R and Wh to unflatten.
    Memory and link matrix are kept at the last step only: they are shown as [N x W] and [N x N]
    (a link matrix of more than LINK_SIDE_MAX cells max-pooled, see pool_link; dims["link_block"]
    then gives the block size).
    """
    n, w = int(dims["nr_cells"]), int(dims["cell_size"])
    r, wh = int(dims["read_heads"]), int(dims.get("num_writes", 1))
    memory = _view(views, "memory", -1, n, w)
    link = _view(views, "link_matrix", -1, wh, n, n)
    link, block = (None, 1) if link is None else pool_link(link[-1])
    shaped = {
        "memory": None if memory is None else memory[-1],            # [N, W]
        "link_matrix": link,                                         # [Wh, N, N] (or pooled)
        "precedence": _view(views, "precedence", -1, wh, n),         # [T, Wh, N]
        "write_weights": _view(views, "write_weights", -1, wh, n),   # [T, Wh, N]
        "read_weights": _view(views, "read_weights", -1, r, n),      # [T, R, N]
        "usage_vector": _view(views, "usage_vector", -1, n),         # [T, N]
        "write_gate": _view(views, "write_gate", -1, wh),            # [T, Wh]
        "allocation_gate": _view(views, "allocation_gate", -1, wh),  # [T, Wh]
        "free_gates": _view(views, "free_gates", -1, r),             # [T, R]
        "read_modes": _view(views, "read_modes", -1, r, 1 + 2 * wh), # [T, R, 1+2Wh]
        "read_masks": _view(views, "read_masks", -1, r, w),          # [T, R, W]   masked_lookup
        "write_masks": _view(views, "write_masks", -1, wh, w),       # [T, Wh, W]  masked_lookup
        "forward_sharpness": _view(views, "forward_sharpness", -1, r),    # [T, R]  link_sharpness
        "backward_sharpness": _view(views, "backward_sharpness", -1, r),  # [T, R]  link_sharpness
    }
    return {
        "kind": "snapshot", "step": int(step), "time": round(time.time(), 3),
        "loss": _scalar(loss),
        "dims": {"nr_cells": n, "cell_size": w, "read_heads": r, "num_writes": wh,
                 **({"link_block": block} if block > 1 else {})},
        "views": {k: _rounded(v) for k, v in shaped.items() if v is not None},
        "inputs": _rounded(inputs), "targets": _rounded(targets),
        "outputs": _rounded(outputs), "mask": _rounded(np.asarray(mask).reshape(-1)),
    }


class EventLog:
    """Appends events to a JSON-lines file, one flushed line per event (a running run's log can
    be replayed at any time). Safe to call from several threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, event: dict) -> None:
        line = json.dumps(event, separators=(",", ":"), allow_nan=False)
        with self._lock:
            if self._file.closed:
                raise ValueError(f"event log {self.path} is closed")
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def truncate(path: Path, step: int) -> None:
    """Drop the events after ``step`` (atomically): a run resumed from its checkpoint at ``step``
    logs them again, and a replay must not show them twice."""
    path = Path(path)
    if not path.exists():
        return
    kept = [e for e in read_events(path) if e["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(e, separators=(",", ":"), allow_nan=False) + "\n" for e in kept),
                   encoding="utf-8")
    tmp.replace(path)


def read_events(path: Path) -> list[dict]:
    """Events of a log in order. A last line cut short (a run still writing) is skipped; a bad
    line elsewhere raises ValueError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        return list(iter_events(f, path))


def parse_events(text: str, path: Path | str = "<events>") -> list[dict]:
    """Events from the text of a log (see read_events)."""
    return list(iter_events(text.splitlines(keepends=True), path))


def iter_events(lines: Iterable[str], path: Path | str = "<events>") -> Iterator[dict]:
    """Events one at a time from the lines of a log (see read_events): a long log is never
    held in memory whole."""
    pending = None  # a line that did not parse: an error unless it turns out to be the last
    for number, line in enumerate(lines, start=1):
        if pending is not None:
            raise pending
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            pending = ValueError(f"{path}, line {number}: not a JSON event ({exc.msg})")
            if not line.endswith("\n"):
                continue  # maybe the line the run is writing right now
            raise pending from exc
        if not isinstance(event, dict) or event.get("kind") not in KINDS:
            raise ValueError(f"{path}, line {number}: expected a scalars, snapshot or generalisation event")
        yield event
