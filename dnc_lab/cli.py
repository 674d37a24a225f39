"""The ``dnclab`` command line: thin click commands, each parsing its options and calling one function.

    dnclab train CONFIG [--cuda N] [--set section.key=value]... [--run-id ID] [--dry-run]
    dnclab resume ID [--cuda N] [--steps N] [--set train.key=value]...
    dnclab runs [SWEEP]
    dnclab eval --run ID [--run ID2 ...] [--lengths 1-8,16,32]   (a table per run, and a plot)
    dnclab sweep SWEEP.yaml [--set section.key=value]... [--sweep-id ID] [--address ADDR]
    dnclab sweep --resume SWEEP_ID / dnclab sweep-report SWEEP_ID      (see dnc_lab.sweep)
    dnclab viz --run ID / dnclab server        (see dnc_lab.viz)

Errors are one line (exit code 2 for bad input, 1 for a failed run); ``dnclab --debug ...`` shows
the Python traceback instead.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import click
import torch
import yaml

from dnc_lab import runs, training  # training.train: the name `train` is the click command below
from dnc_lab.config import ConfigError, config_from_dict, load_config, parse_override, save_config
from dnc_lab.tasks import make_task
from dnc_lab.training import TrainingError, answer_read_modes, build_model, evaluate, parse_lengths, pick_device
from dnc_lab.viz.commands import server, viz

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


class _Group(click.Group):
    """Turns unexpected exceptions into one readable line unless --debug was given."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(f"{type(e).__name__}: {e}  (run `dnclab --debug ...` for the traceback)")


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
def main(debug: bool) -> None:
    """Train, resume, evaluate and watch Differentiable Neural Computers."""


@main.command(context_settings=CONTEXT)
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--cuda", type=click.IntRange(min=-1), default=-1, help="CUDA device index; -1 for the CPU.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config value (repeatable), e.g. --set train.lr=3e-4 --set viz.enabled=false.")
@click.option("--run-id", metavar="ID", default=None,
              help="Name of the run folder (letters, digits, '-', '_'); default: next number and the task.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and write nothing.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: when stderr is a terminal), otherwise one line per summary.")
def train(config: Path, cuda: int, overrides: tuple[str, ...], run_id: Optional[str], dry_run: bool,
          progress: Optional[bool]) -> None:
    """Train a DNC on the task in CONFIG (a YAML file, see configs/)."""
    cfg = load_config(config, overrides)
    device = pick_device(cuda)
    try:  # the DNC's own checks, before any folder is made
        build_model(cfg, torch.device("cpu"))
    except ValueError as e:
        raise ConfigError(f"{config}: model: {e}") from None
    if run_id is not None:
        runs.validate_run_id(run_id)
        if (runs.experiments_root() / run_id).exists():
            raise runs.RunError(f"run {run_id!r} already exists in {runs.experiments_root()}/; choose another "
                                f"--run-id, or continue it with `dnclab resume {run_id}`")
    if dry_run:
        click.echo(f"# dry run: would train on {device} into {runs.experiments_root()}/{run_id or '<next id>'}/")
        click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)
        return
    run_dir = runs.create_run_dir(cfg.task.name, run_id)
    save_config(cfg, run_dir / "config.yaml")
    runs.write_status(run_dir, status="created", task=cfg.task.name, step=0, steps=cfg.train.steps, cuda=cuda,
                      source=str(config), overrides=list(overrides))
    click.echo(f"run {run_dir.name}: {run_dir}/")
    _run_training(run_dir, cfg, device, resume=False, progress=progress)


