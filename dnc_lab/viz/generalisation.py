"""Error against sequence length, for one run or several on one plot: the generalisation figure
of ``dnclab eval``, as a PNG (matplotlib, Agg backend: no display needed) and as a Visdom window.

A curve is one run at one checkpoint: its lengths, the error at each, and the lengths it was
trained on (shaded in both figures, so what lies right of the band is extrapolation). The Visdom
window is logged like every dashboard event, to the run's ``visdom.jsonl``:

    {"kind": "generalisation", "step": 900, "time": ..., "metric": "BER", "length_meaning": "...",
     "curves": [{"run": "00003-copy", "step": 900, "lengths": [1, 2, ...], "error": [0.0, ...],
                 "trained": [1, 8]}, ...]}

so ``dnclab viz --run ID`` draws it again later (window ``generalisation``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

WINDOW = "generalisation"
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]  # matplotlib's C0-C9, so the PNG and the Visdom window agree


class Curve(NamedTuple):
    run: str
    step: int
    lengths: list
    error: list
    trained: tuple  # (shortest, longest) trained length


def generalisation_event(curves: list[Curve], metric: str = "BER", length_meaning: Optional[str] = None) -> dict:
    """The event-log record of one generalisation figure; its step is the first curve's."""
    return {"kind": "generalisation", "step": int(curves[0].step), "time": round(time.time(), 3),
            "metric": metric, "length_meaning": length_meaning,
            "curves": [{"run": c.run, "step": int(c.step), "lengths": [int(x) for x in c.lengths],
                        "error": [float(e) for e in c.error], "trained": [int(c.trained[0]), int(c.trained[1])]}
                       for c in curves]}


def _curves(event: dict) -> list[Curve]:
    return [Curve(c["run"], c["step"], c["lengths"], c["error"], tuple(c["trained"])) for c in event["curves"]]


def _xlabel(event: dict) -> str:
    meaning = event.get("length_meaning")
    return f"length ({meaning})" if meaning else "length"


def write_png(event: dict, path: Path) -> Path:
    """Draw the event's curves into a PNG at ``path`` (error against length, log-free axes so a
    zero error shows; each run's trained lengths shaded in its colour)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    try:
        for i, curve in enumerate(_curves(event)):
            color = COLOURS[i % len(COLOURS)]
            lo, hi = curve.trained
            ax.axvspan(lo - 0.5, hi + 0.5, color=color, alpha=0.12, lw=0)
            ax.plot(curve.lengths, curve.error, "o-", color=color, ms=4,
                    label=f"{curve.run} (step {curve.step}; trained {lo}-{hi}, shaded)")
        ax.set_xlabel(_xlabel(event))
        ax.set_ylabel(event.get("metric", "error"))
        ax.set_ylim(bottom=0)
        ax.set_title("error against length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def generalisation_figure(env: str, event: dict) -> list:
    """The Visdom message drawing the event as window ``generalisation`` (one trace per run; the
    trained lengths as shaded bands)."""
    from dnc_lab.viz.figures import CURVE_SIZE, _builder, _msg, _titled

    curves = _curves(event)
    x = np.array(sorted({length for c in curves for length in c.lengths}), dtype=np.float64)
    y = np.full((len(x), len(curves)), np.nan)
    for j, c in enumerate(curves):
        position = {length: i for i, length in enumerate(x.tolist())}
        for length, error in zip(c.lengths, c.error):
            y[position[float(length)], j] = error
    bands = [{"type": "rect", "xref": "x", "yref": "paper", "x0": c.trained[0] - 0.5, "x1": c.trained[1] + 0.5,
              "y0": 0, "y1": 1, "fillcolor": COLOURS[j % len(COLOURS)], "opacity": 0.12,
              "line": {"width": 0}} for j, c in enumerate(curves)]
    tag = "trained lengths shaded; " + ", ".join(f"{c.run} at step {c.step}" for c in curves)
    opts = _titled(f"{event.get('metric', 'error')} against length", tag, xlabel=_xlabel(event),
                   ylabel=event.get("metric", "error"), legend=[c.run for c in curves], markers=True,
                   linecolor=np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)]
                                       for h in (COLOURS[j % len(COLOURS)] for j in range(len(curves)))]),
                   **CURVE_SIZE)
    opts["layoutopts"]["plotly"]["shapes"] = bands
    Y = y[:, 0] if len(curves) == 1 else y
    return [_msg(_builder(env).line(Y=Y, X=x, win=WINDOW, opts=opts))]
