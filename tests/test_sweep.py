"""Sweeps: the sweep file's checks and expansion, trial folders as runs, and (marked slow) real
sweeps on a real local Ray: 2 configs x 2 seeds, a worker killed mid-run and retried, a killed
sweep resumed, and a head + worker cluster of two processes on this machine."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from dnc_lab import runs, training
from dnc_lab.cli import main
from dnc_lab.config import ConfigError, config_from_dict, save_config

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"hidden_size": 8, "nr_cells": 4, "cell_size": 4, "read_heads": 1},
    "task": {"name": "copy", "bits": 4, "min_length": 1, "max_length": 3},
    "train": {"batch_size": 4, "steps": 20, "summarize_freq": 5, "check_freq": 10, "seed": 0,
              "eval_batch_size": 8, "threads": 1},
    "viz": {"enabled": False},
}


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty experiments root (absolute: Ray's workers run in other folders)."""
    path = tmp_path / "experiments"
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(path))
    return path


def sweep_file(folder: Path, sweep: dict, config: dict = TINY, name: str = "tiny_sweep") -> Path:
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"config": "tiny.yaml", **sweep}))
    return path


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# The sweep file (no Ray)


def test_grid_crossed_with_seeds_gives_one_checked_trial_per_pair(tmp_path):
    from dnc_lab.sweep import load_sweep

    spec, trials = load_sweep(sweep_file(tmp_path, {"grid": {"model.nr_cells": [4, 6], "train.lr": [0.005]},
                                                    "seeds": [0, 12], "set": {"train.steps": 8}}),
                              overrides=("train.batch_size=2",))
    assert [t.id for t in trials] == ["nr_cells4-lr0p005-seed00", "nr_cells4-lr0p005-seed12",
                                      "nr_cells6-lr0p005-seed00", "nr_cells6-lr0p005-seed12"]
    assert [t.config for t in trials] == ["nr_cells4-lr0p005"] * 2 + ["nr_cells6-lr0p005"] * 2
    assert trials[3].values == {"model.nr_cells": 6, "train.lr": 0.005}
    cfg = config_from_dict(TINY, overrides=trials[3].overrides)
    assert (cfg.model.nr_cells, cfg.train.lr, cfg.train.seed, cfg.train.steps, cfg.train.batch_size) == \
        (6, 0.005, 12, 8, 2)
    assert spec.resources.cpus == 1 and spec.scheduler is None and spec.max_failures == 2


def test_random_values_are_drawn_once_from_the_sample_seed(tmp_path):
    from dnc_lab.sweep import load_sweep

    sweep = {"random": {"train.lr": {"loguniform": [1e-3, 1e-2]}, "model.hidden_size": {"choice": [8, 16]}},
             "samples": 3, "seeds": 2, "sample_seed": 7}
    _, a = load_sweep(sweep_file(tmp_path, sweep))
    _, b = load_sweep(sweep_file(tmp_path, sweep))
    assert [t.id for t in a] == [f"r{i}-seed{s}" for i in range(3) for s in range(2)]
    assert [t.values for t in a] == [t.values for t in b]  # the same draws each time the file is read
    assert all(1e-3 <= t.values["train.lr"] <= 1e-2 and t.values["model.hidden_size"] in (8, 16) for t in a)
    assert len({t.values["train.lr"] for t in a}) == 3
    assert a[0].values == a[1].values  # both seeds of a draw train the same values


