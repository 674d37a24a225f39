"""The training loop: loss and error rate, optimisers, the NaN guard, checkpoints, exact resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dnc_lab import runs, training
from dnc_lab.config import TrainConfig, config_from_dict, save_config
from dnc_lab.viz import eventlog
from dnc_lab.training import (TFRMSprop, TrainingError, bit_errors, build_optimizer, guarded_step, masked_bce,
                              parse_lengths)

TINY = {
    "model": {"hidden_size": 8, "nr_cells": 4, "cell_size": 4, "read_heads": 1},
    "task": {"name": "copy", "bits": 4, "min_length": 1, "max_length": 3},
    "train": {"batch_size": 4, "steps": 12, "summarize_freq": 2, "check_freq": 4, "seed": 3},
    "viz": {"enabled": False},
}


def tiny(**train) -> dict:
    cfg = {k: dict(v) for k, v in TINY.items()}
    cfg["train"].update(train)
    return cfg


def new_run(tmp_path: Path, raw: dict, name: str = "r") -> tuple[Path, object]:
    cfg = config_from_dict(raw)
    run_dir = tmp_path / name
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    return run_dir, cfg


@pytest.fixture(autouse=True)
def one_thread():
    """Same thread count in this process and in the subprocesses, so runs compare bit for bit."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_masked_bce_counts_only_masked_steps():
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # [1, 3, 2]
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    logits = torch.tensor([[[9.0, -9.0], [-2.0, 3.0], [0.5, -1.0]]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1:], targets[:, 1:])
    assert torch.allclose(masked_bce(logits, targets, mask), expected)
    changed = logits.clone()
    changed[0, 0] = torch.tensor([-50.0, 50.0])  # wrong, but unmasked
    assert torch.allclose(masked_bce(changed, targets, mask), expected)
    wrong, bits = bit_errors(changed, targets, mask)
    assert (wrong.item(), bits.item()) == (1.0, 4.0)  # step 2, bit 0: logit 0.5 > 0 but target 0


def test_parse_lengths():
    assert parse_lengths("1-3,8, 5") == [1, 2, 3, 5, 8]
    for bad in ("", "0", "3-1", "a", "1-x"):
        with pytest.raises(ValueError, match="length"):
            parse_lengths(bad)


@pytest.mark.parametrize("on_device", [False, True], ids=["host-branch", "found-inf-as-on-cuda"])
@pytest.mark.parametrize("name, extra", [("adam", {}), ("rmsprop", {"momentum": 0.5}), ("rmsprop", {"tf_style": True}),
                                         ("sgd", {"momentum": 0.9})])
