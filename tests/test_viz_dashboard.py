"""Dashboard streaming against a real Visdom server, a refused port and a hung one; event log."""

import json
import logging
import sys
import time

import numpy as np
import pytest

from dnc_lab.viz import eventlog
from dnc_lab.viz.client import VisdomConnection
from dnc_lab.viz.dashboard import Dashboard, env_name
from dnc_lab.viz.replay import replay
from viz_fixtures import MODEL_DIMS, expected_windows, free_port, random_views, start_visdom, stop

N, W, R = MODEL_DIMS["nr_cells"], MODEL_DIMS["cell_size"], MODEL_DIMS["read_heads"]


def test_env_names_use_dashes():
    assert env_name("copy_run_007") == "copy-run-007"


def test_snapshot_event_unflattens_views_and_rounds(dnc_sample):
    views, inputs, targets, outputs, mask = dnc_sample
    event = eventlog.snapshot_event(10, 0.123456789, views, MODEL_DIMS, inputs, targets,
                                    outputs, mask)
    shapes = {k: np.asarray(v).shape for k, v in event["views"].items()}
    t = inputs.shape[0]
    assert shapes == {"memory": (N, W), "link_matrix": (1, N, N), "precedence": (t, 1, N),
                      "write_weights": (t, 1, N), "read_weights": (t, R, N),
                      "usage_vector": (t, N), "write_gate": (t, 1), "allocation_gate": (t, 1),
                      "free_gates": (t, R), "read_modes": (t, R, 3)}
    # head 1's weighting at step 3 is where the model reported it in its flat [T, R*N] view
    assert np.allclose(event["views"]["read_weights"][3][1], views["read_weights"][3, N:2 * N],
                       atol=5e-5)
    assert np.allclose(event["views"]["memory"], views["memory"][-1].reshape(N, W), atol=5e-5)
    assert event["loss"] == 0.123457
    line = json.dumps(event)
    assert "0.12345678" not in line and len(line) < 40_000


def test_event_log_reader_skips_only_a_cut_last_line(tmp_path):
    log = eventlog.EventLog(tmp_path / "visdom.jsonl")
    log.write(eventlog.scalars_event(1, {"loss": 1.0}))
    log.write(eventlog.scalars_event(2, {"loss": float("nan")}))
    log.close()
    path = tmp_path / "visdom.jsonl"
    with open(path, "a") as f:
        f.write('{"kind": "scal')  # a run writing right now
    events = list(eventlog.read_events(path))
    assert [e["step"] for e in events] == [1, 2] and events[1]["values"]["loss"] is None
    path.write_text('{"kind": "scalars"\n' + path.read_text())
    with pytest.raises(ValueError, match="line 1"):
        list(eventlog.read_events(path))


def _window_traces(win: dict) -> dict:
    return {t.get("name"): t for t in win["content"]["data"]}


def test_dashboard_draws_every_window_with_the_logged_data(visdom_server, dnc_sample, tmp_path):
    views, inputs, targets, outputs, mask = dnc_sample
    dash = Dashboard(tmp_path / "run_a", env="dash_every", port=visdom_server.port,
                     model_dims=MODEL_DIMS, timeout_s=10.0)
    for step in (10, 20, 30):
        dash.log_scalars(step, {"loss": 1.0 / step, "ber": 0.5 / step})
    dash.log_scalars(30, {"eval_ber": 0.01})
    dash.log_snapshot(30, 0.0333, views, inputs, targets, outputs, mask)
    stats = dash.close()
    assert stats["failed"] == 0 and stats["sent"] >= 1

    windows = visdom_server.connection().windows("dash-every")
    assert set(windows) == expected_windows(MODEL_DIMS)
    ber = _window_traces(windows["ber"])
    assert ber["train"]["x"] == [10, 20, 30] and ber["train"]["y"] == [0.05, 0.025, 0.0166667]
    assert ber["eval"]["x"] == [30] and ber["eval"]["y"] == [0.01]
    read1 = windows["read-weights-1"]
    assert "step 30" in read1["title"] and "loss 0.0333" in read1["title"]
    layout = read1["content"]["layout"]
    assert layout["xaxis"]["title"] == "time step" and layout["yaxis"]["title"] == "slot"
    z = np.array(read1["content"]["data"][0]["z"])  # [slot, time]
    assert np.allclose(z, views["read_weights"][:, N:2 * N].T, atol=5e-5)
    io = windows["io"]["content"]["data"][0]["z"]
    assert len(io) == 5 + 4 + 4 + 4 + 3  # input, target, output, errors rows and 3 gaps
    assert len(list(eventlog.read_events(tmp_path / "run_a" / "visdom.jsonl"))) == 5


