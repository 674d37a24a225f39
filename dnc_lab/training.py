"""The training loop: set-up or resume, steps, summaries, checkpoints, the reasons to stop.

``train`` reads top to bottom in four phases, each a function below:

    _set_up      model, optimiser, task and data stream; on resume, the checkpoint's state (after
                 checking that it fits the run's config: ``runs.check_resumable``)
    step         ``dnc_lab.step.train_step``: forward, loss, backward, clip, guarded optimiser
                 step, running sums, all on the device with no host synchronisation (or its CUDA
                 graph, ``train.cuda_graph``)
    _summarize   every ``summarize_freq`` steps, the one place the host reads device values:
                 metrics.jsonl, status.json, progress, Visdom, the curriculum
    _stop_reason target BER, SIGINT/SIGTERM, ``max_seconds``; too many non-finite steps raise

Checkpoints every ``check_freq`` steps and when the run stops for any reason; ``_finish`` then
evaluates a finished run on every trained length (bAbI: on its validation split). The loss and
error count come from the task (``objective_for``): bitwise BCE, or a softmax cross-entropy for a
task whose answers are classes.
"""

from __future__ import annotations

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
from dnc_lab.config import Config
from dnc_lab.dnc import DNC
from dnc_lab.embedding import Embedded
from dnc_lab.optim import RMSprop, TFRMSprop, build_optimizer, guarded_step  # noqa: F401 (the public names)
from dnc_lab.runs import CHECKPOINT_VERSION  # noqa: F401
from dnc_lab.step import (ACC_KEYS, GraphedStep, Objective, longest_batch, new_accumulator, read_accumulator,
                          reset_accumulator, train_step)
from dnc_lab.tasks import Batch, Curriculum, make_task
from dnc_lab.viz import eventlog
from dnc_lab.viz.dashboard import Dashboard, env_name


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


# Bit-vector tasks (copy, repeat copy, ...): each output channel an independent bit.
BITS = Objective(loss=masked_bce, errors=bit_errors)
# Tasks whose answer is one class per step (``output_kind = "categorical"``: bAbI's words). The
# metrics keep the name ``ber``: here it is the fraction of wrong answers.
CLASSES = Objective(loss=masked_cross_entropy, errors=class_errors)


def is_categorical(task) -> bool:
    """Whether the task's answer is one class per step (its ``output_kind``; default "bits")."""
    return getattr(task, "output_kind", "bits") == "categorical"


def objective_for(task) -> Objective:
    """The loss and error count ``task`` is trained and scored on: its own ``objective`` if it
    declares one, CLASSES for a categorical task, else the bitwise BCE and bit error rate."""
    return getattr(task, "objective", CLASSES if is_categorical(task) else BITS)


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, task, lengths: Sequence[int], batch_size: int, seed: int,
             device: torch.device) -> list[dict[str, float]]:
    """Bit error rate and loss per sequence length, on fresh sequences.

    Each length gets its own generator seeded from (seed, length), so a length's number does not
    depend on which other lengths are asked for.
    """
    objective = objective_for(task)
    was_training = model.training
    model.eval()
    rows = []
    for length in lengths:
        generator = torch.Generator(device=device).manual_seed(seed * 100_003 + length)
        batch = task.sample(batch_size, generator, length=length)
        logits, _ = model(batch.inputs)
        wrong, bits = objective.errors(logits, batch.targets, batch.mask)
        loss = objective.loss(logits, batch.targets, batch.mask)
        rows.append({"length": length, "ber": (wrong / bits).item(), "loss": loss.item(), "sequences": batch_size})
    model.train(was_training)
    return rows


