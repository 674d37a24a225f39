"""Visdom messages made from dashboard events (pure functions: event in, messages out).

A message is `(endpoint, body)`, exactly what Visdom's own client would POST: the bodies are
built by `visdom.Visdom(send=False)`, whose plotting methods then return their message instead
of sending it. Sending is someone else's job (`dnc_lab.viz.client`), with a timeout.

Every window has a fixed name (`win`), so sending a figure again replaces its window:

    curves (one window per scalar; `eval_<name>` joins `<name>`'s window as trace "eval",
            `<name>/<trace>` joins it as trace <trace>)
      loss, ber, ...            x: step
    the traced sample (batch element 0), redrawn at every snapshot
      memory                    [N x W] memory after the last step (x: word position, y: slot)
      read-weights-<r>          read weighting of head r over time  (x: time step, y: slot)
      write-weights-<h>         write weighting of write head h over time
      usage                     usage of every slot over time
      precedence-<h>            precedence weighting over time
      link-<h>                  temporal link matrix after the last step (x: slot j, y: slot i;
                                L[i, j] ~ "i was written right after j")
      gates                     write, allocation and free gates over time
      read-modes                backward / forward / content mode of each read head over time
    only for models with Csordás & Schmidhuber's variants:
      read-mask-<r>             masked_lookup: read head r's lookup mask over time (x: time step,
                                y: word position; 1 = the position counts in the lookup)
      write-mask-<h>            masked_lookup: the write head's lookup mask over time
      link-sharpness            link_sharpness: each read head's forward and backward exponent
      io                        input, target, thresholded output and errors, stacked over time
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable

import numpy as np

Message = tuple  # (endpoint: str, body: dict)

CURVE_SIZE = {"width": 420, "height": 300}
MAP_SIZE = {"width": 420, "height": 320}


@lru_cache(maxsize=None)
def _builder(env: str):
    """A Visdom client that never sends: its plotting methods return `(body, endpoint)`."""
    import visdom

    return visdom.Visdom(env=env, send=False, use_incoming_socket=False)


def _titled(name: str, tag: str | None, margin_left: int = 60, **opts) -> dict:
    """Visdom opts: window title `name — tag`; plot title on two lines (name, then the smaller
    tag) so it stays clear of plotly's toolbar."""
    text = f"<b>{name}</b>" + (f"<br><span style='font-size:11px'>{tag}</span>" if tag else "")
    layout = {"title": {"text": text, "font": {"size": 13}},
              "margin": {"l": margin_left, "r": 30, "t": 60, "b": 50}}
    return {"title": f"{name} — {tag}" if tag else name,
            "layoutopts": {"plotly": layout}, **opts}


def _msg(result) -> Message:
    body, endpoint = result
    return endpoint, body


# ---------------------------------------------------------------------------------- curves
def curve_of(scalar: str) -> tuple[str, str]:
    """(window, trace) of a scalar: `eval_ber` -> ("ber", "eval"), `loss` -> ("loss", "train"),
    `loss/seed03` -> ("loss", "seed03") (a sweep's dashboard: one trace per trial)."""
    if "/" in scalar:
        window, trace = scalar.split("/", 1)
        return window, trace
    if scalar.startswith("eval_"):
        return scalar[len("eval_"):], "eval"
    return scalar, "train"


_CURVE_TITLES = {"loss": "training loss", "ber": "bit error rate"}


def curve_draw(env: str, win: str, traces: dict[str, tuple[list, list]]) -> list[Message]:
    """Full (re)draw of one curve window from every point: `traces` maps a trace name to
    (steps, values). Replaces the window, so drawing twice gives the same window."""
    names = sorted(traces, key=lambda t: (t != "train", t))  # "train" first: it makes the window
    messages = []
    for i, name in enumerate(names):
        steps, values = traces[name]
        if i == 0:
            opts = _titled(_CURVE_TITLES.get(win, win), None, xlabel="step", ylabel=win,
                           showlegend=True, markers=name == "eval", **CURVE_SIZE)
            messages.append(_msg(_builder(env).line(
                Y=_array(values), X=_array(steps), win=win, name=name, opts=opts)))
        else:
            messages.extend(curve_append(env, win, name, steps, values))
    return messages


