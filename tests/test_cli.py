"""The dnclab CLI through click's CliRunner: help, a whole train -> resume -> eval -> runs cycle,
and a table of bad inputs, each a one-line error that leaves existing runs untouched."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from dnc_lab import runs
from dnc_lab.cli import main

TINY = {
    "model": {"hidden_size": 8, "nr_cells": 4, "cell_size": 4, "read_heads": 1},
    "task": {"name": "copy", "bits": 4, "min_length": 1, "max_length": 3},
    "train": {"batch_size": 4, "steps": 6, "summarize_freq": 2, "check_freq": 4, "seed": 1, "eval_batch_size": 8},
    "viz": {"enabled": False},
}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty experiments root and a tiny config file; returns (root, config path)."""
    root = tmp_path / "experiments"
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(root))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    torch.set_num_threads(1)
    return root, config


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", [[], ["train"], ["resume"], ["runs"], ["eval"], ["viz"], ["server"]])
def test_help_renders(command):
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: main" in result.output or "Usage: " in result.output
    if command == ["train"]:
        assert "--cuda" in result.output and "[default:" in result.output and "--dry-run" in result.output


def test_train_resume_eval_runs_load_run(env):
    root, config = env
    result = cli("train", config, "--run-id", "tiny-1", "--no-progress", "--set", "train.steps=6")
    assert result.exit_code == 0, result.output
    run_dir = root / "tiny-1"
    assert "tiny-1: finished 6 steps" in result.output and "BER per length: 1:" in result.output
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["input_size"] == 4 and saved["train"]["steps"] == 6
    assert [r["step"] for r in runs.read_metrics(run_dir)] == [2, 4, 6]
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [4, 6]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 6 and set(status["eval"]) == {"1", "2", "3"}

    result = cli("resume", "tiny-1")  # already done: says how to go on
    assert result.exit_code == 2 and "use --steps N" in result.output
    result = cli("resume", "tiny-1", "--steps", "10", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "resuming tiny-1 at step 6" in result.output
    assert [r["step"] for r in runs.read_metrics(run_dir)] == [2, 4, 6, 8, 10]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 10

    result = cli("eval", "--run", "tiny-1", "--lengths", "1-2,6", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("tiny-1 at step 10") and lines[1].split() == ["LENGTH", "BER", "LOSS"]
    assert [line.split()[0] for line in lines[2:5]] == ["1", "2", "6"] and "longer than trained" in lines[4]
    assert lines[5] == f"plot: {run_dir / 'generalisation.png'}"  # tests/test_eval_plot.py checks the figure
    assert (run_dir / "eval.jsonl").is_file()

    cli("train", config, "--no-progress", "--set", "train.steps=2")  # a second run with a default id
    result = cli("runs")
    assert result.exit_code == 0
    table = result.output.splitlines()
    assert table[0].split()[:4] == ["ID", "TASK", "STEP", "STATUS"]
    assert table[1].split()[:4] == ["00000-copy", "copy", "2/2", "finished"]
    assert table[2].split()[:4] == ["tiny-1", "copy", "10/10", "finished"]

    model, config_dict = runs.load_run("tiny-1")
    assert not model.training and config_dict["task"]["bits"] == 4
    out, _ = model(torch.zeros(1, 5, 4))
    assert out.shape == (1, 5, 4)
    model2, _ = runs.load_run(run_dir, checkpoint=8)
    assert not torch.equal(next(model.parameters()), next(model2.parameters()))


def test_dry_run_writes_nothing(env):
    root, config = env
    result = cli("train", config, "--dry-run", "--set", "train.lr=0.01")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["train"]["lr"] == 0.01 and printed["model"]["input_size"] == 4
    assert not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize("make_args, message", [
    (lambda cfg, tmp: ["train", tmp / "missing.yaml"], "config file '.*missing.yaml' not found"),
    (lambda cfg, tmp: ["train", _write(tmp, "task: [copy"), ], r"bad.yaml: malformed YAML at line"),
    (lambda cfg, tmp: ["train", _write(tmp, yaml.safe_dump({**TINY, "train": {"stpes": 3}}))],
     r"unknown key train.stpes \(did you mean 'steps'\?\)"),
    (lambda cfg, tmp: ["train", cfg, "--set", "train.steps=many"], r"train.steps = 'many': expected an integer"),
    (lambda cfg, tmp: ["train", cfg, "--set", "train.lr=0"], r"train.lr = 0: expected a value > 0"),
    (lambda cfg, tmp: ["train", cfg, "--set", "train.lr"], r"expected section.key=value"),
    (lambda cfg, tmp: ["train", cfg, "--run-id", "../escape"], r"run id '../escape' is not allowed"),
    (lambda cfg, tmp: ["train", cfg, "--run-id", "existing"], r"run 'existing' already exists"),
    (lambda cfg, tmp: ["train", cfg, "--cuda", "0"] if not torch.cuda.is_available() else ["train", cfg, "--cuda", "99"],
     r"--cuda (0: CUDA is not available|99: only)"),
    (lambda cfg, tmp: ["resume", "nope"], r"no run 'nope' in .*there: existing"),
    (lambda cfg, tmp: ["resume", "exiting"], r"did you mean existing"),
    (lambda cfg, tmp: ["eval", "--run", "nope"], r"no run 'nope'"),
    (lambda cfg, tmp: ["eval", "--run", "existing", "--lengths", "1-x"], r"'1-x' in '1-x': expected a length"),
    (lambda cfg, tmp: ["eval", "--run", "existing", "--checkpoint", "3"], r"checkpoint '3' not found .* steps there: \[2\]"),
])
def test_bad_inputs_give_one_clear_line_and_touch_no_run(env, tmp_path, make_args, message):
    root, config = env
    assert cli("train", config, "--run-id", "existing", "--no-progress", "--set", "train.steps=2").exit_code == 0
    before = snapshot(root)
    result = cli(*make_args(config, tmp_path))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert re.search(message, result.output), result.output
    assert snapshot(root) == before
    assert sorted(p.name for p in root.iterdir()) == ["existing"]


def _write(tmp: Path, text: str) -> Path:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return path


def test_unexpected_errors_are_one_line_unless_debug(env):
    root, config = env
    assert cli("train", config, "--run-id", "r", "--no-progress", "--set", "train.steps=2").exit_code == 0
    cfg = yaml.safe_load((root / "r" / "config.yaml").read_text())
    cfg["model"]["hidden_size"] = 9  # the checkpoint no longer fits the model
    (root / "r" / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = cli("eval", "--run", "r")
    assert result.exit_code == 1 and "RuntimeError" in result.output and "--debug" in result.output
    assert "Traceback" not in result.output
    result = cli("--debug", "eval", "--run", "r")
    assert isinstance(result.exception, RuntimeError)


def test_resume_changes_only_train_and_viz_values(env):
    root, config = env
    args = ["--no-progress", "--set", "train.steps=40", "--set", "train.target_ber=1.0"]  # stops at step 2
    assert cli("train", config, "--run-id", "t", *args).exit_code == 0
    assert runs.read_status(root / "t")["status"] == "reached_target"
    before = snapshot(root)
    result = cli("resume", "t")
    assert result.exit_code == 2 and "--set train.target_ber=null" in result.output
    result = cli("resume", "t", "--set", "model.hidden_size=16")
    assert result.exit_code == 2 and "only train.* and viz.* values can change" in result.output
    result = cli("resume", "t", "--set", "train.lr=-1")
    assert result.exit_code == 2 and "train.lr = -1: expected a value > 0" in result.output
    assert snapshot(root) == before
    result = cli("resume", "t", "--set", "train.target_ber=null", "--steps", "6", "--no-progress")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((root / "t" / "config.yaml").read_text())["train"]
    assert (saved["target_ber"], saved["steps"]) == (None, 6)
    assert runs.read_status(root / "t")["status"] == "finished"


def test_resume_refuses_an_edited_model_in_one_line_and_touches_nothing(env):
    root, config = env
    assert cli("train", config, "--run-id", "e", "--no-progress", "--set", "train.steps=2").exit_code == 0
    cfg = yaml.safe_load((root / "e" / "config.yaml").read_text())
    cfg["model"]["nr_cells"] = 8  # today's silent trap: a different memory under the old weights
    (root / "e" / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = snapshot(root)
    result = cli("resume", "e", "--steps", "4", "--no-progress")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "model.nr_cells: 4 -> 8" in result.output and "train.steps" not in result.output
    assert snapshot(root) == before