@torch.no_grad()
def answer_read_modes(model: nn.Module, task, length: int, sequences: int, seed: int,
                      device: torch.device) -> dict[str, float]:
    """How the read heads address memory while the model answers: the mean weight of the backward,
    forward and content read modes (π^i_t, summed over write heads, averaged over read heads) over
    the answer steps (mask = 1) of ``sequences`` fresh sequences of ``length``.

    Forward near 1 means the answers are read by following the temporal links in write order (a
    copy that does so is not tied to the lengths it was trained on); content near 1, by lookup.
    Each sequence is traced on its own (``model.trace`` shows batch element 0), on the reference step.
    """
    h = (model.dnc if isinstance(model, Embedded) else model).num_writes
    generator = torch.Generator(device=device).manual_seed(seed * 100_003 + length)
    sums, steps = np.zeros(3), 0
    was_training = model.training
    model.eval()
    for _ in range(sequences):
        batch = task.sample(1, generator, length=length)
        _, _, views = model.trace(batch.inputs)
        modes = views["read_modes"].reshape(len(views["read_modes"]), -1, 2 * h + 1)  # [T, R, 2H+1]
        answer = batch.mask[0].cpu().numpy() > 0
        picked = modes[answer]  # [answer steps, R, 2H+1]
        sums += np.stack([picked[..., :h].sum(-1), picked[..., h:2 * h].sum(-1), picked[..., 2 * h]], -1).mean(1).sum(0)
        steps += int(answer.sum())
    model.train(was_training)
    backward, forward, content = sums / max(steps, 1)
    return {"backward": float(backward), "forward": float(forward), "content": float(content)}


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
    status: str  # finished | reached_target | interrupted | max_seconds | stopped | failed
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
          on_summary: Optional[Callable[[dict], Optional[str]]] = None) -> TrainResult:
    """Train (or, with ``resume``, continue from the newest checkpoint) the run in ``run_dir``.

    progress: show a tqdm bar (default: when stderr is a terminal); otherwise a line per summary.
    on_summary: called with each metrics row right after it is appended to metrics.jsonl (a sweep
    reports it to its scheduler). If it returns a message, the run stops there as asked (status
    'stopped', a checkpoint written): a sweep's scheduler stopping a hopeless trial.
    Returns how the run ended; raises TrainingError when it had to stop (status 'failed') and
    runs.ResumeError when the checkpoint does not fit the run's config (nothing is changed then).
    """
    threads = torch.get_num_threads()
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        if device.type == "cuda":
            # float32 products in full precision unless train.tf32; cuDNN's own TF32 default
            # (on for its RNNs and convolutions) follows the same switch.
            torch.set_float32_matmul_precision("high" if cfg.train.tf32 else "highest")
            torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        return _train(run_dir, cfg, device, resume, progress, echo, on_summary)
    finally:  # leave the caller's process as it was
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


def _train(run_dir: Path, cfg: Config, device: torch.device, resume: bool, progress: Optional[bool],
           echo, on_summary: Optional[Callable[[dict], Optional[str]]]) -> TrainResult:
    tc = cfg.train
    run = _set_up(run_dir, cfg, device, resume, echo)
    out = _open_output(run, progress, echo, on_summary)
    result: Optional[TrainResult] = None
    run.started = time.monotonic() - run.elapsed
    run.interval = (time.monotonic(), run.step)
    try:
        with _StopSignals() as stop:
            while result is None and run.step < tc.steps:
                run.step += 1
                batch = run.sample()
                run.train_step(batch)
                out.bar.update(1)
                run.elapsed = time.monotonic() - run.started
                if run.step % tc.summarize_freq == 0 or run.step == tc.steps:
                    sums = _summarize(run, out, batch)
                    _stop_if_nonfinite(run, sums)
                    result = _grow_curriculum_or_reach_target(run, out.say)
                if run.step % tc.check_freq == 0:
                    _checkpoint(run)
                result = result or _stop_reason(run, stop)
    except BaseException as e:
        out.bar.close()
        message = str(e) if isinstance(e, TrainingError) else f"{type(e).__name__}: {e}"
        runs.write_status(run_dir, status="failed", step=run.step, message=message)
        if out.dash is not None:
            out.dash.close()
        raise
    return _finish(run, out, result)


# ---------------------------------------------------------------------------------------------
# Phase 1: set-up, or resume from a checkpoint


@dataclass
class _Run:
    """What the loop holds and advances: the model and its training state, and the counters."""

    run_dir: Path
    cfg: Config
    device: torch.device
    model: DNC
    optimizer: torch.optim.Optimizer
    task: Any
    objective: Objective
    curriculum: Curriculum
    generator: torch.Generator  # the data's own stream, separate from the one that initialised the model
    acc: dict[str, torch.Tensor]  # running sums on the device, read at summaries
    train_step: Callable[[Batch], None] = None  # type: ignore[assignment]  (set last by _set_up)
    step: int = 0
    elapsed: float = 0.0  # training seconds, over every resume
    skipped_total: int = 0
    last: Optional[dict] = None  # the newest metrics row
    started: float = 0.0  # time.monotonic() at elapsed 0
    interval: tuple[float, int] = (0.0, 0)  # (time, step) of the previous summary, for steps/s
    stop_asked: Optional[str] = None  # on_summary's answer (a sweep's scheduler): stop here, and why

    def sample(self) -> Batch:
        return self.task.sample(self.cfg.train.batch_size, self.generator, max_length=self.curriculum.max_length)


