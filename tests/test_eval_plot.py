"""`dnclab eval`'s generalisation figure: the PNG, the event in the run's log, its replay, and
the Visdom window (on a real server: slow); for the new tasks too."""

import json
import struct

import pytest
import torch
import yaml
from click.testing import CliRunner

from dnc_lab.cli import main
from dnc_lab.viz import eventlog
from dnc_lab.viz.replay import replay_messages

TINY = {
    "model": {"hidden_size": 8, "nr_cells": 6, "cell_size": 4, "read_heads": 1},
    "task": {"name": "copy", "bits": 4, "min_length": 1, "max_length": 3},
    "train": {"batch_size": 4, "steps": 4, "summarize_freq": 2, "check_freq": 4, "eval_batch_size": 8},
    "viz": {"enabled": False},
}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def two_runs(tmp_path, monkeypatch):
    """Experiments root with two tiny trained copy runs, A (seed 0) and B (seed 1)."""
    root = tmp_path / "experiments"
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(root))
    torch.set_num_threads(1)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    for run_id, seed in (("A", 0), ("B", 1)):
        result = cli("train", config, "--run-id", run_id, "--no-progress", "--set", f"train.seed={seed}")
        assert result.exit_code == 0, result.output
    return root


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's header; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def generalisation_events(run_dir):
    return [e for e in eventlog.read_events(run_dir / eventlog.LOG_NAME) if e["kind"] == "generalisation"]


