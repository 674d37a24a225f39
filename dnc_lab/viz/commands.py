"""Click commands `dnclab viz` (replay a run into Visdom) and `dnclab server` (start Visdom).

cli.py adds both to the `dnclab` group. Each parses its options and calls one function.
"""

from __future__ import annotations

import click

from dnc_lab.viz.server import is_loopback


@click.command()
@click.option("--run", "run", required=True, metavar="ID",
              help="Run id (a folder under the experiments root; SWEEP/TRIAL for a sweep's trial), path "
                   "to a run folder, or a sweep id (its trials' curves overlaid).")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Visdom server port  [default: the run's viz.port, else 8097]")
@click.option("--server", "server_url", default=None, metavar="URL",
              help="Visdom server  [default: the run's viz.server, else http://localhost]")
@click.option("--env", default=None, metavar="NAME",
              help="Visdom env to draw into  [default: the run's env: its id, `_` -> `-`]")
@click.option("--step", type=click.IntRange(min=0), default=None,
              help="Show the memory snapshot at this step (the last one at or before it) "
                   "[default: the last]")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds to wait for each answer from the server.")
@click.option("--length", type=click.IntRange(min=1), default=None,
              help="Instead of the log: trace the run's newest checkpoint on one fresh sequence of this "
                   "length (the task's unit, as in `dnclab eval`) and draw its memory windows into env "
                   "<run env>-length<L>, e.g. to watch a copy read along the links past its trained lengths.")
@click.option("--seed", type=click.IntRange(min=0), default=1234, show_default=True,
              help="With --length: the seed of the sequence (the same rule as `dnclab eval --seed`).")
def viz(run, port, server_url, env, step, timeout, length, seed):
    """Replay a run's dashboard (finished or still running) into Visdom.

    Redraws every window from the run's event log (visdom.jsonl); replaying again gives the
    same windows, not duplicates. With --length, draws the memory windows of the trained model
    on a fresh sequence of that length instead.
    """
    from dnc_lab.runs import SWEEP_FILE, experiments_root, resolve_run_dir
    from dnc_lab.viz.client import VisdomUnavailable, server_url as make_url
    from dnc_lab.viz.replay import ReplayError, replay, run_viz_settings, show_length

    sweep_dir = experiments_root() / run
    # A sweep's folder has the sweep's dashboard (every trial's curves); its trials are runs.
    run_dir = sweep_dir if (sweep_dir / SWEEP_FILE).is_file() else resolve_run_dir(run)
    settings = run_viz_settings(run_dir)
    port = port or int(settings.get("port") or 8097)
    server_url = server_url or settings.get("server") or "http://localhost"
    if length is not None and step is not None:
        raise click.BadParameter("--step picks a logged snapshot; --length traces the newest checkpoint: "
                                 "give one of them", param_hint="--step")
    try:
        if length is not None:
            result = show_length(run_dir, length, seed, env=env, server=server_url, port=port, timeout_s=timeout)
            click.echo(f"Traced {run_dir.name} (checkpoint of step {result.snapshot_step}) on one sequence of "
                       f"length {length}, seed {seed}, into env '{result.env}': {len(result.windows)} windows.")
            click.echo(f"Open {result.url}/env/{result.env}")
            return
        result = replay(run_dir, env=env, server=server_url, port=port, timeout_s=timeout,
                        step=step)
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from exc
    except VisdomUnavailable as exc:
        raise click.ClickException(
            f"no Visdom server answers at {make_url(server_url, port)} ({exc}). Start one in "
            f"another terminal with `dnclab server --port {port}`, then run this again."
        ) from exc
    shown = f"memory snapshot of step {result.snapshot_step}" \
        if result.snapshot_step is not None else "no memory snapshot yet"
    click.echo(f"Replayed {result.events} events of {run_dir.name} into env '{result.env}': "
               f"{len(result.windows)} windows, {shown}.")
    click.echo(f"Open {result.url}/env/{result.env}")


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=8097, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback (e.g. 0.0.0.0) makes the "
                   "dashboard reachable from other machines: consider --enable-login.")
@click.option("--env-path", type=click.Path(file_okay=False), default=None,
              help="Folder where Visdom saves envs  [default: Visdom's, ~/.visdom]")
@click.option("--base-url", default="", help="Serve under this path prefix, e.g. /visdom.")
@click.option("--enable-login", is_flag=True,
              help="Require a username and password: asked for at start, or read from "
                   "VISDOM_USERNAME / VISDOM_PASSWORD (and VISDOM_COOKIE) when "
                   "VISDOM_USE_ENV_CREDENTIALS=1. Clients then need VISDOM_USERNAME and "
                   "VISDOM_PASSWORD set too.")
@click.option("--force-new-cookie", is_flag=True,
              help="With --enable-login: make a new cookie secret (logs everyone out).")
@click.option("--readonly", is_flag=True, help="Start in read-only mode.")
def server(port, host, env_path, base_url, enable_login, force_new_cookie, readonly):
    """Start a Visdom server (loopback only by default) for live dashboards.

    Installs Visdom's JavaScript from npm packages first if it is missing; never downloads
    from a CDN.
    """
    from dnc_lab.viz.server import ServerError, serve

    if not is_loopback(host) and not enable_login:
        click.echo(f"warning: listening on {host} without --enable-login: anyone who can reach "
                   "this machine can see and change the dashboards.", err=True)
    try:
        serve(port=port, host=host, env_path=env_path, base_url=base_url,
              enable_login=enable_login, force_new_cookie=force_new_cookie, readonly=readonly)
    except ServerError as exc:
        raise click.ClickException(str(exc)) from exc