def _set_up(run_dir: Path, cfg: Config, device: torch.device, resume: bool, echo) -> _Run:
    tc = cfg.train
    seed_everything(tc.seed)
    model = build_model(cfg, device)
    model.train()
    task = make_task(cfg.task, device)
    run = _Run(run_dir, cfg, device, model, build_optimizer(list(model.parameters()), tc, device), task,
               objective_for(task), Curriculum(cfg.task),
               torch.Generator(device=device).manual_seed(tc.seed + 1_000_003), new_accumulator(device))
    if resume:
        _resume(run, echo)
    if device.type != "cuda" and tc.tf32:
        echo(f"note: train.tf32 has no effect on {device} (TF32 is a mode of NVIDIA GPUs)")
    run.train_step = _step_function(run, echo)  # after _resume: a CUDA graph captures the loaded state
    return run


def _resume(run: _Run, echo) -> None:
    """Load the newest checkpoint into ``run``: model, optimiser, curriculum, sums, counters, RNGs.
    Metrics and events logged after it (by a process that died later) are dropped."""
    # On the CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest.
    state = runs.load_checkpoint(run.run_dir, map_location="cpu")
    changes = runs.check_resumable(run.run_dir, state, run.cfg.to_dict())
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.curriculum.load_state_dict(state["curriculum"])
    for k in ACC_KEYS:
        run.acc[k].copy_(state["accumulator"][k])
    run.step, run.elapsed, run.skipped_total = state["step"], state["elapsed"], state["skipped_total"]
    if not runs.restore_rng(state["rng"], run.generator):
        run.generator.manual_seed(run.cfg.train.seed + 1_000_003 + run.step)
        echo("warning: resumed on another kind of device; the data stream continues from a new seed, "
             "so the run will not match an uninterrupted one exactly")
    runs.truncate_metrics(run.run_dir, run.step)
    eventlog.truncate(run.run_dir / eventlog.LOG_NAME, run.step)
    changed = f"; changed since the checkpoint: {', '.join(changes)}" if changes else ""
    echo(f"resuming {run.run_dir.name} at step {run.step} of {run.cfg.train.steps}{changed}")


# ---------------------------------------------------------------------------------------------
# Phase 2: the step (dnc_lab/step.py)


def _step_function(run: _Run, echo) -> Callable[[Batch], None]:
    """The step the loop calls: ``step.train_step`` on this run, or its CUDA graph (train.cuda_graph).
    On a GPU the non-finite guard decides on the device; on the CPU, on the host (it costs nothing)."""
    tc, on_cuda = run.cfg.train, run.device.type == "cuda"

    def eager(batch: Batch) -> None:
        train_step(run.model, run.optimizer, batch, run.acc, run.objective, tc.clip, guard_on_device=on_cuda)

    if not tc.cuda_graph:
        return eager
    if not on_cuda:
        echo(f"note: train.cuda_graph has no effect on {run.device} (CUDA graphs need a GPU); steps run eagerly")
        return eager
    longest = longest_batch(run.task, tc.batch_size, run.cfg.task.max_length, run.device)
    return GraphedStep(eager, longest)


def _checkpoint(run: _Run) -> Optional[Path]:
    with torch.no_grad():
        finite = all(torch.isfinite(p).all() for p in run.model.parameters())
    if not finite:  # cannot happen with the guard; never write a broken model anyway
        warnings.warn(f"model not finite at step {run.step}; checkpoint not written")  # pragma: no cover
        return None  # pragma: no cover
    payload = {
        "version": runs.CHECKPOINT_VERSION, "config": run.cfg.to_dict(),
        "step": run.step, "elapsed": run.elapsed, "skipped_total": run.skipped_total,
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "curriculum": run.curriculum.state_dict(), "accumulator": {k: v.detach().cpu() for k, v in run.acc.items()},
        "rng": runs.capture_rng(run.generator),
    }
    return runs.save_checkpoint(run.run_dir, run.step, payload, run.cfg.train.keep_checkpoints)