@pytest.mark.parametrize("sweep, overrides, message", [
    ({"grid": {"model.nr_cells": 4}}, (), r"tiny_sweep.yaml: grid.model.nr_cells: expected a non-empty list"),
    ({"grid": {"model.nr_cells": [4, "many"]}}, (),
     r"tiny_sweep.yaml: grid.model.nr_cells: model.nr_cells = 'many': expected an integer"),
    ({"grid": {"model.nr_celss": [4]}}, (), r"grid.model.nr_celss: .*unknown key model.nr_celss"),
    ({"grid": {"train.seed": [1, 2]}}, (), r"grid.train.seed: seeds are given by the sweep's `seeds` key"),
    ({"seeds": [1, 1]}, (), r"seeds: \[1, 1\]: a seed appears twice"),
    ({"seeds": 0}, (), r"seeds: 0: expected a number of seeds >= 1"),
    ({"grids": {}}, (), r"grids: unknown key \(did you mean 'grid'\?\)"),
    ({"config": "missing.yaml"}, (), r"config: 'missing.yaml': no such file"),
    ({"random": {"train.lr": {"loguniform": [0, 1]}}}, (), r"random.train.lr: loguniform: expected lo > 0"),
    ({"samples": 3}, (), r"samples: 3 samples but no `random` values"),
    ({"resources": {"cpus": 0}}, (), r"resources.cpus: 0: expected a number > 0"),
    ({"scheduler": {"name": "hyperband"}}, (), r"scheduler: .*expected null .* name: asha"),
    ({"eval_lengths": "3-1"}, (), r"eval_lengths: '3-1'"),
    ({"grid": {"model.nr_cells": [4, 6]}}, ("model.nr_cells=8",),
     r"--set model.nr_cells=8: .*sweeps model.nr_cells; change it there"),
    ({}, ("train.seed=3",), r"--set train.seed=3: seeds are given by the sweep file's `seeds` key"),
    ({"set": {"task.min_length": 5}}, (), r"tiny_sweep.yaml: set.task.min_length: "),
])
def test_bad_sweep_files_stop_with_one_line_naming_the_key(tmp_path, sweep, overrides, message):
    from dnc_lab.sweep import load_sweep

    path = sweep_file(tmp_path, sweep)
    if "config" in sweep:
        path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep(path, overrides)
    assert "\n" not in info.value.message


def test_shipped_sweep_files_expand():
    from dnc_lab.sweep import load_sweep

    _, seeds = load_sweep(REPO / "configs/sweeps/copy_seeds.yaml")
    assert [t.id for t in seeds] == [f"seed{s:02d}" for s in range(20)]
    _, memory = load_sweep(REPO / "configs/sweeps/copy_memory.yaml")
    assert {t.config for t in memory} == {"nr_cells16", "nr_cells32"} and len(memory) == 20
    _, generalise = load_sweep(REPO / "configs/sweeps/copy_generalise.yaml")
    assert {t.config for t in generalise} == {f"nr_cells{n}-target_ber{b}" for n in (32, 64) for b in ("0p001", "0p0001")}
    assert len(generalise) == 24 and all("model.deallocation=true" in t.overrides for t in generalise)
    _, series = load_sweep(REPO / "configs/sweeps/copy_series_variants.yaml")
    assert len(series) == 40 and len({t.config for t in series}) == 4  # DNC, -S, -D, -DS x 10 seeds


def test_trials_are_runs_listed_and_resolved_as_sweep_slash_trial(tmp_path, root):
    from dnc_lab.sweep import create_sweep, load_sweep

    spec, trials = load_sweep(sweep_file(tmp_path, {"seeds": 2}))
    sweep_dir = create_sweep(spec, trials, sweep_id="s1")
    root.joinpath("plain").mkdir()
    save_config(config_from_dict(TINY), root / "plain" / "config.yaml")
    assert [runs.run_id(p) for p in runs.list_runs()] == ["plain", "s1/seed0", "s1/seed1"]
    assert [runs.run_id(p) for p in runs.list_runs(sweep="s1")] == ["s1/seed0", "s1/seed1"]
    assert runs.resolve_run_dir("s1/seed1") == sweep_dir / "seed1"
    assert yaml.safe_load((sweep_dir / "seed1" / "config.yaml").read_text())["viz"]["env"] == "s1-seed1"
    with pytest.raises(runs.RunNotFound, match=r"'s1' is a sweep: its trials are s1/<trial>"):
        runs.resolve_run_dir("s1")
    listed = cli("runs", "s1")
    assert listed.exit_code == 0, listed.output
    assert [line.split()[:4] for line in listed.output.splitlines()[1:]] == \
        [["s1/seed0", "copy", "0/20", "created"], ["s1/seed1", "copy", "0/20", "created"]]
    assert "no sweep 'nope'" in cli("runs", "nope").output
    again = cli("sweep", tmp_path / "tiny_sweep.yaml", "--sweep-id", "s1")
    assert again.exit_code == 2 and "'s1' already exists" in again.output


