"""The training loop: optimisers, masked loss and bit error rate, NaN guard, summaries, checkpoints.

One step, top to bottom (``train``): sample a batch on the device, run the DNC from an empty
memory, masked loss (BCE with logits; softmax cross-entropy for a task whose answers are classes,
see ``scoring``), backward, clip the gradient norm, a guarded optimiser step (skipped, on the
device, when the loss or gradient is not finite). Running sums stay on the device; the host reads
them only every ``summarize_freq`` steps, to write metrics.jsonl, the progress bar, status.json and
the Visdom dashboard. Checkpoints every ``check_freq`` steps and when the run
stops for any reason (end, SIGINT/SIGTERM, ``max_seconds``, ``target_ber``).
"""

from __future__ import annotations

import math
import os
import random
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dnc_lab import runs
from dnc_lab.config import Config, TrainConfig
from dnc_lab.dnc import DNC
from dnc_lab.embedding import Embedded
from dnc_lab.tasks import Curriculum, make_task
from dnc_lab.viz import eventlog
from dnc_lab.viz.dashboard import Dashboard, env_name

CHECKPOINT_VERSION = 1


class TrainingError(Exception):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


def pick_device(cuda: int) -> torch.device:
    """``--cuda N``: cuda:N, or the CPU for -1; a clear error when CUDA or device N is missing."""
    from dnc_lab.config import ConfigError  # a usage error: one line, exit code 2

    if cuda < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no usable GPU"
        raise ConfigError(f"--cuda {cuda}: CUDA is not available (torch {torch.__version__}, {build}); "
                               f"use --cuda -1 for the CPU")
    count = torch.cuda.device_count()
    if cuda >= count:
        raise ConfigError(f"--cuda {cuda}: only {count} CUDA device(s) visible (0..{count - 1})")
    return torch.device("cuda", cuda)