def curve_append(env: str, win: str, trace: str, steps: list, values: list) -> list[Message]:
    """Points appended to one trace of a curve window (the trace is added if it is new)."""
    opts = {"markers": trace == "eval"}
    return [_msg(_builder(env).line(Y=_array(values), X=_array(steps), win=win, name=trace,
                                    update="append", opts=opts))]


def _array(values: Iterable) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


# ------------------------------------------------------------------------------- snapshots
def snapshot_figures(env: str, event: dict) -> list[Message]:
    """Every window of the traced sample, from one snapshot event (see eventlog for shapes)."""
    vis = _builder(env)
    views = {k: np.asarray(v, dtype=np.float64) for k, v in event["views"].items()}
    step, loss = event["step"], event["loss"]
    tag = f"step {step}, loss {loss:.4g}" if loss is not None else f"step {step}, loss NaN"
    msgs: list[Message] = []

    def heatmap(win, z, title, xlabel, ylabel, unit_range=True, colormap="Viridis"):
        opts = _titled(title, tag, xlabel=xlabel, ylabel=ylabel, colormap=colormap, **MAP_SIZE)
        if unit_range:  # weightings and gates live in [0, 1]: a fixed scale compares steps
            opts.update(xmin=0.0, xmax=1.0)
        msgs.append(_msg(vis.heatmap(np.asarray(z), win=win, opts=opts)))

    if "memory" in views:
        m = views["memory"]  # [N, W]
        limit = float(np.nanmax(np.abs(m))) or 1.0
        opts = _titled(f"memory [{m.shape[0]}×{m.shape[1]}] after the last step", tag,
                       xlabel="word position", ylabel="slot", colormap="RdBu",
                       xmin=-limit, xmax=limit, **MAP_SIZE)
        msgs.append(_msg(vis.heatmap(m, win="memory", opts=opts)))
    for r in range(views["read_weights"].shape[1] if "read_weights" in views else 0):
        heatmap(f"read-weights-{r}", views["read_weights"][:, r, :].T,
                f"read weighting, head {r}", "time step", "slot")
    for h in range(views["write_weights"].shape[1] if "write_weights" in views else 0):
        heatmap(f"write-weights-{h}", views["write_weights"][:, h, :].T,
                f"write weighting, write head {h}", "time step", "slot")
    if "usage_vector" in views:
        heatmap("usage", views["usage_vector"].T, "usage", "time step", "slot")
    for h in range(views["precedence"].shape[1] if "precedence" in views else 0):
        heatmap(f"precedence-{h}", views["precedence"][:, h, :].T,
                f"precedence, write head {h}", "time step", "slot")
    block = event["dims"].get("link_block", 1)
    pooled = f" (max over {block}×{block} slots)" if block > 1 else ""
    unit = f"block of {block} slots" if block > 1 else "slot"
    for h in range(views["link_matrix"].shape[0] if "link_matrix" in views else 0):
        heatmap(f"link-{h}", views["link_matrix"][h],
                f"link matrix L[i, j], write head {h}, last step{pooled}",
                f"{unit} j (written before)", f"{unit} i (written after)")

    gates = _gate_traces(views)
    if gates:
        msgs.append(_lines(vis, "gates", gates, "gates", tag, "gate value"))
    modes = _mode_traces(views)
    if modes:
        msgs.append(_lines(vis, "read-modes", modes, "read modes", tag, "mode weight"))
    for r in range(views["read_masks"].shape[1] if "read_masks" in views else 0):
        heatmap(f"read-mask-{r}", views["read_masks"][:, r, :].T,
                f"lookup mask, read head {r}", "time step", "word position")
    for h in range(views["write_masks"].shape[1] if "write_masks" in views else 0):
        heatmap(f"write-mask-{h}", views["write_masks"][:, h, :].T,
                f"lookup mask, write head {h}", "time step", "word position")
    sharpness = _sharpness_traces(views)
    if sharpness:
        msgs.append(_lines(vis, "link-sharpness", sharpness, "link sharpness (exponent ≥ 1)", tag,
                           "exponent", unit_range=False))
    msgs.append(_io_figure(vis, event, tag))
    return msgs