# ---------------------------------------------------------------------------------------------
# Phase 3: summaries (the only place the host reads device values)


@dataclass
class _Output:
    """Where a run reports: progress bar or lines, status.json, the dashboard, the caller's callback."""

    bar: tqdm
    show_bar: bool
    echo: Callable[[str], Any]
    dash: Optional[Dashboard]
    on_summary: Optional[Callable[[dict], Optional[str]]]

    def say(self, text: str) -> None:
        """A line that leaves the progress bar intact."""
        if self.show_bar:
            self.bar.write(text, file=sys.stderr)
        else:
            self.echo(text)


def _open_output(run: _Run, progress: Optional[bool], echo, on_summary) -> _Output:
    cfg = run.cfg
    dash = None
    if cfg.viz.enabled:
        env = env_name(cfg.viz.env or run.run_dir.name)  # the env `dnclab viz` replays into by default
        dash = Dashboard(run.run_dir, env=env, server=cfg.viz.server, port=cfg.viz.port, enabled=True,
                         queue_size=cfg.viz.queue_size, timeout_s=cfg.viz.timeout_s,
                         model_dims={"nr_cells": cfg.model.nr_cells, "cell_size": cfg.model.cell_size,
                                     "read_heads": cfg.model.read_heads, "num_writes": cfg.model.num_writes})
    backend = run.model.backend_choice()  # which memory-step kernels run, and why a faster one did not
    echo(f"memory backend: {backend.describe()}")
    runs.write_status(run.run_dir, status="running", task=cfg.task.name, step=run.step, steps=cfg.train.steps,
                      pid=os.getpid(), host=socket.gethostname(), device=str(run.device),
                      backend=backend.name, backend_reason=backend.reason, message="")
    show_bar = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=cfg.train.steps, initial=run.step, desc=run.run_dir.name, unit="step", dynamic_ncols=True,
               disable=not show_bar, file=sys.stderr)
    return _Output(bar, show_bar, echo, dash, on_summary)


def _summarize(run: _Run, out: _Output, batch: Batch) -> dict[str, float]:
    """Read the running sums (one synchronisation), write the metrics row everywhere, reset the
    sums; return them."""
    tc = run.cfg.train
    sums = read_accumulator(run.acc)
    run.skipped_total += int(sums["skipped"])
    now = time.monotonic()
    per_ok = (lambda total: total / sums["ok"]) if sums["ok"] else (lambda total: None)
    since, since_step = run.interval
    last = {  # None (JSON null) when every step of the interval was skipped
        "step": run.step,
        "loss": per_ok(sums["loss"]),
        "ber": sums["wrong"] / sums["bits"] if sums["bits"] else None,
        "grad_norm": per_ok(sums["grad_norm"]),
        "skipped": int(sums["skipped"]), "skipped_total": run.skipped_total,
        "max_length": run.curriculum.max_length, "lr": run.optimizer.param_groups[0]["lr"],
        "time": round(run.elapsed, 3),
        "steps_per_s": round((run.step - since_step) / max(now - since, 1e-9), 2),
    }
    run.interval, run.last = (now, run.step), last
    reset_accumulator(run.acc)
    runs.append_metrics(run.run_dir, last)
    runs.write_status(run.run_dir, step=run.step, last={k: last[k] for k in ("loss", "ber")},
                      skipped_total=run.skipped_total)
    if out.on_summary is not None:
        run.stop_asked = out.on_summary(last)
    out.bar.set_postfix(loss=_fmt(last["loss"]), ber=_fmt(last["ber"]), refresh=False)
    if not out.show_bar:
        out.echo(f"step {run.step}/{tc.steps}  loss {_fmt(last['loss'])}  ber {_fmt(last['ber'])}  "
                 f"skipped {last['skipped']}  {last['time']:.0f}s")
    if out.dash is not None and last["loss"] is not None:
        _log_to_dashboard(out.dash, run.model, batch, last, categorical=is_categorical(run.task))
    return sums


# ---------------------------------------------------------------------------------------------
# Phase 4: the reasons to stop, and the end of a run