# ---------------------------------------------------------------------------------------------
# Loss and error rate (pure functions)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the masked steps' output bits.

    logits, targets [B, T, O]; mask [B, T] (1 where an answer is expected). Steps outside the mask
    add nothing: the model is free to output anything while it reads the input.
    """
    per_bit = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # [B, T, O]
    counted = mask.sum() * logits.shape[-1]
    return (per_bit * mask[..., None]).sum() / counted.clamp_min(1)


def bit_errors(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(wrong bits, counted bits) over the masked steps; a bit is 1 where the logit is > 0."""
    wrong = ((logits > 0) != (targets > 0.5)).float() * mask[..., None]
    return wrong.sum(), mask.sum() * logits.shape[-1]


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over the masked steps, for a task whose answer is one class per
    step (bAbI's words). logits [B, T, V]; targets [B, T, V] one-hot where mask is 1; mask [B, T]."""
    per_step = -(torch.log_softmax(logits, dim=-1) * targets).sum(-1)  # [B, T]
    return (per_step * mask).sum() / mask.sum().clamp_min(1)


def class_errors(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(wrong answers, answers) over the masked steps: an answer is right when the most likely
    class is the target's."""
    wrong = (logits.argmax(-1) != targets.argmax(-1)).float() * mask
    return wrong.sum(), mask.sum()


def is_categorical(task) -> bool:
    """Whether the task's answer is one class per step (its ``output_kind``; default "bits")."""
    return getattr(task, "output_kind", "bits") == "categorical"


def scoring(task) -> tuple[Callable, Callable]:
    """(loss, errors) for ``task``: masked BCE and bit errors, or for a categorical task masked
    cross-entropy and wrong classes. The metrics keep the name ``ber``: for a categorical task it
    is the fraction of wrong answer words."""
    if is_categorical(task):
        return masked_cross_entropy, class_errors
    return masked_bce, bit_errors


# ---------------------------------------------------------------------------------------------
# Optimisers


class TFRMSprop(torch.optim.Optimizer):
    """RMSProp as TensorFlow 1's RMSPropOptimizer (used by deepmind/dnc).

    Differs from torch.optim.RMSprop in two ways that matter early in training: the mean square
    starts at 1 (not 0), and epsilon sits inside the square root:
        ms  <- alpha * ms + (1 - alpha) * g^2
        mom <- momentum * mom + lr * g / sqrt(ms + eps)
        p   <- p - mom
    State is created at construction so that it can be guarded and checkpointed like any tensor.
    """

    def __init__(self, params, lr: float = 1e-4, alpha: float = 0.9, eps: float = 1e-10, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["ms"] = torch.ones_like(p, memory_format=torch.preserve_format)
                self.state[p]["mom"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                state["ms"].mul_(group["alpha"]).addcmul_(g, g, value=1 - group["alpha"])
                update = g / (state["ms"] + group["eps"]).sqrt()
                state["mom"].mul_(group["momentum"]).add_(update, alpha=group["lr"])
                p.sub_(state["mom"])


def build_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer``. On CUDA its step counters live on the device
    (``capturable``) so that the NaN guard never has to read them on the host."""
    on_cuda = device.type == "cuda"
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps or 1e-8, weight_decay=cfg.weight_decay,
                                capturable=on_cuda)
    if cfg.optimizer == "rmsprop":
        if cfg.tf_style:
            return TFRMSprop(params, lr=cfg.lr, alpha=cfg.rmsprop_alpha or 0.9, eps=cfg.eps or 1e-10,
                             momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.rmsprop_alpha or 0.99, eps=cfg.eps or 1e-8,
                                   momentum=cfg.momentum, weight_decay=cfg.weight_decay, capturable=on_cuda)
    warnings.warn("train.optimizer = 'sgd': DNCs tend to diverge with plain SGD; adam or rmsprop is safer",
                  stacklevel=2)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def guarded_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor, on_device: Optional[bool] = None) -> None:
    """``optimizer.step()`` where ``ok`` (a 0-dim bool tensor) is True; where it is False, nothing changes.

    On a GPU (``on_device``, the default for a tensor that is not on the CPU) the step is taken and
    undone on the device: parameters and optimiser state are copied before it and restored with
    torch.where, so the host never waits for the device to decide. On the CPU reading ``ok`` costs
    nothing, so the step is simply skipped (the copies were ~10% of a small model's step).
    """
    if on_device is None:
        on_device = ok.device.type != "cpu"
    if not on_device:
        if bool(ok):
            optimizer.step()
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    old_params = [p.detach().clone() for p in params]
    old_state = {p: {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)} for p in params}
    optimizer.step()
    with torch.no_grad():
        for p, old in zip(params, old_params):
            p.copy_(torch.where(ok, p, old))
        for p in params:
            for key, value in optimizer.state[p].items():
                if torch.is_tensor(value):
                    # state created by this very step: "no state yet" is all zeros for torch's optimisers
                    old = old_state[p].get(key, torch.zeros_like(value))
                    value.copy_(torch.where(ok, value, old))


# ---------------------------------------------------------------------------------------------
# Running sums, kept on the device between summaries


ACC_KEYS = ("loss", "wrong", "bits", "grad_norm", "ok", "skipped", "run", "max_run")


def new_accumulator(device: torch.device) -> dict[str, torch.Tensor]:
    """Sums since the last summary. ``run``: non-finite steps in a row now; ``max_run``: longest."""
    return {k: torch.zeros((), dtype=torch.float64, device=device) for k in ACC_KEYS}


def accumulate(acc: dict[str, torch.Tensor], ok: torch.Tensor, loss: torch.Tensor, wrong: torch.Tensor,
               bits: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Add one step's values (only of finite steps) without leaving the device."""
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
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, task, lengths: Sequence[int], batch_size: int, seed: int,
             device: torch.device) -> list[dict[str, float]]:
    """Bit error rate and loss per sequence length, on fresh sequences.

    Each length gets its own generator seeded from (seed, length), so a length's number does not
    depend on which other lengths are asked for.
    """
    was_training = model.training
    model.eval()
    loss_of, errors_of = scoring(task)
    rows = []
    for length in lengths:
        generator = torch.Generator(device=device).manual_seed(seed * 100_003 + length)
        batch = task.sample(batch_size, generator, length=length)
        logits, _ = model(batch.inputs)
        wrong, bits = errors_of(logits, batch.targets, batch.mask)
        loss = loss_of(logits, batch.targets, batch.mask)
        rows.append({"length": length, "ber": (wrong / bits).item(), "loss": loss.item(), "sequences": batch_size})
    model.train(was_training)
    return rows


def final_evaluation(model: nn.Module, task, cfg: Config, device: torch.device) -> tuple[list, float, dict]:
    """(rows, mean error, {length or task number: error}) at the end of a run: the error per
    trained length on fresh sequences, or for a task with its own held-out data (bAbI, which has
    ``evaluate``) the error per bAbI task on its validation split."""
    if hasattr(task, "evaluate"):
        was_training = model.training
        model.eval()
        report = task.evaluate(model, "validation", cfg.train.eval_batch_size)
        model.train(was_training)
        rows = [{"task": t.task, "error": t.error, "questions": t.questions} for t in report.per_task]
        return rows, report.mean_error, {str(r["task"]): r["error"] for r in rows}
    lengths = list(range(cfg.task.min_length, cfg.task.max_length + 1))
    rows = evaluate(model, task, lengths, cfg.train.eval_batch_size, cfg.train.seed, device)
    return rows, sum(r["ber"] for r in rows) / len(rows), {str(r["length"]): r["ber"] for r in rows}


def parse_lengths(text: str) -> list[int]:
    """``"1-8,16,32"`` -> [1, ..., 8, 16, 32]; ValueError with the bad part otherwise."""
    lengths: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                lengths.extend(range(lo, hi + 1))
            else:
                lengths.append(int(part))
        except ValueError:
            raise ValueError(f"{part!r} in {text!r}: expected a length (16) or a range (1-8), "
                             f"comma-separated") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"{text!r}: lengths must be positive integers")
    return sorted(set(lengths))


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    status: str  # finished | reached_target | interrupted | max_seconds | failed
    step: int
    message: str
    last: Optional[dict] = None
    signal: Optional[int] = None
    eval: list = field(default_factory=list)


class _StopSignals:
    """SIGINT/SIGTERM set a flag checked after each step; a second signal acts as usual."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    """The DNC of ``cfg.model``; wrapped in ``Embedded`` when the task asks for a learned input
    embedding (``task.embedding_size`` > 0: the DNC then takes embedding_size inputs)."""
    kwargs = cfg.model_kwargs()
    embedding = getattr(cfg.task, "embedding_size", 0)
    if not embedding:
        return DNC(**kwargs, device=device)
    vocabulary = kwargs.pop("input_size")
    return Embedded(vocabulary, DNC(**kwargs, input_size=embedding, device=device)).to(device)


def train(run_dir: Path, cfg: Config, device: torch.device, resume: bool = False,
          progress: Optional[bool] = None, echo=print,
          on_summary: Optional[Callable[[dict], None]] = None) -> TrainResult:
    """Train (or, with ``resume``, continue from the newest checkpoint) the run in ``run_dir``.

    progress: show a tqdm bar (default: when stderr is a terminal); otherwise a line per summary.
    on_summary: called with each metrics row right after it is appended to metrics.jsonl (a sweep
    reports it to its scheduler).
    Returns how the run ended; raises TrainingError when it had to stop (status 'failed').
    """
    threads = torch.get_num_threads()
    try:
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        return _train(run_dir, cfg, device, resume, progress, echo, on_summary)
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was


def _train(run_dir: Path, cfg: Config, device: torch.device, resume: bool, progress: Optional[bool],
           echo, on_summary: Optional[Callable[[dict], None]] = None) -> TrainResult:
    tc = cfg.train
    seed_everything(tc.seed)
    model = build_model(cfg, device)
    model.train()
    optimizer = build_optimizer(list(model.parameters()), tc, device)
    task = make_task(cfg.task, device)
    loss_of, errors_of = scoring(task)
    curriculum = Curriculum(cfg.task)
    # The data's own stream, separate from the global one that initialised the model.
    generator = torch.Generator(device=device).manual_seed(tc.seed + 1_000_003)
    acc = new_accumulator(device)
    step, elapsed, skipped_total = 0, 0.0, 0

    if resume:
        # On the CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
        state = runs.load_checkpoint(run_dir, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        curriculum.load_state_dict(state["curriculum"])
        for k in ACC_KEYS:
            acc[k].copy_(state["accumulator"][k])
        step, elapsed, skipped_total = state["step"], state["elapsed"], state["skipped_total"]
        if not runs.restore_rng(state["rng"], generator):
            generator.manual_seed(tc.seed + 1_000_003 + step)
            echo("warning: resumed on another kind of device; the data stream continues from a new seed, "
                 "so the run will not match an uninterrupted one exactly")
        runs.truncate_metrics(run_dir, step)
        eventlog.truncate(run_dir / eventlog.LOG_NAME, step)
        echo(f"resuming {run_dir.name} at step {step} of {tc.steps}")

    def checkpoint() -> Optional[Path]:
        with torch.no_grad():
            finite = all(torch.isfinite(p).all() for p in model.parameters())
        if not finite:  # cannot happen with the guard; never write a broken model anyway
            echo(f"warning: model not finite at step {step}; checkpoint not written")  # pragma: no cover
            return None
        payload = {
            "version": CHECKPOINT_VERSION, "step": step, "elapsed": elapsed, "skipped_total": skipped_total,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "curriculum": curriculum.state_dict(), "accumulator": {k: v.detach().cpu() for k, v in acc.items()},
            "rng": runs.capture_rng(generator),
        }
        return runs.save_checkpoint(run_dir, step, payload, tc.keep_checkpoints)

    env = env_name(cfg.viz.env or run_dir.name)  # the env `dnclab viz` replays into by default
    dash = None
    if cfg.viz.enabled:
        dash = Dashboard(run_dir, env=env, server=cfg.viz.server, port=cfg.viz.port, enabled=True,
                         queue_size=cfg.viz.queue_size, timeout_s=cfg.viz.timeout_s,
                         model_dims={"nr_cells": cfg.model.nr_cells, "cell_size": cfg.model.cell_size,
                                     "read_heads": cfg.model.read_heads, "num_writes": cfg.model.num_writes})

    backend = model.backend_choice()  # which memory-step kernels run, and why a faster one did not
    echo(f"memory backend: {backend.describe()}")
    runs.write_status(run_dir, status="running", task=cfg.task.name, step=step, steps=tc.steps,
                      pid=os.getpid(), host=socket.gethostname(), device=str(device),
                      backend=backend.name, backend_reason=backend.reason, message="")
    show_bar = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=tc.steps, initial=step, desc=run_dir.name, unit="step", dynamic_ncols=True,
               disable=not show_bar, file=sys.stderr)
    say = (lambda text: bar.write(text, file=sys.stderr)) if show_bar else echo  # keeps the bar intact
    last: Optional[dict] = None
    result: Optional[TrainResult] = None
    started = time.monotonic() - elapsed
    interval_start, interval_step = time.monotonic(), step

    try:
        with _StopSignals() as stop:
            while result is None and step < tc.steps:
                step += 1
                batch = task.sample(tc.batch_size, generator, max_length=curriculum.max_length)
                logits, _ = model(batch.inputs)  # every batch starts from an empty memory
                loss = loss_of(logits, batch.targets, batch.mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), tc.clip if tc.clip > 0 else math.inf)
                ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
                guarded_step(optimizer, ok)
                with torch.no_grad():
                    wrong, bits = errors_of(logits.detach(), batch.targets, batch.mask)
                    accumulate(acc, ok, loss, wrong, bits, grad_norm)
                bar.update(1)
                elapsed = time.monotonic() - started

                if step % tc.summarize_freq == 0 or step == tc.steps:
                    # --- summary: the only place the host reads device values ---
                    sums = read_accumulator(acc)
                    skipped_total += int(sums["skipped"])
                    now = time.monotonic()
                    per_ok = (lambda total: total / sums["ok"]) if sums["ok"] else (lambda total: None)
                    last = {  # None (JSON null) when every step of the interval was skipped
                        "step": step,
                        "loss": per_ok(sums["loss"]),
                        "ber": sums["wrong"] / sums["bits"] if sums["bits"] else None,
                        "grad_norm": per_ok(sums["grad_norm"]),
                        "skipped": int(sums["skipped"]), "skipped_total": skipped_total,
                        "max_length": curriculum.max_length, "lr": optimizer.param_groups[0]["lr"],
                        "time": round(elapsed, 3),
                        "steps_per_s": round((step - interval_step) / max(now - interval_start, 1e-9), 2),
                    }
                    interval_start, interval_step = now, step
                    reset_accumulator(acc)
                    runs.append_metrics(run_dir, last)
                    runs.write_status(run_dir, step=step, last={k: last[k] for k in ("loss", "ber")},
                                      skipped_total=skipped_total)
                    if on_summary is not None:
                        on_summary(last)
                    bar.set_postfix(loss=_fmt(last["loss"]), ber=_fmt(last["ber"]), refresh=False)
                    if not show_bar:
                        echo(f"step {step}/{tc.steps}  loss {_fmt(last['loss'])}  ber {_fmt(last['ber'])}  "
                             f"skipped {last['skipped']}  {last['time']:.0f}s")
                    if dash is not None and last["loss"] is not None:
                        _log_to_dashboard(dash, model, batch, last, categorical=is_categorical(task))
                    if sums["max_run"] >= tc.max_nonfinite:
                        newest = runs.list_checkpoints(run_dir)
                        at = f"step {newest[-1][0]}" if newest else "none yet"
                        raise TrainingError(
                            f"stopped at step {step}: {int(sums['max_run'])} non-finite losses/gradients in a row "
                            f"(train.max_nonfinite = {tc.max_nonfinite}); last good checkpoint: {at}. "
                            f"Try a lower train.lr or a smaller train.clip")
                    full_length = curriculum.done
                    if last["ber"] is not None and curriculum.update(last["ber"]):
                        say(f"curriculum: sequences up to length {curriculum.max_length} from step {step + 1}")
                    if tc.target_ber is not None and full_length and last["ber"] is not None \
                            and last["ber"] <= tc.target_ber:
                        result = TrainResult("reached_target", step,
                                             f"reached target BER {last['ber']:.4g} <= {tc.target_ber}")

                if step % tc.check_freq == 0:
                    checkpoint()
                if result is None and stop.received is not None:
                    name = signal.Signals(stop.received).name
                    result = TrainResult("interrupted", step, f"{name} received at step {step}",
                                         signal=stop.received)
                if result is None and tc.max_seconds is not None and elapsed >= tc.max_seconds:
                    result = TrainResult("max_seconds", step, f"train.max_seconds = {tc.max_seconds} reached")
    except BaseException as e:
        bar.close()
        message = str(e) if isinstance(e, TrainingError) else f"{type(e).__name__}: {e}"
        runs.write_status(run_dir, status="failed", step=step, message=message)
        if dash is not None:
            dash.close()
        raise
    bar.close()

    if result is None:
        result = TrainResult("finished", step, f"finished {tc.steps} steps")
    if step % tc.check_freq != 0 or not runs.list_checkpoints(run_dir):
        checkpoint()
    result.last = last
    if result.status in ("finished", "reached_target"):
        result.eval, eval_ber, per_item = final_evaluation(model, task, cfg, device)
        if dash is not None:
            dash.log_scalars(step, {"eval_ber": eval_ber})
        runs.write_status(run_dir, eval=per_item, eval_ber=eval_ber)
    runs.write_status(run_dir, status=result.status, step=step, message=result.message)
    if dash is not None:
        dash.close()
    return result


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def _log_to_dashboard(dash, model: DNC, batch, last: dict, categorical: bool = False) -> None:
    """Curves, and memory views of sample 0 of the current batch (one extra forward, no grad).
    Outputs are shown as probabilities: per bit, or (``categorical``) a softmax over the classes."""
    dash.log_scalars(last["step"], {"loss": last["loss"], "ber": last["ber"]})
    n = int(batch.mask[0].nonzero().max().item()) + 1 if batch.mask[0].any() else batch.mask.shape[1]
    inputs = batch.inputs[:1, :n]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits, _, views = model.trace(inputs)
    model.train(was_training)
    dash.log_snapshot(last["step"], loss=last["loss"], views=views, inputs=inputs[0].cpu().numpy(),
                      targets=batch.targets[0, :n].cpu().numpy(),
                      outputs=(torch.softmax(logits[0], -1) if categorical else torch.sigmoid(logits[0])).cpu().numpy(),
                      mask=batch.mask[0, :n].cpu().numpy())