def _sharpness_traces(views: dict) -> dict[str, np.ndarray]:
    traces = {}
    for key, label in (("forward_sharpness", "forward"), ("backward_sharpness", "backward")):
        if key in views:
            for r in range(views[key].shape[1]):
                traces[f"r{r} {label}"] = views[key][:, r]
    return traces


def _gate_traces(views: dict) -> dict[str, np.ndarray]:
    traces = {}
    for key, label in (("write_gate", "write"), ("allocation_gate", "allocation")):
        if key in views:
            for h in range(views[key].shape[1]):
                traces[label if views[key].shape[1] == 1 else f"{label} {h}"] = views[key][:, h]
    if "free_gates" in views:
        for r in range(views["free_gates"].shape[1]):
            traces[f"free, read head {r}"] = views["free_gates"][:, r]
    return traces


def _mode_traces(views: dict) -> dict[str, np.ndarray]:
    if "read_modes" not in views:
        return {}
    modes = views["read_modes"]  # [T, R, 1 + 2*Wh]: Wh backward, Wh forward, content
    wh = (modes.shape[2] - 1) // 2
    traces = {}
    for r in range(modes.shape[1]):
        for h in range(wh):
            suffix = "" if wh == 1 else f" w{h}"
            traces[f"r{r} backward{suffix}"] = modes[:, r, h]
            traces[f"r{r} forward{suffix}"] = modes[:, r, wh + h]
        traces[f"r{r} content"] = modes[:, r, 2 * wh]
    return traces


def _lines(vis, win: str, traces: dict[str, np.ndarray], title: str, tag: str,
           ylabel: str, unit_range: bool = True) -> Message:
    """Several traces over time in one window (x: time step), legend = trace names. Values in
    [0, 1] (gates, modes) get a fixed y range so snapshots compare; others scale to the data."""
    y = np.stack(list(traces.values()), axis=1)  # [T, traces]
    x = np.arange(y.shape[0], dtype=np.float64)
    fixed = {"ytickmin": -0.05, "ytickmax": 1.05} if unit_range else {}
    opts = _titled(title, tag, xlabel="time step", ylabel=ylabel, legend=list(traces),
                   **fixed, **CURVE_SIZE)
    if y.shape[1] == 1:
        return _msg(vis.line(Y=y[:, 0], X=x, win=win, name=next(iter(traces)), opts=opts))
    return _msg(vis.line(Y=y, X=x, win=win, opts=opts))


def _io_figure(vis, event: dict, tag: str) -> Message:
    """Input, target, thresholded output and errors stacked as row blocks over time (x).

    Output and errors are shown only where the mask counts the step (elsewhere blank). Plotly
    draws row 0 at the bottom, so blocks are stacked bottom-up to read input first from the top.
    """
    inputs = np.asarray(event["inputs"], dtype=np.float64).T  # [in, T]
    targets = np.asarray(event["targets"], dtype=np.float64).T  # [out, T]
    outputs = np.asarray(event["outputs"], dtype=np.float64).T
    mask = np.asarray(event["mask"], dtype=np.float64).reshape(-1) > 0  # [T]
    bits = np.where(mask, (outputs > 0.5).astype(np.float64), np.nan)
    errors = np.where(mask, np.abs(bits - targets), np.nan)
    wrong = int(np.nansum(errors))
    blocks = [("errors", errors), ("output>0.5", bits), ("target", targets), ("input", inputs)]
    gap = np.full((1, inputs.shape[1]), np.nan)
    rows, ticks, labels, y = [], [], [], 0
    for name, block in blocks:
        if rows:
            rows.append(gap)
            y += 1
        rows.append(block)
        ticks.append(y + (block.shape[0] - 1) / 2)
        labels.append(name)
        y += block.shape[0]
    opts = _titled(f"input | target | output>0.5 | errors: {wrong} wrong bits", tag,
                   margin_left=90, xlabel="time step", ytickvals=ticks, yticklabels=labels,
                   colormap="Viridis", xmin=0.0, xmax=1.0, width=560, height=360)
    return _msg(vis.heatmap(np.concatenate(rows, axis=0), win="io", opts=opts))

