"""The training step (dnc_lab/step.py) and its optimisers (dnc_lab/optim.py), on the CPU: no host
synchronisation in a step (proved on the meta device), the on-device guard, padding for a CUDA
graph, and the graph's eager twin. The GPU itself is exercised in tests/test_cuda.py."""

import importlib
import warnings

import pytest
import torch

from dnc_lab.config import TrainConfig, config_from_dict
from dnc_lab.optim import RMSprop, build_optimizer, guarded_step
from dnc_lab.step import GraphedStep, longest_batch, new_accumulator, pad_batch, read_accumulator, train_step
from dnc_lab.tasks import make_task
from dnc_lab.training import BITS, build_model

TINY = {
    "model": {"hidden_size": 8, "nr_cells": 4, "cell_size": 4, "read_heads": 1},
    "task": {"name": "copy", "bits": 4, "min_length": 1, "max_length": 3},
    "train": {"batch_size": 3, "seed": 3},
    "viz": {"enabled": False},
}


def tiny_model(device="cpu", dtype=torch.float64, **model):
    cfg = config_from_dict({**TINY, "model": {**TINY["model"], **model}})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a backend that cannot run on this device says so
        return build_model(cfg, torch.device(device)).to(dtype), cfg


@pytest.mark.parametrize("name, extra", [("adam", {}), ("rmsprop", {}), ("rmsprop", {"tf_style": True})])
def test_whole_step_runs_on_the_meta_device_so_it_never_reads_the_device(name, extra, monkeypatch):
    """Sample, forward, loss, backward, clip, the guarded optimiser step as on CUDA (fused Adam
    reading found_inf, or dnc_lab's RMSprop) and the running sums, on tensors without data: any
    host read of a device value (.item(), bool(tensor), .tolist()) fails here."""
    # torch refuses fused optimisers on meta only by a Python-side device list; the fused kernel
    # itself has a meta implementation, so the same step runs once the list is bypassed.
    monkeypatch.setattr(importlib.import_module("torch.optim.adam"), "_device_dtype_check_for_fused",
                        lambda *a, **k: None)
    model, cfg = tiny_model("meta", torch.float32)
    task = make_task(cfg.task, "meta")
    opt = build_optimizer(list(model.parameters()), TrainConfig(optimizer=name, **extra), torch.device("meta"),
                          device_guard=True)
    acc = new_accumulator("meta")
    for _ in range(2):
        batch = task.sample(3, None, max_length=2)
        train_step(model, opt, batch, acc, BITS, clip=10.0, guard_on_device=True)
    assert acc["loss"].device.type == "meta" and opt.found_inf.device.type == "meta"
    assert name != "adam" or opt.defaults["fused"]
    # The host-side guard, by contrast, reads the flag: the meta device catches that.
    with pytest.raises(RuntimeError, match="meta"):
        train_step(model, opt, task.sample(3, None), acc, BITS, clip=10.0, guard_on_device=False)


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.5, 0.1)])
def test_rmsprop_follows_torch_rmsprop(momentum, weight_decay):
    """dnc_lab's RMSprop (used so that a step can be cancelled on the device) is torch's update."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    theirs = torch.nn.Parameter(ours.detach().clone())
    kw = dict(lr=0.01, alpha=0.9, eps=1e-6, momentum=momentum, weight_decay=weight_decay)
    a, b = RMSprop([ours], **kw), torch.optim.RMSprop([theirs], **kw)
    for _ in range(4):
        g = torch.randn(5, dtype=torch.float64)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-15)


def test_found_inf_step_changes_nothing_even_as_the_first_step():
    """On the CUDA path a non-finite step is cancelled inside the optimiser's own update: also
    before any state exists (fused Adam creates its moments then) and the step count stays."""
    for name in ("adam", "rmsprop"):
        model = torch.nn.Linear(2, 1)
        before = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(list(model.parameters()), TrainConfig(optimizer=name), torch.device("cpu"),
                              device_guard=True)
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        guarded_step(opt, torch.tensor(False), on_device=True)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        state = [v for s in opt.state.values() for v in s.values()]
        assert state and all(torch.isfinite(v).all() and (name != "adam" or not v.any()) for v in state)


def test_guarded_step_on_device_refuses_an_optimizer_that_cannot_cancel_a_step():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    with pytest.raises(TypeError, match="Adam cannot cancel a non-finite step on the device"):
        guarded_step(torch.optim.Adam([p]), torch.tensor(True), on_device=True)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits, _ = model(batch.inputs)
    loss = BITS.loss(logits, batch.targets, batch.mask)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_padding_to_the_longest_length_leaves_loss_and_gradients_unchanged():
    """What makes one captured graph serve every curriculum length: zero steps appended after the
    sequences change no earlier output, and the mask drops them."""
    model, cfg = tiny_model()
    task = make_task(cfg.task)
    batch = task.sample(3, torch.Generator().manual_seed(1), max_length=2)  # T = 5
    batch = batch._replace(inputs=batch.inputs.double(), targets=batch.targets.double(), mask=batch.mask.double())
    padded = pad_batch(batch, 7)  # the task's longest: 2 * 3 + 1
    assert padded.inputs.shape[1] == 7 and not padded.mask[:, 5:].any()
    loss, grads = _loss_and_grads(model, batch)
    loss_p, grads_p = _loss_and_grads(model, padded)
    torch.testing.assert_close(loss_p, loss, rtol=1e-13, atol=0)
    for g, gp in zip(grads, grads_p):
        torch.testing.assert_close(gp, g, rtol=1e-11, atol=1e-14)
    with pytest.raises(ValueError, match="cannot pad a batch of 7 time steps to 5"):
        pad_batch(padded, 5)


def test_graphed_step_pads_every_curriculum_length_into_one_shape():
    """GraphedStep's eager twin (capture=False, as on a CPU): batches of lengths 1..3 go through
    the same fixed tensors and train the model as the unpadded steps do."""
    models = [tiny_model()[0] for _ in range(2)]
    cfg = tiny_model()[1]
    task = make_task(cfg.task)
    tc = TrainConfig(optimizer="rmsprop", lr=0.01)
    opts = [build_optimizer(list(m.parameters()), tc, torch.device("cpu")) for m in models]
    accs = [new_accumulator("cpu") for _ in models]
    steps = [lambda b, i=i: train_step(models[i], opts[i], b, accs[i], BITS, 10.0, guard_on_device=False)
             for i in range(2)]
    longest = longest_batch(task, 3, cfg.task.max_length, "cpu")
    graphed = GraphedStep(steps[1], longest._replace(inputs=longest.inputs.double(),
                                                     targets=longest.targets.double(),
                                                     mask=longest.mask.double()), capture=False)
    generator = torch.Generator().manual_seed(2)
    for cap in (1, 2, 3, 2):
        batch = task.sample(3, generator, max_length=cap)
        batch = batch._replace(inputs=batch.inputs.double(), targets=batch.targets.double(), mask=batch.mask.double())
        steps[0](batch)
        graphed(batch)
        assert graphed.static.inputs.shape[1] == 7
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    sums = [read_accumulator(acc) for acc in accs]
    assert sums[0]["bits"] == sums[1]["bits"] > 0 and sums[0]["wrong"] == sums[1]["wrong"]
    assert sums[1]["loss"] == pytest.approx(sums[0]["loss"], rel=1e-12)
