"""Training on a GPU: a step with no host synchronisation, its CUDA graph, determinism, exact
resume, TF32. Every test here needs CUDA and is skipped without it; `make gpu-check` runs them on
a GPU machine (benchmarks/gpu_check.py). Their CPU halves are in tests/test_step.py."""

import math

import pytest
import torch

from dnc_lab import runs, training
from dnc_lab.config import TrainConfig, config_from_dict, save_config
from dnc_lab.step import GraphedStep, longest_batch, new_accumulator, train_step
from dnc_lab.tasks import make_task

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda", 0)
TINY = {
    "model": {"hidden_size": 16, "nr_cells": 8, "cell_size": 8, "read_heads": 2},
    "task": {"name": "copy", "bits": 4, "min_length": 1, "max_length": 4},
    "train": {"batch_size": 16, "steps": 12, "summarize_freq": 2, "check_freq": 4, "seed": 5},
    "viz": {"enabled": False},
}


def tiny(model=None, task=None, **train):
    return config_from_dict({"model": {**TINY["model"], **(model or {})}, "task": {**TINY["task"], **(task or {})},
                             "train": {**TINY["train"], **train}, "viz": TINY["viz"]})


def run_training(tmp_path, name, cfg, resume=False):
    run_dir = tmp_path / name
    if not resume:
        run_dir.mkdir()
        save_config(cfg, run_dir / "config.yaml")
    return run_dir, training.train(run_dir, cfg, CUDA, resume=resume, progress=False, echo=lambda *a: None)


def strip(rows):
    return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in rows]


@pytest.mark.parametrize("optimizer, extra", [("adam", {}), ("rmsprop", {"momentum": 0.9}),
                                              ("rmsprop", {"tf_style": True})])
def test_steps_never_synchronise_and_a_nonfinite_one_changes_nothing(optimizer, extra):
    """Sample, forward, loss, backward, clip, the guarded step (fused Adam's found_inf, or RMSprop's)
    and the running sums, under set_sync_debug_mode("error"): any host wait raises."""
    cfg = tiny(optimizer=optimizer, **extra)
    torch.manual_seed(0)
    model = training.build_model(cfg, CUDA)
    task = make_task(cfg.task, CUDA)
    opt = training.build_optimizer(list(model.parameters()), cfg.train, CUDA)
    acc = new_accumulator(CUDA)
    generator = torch.Generator(device=CUDA).manual_seed(1)

    def step(poison=False):
        batch = task.sample(cfg.train.batch_size, generator, max_length=3)
        if poison:
            batch.inputs[0, 0, 0] = float("nan")
        train_step(model, opt, batch, acc, training.BITS, cfg.train.clip, guard_on_device=True)

    step()  # lazy set-up (cuBLAS handles, optimiser state) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
        before = ([p.detach().clone() for p in model.parameters()],
                  [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)])
        step(poison=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    after = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert all(torch.equal(a, b) for a, b in zip(before[1], after))
    sums = training.read_accumulator(acc)
    assert (sums["ok"], sums["skipped"]) == (4.0, 1.0)


def test_cuda_graph_replays_without_synchronising_and_trains_as_eager_steps():
    cfg = tiny()
    models, opts, accs = [], [], []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(training.build_model(cfg, CUDA))
        opts.append(training.build_optimizer(list(models[-1].parameters()), cfg.train, CUDA))
        accs.append(new_accumulator(CUDA))
    task = make_task(cfg.task, CUDA)

    def stepper(i):
        return lambda b: train_step(models[i], opts[i], b, accs[i], training.BITS, cfg.train.clip, True)

    graphed = GraphedStep(stepper(1), longest_batch(task, cfg.train.batch_size, cfg.task.max_length, CUDA))
    generator = torch.Generator(device=CUDA).manual_seed(1)
    caps = [1, 2, 3, 4, 2, 4, 1, 3]  # the curriculum's length changes; the graph does not
    batches = [task.sample(cfg.train.batch_size, generator, max_length=cap) for cap in caps]
    for batch in batches:
        stepper(0)(batch)
    for batch in batches[:5]:  # 3 eager warm-up steps, the capture, a replay
        graphed(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[5:]:
            graphed(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert graphed.graph is not None and graphed.calls == len(caps)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-5)
    eager, captured = training.read_accumulator(accs[0]), training.read_accumulator(accs[1])
    assert eager["bits"] == captured["bits"] and captured["loss"] == pytest.approx(eager["loss"], rel=1e-4)


def test_two_runs_are_identical_and_resume_is_exact(tmp_path):
    """Determinism across two runs, and a run stopped at step 4 and resumed ends exactly as one
    never stopped (the CUDA RNG and the data stream are restored from the checkpoint)."""
    cfg = tiny()
    a_dir, _ = run_training(tmp_path, "a", cfg)
    b_dir, _ = run_training(tmp_path, "b", cfg)
    assert strip(runs.read_metrics(a_dir)) == strip(runs.read_metrics(b_dir))
    stopped = tiny(steps=4)
    c_dir, _ = run_training(tmp_path, "c", stopped)
    run_training(tmp_path, "c", cfg, resume=True)
    assert strip(runs.read_metrics(c_dir)) == strip(runs.read_metrics(a_dir))
    ma, mc = runs.load_checkpoint(a_dir)["model"], runs.load_checkpoint(c_dir)["model"]
    assert all(torch.equal(ma[k], mc[k]) for k in ma)


def test_cuda_graph_run_with_a_curriculum_follows_the_eager_run(tmp_path):
    task = {"curriculum": True, "curriculum_start": 1, "curriculum_threshold": 1.0}  # grows every summary
    _, eager = run_training(tmp_path, "eager", tiny(task=task))
    run_dir, graphed = run_training(tmp_path, "graph", tiny(task=task, cuda_graph=True))
    rows, eager_rows = runs.read_metrics(run_dir), runs.read_metrics(tmp_path / "eager")
    assert [r["max_length"] for r in rows] == [1, 2, 3, 4, 4, 4]
    assert graphed.status == "finished" and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(eager_rows[0]["loss"], rel=1e-4)


def test_tf32_is_on_only_while_a_run_that_asks_for_it_trains(tmp_path):
    seen = []
    before = torch.get_float32_matmul_precision()
    run_dir = tmp_path / "t"
    run_dir.mkdir()
    training.train(run_dir, tiny(steps=2, tf32=True), CUDA, progress=False, echo=lambda *a: None,
                   on_summary=lambda row: seen.append((torch.get_float32_matmul_precision(),
                                                       torch.backends.cudnn.allow_tf32)))
    assert seen == [("high", True)] and torch.get_float32_matmul_precision() == before
    run_dir = tmp_path / "f"
    run_dir.mkdir()
    training.train(run_dir, tiny(steps=2), CUDA, progress=False, echo=lambda *a: None,
                   on_summary=lambda row: seen.append((torch.get_float32_matmul_precision(),
                                                       torch.backends.cudnn.allow_tf32)))
    assert seen[1] == ("highest", False)


def test_guarded_optimisers_on_cuda_are_fused_and_capturable():
    p = torch.nn.Parameter(torch.zeros(3, device=CUDA))
    adam = training.build_optimizer([p], TrainConfig(optimizer="adam"), CUDA)
    assert adam.defaults["fused"] and adam.defaults["capturable"]