@main.command(context_settings=CONTEXT)
@click.argument("run")
@click.option("--cuda", type=click.IntRange(min=-1), default=None,
              help="CUDA device index; -1 for the CPU. Default: the device the run was started with.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Train until this step instead of train.steps (e.g. to extend a finished run).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Change a train.* or viz.* value from here on, e.g. --set train.target_ber=null "
                   "(model and task are fixed by the checkpoint).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def resume(run: str, cuda: Optional[int], steps: Optional[int], overrides: tuple[str, ...],
           progress: Optional[bool]) -> None:
    """Continue RUN (an id or a run folder) from its newest checkpoint, exactly where it left off."""
    run_dir = runs.resolve_run_dir(run)
    status = runs.read_status(run_dir)
    if runs.is_alive(status):
        raise runs.RunError(f"run {run_dir.name!r} is still running (pid {status['pid']}); stop it first")
    for item in overrides:
        if parse_override(item)[0] not in ("train", "viz"):
            raise runs.RunError(f"--set {item}: only train.* and viz.* values can change when resuming; "
                                f"model and task are fixed by the checkpoint")
    if steps is not None:
        overrides += (f"train.steps={steps}",)
    config_path = run_dir / "config.yaml"
    try:
        raw = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise runs.RunError(f"{config_path}: cannot read the run's config: {e}") from None
    cfg = config_from_dict(raw, source=str(config_path), overrides=overrides)
    checkpoints = runs.list_checkpoints(run_dir)
    if not checkpoints:
        raise runs.RunError(f"run {run_dir.name!r} has no checkpoint to resume from; start it again with "
                            f"`dnclab train`")
    last_step = checkpoints[-1][0]
    if last_step >= cfg.train.steps:
        raise runs.RunError(f"run {run_dir.name!r} already reached step {last_step} of {cfg.train.steps}; "
                            f"use --steps N (N > {last_step}) to train it longer")
    if status.get("status") == "reached_target" and not any(o.startswith("train.target_ber=") for o in overrides):
        raise runs.RunError(f"run {run_dir.name!r} stopped at its target BER (train.target_ber = "
                            f"{cfg.train.target_ber}); to train further, lower it or turn it off with "
                            f"--set train.target_ber=null")
    cuda = status.get("cuda", -1) if cuda is None else cuda
    device = pick_device(cuda)
    # Before anything is written: the checkpoint must fit the (possibly edited) config.
    runs.check_resumable(run_dir, runs.load_checkpoint(run_dir), cfg.to_dict())
    if overrides:
        save_config(cfg, config_path)
    runs.write_status(run_dir, cuda=cuda, steps=cfg.train.steps)
    _run_training(run_dir, cfg, device, resume=True, progress=progress)


def _run_training(run_dir: Path, cfg, device, resume: bool, progress: Optional[bool]) -> None:
    try:
        result = training.train(run_dir, cfg, device, resume=resume, progress=progress, echo=click.echo)
    except TrainingError as e:
        raise click.ClickException(str(e)) from None
    except runs.RunError:  # e.g. a checkpoint that does not fit the config: refused, nothing changed
        raise
    except Exception as e:
        runs.write_status(run_dir, status="failed", message=f"{type(e).__name__}: {e}")
        raise
    last = result.last or {}
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    summary = f"loss {fmt(last.get('loss'))}, BER {fmt(last.get('ber'))}" if last else "no summary yet"
    click.echo(f"{run_dir.name}: {result.message} ({summary})")
    if result.eval and "length" in result.eval[0]:
        click.echo("BER per length: " + ", ".join(f"{r['length']}: {r['ber']:.4f}" for r in result.eval))
    elif result.eval:  # bAbI: its validation split
        click.echo("validation error per task: " + ", ".join(f"{r['task']}: {r['error']:.4f}" for r in result.eval))
    if result.status in ("interrupted", "max_seconds"):
        click.echo(f"checkpoint saved at step {result.step}; continue with `dnclab resume {run_dir.name}`")
    if result.signal is not None:
        sys.exit(128 + result.signal)


@main.command("runs", context_settings=CONTEXT)
@click.argument("sweep", required=False)
def runs_command(sweep: Optional[str]) -> None:
    """List the runs in the experiments folder ($DNCLAB_EXPERIMENTS, default experiments/), a sweep's
    trials as SWEEP/TRIAL; with SWEEP, only that sweep's trials."""
    if sweep is not None and not (runs.experiments_root() / sweep / runs.SWEEP_FILE).is_file():
        sweeps = [p.name for p in runs.list_sweeps()]
        raise runs.RunNotFound(f"no sweep {sweep!r} in {runs.experiments_root()}/; "
                               + (f"sweeps there: {', '.join(sweeps[-5:])}" if sweeps else "there are no sweeps"))
    folders = runs.list_runs(sweep=sweep)
    if not folders:
        click.echo(f"no runs in {runs.experiments_root()}/")
        return
    header = ("ID", "TASK", "STEP", "STATUS", "LOSS", "BER", "EVAL BER", "UPDATED")
    rows = []
    for folder in folders:
        s = runs.read_status(folder)
        status = s.get("status", "?")
        if status == "running" and not runs.is_alive(s):
            status = "dead" if s.get("host") == socket.gethostname() else "running?"
        last = s.get("last") or {}
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        rows.append((runs.run_id(folder), s.get("task", "?"), f"{s.get('step', 0)}/{s.get('steps', '?')}", status,
                     fmt(last.get("loss")), fmt(last.get("ber")), fmt(s.get("eval_ber")), s.get("updated", "-")))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())