def test_curves_are_appended_not_redrawn(visdom_server, tmp_path):
    dash = Dashboard(tmp_path / "run_b", env="dash-append", port=visdom_server.port,
                     timeout_s=10.0)
    sent = []
    post = dash.connection.post
    dash.connection.post = lambda endpoint, body: sent.append((endpoint, body)) or post(endpoint, body)
    dash.log_scalars(1, {"loss": 0.9})
    deadline = time.monotonic() + 20
    while not sent and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    dash.log_scalars(2, {"loss": 0.8})
    dash.log_scalars(3, {"loss": 0.7})
    dash.close()
    loss_msgs = [(endpoint, body) for endpoint, body in sent if body.get("win") == "loss"]
    assert loss_msgs[0][0] == "events"  # the first point draws the window, with its titles
    assert [m[0] for m in loss_msgs[1:]] == ["update"] * (len(loss_msgs) - 1)
    assert all(m[1]["append"] for m in loss_msgs[1:])
    trace = _window_traces(visdom_server.connection().windows("dash-append")["loss"])["train"]
    assert trace["x"] == [1, 2, 3] and trace["y"] == [0.9, 0.8, 0.7]


def _stream(dash: Dashboard, rng, events: int = 6) -> None:
    inputs = rng.integers(0, 2, (7, 5)).astype(float)
    for step in range(events):
        dash.log_scalars(step, {"loss": 1.0 / (step + 1), "ber": 0.5})
        dash.log_snapshot(step, 1.0 / (step + 1), random_views(rng, 7, MODEL_DIMS), inputs,
                          inputs[:, :4], rng.random((7, 4)), np.ones(7))


@pytest.mark.parametrize("server", ["dead", "hung"])
def test_unreachable_server_warns_once_and_loses_nothing(server, dead_port, hung_port, tmp_path,
                                                          caplog):
    port = dead_port if server == "dead" else hung_port
    timeout_s = 2.0
    dash = Dashboard(tmp_path / "run_c", env="nowhere", port=port, model_dims=MODEL_DIMS,
                     timeout_s=timeout_s, queue_size=4)
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING, logger="dnc_lab.viz.dashboard"):
        start = time.monotonic()
        _stream(dash, rng)  # never waits for the server: only a log line and a queue slot
        emitted = time.monotonic() - start
        stats = dash.close()
        closed = time.monotonic() - start - emitted
    # Correctness bounds, not speed targets: emitting never waits on the network (a sender that
    # waited would spend at least one request timeout on the first event alone), and close() gives
    # up within its documented bound.
    assert emitted < timeout_s
    assert closed <= Dashboard.close_timeout(timeout_s) + 2
    assert stats["sent"] == 0 and stats["failed"] >= 1
    warnings = [r for r in caplog.records if "Training goes on" in r.getMessage()]
    assert len(warnings) == 1 and "dnclab server" in warnings[0].getMessage()
    events = list(eventlog.read_events(tmp_path / "run_c" / "visdom.jsonl"))
    assert [e["kind"] for e in events] == ["scalars", "snapshot"] * 6


def test_a_full_queue_drops_old_snapshots_first(tmp_path, hung_port):
    # The sender is stuck on a server that never answers; the queue keeps the newest events
    # and every curve point, dropping the oldest snapshots.
    dash = Dashboard(tmp_path / "run_d", env="full", port=hung_port, model_dims=MODEL_DIMS,
                     timeout_s=5.0, queue_size=3)
    rng = np.random.default_rng(1)
    dash.log_scalars(0, {"loss": 1.0})
    time.sleep(0.2)  # the sender takes it and blocks on the hung server
    _stream(dash, rng, events=3)  # 6 events into 3 slots
    with dash._cond:
        kinds = [(e["kind"], e["step"]) for e in dash._queue]
        dropped = dash._stats["dropped"]
    assert kinds == [("scalars", 1), ("scalars", 2), ("snapshot", 2)]
    assert dropped == 3
    dash.close(timeout=0.1)


