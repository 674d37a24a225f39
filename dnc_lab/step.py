"""One training step on the device, with no host-device synchronisation, and its CUDA graph.

``train_step``: forward from an empty memory, loss, backward, clip the gradient norm, a guarded
optimiser step, running sums. No line of it reads a device value on the host (no ``.item()``, no
``if tensor``), so on a GPU the host queues step after step without waiting; the loop in
``training`` reads the running sums once per summary. ``tests/test_step.py`` proves it by running
the whole step on the ``meta`` device (where any such read fails); ``tests/test_cuda.py`` runs it
under ``torch.cuda.set_sync_debug_mode("error")``.

``GraphedStep`` (``train.cuda_graph``) captures that step once as a CUDA graph and replays it: one
launch per step instead of thousands. A graph replays fixed shapes, so every batch is padded to the
task's longest sequence (``pad_batch``).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from dnc_lab.optim import guarded_step
from dnc_lab.tasks.base import Batch


class Objective(NamedTuple):
    """What a task is trained and scored on: both take (logits [B, T, O], targets, mask [B, T]).

    loss:   a differentiable scalar (the mean over the masked answers)
    errors: (wrong, counted) as tensors, summed over the batch; the error rate is wrong / counted
    """

    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    errors: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Running sums, kept on the device between summaries


ACC_KEYS = ("loss", "wrong", "bits", "grad_norm", "ok", "skipped", "run", "max_run")


def new_accumulator(device: torch.device | str) -> dict[str, torch.Tensor]:
    """Sums since the last summary. ``run``: non-finite steps in a row now; ``max_run``: longest."""
    return {k: torch.zeros((), dtype=torch.float64, device=device) for k in ACC_KEYS}


def accumulate(acc: dict[str, torch.Tensor], ok: torch.Tensor, loss: torch.Tensor, wrong: torch.Tensor,
               bits: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Add one step's values (only of finite steps) without leaving the device; in place, so a
    CUDA graph that captured this keeps adding into the same tensors."""
    zero = torch.zeros((), dtype=torch.float64, device=loss.device)
    okf = ok.double()
    acc["loss"] += torch.where(ok, loss.detach().double(), zero)
    acc["wrong"] += torch.where(ok, wrong.double(), zero)
    acc["bits"] += torch.where(ok, bits.double(), zero)
    acc["grad_norm"] += torch.where(ok, grad_norm.detach().double(), zero)
    acc["ok"] += okf
    acc["skipped"] += 1 - okf
    acc["run"].copy_((acc["run"] + 1) * (1 - okf))
    acc["max_run"].copy_(torch.maximum(acc["max_run"], acc["run"]))


def read_accumulator(acc: dict[str, torch.Tensor]) -> dict[str, float]:
    """One host-device synchronisation: all sums at once."""
    return dict(zip(ACC_KEYS, torch.stack([acc[k] for k in ACC_KEYS]).tolist()))


def reset_accumulator(acc: dict[str, torch.Tensor]) -> None:
    for k in ACC_KEYS:
        if k != "run":  # a streak of non-finite steps spans summaries
            acc[k].zero_()
    acc["max_run"].copy_(acc["run"])


# ---------------------------------------------------------------------------------------------
# The step


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, acc: dict[str, torch.Tensor],
               objective: Objective, clip: float, guard_on_device: bool) -> None:
    """One optimiser step on ``batch``; its loss, errors and gradient norm are added to ``acc``.

    A step whose loss or gradient norm is not finite changes nothing (``optim.guarded_step``) and is
    counted as skipped. ``clip`` <= 0: the norm is measured but not clipped.
    """
    optimizer.zero_grad(set_to_none=True)  # first: a captured backward must not add to old gradients
    logits, _ = model(batch.inputs)  # every batch starts from an empty memory
    loss = objective.loss(logits, batch.targets, batch.mask)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
    ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
    guarded_step(optimizer, ok, guard_on_device)
    with torch.no_grad():
        wrong, bits = objective.errors(logits.detach(), batch.targets, batch.mask)
        accumulate(acc, ok, loss, wrong, bits, grad_norm)


# ---------------------------------------------------------------------------------------------
# Fixed shapes for a CUDA graph


def pad_batch(batch: Batch, steps: int) -> Batch:
    """``batch`` with zero steps appended up to ``steps`` time steps (mask 0 there).

    The DNC is causal: steps appended after a sequence's end change none of its earlier outputs,
    and the mask drops them from the loss and the error count, so loss and gradients are those of
    the unpadded batch (up to the order of a sum's terms).
    """
    extra = steps - batch.inputs.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a batch of {batch.inputs.shape[1]} time steps to {steps}")
    pad3 = (0, 0, 0, extra)  # [B, T, features]: pad T at the end
    return Batch(nn.functional.pad(batch.inputs, pad3), nn.functional.pad(batch.targets, pad3),
                 nn.functional.pad(batch.mask, (0, extra)), batch.lengths)


def longest_batch(task, batch_size: int, max_length: int, device: torch.device | str) -> Batch:
    """A batch of the task's longest shape (every sequence at ``max_length``), drawn with a
    generator of its own so that the training data stream is untouched."""
    generator = torch.Generator(device=device).manual_seed(0)
    return task.sample(batch_size, generator, length=max_length)


class GraphedStep:
    """``train.cuda_graph``: ``step(batch)`` captured once as a CUDA graph, then replayed.

    Every batch is padded to the time steps of ``longest`` (a batch of the task's longest shape) and
    copied into fixed input tensors, whatever the curriculum's current length. The first ``warmup``
    calls run eagerly, on a side stream (PyTorch's recipe: cuBLAS handles, the allocator and
    autograd set themselves up outside the capture); they are real training steps. The next call captures the step (capturing runs nothing) and replays
    it; every later call only copies its batch in and replays.

    ``capture=False`` runs every call eagerly on the same padded fixed tensors (the CPU tests use
    this to check the padding and copying without a GPU).
    """

    def __init__(self, step: Callable[[Batch], None], longest: Batch, warmup: int = 3, capture: bool = True):
        self.static = Batch(*(torch.zeros_like(t) for t in longest))  # the graph's inputs
        self.step, self.warmup, self.capture = step, warmup, capture
        self.calls = 0
        self.graph = None

    def __call__(self, batch: Batch) -> None:
        padded = pad_batch(batch, self.static.inputs.shape[1])
        for static, new in zip(self.static, padded):
            static.copy_(new)
        self.calls += 1
        if not self.capture:
            self.step(self.static)
        elif self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(self.static)
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.step(self.static)
            self.graph.replay()