def test_one_run_png_event_and_replay(two_runs):
    result = cli("eval", "--run", "A", "--lengths", "1-3,6", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    png = two_runs / "A" / "generalisation.png"
    assert f"plot: {png}" in result.output and png_size(png) == (768, 480)
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (480, 768)  # decodes as an image
    (event,) = generalisation_events(two_runs / "A")
    record = json.loads((two_runs / "A" / "eval.jsonl").read_text().splitlines()[-1])
    (curve,) = event["curves"]
    assert curve["run"] == "A" and curve["lengths"] == [1, 2, 3, 6] and curve["trained"] == [1, 3]
    assert curve["error"] == pytest.approx([r["ber"] for r in record["rows"]], abs=1e-12)
    assert event["length_meaning"] == "vectors to copy" and curve["step"] == record["step"] == 4
    messages, _, _ = replay_messages("A", eventlog.read_events(two_runs / "A" / eventlog.LOG_NAME))
    (window,) = [body for _, body in messages if body["win"] == "generalisation"]
    assert window["data"][0]["x"] == [1, 2, 3, 6]
    assert window["layout"]["shapes"][0]["x0"] == 0.5 and window["layout"]["shapes"][0]["x1"] == 3.5


def test_several_runs_on_one_plot(two_runs):
    result = cli("eval", "--run", "A", "--run", "B", "--lengths", "2,5", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    assert png_size(two_runs / "A" / "generalisation-A+B.png")
    (event,) = generalisation_events(two_runs / "A")  # logged with the first run
    assert [c["run"] for c in event["curves"]] == ["A", "B"]
    assert not (two_runs / "B" / eventlog.LOG_NAME).exists()  # B trained without Visdom: no log, none made
    assert [c["lengths"] for c in event["curves"]] == [[2, 5], [2, 5]]
    assert result.output.count("LENGTH") == 2
    result = cli("eval", "--run", "A", "--run", "B", "--checkpoint", "4")
    assert result.exit_code == 2 and "one checkpoint step cannot apply to several runs" in result.output


def set_port(run_dir, port: int) -> None:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["viz"]["port"] = port
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


def test_visdom_unavailable_is_one_line(two_runs, dead_port):
    set_port(two_runs / "A", dead_port)
    result = cli("eval", "--run", "A", "--lengths", "1", "--batch-size", "4", "--visdom")
    assert result.exit_code == 0, result.output
    assert "Visdom: no server answers" in result.output and "dnclab viz --run A" in result.output


def test_eval_reports_the_answer_phase_read_modes(two_runs):
    result = cli("eval", "--run", "A", "--lengths", "2,6", "--batch-size", "8", "--modes", "3", "--no-visdom")
    assert result.exit_code == 0, result.output
    assert "read modes over the answer steps of 3 sequences" in result.output
    assert "BACKWARD   FORWARD   CONTENT" in result.output
    record = json.loads((two_runs / "A" / "eval.jsonl").read_text().splitlines()[-1])
    assert record["mode_sequences"] == 3 and [r["length"] for r in record["rows"]] == [2, 6]
    for row in record["rows"]:
        modes = row["read_modes"]
        assert sum(modes.values()) == pytest.approx(1.0, abs=1e-5)  # a softmax over the modes, at every step
        assert all(0.0 <= v <= 1.0 for v in modes.values())


def test_answer_read_modes_average_only_the_answer_steps(monkeypatch):
    """Two read heads, one write head; copy of length 2: T = 5, answers at steps 3 and 4."""
    import numpy as np

    from dnc_lab import DNC
    from dnc_lab.tasks.copy import CopyConfig, CopyTask
    from dnc_lab.training import answer_read_modes

    model = DNC(4, 8, nr_cells=4, cell_size=3, read_heads=2)
    per_step = [[1, 0, 0, 1, 0, 0]] * 3 + [[0, 1, 0, 0, 0, 1], [0, 0.5, 0.5, 0, 1, 0]]  # [T, R*(2H+1)]
    monkeypatch.setattr(model, "trace", lambda x: (None, None, {"read_modes": np.array(per_step)}))
    modes = answer_read_modes(model, CopyTask(CopyConfig(bits=4)), 2, sequences=2, seed=0,
                              device=torch.device("cpu"))
    # head 0: forward 1, then forward 0.5 + content 0.5; head 1: content 1, then forward 1.
    assert modes == pytest.approx({"backward": 0.0, "forward": 0.625, "content": 0.375})


@pytest.mark.parametrize("task, lengths, meaning", [
    ({"name": "associative_recall", "bits": 3, "item_length": 2, "min_length": 2, "max_length": 3}, "2-4",
     "items in the list"),
    ({"name": "priority_sort", "bits": 3, "min_length": 1, "max_length": 3}, "1-4", "input vectors"),
    ({"name": "key_value", "bits": 4, "min_length": 1, "max_length": 2, "two_way": True}, "1-4", "key-value pairs"),
])
def test_new_tasks_train_and_eval(tmp_path, monkeypatch, task, lengths, meaning):
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(tmp_path / "exp"))
    torch.set_num_threads(1)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "task": task}))
    assert cli("train", config, "--run-id", "t", "--no-progress").exit_code == 0
    result = cli("eval", "--run", "t", "--lengths", lengths, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert f"length = {meaning}" in result.output
    rows = [line.split() for line in result.output.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(int(lengths[0]), int(lengths[-1]) + 1))
    if task["name"] == "key_value":  # 2 key bits: at most 4 pairs
        result = cli("eval", "--run", "t", "--lengths", "5", "--batch-size", "4")
        assert result.exit_code == 2 and "length = 5 pairs: expected 1 to 2^(bits/2) = 4" in result.output


@pytest.mark.slow
def test_window_reaches_a_visdom_server(two_runs, visdom_server):
    run = two_runs / "A"
    set_port(run, visdom_server.port)
    result = cli("eval", "--run", "A", "--run", "B", "--lengths", "1-3,6", "--batch-size", "8", "--visdom")
    assert result.exit_code == 0, result.output
    assert "Visdom: window 'generalisation' in env 'A'" in result.output
    window = visdom_server.connection().windows("A")["generalisation"]
    traces = {t["name"]: t for t in window["content"]["data"]}
    (event,) = generalisation_events(run)
    for curve in event["curves"]:
        assert traces[curve["run"]]["x"] == curve["lengths"]
        assert traces[curve["run"]]["y"] == pytest.approx(curve["error"], abs=1e-9)


def test_traced_event_is_a_snapshot_of_the_newest_checkpoint_at_any_length(two_runs):
    from dnc_lab.viz.replay import ReplayError, traced_event

    event = traced_event(two_runs / "A", length=6)  # trained on 1-3
    assert event["kind"] == "snapshot" and event["step"] == 4  # the run's last checkpoint
    steps = 2 * 6 + 1
    assert len(event["inputs"]) == steps and sum(event["mask"]) == 6
    assert len(event["views"]["read_weights"]) == steps and len(event["views"]["read_weights"][0][0]) == 6  # N=6
    again = traced_event(two_runs / "A", length=6)
    assert event["loss"] > 0 and {**again, "time": 0} == {**event, "time": 0}  # the seed fixes the sequence
    assert traced_event(two_runs / "A", length=6, seed=5)["inputs"] != event["inputs"]
    result = cli("viz", "--run", "A", "--length", "4", "--step", "2")
    assert result.exit_code == 2 and "give one of them" in result.output
    (two_runs / "empty").mkdir()
    with pytest.raises(ReplayError, match="no checkpoint to trace"):
        traced_event(two_runs / "empty", length=3)