@main.command("eval", context_settings=CONTEXT)
@click.option("--run", "run_ids", required=True, multiple=True, metavar="ID",
              help="Run id or run folder; repeat it to compare runs on one plot (--run A --run B).")
@click.option("--lengths", default=None, metavar="LIST",
              help="Lengths to test, e.g. 1-8,16,32, in each task's own unit (copy: vectors; associative "
                   "recall: items; key-value: pairs; ...). Default: the trained lengths and twice the longest.")
@click.option("--batch-size", type=click.IntRange(min=1), default=200,
              help="Sequences per length (bAbI: stories per batch).")
@click.option("--seed", type=click.IntRange(min=0), default=1234, help="Seed of the test sequences.")
@click.option("--checkpoint", default=None, metavar="STEP",
              help="Checkpoint step (default: the newest; one --run only).")
@click.option("--cuda", type=click.IntRange(min=-1), default=-1, help="CUDA device index; -1 for the CPU.")
@click.option("--split", type=click.Choice(["test", "validation"]), default="test",
              help="bAbI only: the split to evaluate (validation: the held-out training stories).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG of error against length  [default: <run>/generalisation.png; with several runs "
                   "<first run>/generalisation-<A>+<B>.png]")
@click.option("--visdom/--no-visdom", default=None,
              help="Also draw the plot in the first run's Visdom env  [default: if its viz.enabled]")
@click.option("--modes", "mode_sequences", type=click.IntRange(min=0), default=0, metavar="N",
              help="Also give the read heads' mean backward / forward / content mode weight over the answer "
                   "steps of N sequences per length (forward ≈ 1: answers read along the temporal links)")
def eval_command(run_ids: tuple[str, ...], lengths: Optional[str], batch_size: int, seed: int,
                 checkpoint: Optional[str], cuda: int, split: str, plot_path: Optional[Path],
                 visdom: Optional[bool], mode_sequences: int) -> None:
    """Error per sequence length (how runs generalise beyond their training lengths), with a plot;
    for bAbI, the per-task error on the test set."""
    if checkpoint is not None and len(run_ids) > 1:
        raise click.BadParameter("one checkpoint step cannot apply to several runs; give one --run",
                                 param_hint="--checkpoint")
    if lengths is not None:
        try:
            parse_lengths(lengths)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--lengths") from None
    device = pick_device(cuda)
    curves, meanings, length_runs = [], set(), []
    for run in run_ids:
        run_dir = runs.resolve_run_dir(run)
        cfg = load_config(run_dir / "config.yaml")
        task = make_task(cfg.task, device)
        if getattr(task, "length_meaning", "") is None:
            if lengths is not None:
                raise click.BadParameter(f"--lengths does not apply to task {cfg.task.name!r} (run {run_dir.name}): "
                                         f"its sequences have their own lengths", param_hint="--lengths")
            _eval_on_split(run_dir, task, checkpoint, device, split, batch_size)
            continue
        curves.append(_eval_lengths(run_dir, cfg, task, lengths, checkpoint, device, batch_size, seed,
                                    mode_sequences))
        meanings.add(getattr(task, "length_meaning", None))
        length_runs.append(run_dir)
    if curves:
        _show_generalisation(length_runs, curves, meanings.pop() if len(meanings) == 1 else None,
                             plot_path, visdom)


def _load_for_eval(run_dir: Path, checkpoint: Optional[str], device):
    """(model in eval mode, the checkpoint's step)."""
    model, _ = runs.load_run(run_dir, checkpoint=checkpoint, device=device)
    path = runs.checkpoint_path(run_dir, checkpoint) if checkpoint else runs.list_checkpoints(run_dir)[-1][1]
    match = runs.CHECKPOINT_RE.match(path.name)
    return model, int(match.group(1)) if match else path.name


def _append_eval(run_dir: Path, record: dict) -> None:
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **record}) + "\n")