# ---------------------------------------------------------------------------------------------
# Real sweeps on a real local Ray (starting Ray and its workers takes 10-30 s on this machine)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for this module's in-process sweeps; run_sweep uses a Ray already initialised
    as it is, and leaves it running."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 1024 ** 2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def grid(local_ray, tmp_path_factory):
    """One 2 configs x 2 seeds sweep of tiny runs, with a worker killed and a trial failing for
    good (see kill_or_fail): (sweep folder, trials, progress lines)."""
    from dnc_lab.sweep import create_sweep, load_sweep, run_sweep

    def kill_or_fail(run_dir, row):  # in a Ray worker (a function in a function: pickled by value)
        """The grid sweep's hook, in the Ray worker after each report. nr_cells4-seed0: its worker is
        killed once, at step 25 (after the step-20 checkpoint). nr_cells6-seed1: fails at step 10 on
        every attempt."""
        import os
        import signal

        if run_dir.name == "nr_cells6-seed1" and row["step"] == 10:
            raise RuntimeError("planted failure")
        marker = run_dir / "killed-once"
        if run_dir.name == "nr_cells4-seed0" and row["step"] == 25 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    folder = tmp_path_factory.mktemp("grid")
    old = os.environ.get("DNCLAB_EXPERIMENTS")
    os.environ["DNCLAB_EXPERIMENTS"] = str(folder / "experiments")
    try:
        config = {**TINY, "train": {**TINY["train"], "steps": 40}}
        spec, trials = load_sweep(sweep_file(folder, {"grid": {"model.nr_cells": [4, 6]}, "seeds": 2,
                                                      "max_concurrent": 2, "max_failures": 1,
                                                      "eval_lengths": "1-3,6"}, config),
                                  overrides=("viz.enabled=true", "viz.port=9"))  # no server on port 9
        sweep_dir = create_sweep(spec, trials, sweep_id="grid")
        lines: list[str] = []
        run_sweep(sweep_dir, echo=lines.append, hook=kill_or_fail)
        yield sweep_dir, trials, lines
    finally:
        if old is None:
            del os.environ["DNCLAB_EXPERIMENTS"]
        else:
            os.environ["DNCLAB_EXPERIMENTS"] = old


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in rows]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_configs_by_two_seeds_each_trial_a_run(grid, monkeypatch):
    sweep_dir, trials, lines = grid
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(sweep_dir.parent))
    assert [runs.read_status(sweep_dir / t.id)["status"] for t in trials] == \
        ["finished", "finished", "finished", "failed"], "\n".join(lines)
    for t in trials[:3]:
        run_dir = sweep_dir / t.id
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (cfg["model"]["nr_cells"], cfg["train"]["seed"]) == (t.values["model.nr_cells"], t.seed)
        assert [r["step"] for r in runs.read_metrics(run_dir)] == [5, 10, 15, 20, 25, 30, 35, 40]
        evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
        assert [r["length"] for r in evals[-1]["rows"]] == [1, 2, 3, 6]
        assert (run_dir / "visdom.jsonl").is_file()  # the trial's own dashboard log
        # Nothing of Ray's in a run folder (Ray's bookkeeping is in <sweep>/.ray)
        assert {p.name for p in run_dir.iterdir()} - {"killed-once"} == \
            {"checkpoints", "config.yaml", "eval.jsonl", "metrics.jsonl", "status.json", "train.log", "visdom.jsonl"}
    assert (sweep_dir / ".ray" / "launch-1").is_dir()
    # One line per trial state change, with the count and an ETA
    assert sum(": finished at step 40" in line for line in lines) == 3
    assert any(line.startswith("[4/4 done, 1 failed; ETA") for line in lines), "\n".join(lines)
    assert lines[-1].startswith("sweep grid: 1 failed, 3 finished in ")
    # The sweep's dashboard: each trial a trace of the loss and BER windows
    from dnc_lab.viz import eventlog
    traces = {k for e in eventlog.read_events(sweep_dir / eventlog.LOG_NAME) for k in e["values"]}
    assert traces == {f"{q}/{t.id}" for q in ("loss", "ber") for t in trials}
    # Trials are runs: listed, evaluated, loaded and resumed by their <sweep>/<trial> id
    listed = cli("runs", "grid")
    assert [line.split()[:4] for line in listed.output.splitlines()[1:]] == \
        [[f"grid/{t.id}", "copy", f"{step}/40", status] for t, step, status in
         zip(trials, (40, 40, 40, 10), ("finished", "finished", "finished", "failed"))]
    evaluated = cli("eval", "--run", "grid/nr_cells6-seed0", "--lengths", "2", "--batch-size", "4")
    assert evaluated.exit_code == 0 and evaluated.output.startswith("grid/nr_cells6-seed0 at step 40"), \
        evaluated.output
    model, config = runs.load_run("grid/nr_cells6-seed0")
    assert model.nr_cells == 6 and config["train"]["seed"] == 0
    resumed = cli("resume", "grid/nr_cells6-seed0", "--steps", "45", "--no-progress")
    assert resumed.exit_code == 0 and "resuming nr_cells6-seed0 at step 40 of 45" in resumed.output, resumed.output


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_worker_is_retried_from_its_checkpoint_and_ends_like_an_uninterrupted_run(grid, tmp_path):
    sweep_dir, _, lines = grid
    run_dir = sweep_dir / "nr_cells4-seed0"
    assert (run_dir / "killed-once").exists()
    retry = [line for line in lines if "nr_cells4-seed0: " in line and "retry 1 of 1" in line]
    assert len(retry) == 1 and "its worker process (pid " in retry[0] and " died" in retry[0] \
        and retry[0].endswith("retry 1 of 1, from its checkpoint at step 20"), "\n".join(lines)
    assert runs.read_status(run_dir)["attempts"] == 2
    assert "--- attempt 2 on" in (run_dir / "train.log").read_text() and \
        "from the checkpoint at step 20" in (run_dir / "train.log").read_text()
    # The same config trained here, never interrupted
    plain = tmp_path / "plain"
    plain.mkdir()
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    training.train(plain, cfg, torch.device("cpu"), progress=False, echo=lambda text: None)
    killed, uninterrupted = runs.read_metrics(run_dir), runs.read_metrics(plain)
    assert [r["step"] for r in killed] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert strip(killed) == strip(uninterrupted)  # the final loss, and every summary before it
    a, b = runs.load_checkpoint(run_dir)["model"], runs.load_checkpoint(plain)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_trial_failing_for_good_is_reported_with_its_reason_and_the_sweep_goes_on(grid, monkeypatch):
    sweep_dir, _, lines = grid
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(sweep_dir.parent))
    status = runs.read_status(sweep_dir / "nr_cells6-seed1")
    assert (status["status"], status["message"]) == ("failed", "RuntimeError: planted failure")
    first = [line for line in lines if "nr_cells6-seed1: " in line and "retry" in line]
    assert len(first) == 1 and first[0].endswith(
        "nr_cells6-seed1: RuntimeError: planted failure; retry 1 of 1, from the start (no checkpoint yet)")
    assert any("nr_cells6-seed1: FAILED" in line and line.endswith("RuntimeError: planted failure")
               for line in lines), "\n".join(lines)
    # ... and the report counts it, per configuration over seeds
    report = cli("sweep-report", "grid", "--solved-ber", "0.5")
    assert report.exit_code == 0, report.output
    assert "eval BER, length 6 (longer than trained)" in report.output
    data = {c["config"]: c for c in json.loads((sweep_dir / "report.json").read_text())["configs"]}
    assert [(c, data[c]["seeds"], data[c]["failed"]) for c in data] == [("nr_cells4", 2, 0), ("nr_cells6", 2, 1)]
    finals = [runs.read_metrics(sweep_dir / f"nr_cells4-seed{s}")[-1]["ber"] for s in (0, 1)]
    assert data["nr_cells4"]["final_ber"]["mean"] == pytest.approx(sum(finals) / 2, rel=1e-12)
    assert (data["nr_cells4"]["final_ber"]["min"], data["nr_cells4"]["final_ber"]["max"]) == (min(finals), max(finals))
    assert data["nr_cells4"]["solved"] == sum(
        any(r["ber"] <= 0.5 for r in runs.read_metrics(sweep_dir / f"nr_cells4-seed{s}")) for s in (0, 1))
    rows = (sweep_dir / "report.csv").read_text().splitlines()
    assert rows[0] == "config,seeds,solved,failed,stopped,not_done,quantity,n,mean,sd,median,min,max"
    for png in ("curves.png", "eval_ber.png"):
        assert (sweep_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_sweep_dashboard_overlays_the_trials_curves(grid, visdom_server, monkeypatch):
    sweep_dir, trials, _ = grid
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(sweep_dir.parent))
    replayed = cli("viz", "--run", "grid", "--port", visdom_server.port, "--env", "grid_replayed")
    assert replayed.exit_code == 0, replayed.output
    windows = visdom_server.connection().windows("grid-replayed")
    assert set(windows) == {"loss", "ber"}
    for win in ("loss", "ber"):
        traces = {t["name"]: t for t in windows[win]["content"]["data"]}
        assert set(traces) == {t.id for t in trials}
        # the killed trial's redone steps appear once, as in its metrics.jsonl
        rows = runs.read_metrics(sweep_dir / "nr_cells4-seed0")
        assert traces["nr_cells4-seed0"]["x"] == [r["step"] for r in rows]
        assert traces["nr_cells4-seed0"]["y"] == pytest.approx([r[win] for r in rows], rel=1e-5)