def test_guarded_step_skips_nonfinite_updates_exactly(name, extra, on_device):
    """On the CPU a bad step is skipped on the host; ``on_device`` runs the path used on CUDA (fused
    Adam/SGD or dnc_lab's RMSprop reading ``found_inf``), here on the CPU."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="diverge") if name == "sgd" else _nothing():
        opt = build_optimizer(list(model.parameters()), TrainConfig(optimizer=name, lr=0.1, **extra),
                              torch.device("cpu"), device_guard=on_device)

    def step(x: torch.Tensor) -> None:
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        guarded_step(opt, torch.isfinite(loss) & torch.isfinite(norm), on_device)

    step(torch.ones(4, 3))  # a good step creates the optimiser state
    before = ([p.clone() for p in model.parameters()],
              {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)})
    step(torch.full((4, 3), float("nan")))
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    after = {k: v for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    assert all(torch.equal(before[1][k], after[k]) for k in after)
    step(torch.ones(4, 3))
    assert not torch.equal(before[0][0], next(model.parameters()))  # good steps still move


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_tf_rmsprop_follows_tensorflow_update():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = TFRMSprop([p], lr=0.1, alpha=0.9, eps=1e-10)
    ms, value = torch.ones(2), p.detach().clone()
    for g in (torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.1])):
        p.grad = g.clone()
        opt.step()
        ms = 0.9 * ms + 0.1 * g ** 2  # mean square starts at 1; eps inside the square root
        value = value - 0.1 * g / torch.sqrt(ms + 1e-10)
        assert torch.allclose(p.detach(), value)


class _NaNInputs:
    """Wraps a task: the batches of the given sample calls (1-based) get a NaN input."""

    def __init__(self, task, bad_calls):
        self.task, self.bad, self.calls = task, set(bad_calls), 0
        self.input_size, self.output_size = task.input_size, task.output_size

    def sample(self, *args, **kwargs):
        self.calls += 1
        batch = self.task.sample(*args, **kwargs)
        if self.calls in self.bad:
            batch.inputs[0, 0, 0] = float("nan")
        return batch


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    real_make_task = training.make_task
    # Steps 5 and 6 are non-finite: skipped, counted, and the run goes on.
    monkeypatch.setattr(training, "make_task", lambda cfg, device: _NaNInputs(real_make_task(cfg, device), {5, 6}))
    run_dir, cfg = new_run(tmp_path, tiny(steps=8), "some")
    result = training.train(run_dir, cfg, torch.device("cpu"), progress=False, echo=lambda *a: None)
    rows = runs.read_metrics(run_dir)
    assert result.status == "finished" and [r["skipped"] for r in rows] == [0, 0, 2, 0]
    assert rows[-1]["skipped_total"] == 2 and rows[2]["loss"] is None  # no finite step in steps 5-6
    assert all(math.isfinite(r["loss"]) for r in rows if r is not rows[2])
    state = runs.load_checkpoint(run_dir)
    assert all(torch.isfinite(v).all() for v in state["model"].values())

    # From step 5 on every step is non-finite: the run stops at the next summary after 3 in a row,
    # its checkpoint of step 4 intact and nothing later written.
    monkeypatch.setattr(training, "make_task",
                        lambda cfg, device: _NaNInputs(real_make_task(cfg, device), range(5, 100)))
    run_dir, cfg = new_run(tmp_path, tiny(steps=20, max_nonfinite=3), "all")
    with pytest.raises(TrainingError, match=r"stopped at step 8: 4 non-finite .* in a row.*last good checkpoint: step 4"):
        training.train(run_dir, cfg, torch.device("cpu"), progress=False, echo=lambda *a: None)
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [4]
    assert runs.read_status(run_dir)["status"] == "failed"


def _train_cli(args, env_root: Path, **popen):
    env = {**os.environ, "DNCLAB_EXPERIMENTS": str(env_root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dnc_lab.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **popen)


def _wait_for_checkpoint(run_dir: Path, proc, at_least: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = runs.list_checkpoints(run_dir)
        if done and done[-1][0] >= at_least:
            return
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.02)
    raise AssertionError("no checkpoint in time")


@pytest.mark.slow
def test_resume_after_kill_9_ends_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch, dead_port):
    root = tmp_path / "experiments"
    monkeypatch.setenv("DNCLAB_EXPERIMENTS", str(root))
    config = tmp_path / "tiny.yaml"
    # A long run (so that it is surely still running when killed), killed after its step-20
    # checkpoint; it streams to a dashboard with no server, so its event log is written too.
    killed_config = tiny(steps=100_000, summarize_freq=5, check_freq=10)
    killed_config["viz"] = {"enabled": True, "port": dead_port}
    config.write_text(yaml.safe_dump(killed_config))
    proc = _train_cli(["train", str(config), "--run-id", "killed", "--no-progress"], root)
    _wait_for_checkpoint(root / "killed", proc, 20)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdout.close()
    assert runs.read_status(root / "killed")["status"] == "running"  # it never got to say otherwise
    from click.testing import CliRunner

    from dnc_lab.cli import main
    table = CliRunner().invoke(main, ["runs"]).output.splitlines()
    assert [table[1].split()[i] for i in (0, 3)] == ["killed", "dead"]  # `dnclab runs` sees the process is gone
    # Drop the newest checkpoint: the run now resumes from one taken summaries before the kill, as
    # if it had died just before writing the next one, so its metrics and event log run ahead.
    *_, (older, _), (_, newest) = runs.list_checkpoints(root / "killed")
    newest.unlink()
    killed_at = older

    final = killed_at + 15
    resumed = _train_cli(["resume", "killed", "--steps", str(final), "--no-progress"], root)
    out = resumed.communicate(timeout=120)[0].decode()
    assert resumed.returncode == 0, out

    # The same run, never interrupted, in this process.
    raw = tiny(steps=final, summarize_freq=5, check_freq=10)
    run_dir, cfg = new_run(root, raw, "straight")
    training.train(run_dir, cfg, torch.device("cpu"), progress=False, echo=lambda *a: None)

    a, b = runs.read_metrics(root / "killed"), runs.read_metrics(run_dir)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in rows]  # noqa
    assert strip(a) == strip(b)  # every summary, including the ones after the kill
    assert [r["step"] for r in a] == list(range(5, final + 1, 5))
    # the event log holds each summary once: what the killed process logged after its checkpoint is gone
    events = eventlog.read_events(root / "killed" / eventlog.LOG_NAME)
    training_curve = [e["step"] for e in events if e["kind"] == "scalars" and "loss" in e["values"]]
    snapshots = [e["step"] for e in events if e["kind"] == "snapshot"]
    assert training_curve == snapshots == list(range(5, final + 1, 5))
    ma, mb = runs.load_checkpoint(root / "killed")["model"], runs.load_checkpoint(run_dir)["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in mb)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    root = tmp_path / "experiments"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(steps=100_000, summarize_freq=5, check_freq=1000)))
    proc = _train_cli(["train", str(config), "--run-id", "term", "--no-progress"], root)
    deadline = time.monotonic() + 120
    while not runs.read_metrics(root / "term") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "SIGTERM received" in out and "dnclab resume term" in out
    status = runs.read_status(root / "term")
    assert status["status"] == "interrupted"
    [(step, path)] = runs.list_checkpoints(root / "term")
    assert step == status["step"] > 0
    state = torch.load(path, weights_only=True)
    assert state["step"] == step and set(state["rng"]) == {"torch", "cuda", "python", "numpy", "task"}


def test_dashboard_logs_every_summary_and_does_not_change_training(tmp_path, dead_port):
    """With Visdom enabled but no server, the run streams into its event log, and its numbers
    are exactly those of the same run without Visdom (the trace for the dashboard takes no RNG)."""
    quiet = lambda *a: None  # noqa: E731
    raw = tiny(steps=6)
    run_off, cfg_off = new_run(tmp_path, raw, "off")
    training.train(run_off, cfg_off, torch.device("cpu"), progress=False, echo=quiet)
    raw["viz"] = {"enabled": True, "server": "http://127.0.0.1", "port": dead_port, "timeout_s": 0.5}
    run_on, cfg_on = new_run(tmp_path, raw, "on")
    training.train(run_on, cfg_on, torch.device("cpu"), progress=False, echo=quiet)

    events = [json.loads(line) for line in (run_on / "visdom.jsonl").read_text().splitlines()]
    scalars = [e for e in events if e["kind"] == "scalars"]
    snapshots = [e for e in events if e["kind"] == "snapshot"]
    assert [e["step"] for e in snapshots] == [2, 4, 6]
    assert [(e["step"], sorted(e["values"])) for e in scalars] == [
        (2, ["ber", "loss"]), (4, ["ber", "loss"]), (6, ["ber", "loss"]), (6, ["eval_ber"])]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in rows]  # noqa
    assert strip(runs.read_metrics(run_on)) == strip(runs.read_metrics(run_off))
    assert not (run_off / "visdom.jsonl").exists()


def test_curriculum_advances_at_summaries_and_is_checkpointed(tmp_path):
    raw = tiny(steps=8)
    raw["task"].update(curriculum=True, curriculum_start=1, curriculum_threshold=1.0)  # always advance
    run_dir, cfg = new_run(tmp_path, raw)
    said = []
    training.train(run_dir, cfg, torch.device("cpu"), progress=False, echo=said.append)
    assert [r["max_length"] for r in runs.read_metrics(run_dir)] == [1, 2, 3, 3]  # the length used so far
    assert "curriculum: sequences up to length 2 from step 3" in said
    assert runs.load_checkpoint(run_dir)["curriculum"] == {"max_length": 3}


def test_max_seconds_stops_with_a_checkpoint_that_resumes(tmp_path):
    run_dir, cfg = new_run(tmp_path, tiny(steps=8, max_seconds=1e-6))
    result = training.train(run_dir, cfg, torch.device("cpu"), progress=False, echo=lambda *a: None)
    assert (result.status, result.step) == ("max_seconds", 1)
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [1]
    cfg.train.max_seconds = None
    result = training.train(run_dir, cfg, torch.device("cpu"), resume=True, progress=False, echo=lambda *a: None)
    assert (result.status, result.step) == ("finished", 8) and runs.read_status(run_dir)["status"] == "finished"


def test_resume_refuses_a_changed_model_or_task_and_reports_allowed_changes(tmp_path):
    quiet = lambda *a: None  # noqa: E731
    run_dir, cfg = new_run(tmp_path, tiny(steps=8, max_seconds=1e-6))
    training.train(run_dir, cfg, torch.device("cpu"), progress=False, echo=quiet)  # stops after step 1
    assert runs.load_checkpoint(run_dir)["config"] == cfg.to_dict()
    status = runs.read_status(run_dir)

    edited = tiny(steps=8)
    edited["model"]["nr_cells"] = 8
    edited["task"]["max_length"] = 4
    with pytest.raises(runs.ResumeError, match=r"in keys that cannot change on resume.*: model\.nr_cells: 4 -> 8; "
                                               r"task\.max_length: 3 -> 4\. Restore"):
        training.train(run_dir, config_from_dict(edited), torch.device("cpu"), resume=True, echo=quiet)
    assert runs.read_status(run_dir) == status  # refused before anything was touched

    said = []
    changed = tiny(steps=8, lr=3e-4)
    result = training.train(run_dir, config_from_dict(changed), torch.device("cpu"), resume=True, progress=False,
                            echo=said.append)
    assert result.status == "finished"
    assert said[0] == ("resuming r at step 1 of 8; changed since the checkpoint: train.lr: 0.001 -> 0.0003, "
                       "train.max_seconds: 1e-06 -> None")


def test_resume_names_the_checkpoint_format_versions(tmp_path):
    run_dir, cfg = new_run(tmp_path, tiny(steps=4))
    training.train(run_dir, cfg, torch.device("cpu"), progress=False, echo=lambda *a: None)
    [(_, path)] = runs.list_checkpoints(run_dir)
    state = torch.load(path, weights_only=True)
    state["version"] = 1
    del state["config"]
    torch.save(state, path)
    cfg.train.steps = 6
    with pytest.raises(runs.ResumeError, match=r"checkpoint of step 4: checkpoint format version 1, but this dnc_lab "
                                               r"reads version 2 only"):
        training.train(run_dir, cfg, torch.device("cpu"), resume=True, echo=lambda *a: None)


def test_cuda_only_options_on_the_cpu_say_so_and_change_nothing(tmp_path):
    quiet = lambda *a: None  # noqa: E731
    plain_dir, plain = new_run(tmp_path, tiny(steps=4), "plain")
    training.train(plain_dir, plain, torch.device("cpu"), progress=False, echo=quiet)
    said = []
    run_dir, cfg = new_run(tmp_path, tiny(steps=4, cuda_graph=True, tf32=True), "gpu-options")
    training.train(run_dir, cfg, torch.device("cpu"), progress=False, echo=said.append)
    assert "note: train.cuda_graph has no effect on cpu (CUDA graphs need a GPU); steps run eagerly" in said
    assert "note: train.tf32 has no effect on cpu (TF32 is a mode of NVIDIA GPUs)" in said
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in rows]  # noqa
    assert strip(runs.read_metrics(run_dir)) == strip(runs.read_metrics(plain_dir))