def _eval_lengths(run_dir: Path, cfg, task, lengths: Optional[str], checkpoint, device, batch_size: int, seed: int,
                  mode_sequences: int = 0):
    """Print and record the BER per length of one run (and its answer-phase read modes from
    ``mode_sequences`` sequences per length, if > 0); its curve for the plot."""
    from dnc_lab.viz.generalisation import Curve

    if lengths is None:
        lengths = f"{cfg.task.min_length}-{cfg.task.max_length},{2 * cfg.task.max_length}"
    wanted = parse_lengths(lengths)
    model, step = _load_for_eval(run_dir, checkpoint, device)
    try:
        rows = evaluate(model, task, wanted, batch_size, seed, device)
    except ValueError as e:  # a length the task cannot make (e.g. more key-value pairs than keys)
        raise click.BadParameter(f"run {run_dir.name}: {e}", param_hint="--lengths") from None
    for r in rows if mode_sequences else ():
        r["read_modes"] = answer_read_modes(model, task, r["length"], mode_sequences, seed, device)
    trained = range(cfg.task.min_length, cfg.task.max_length + 1)
    click.echo(f"{runs.run_id(run_dir)} at step {step}: {batch_size} sequences per length, seed {seed}; "
               f"length = {task.length_meaning}"
               + (f"; read modes over the answer steps of {mode_sequences} sequences" if mode_sequences else ""))
    modes_header = f"  {'BACKWARD':>8}  {'FORWARD':>8}  {'CONTENT':>8}" if mode_sequences else ""
    click.echo(f"{'LENGTH':>6}  {'BER':>8}  {'LOSS':>8}{modes_header}")
    for r in rows:
        note = "" if r["length"] in trained else "  (longer than trained)" if r["length"] > cfg.task.max_length \
            else "  (shorter than trained)"
        modes = "".join(f"  {r['read_modes'][k]:>8.3f}" for k in ("backward", "forward", "content")) \
            if mode_sequences else ""
        click.echo(f"{r['length']:>6}  {r['ber']:>8.4f}  {r['loss']:>8.4f}{modes}{note}")
    _append_eval(run_dir, {"step": step, "seed": seed, "batch_size": batch_size, "rows": rows,
                           **({"mode_sequences": mode_sequences} if mode_sequences else {})})
    return Curve(run_dir.name, step, [r["length"] for r in rows], [r["ber"] for r in rows],
                 (cfg.task.min_length, cfg.task.max_length))


def _eval_on_split(run_dir: Path, task, checkpoint, device, split: str, batch_size: int) -> None:
    """A task with its own test data (bAbI): the DNC paper's per-task error, mean and failed tasks."""
    model, step = _load_for_eval(run_dir, checkpoint, device)
    report = task.evaluate(model, split, batch_size)
    questions = sum(t.questions for t in report.per_task)
    click.echo(f"{run_dir.name} at step {step}: {split} split, {len(report.per_task)} tasks, {questions} questions "
               f"(a question is right only if every answer word is)")
    click.echo(f"{'TASK':>4}  {'QUESTIONS':>9}  {'ERROR':>7}")
    for t in report.per_task:
        mark = "  failed" if t.task in report.failed else ""
        click.echo(f"{t.task:>4}  {t.questions:>9}  {100 * t.error:>6.1f}%{mark}")
    failed = ", ".join(map(str, report.failed)) or "none"
    click.echo(f"mean error {100 * report.mean_error:.1f}%; failed tasks (error > 5%): "
               f"{len(report.failed)} of {len(report.per_task)} ({failed})")
    _append_eval(run_dir, {"step": step, "split": split, "mean_error": report.mean_error, "failed": report.failed,
                           "per_task": [{"task": t.task, "questions": t.questions, "error": t.error}
                                        for t in report.per_task]})


def _show_generalisation(run_dirs: list[Path], curves: list, meaning: Optional[str], plot_path: Optional[Path],
                         visdom: Optional[bool]) -> None:
    """The PNG, the event in the first run's event log, and (if asked) its Visdom window."""
    from dnc_lab.viz.client import VisdomConnection, VisdomUnavailable
    from dnc_lab.viz.eventlog import LOG_NAME, EventLog
    from dnc_lab.viz.generalisation import generalisation_event, generalisation_figure, write_png
    from dnc_lab.viz.replay import default_env, run_viz_settings

    first = run_dirs[0]
    event = generalisation_event(curves, "BER", meaning)
    if plot_path is None:
        name = "generalisation" if len(curves) == 1 else "generalisation-" + "+".join(c.run for c in curves)
        plot_path = first / f"{name}.png"
    click.echo(f"plot: {write_png(event, plot_path)}")
    log = EventLog(first / LOG_NAME)
    try:
        log.write(event)
    finally:
        log.close()
    settings = run_viz_settings(first)
    if not (settings.get("enabled", True) if visdom is None else visdom):
        return
    env = default_env(first)
    connection = VisdomConnection(settings.get("server") or "http://localhost", int(settings.get("port") or 8097),
                                  timeout_s=float(settings.get("timeout_s") or 2.0))
    try:
        connection.open_env(env)
        for endpoint, body in generalisation_figure(env, event):
            connection.post(endpoint, body)
        click.echo(f"Visdom: window 'generalisation' in env '{env}' at {connection.url}")
    except VisdomUnavailable as e:
        click.echo(f"Visdom: no server answers at {connection.url} ({e}); the figure is in {first / LOG_NAME}, "
                   f"`dnclab viz --run {first.name}` draws it later")
    finally:
        connection.close()


