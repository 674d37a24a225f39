"""`dnclab train` streaming to a real Visdom server, `dnclab viz` replay, `dnclab server`."""

import json

import pytest

from dnc_lab.viz import eventlog
from viz_fixtures import TINY_TRAIN, expected_windows, run_cli

pytestmark = pytest.mark.slow

COPY_DIMS = {"read_heads": 1, "num_writes": 1}  # configs/copy.yaml


def _data(windows: dict) -> dict:
    """win -> its traces' data (x, y, z by trace name), without ids and layout."""
    return {win: {t.get("name"): {k: t.get(k) for k in ("x", "y", "z")}
                  for t in w["content"]["data"]}
            for win, w in windows.items()}


def test_training_streams_every_window(streamed_run, visdom_server):
    windows = visdom_server.connection().windows(streamed_run.env)
    assert set(windows) == expected_windows(COPY_DIMS)
    metrics = [json.loads(line) for line in
               (streamed_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = {t["name"]: t for t in windows["loss"]["content"]["data"]}["train"]
    assert loss["x"] == [m["step"] for m in metrics]
    assert loss["y"] == pytest.approx([m["loss"] for m in metrics], rel=1e-5)
    assert "eval" in {t["name"] for t in windows["ber"]["content"]["data"]}
    assert f"step {metrics[-1]['step']}" in windows["memory"]["title"]


def test_replay_reproduces_the_windows_and_twice_changes_nothing(streamed_run, visdom_server,
                                                                  monkeypatch):
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(streamed_run.run_dir.parent))
    args = ["viz", "--run", streamed_run.run_id, "--port", str(visdom_server.port),
            "--env", "viz_replayed"]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert "viz-replayed" in result.output
    connection = visdom_server.connection()
    live = _data(connection.windows(streamed_run.env))
    first = _data(connection.windows("viz-replayed"))
    assert first == live  # curves appended live == curves drawn whole from the log
    assert run_cli(args).exit_code == 0
    assert _data(connection.windows("viz-replayed")) == first


def test_replay_without_server_says_how_to_start_one(streamed_run, dead_port, monkeypatch):
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(streamed_run.run_dir.parent))
    result = run_cli(["viz", "--run", streamed_run.run_id, "--port", str(dead_port)])
    assert result.exit_code == 1
    assert f"dnclab server --port {dead_port}" in result.output
    assert "Traceback" not in result.output


def _train_metrics(root, run_id, port, timeout_s="0.5"):
    result = run_cli(["train", "configs/copy.yaml", *TINY_TRAIN, "--set", f"viz.port={port}",
                      "--set", f"viz.timeout_s={timeout_s}", "--run-id", run_id])
    assert result.exit_code == 0, result.output
    lines = (root / run_id / "metrics.jsonl").read_text().splitlines()
    drop = {"time", "steps_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def test_training_without_a_server_or_with_a_hung_one_gives_the_same_run(
        streamed_run, dead_port, hung_port, tmp_path, monkeypatch):
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(tmp_path))
    reference = [{k: v for k, v in json.loads(line).items() if k not in {"time", "steps_per_s"}}
                 for line in (streamed_run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert _train_metrics(tmp_path, "no_server", dead_port) == reference
    assert _train_metrics(tmp_path, "hung_server", hung_port) == reference
    # nothing shown live is lost: the event logs hold the same events as the streamed run's
    kinds = [e["kind"] for e in eventlog.read_events(streamed_run.run_dir / "visdom.jsonl")]
    for run_id in ("no_server", "hung_server"):
        assert [e["kind"] for e in eventlog.read_events(tmp_path / run_id / "visdom.jsonl")] == kinds


def test_server_listens_on_loopback_only(visdom_server):
    # /proc/net/tcp lists listening sockets (state 0A) as hex "address:port"; 0100007F = 127.0.0.1
    port = f"{visdom_server.port:04X}"
    listening = [line.split()[1] for line in open("/proc/net/tcp").read().splitlines()[1:]
                 if line.split()[1].endswith(":" + port) and line.split()[3] == "0A"]
    assert listening == [f"0100007F:{port}"]


def test_server_on_a_busy_port_is_a_clear_error(visdom_server, tmp_path):
    result = run_cli(["server", "--port", str(visdom_server.port),
                      "--env-path", str(tmp_path / "envs")])
    assert result.exit_code == 1
    assert f"port {visdom_server.port}" in result.output and "already in use" in result.output


def test_replay_of_an_earlier_snapshot_and_of_a_run_without_events(streamed_run, visdom_server,
                                                                    tmp_path):
    from dnc_lab.viz.replay import ReplayError, replay

    result = replay(streamed_run.run_dir, env="viz-step-2", port=visdom_server.port, step=3)
    assert result.snapshot_step == 2  # summaries at steps 2 and 4: the last one at or before 3
    assert "step 2" in visdom_server.connection().windows("viz-step-2")["memory"]["title"]
    with pytest.raises(ReplayError, match="no dashboard events"):
        replay(tmp_path, port=visdom_server.port)


def test_viz_length_draws_the_trained_model_on_a_longer_sequence(streamed_run, visdom_server, monkeypatch):
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(streamed_run.run_dir.parent))
    result = run_cli(["viz", "--run", streamed_run.run_id, "--port", str(visdom_server.port), "--length", "12"])
    assert result.exit_code == 0, result.output
    assert "on one sequence of length 12, seed 1234, into env 'viz-stream-length12'" in result.output
    connection = visdom_server.connection()
    traced = connection.windows("viz-stream-length12")
    live = connection.windows(streamed_run.env)
    assert "memory" in traced
    assert "loss" not in traced  # memory windows only: curves stay in the run's own env
    # A copy of 12 vectors: 25 time steps along x, where the training samples had at most 8 vectors.
    heatmaps = [w for w in traced.values() if w["content"]["data"][0]["type"] == "heatmap"
                and "read weighting" in w["title"]]
    assert heatmaps and len(heatmaps[0]["content"]["data"][0]["z"][0]) == 25
    assert set(live) >= set(traced)  # the same windows; the run's env is left as it was