def test_a_resumed_run_continues_its_curves(visdom_server, tmp_path):
    # First life of the run: steps 1-4. Resumed from a checkpoint at step 2, it redoes 3 and 4
    # (with other values) and goes on: the curve must read 1, 2, 3', 4', 5 live and on replay.
    run_dir = tmp_path / "run_e"
    first = Dashboard(run_dir, env="resumed", port=visdom_server.port, enabled=False)
    for step in (1, 2, 3, 4):
        first.log_scalars(step, {"loss": 1.0 - step / 10})
    first.close()
    second = Dashboard(run_dir, env="resumed", port=visdom_server.port, timeout_s=10.0)
    for step in (3, 4, 5):
        second.log_scalars(step, {"loss": 0.5 - step / 100})
    assert second.close()["failed"] == 0
    connection = visdom_server.connection()
    expected = ([1, 2, 3, 4, 5], [0.9, 0.8, 0.47, 0.46, 0.45])
    live = _window_traces(connection.windows("resumed")["loss"])["train"]
    assert (live["x"], live["y"]) == expected
    replay(run_dir, env="resumed-replay", port=visdom_server.port)
    again = _window_traces(connection.windows("resumed-replay")["loss"])["train"]
    assert (again["x"], again["y"]) == expected


def test_a_server_started_mid_run_gets_the_whole_curves(tmp_path, visdom_assets):
    port = free_port()
    dash = Dashboard(tmp_path / "run_f", env="late", port=port, timeout_s=5.0)
    dash.retry_s = 0.2  # try again soon (the default waits 10 s between tries)
    dash.log_scalars(1, {"loss": 0.9})  # nobody listens yet: fails, the point is kept
    deadline = time.monotonic() + 20
    while dash.stats["failed"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dash.stats["failed"] == 1
    process = start_visdom([sys.executable, "-m", "dnc_lab.viz.server", "--port", str(port),
                            "--env-path", str(tmp_path / "envs")], port, tmp_path / "server.log")
    try:
        time.sleep(0.3)
        dash.log_scalars(2, {"loss": 0.8})
        assert dash.close()["sent"] == 2
        windows = VisdomConnection(port=port, timeout_s=10).windows("late")
        trace = _window_traces(windows["loss"])["train"]
        assert trace["x"] == [1, 2] and trace["y"] == [0.9, 0.8]
    finally:
        stop(process)


def test_figures_for_several_read_and_write_heads():
    from dnc_lab.viz.figures import snapshot_figures

    dims = {"nr_cells": 5, "cell_size": 3, "read_heads": 3, "num_writes": 2}
    rng = np.random.default_rng(2)
    event = eventlog.snapshot_event(7, 0.5, random_views(rng, 4, dims), dims,
                                    np.ones((4, 2)), np.ones((4, 2)), np.ones((4, 2)), np.ones(4))
    figures = {body["win"]: body for _, body in snapshot_figures("heads", event)}
    assert set(figures) == expected_windows(dims, curves=())
    modes = [trace["name"] for trace in figures["read-modes"]["data"]]
    assert len(modes) == 3 * (1 + 2 * 2) and "r2 forward w1" in modes
    gates = [trace["name"] for trace in figures["gates"]["data"]]
    assert gates == ["write 0", "write 1", "allocation 0", "allocation 1",
                     "free, read head 0", "free, read head 1", "free, read head 2"]
    # link-1 is write head 1's matrix, not head 0's
    assert np.allclose(figures["link-1"]["data"][0]["z"], event["views"]["link_matrix"][1])


def test_a_large_link_matrix_is_max_pooled_for_display():
    from dnc_lab.viz.figures import snapshot_figures

    n = 600  # more than LINK_SIDE_MAX cells: blocks of 3 slots, 200 × 200
    dims = {"nr_cells": n, "cell_size": 2, "read_heads": 1, "num_writes": 1}
    views = random_views(np.random.default_rng(3), 2, dims)
    link = np.zeros((2, n, n))
    link[-1, 599, 3] = 0.9  # slot 599 written right after slot 3, at the last step
    views["link_matrix"] = link.reshape(2, n * n)
    event = eventlog.snapshot_event(1, 0.5, views, dims, np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)),
                                    np.ones(2))
    pooled = np.asarray(event["views"]["link_matrix"])
    assert pooled.shape == (1, 200, 200) and event["dims"]["link_block"] == 3
    assert pooled[0, 199, 1] == 0.9 and pooled.sum() == 0.9  # the link survives pooling, nothing else appears
    figure = {body["win"]: body for _, body in snapshot_figures("big", event)}["link-0"]
    assert "max over 3×3 slots" in json.dumps(figure, ensure_ascii=False)
    small = eventlog.snapshot_event(1, 0.5, random_views(np.random.default_rng(4), 2, MODEL_DIMS), MODEL_DIMS,
                                    np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)), np.ones(2))
    assert "link_block" not in small["dims"] and np.asarray(small["views"]["link_matrix"]).shape == (1, N, N)