def _stop_if_nonfinite(run: _Run, sums: dict[str, float]) -> None:
    tc = run.cfg.train
    if sums["max_run"] >= tc.max_nonfinite:
        newest = runs.list_checkpoints(run.run_dir)
        at = f"step {newest[-1][0]}" if newest else "none yet"
        raise TrainingError(
            f"stopped at step {run.step}: {int(sums['max_run'])} non-finite losses/gradients in a row "
            f"(train.max_nonfinite = {tc.max_nonfinite}); last good checkpoint: {at}. "
            f"Try a lower train.lr or a smaller train.clip")


def _grow_curriculum_or_reach_target(run: _Run, say: Callable[[str], None]) -> Optional[TrainResult]:
    """After a summary: the curriculum may grow; the target BER counts only at the full length."""
    tc, ber = run.cfg.train, run.last["ber"]
    full_length = run.curriculum.done
    if ber is not None and run.curriculum.update(ber):
        say(f"curriculum: sequences up to length {run.curriculum.max_length} from step {run.step + 1}")
    if tc.target_ber is not None and full_length and ber is not None and ber <= tc.target_ber:
        return TrainResult("reached_target", run.step, f"reached target BER {ber:.4g} <= {tc.target_ber}")
    return None


def _stop_reason(run: _Run, stop: _StopSignals) -> Optional[TrainResult]:
    tc = run.cfg.train
    if stop.received is not None:
        name = signal.Signals(stop.received).name
        return TrainResult("interrupted", run.step, f"{name} received at step {run.step}", signal=stop.received)
    if tc.max_seconds is not None and run.elapsed >= tc.max_seconds:
        return TrainResult("max_seconds", run.step, f"train.max_seconds = {tc.max_seconds} reached")
    if run.stop_asked and run.step < tc.steps:  # at the last step the run is simply finished
        return TrainResult("stopped", run.step, str(run.stop_asked))
    return None


def _finish(run: _Run, out: _Output, result: Optional[TrainResult]) -> TrainResult:
    """The last checkpoint; for a finished run, the evaluation on every trained length (bAbI: its
    validation split); the status."""
    out.bar.close()
    tc, step = run.cfg.train, run.step
    if result is None:
        result = TrainResult("finished", step, f"finished {tc.steps} steps")
    if step % tc.check_freq != 0 or not runs.list_checkpoints(run.run_dir):
        _checkpoint(run)
    result.last = run.last
    if result.status in ("finished", "reached_target"):
        result.eval, eval_ber, per_item = final_evaluation(run.model, run.task, run.cfg, run.device)
        if out.dash is not None:
            out.dash.log_scalars(step, {"eval_ber": eval_ber})
        runs.write_status(run.run_dir, eval=per_item, eval_ber=eval_ber)
    runs.write_status(run.run_dir, status=result.status, step=step, message=result.message)
    if out.dash is not None:
        out.dash.close()
    return result


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def _log_to_dashboard(dash, model: DNC, batch, last: dict, categorical: bool = False) -> None:
    """Curves, and memory views of sample 0 of the current batch (one extra forward, no grad)."""
    dash.log_scalars(last["step"], {"loss": last["loss"], "ber": last["ber"]})
    sample, _ = trace_sample(model, batch, categorical)
    dash.log_snapshot(last["step"], loss=last["loss"], **sample)


def trace_sample(model: nn.Module, batch, categorical: bool = False) -> tuple[dict[str, Any], torch.Tensor]:
    """Sample 0 of ``batch`` traced through ``model`` (eval mode, no grad), up to its last answer
    step T: (the keyword arguments of ``Dashboard.log_snapshot`` other than step and loss: views as
    from ``DNC.trace``; inputs, targets, outputs, mask as numpy arrays [T, ...]; the logits [1, T, out]).
    Outputs are probabilities: per bit, or (``categorical``) a softmax over the classes."""
    n = int(batch.mask[0].nonzero().max().item()) + 1 if batch.mask[0].any() else batch.mask.shape[1]
    inputs = batch.inputs[:1, :n]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits, _, views = model.trace(inputs)
    model.train(was_training)
    outputs = torch.softmax(logits[0], -1) if categorical else torch.sigmoid(logits[0])
    return {"views": views, "inputs": inputs[0].cpu().numpy(), "targets": batch.targets[0, :n].cpu().numpy(),
            "outputs": outputs.cpu().numpy(), "mask": batch.mask[0, :n].cpu().numpy()}, logits