def _wait(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_sweep_resumes_without_redoing_finished_trials(tmp_path, root, local_ray):
    config = {**TINY, "train": {**TINY["train"], "steps": 30}}
    path = sweep_file(tmp_path, {"seeds": 2, "max_concurrent": 1}, config)
    log = open(tmp_path / "sweep.log", "w")
    # Its own session: killing the group kills the command and the local Ray it started, as a
    # closed terminal or a killed batch job would.
    proc = subprocess.Popen([sys.executable, "-m", "dnc_lab.cli", "sweep", str(path), "--sweep-id", "s"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    sweep_dir = root / "s"
    try:
        _wait(lambda: (sweep_dir / "seed0" / "eval.jsonl").is_file(), 300, "the first trial to finish", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert runs.read_status(sweep_dir / "seed1").get("status") != "finished", (tmp_path / "sweep.log").read_text()
    kept = [(sweep_dir / "seed0" / name).read_bytes() for name in ("status.json", "metrics.jsonl", "eval.jsonl")]

    resumed = cli("sweep", "--resume", "s")  # in this process: the module's Ray
    assert resumed.exit_code == 0, resumed.output
    assert "1 of 2 trials to run (1 done before)" in resumed.output
    assert [runs.read_status(sweep_dir / f"seed{i}")["status"] for i in range(2)] == ["finished"] * 2
    assert kept == [(sweep_dir / "seed0" / name).read_bytes() for name in ("status.json", "metrics.jsonl", "eval.jsonl")]
    assert "] seed0: " not in resumed.output and "] seed1: finished at step 30" in resumed.output
    assert [r["step"] for r in runs.read_metrics(sweep_dir / "seed1")] == [5, 10, 15, 20, 25, 30]
    again = cli("sweep", "--resume", "s")
    assert again.exit_code == 0 and "all 2 trials are done" in again.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sweep_joins_a_cluster_and_runs_on_its_worker_node(tmp_path, root):
    """`ray start --head` and `ray start --address` as two processes here: a two-node cluster. The
    head has no CPUs for trials, so the trial can only run on the worker node."""
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or pytest.skip("no `ray` command")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-gpus=0", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    nodes = [subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=0",
                               "--include-dashboard=false", *common], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(3)  # the worker node retries its connection until the head answers
        nodes.append(subprocess.Popen([ray_cli, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", *common],
                                      env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        path = sweep_file(tmp_path, {"seeds": 1})
        done = subprocess.run([sys.executable, "-m", "dnc_lab.cli", "sweep", str(path), "--sweep-id", "c",
                               "--address", f"127.0.0.1:{port}"], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"Ray: cluster at 127.0.0.1:{port}" in done.stdout
        status = runs.read_status(root / "c" / "seed0")
        # It needed one CPU, and only the worker node has one: it ran there.
        assert status["status"] == "finished" and len(status["node"]) == 56
    finally:
        for node in reversed(nodes):  # --block: on SIGTERM, `ray start` stops what it started
            os.killpg(node.pid, signal.SIGTERM)
        for node in reversed(nodes):
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


# ---------------------------------------------------------------------------------------------
# What sweeps need from the training loop and the dashboard


def test_on_summary_returning_a_message_stops_the_run_cleanly(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    cfg = config_from_dict(TINY)
    seen = []
    result = training.train(run_dir, cfg, torch.device("cpu"), progress=False, echo=lambda text: None,
                            on_summary=lambda row: seen.append(row["step"]) or ("enough" if row["step"] == 10 else None))
    assert (result.status, result.step, result.message, seen) == ("stopped", 10, "enough", [5, 10])
    assert runs.read_status(run_dir)["status"] == "stopped"
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [10]  # resumable where it stopped


def test_a_sweep_dashboard_scalar_names_its_trace():
    from dnc_lab.viz.figures import curve_of

    assert curve_of("ber/nr_cells4-seed03") == ("ber", "nr_cells4-seed03")
    assert (curve_of("ber"), curve_of("eval_ber")) == (("ber", "train"), ("ber", "eval"))