@main.command(context_settings=CONTEXT)
@click.argument("sweep_file", required=False, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config value in every trial (repeatable), e.g. --set train.steps=200.")
@click.option("--sweep-id", metavar="ID", default=None,
              help="Name of the sweep folder (letters, digits, '-', '_'); default: next number and the file's name.")
@click.option("--resume", "resume_id", metavar="SWEEP_ID", default=None,
              help="Continue this sweep: run its trials that are not done (from their checkpoints).")
@click.option("--address", default=None, metavar="HOST:PORT",
              help="Ray cluster to join (or 'auto'); default: $RAY_ADDRESS, else a local Ray started here.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="Trials at once (overrides the sweep file's max_concurrent).")
@click.option("--cpus", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs per trial (overrides the sweep file's resources.cpus).")
@click.option("--gpus", type=click.FloatRange(min=0), default=None,
              help="GPUs per trial, a fraction to share one (overrides the sweep file's resources.gpus).")
@click.option("--dry-run", is_flag=True, help="List the trials and their values, and write nothing.")
def sweep(sweep_file: Optional[Path], overrides: tuple[str, ...], sweep_id: Optional[str], resume_id: Optional[str],
          address: Optional[str], max_concurrent: Optional[int], cpus: Optional[float], gpus: Optional[float],
          dry_run: bool) -> None:
    """Run a seed / hyper-parameter sweep (SWEEP_FILE, see configs/sweeps/) on Ray Tune, each trial
    an ordinary run folder experiments/<sweep>/<trial>/."""
    from dnc_lab import sweep as sweeps

    if (sweep_file is None) == (resume_id is None):
        raise click.UsageError("give a sweep file, or --resume SWEEP_ID (not both)")
    if resume_id is not None:
        if overrides or sweep_id:
            raise click.UsageError("--resume continues a sweep as it was made: --set and --sweep-id do not apply")
        sweep_dir = runs.resolve_sweep_dir(resume_id)
    else:
        spec, trials = sweeps.load_sweep(sweep_file, overrides)
        if sweep_id is not None and (runs.experiments_root() / runs.validate_run_id(sweep_id)).exists():
            raise runs.RunError(f"{sweep_id!r} already exists in {runs.experiments_root()}/; choose another "
                                f"--sweep-id, or continue it with `dnclab sweep --resume {sweep_id}`")
        if dry_run:
            click.echo(f"# dry run: {len(trials)} trials into {runs.experiments_root()}/{sweep_id or '<next id>'}/")
            for t in trials:
                click.echo(f"{t.id}: " + " ".join(t.overrides))
            return
        sweep_dir = sweeps.create_sweep(spec, trials, overrides, sweep_id)
        click.echo(f"sweep {sweep_dir.name}: {sweep_dir}/ ({len(trials)} trials)")
    outcome = sweeps.run_sweep(sweep_dir, address=address, max_concurrent=max_concurrent, cpus=cpus, gpus=gpus,
                               echo=click.echo)
    if outcome.counts.get("failed"):
        sys.exit(1)


@main.command("sweep-report", context_settings=CONTEXT)
@click.argument("sweep_id")
@click.option("--solved-ber", type=click.FloatRange(min=0, max=1), default=0.001,
              help="A trial is solved once a summary's training BER is at most this (when its config has no "
                   "train.target_ber).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
def sweep_report(sweep_id: str, solved_ber: float, no_plots: bool) -> None:
    """Per configuration over seeds: final and eval BER, steps and seconds to the target, solved and
    failed counts; as a table, and report.csv / trials.csv / report.json / curves.png / eval_ber.png in
    the sweep folder."""
    from dnc_lab.sweep_report import write_report

    sweep_dir = runs.resolve_sweep_dir(sweep_id)
    report = write_report(sweep_dir, solved_ber=solved_ber, plots=not no_plots)
    click.echo(report.text)
    click.echo("written: " + ", ".join(str(p) for p in report.files))


main.add_command(viz)
main.add_command(server)


if __name__ == "__main__":
    main()
