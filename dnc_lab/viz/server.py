"""Starts Visdom's server, on loopback unless told otherwise, with its assets installed offline.

    python -m dnc_lab.viz.server [--port 8097] [--host 127.0.0.1] [--env-path DIR] ...
    dnclab server ...                       (the same, through the CLI)

Runs visdom's own command-line entry (`visdom.server.run_server.main`, which handles the login
options) with two differences:
- it never downloads anything: the assets come from `dnc_lab.viz.assets` (npm tarballs);
- it binds exactly `--host`. Visdom itself binds either 127.0.0.1 (`-bind_local`) or every
  interface; here the default is loopback and any other address is an explicit choice.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import sys
from unittest import mock


class ServerError(RuntimeError):
    """The server could not start; the message says why and what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_assets() -> None:
    """Install Visdom's assets from npm (cached tarballs) if any is missing."""
    from dnc_lab.viz import assets

    if assets.status().ok:
        return
    print("Visdom's JavaScript is not installed yet; installing it from npm packages ...",
          flush=True)
    try:
        assets.install()
    except assets.AssetError as exc:
        raise ServerError(
            f"{exc}. Visdom cannot start without these files: run `make setup` (or `python -m "
            "dnc_lab.viz.assets install`) on a machine where npm can reach its registry."
        ) from exc


def visdom_argv(port: int, env_path: str | None = None, base_url: str = "",
                enable_login: bool = False, force_new_cookie: bool = False,
                readonly: bool = False, host: str = "127.0.0.1") -> list[str]:
    """Arguments for visdom's own server command (visdom 0.2.4 spells them with one dash)."""
    argv = ["visdom", "-port", str(int(port)), "--hostname", f"http://{host}"]
    if env_path is not None:
        argv += ["-env_path", str(env_path)]
    if base_url not in ("", "/"):
        argv += ["-base_url", "/" + base_url.strip("/")]
    if enable_login:
        argv.append("-enable_login")
    if force_new_cookie:
        argv.append("-force_new_cookie")
    if readonly:
        argv.append("-readonly")
    return argv


def serve(port: int = 8097, host: str = "127.0.0.1", env_path: str | None = None,
          base_url: str = "", enable_login: bool = False, force_new_cookie: bool = False,
          readonly: bool = False) -> None:
    """Run the server until interrupted. Raises ServerError when it cannot start."""
    if not 0 < int(port) < 65536:
        raise ServerError(f"port must be between 1 and 65535, got {port}")
    if force_new_cookie and not enable_login:
        raise ServerError("--force-new-cookie only applies together with --enable-login")
    ensure_assets()

    import visdom.server.app as visdom_app
    import visdom.server.run_server as run_server
    from visdom.server.defaults import DEFAULT_ENV_PATH

    if enable_login:
        # visdom keeps the login cookie secret in its default env folder whatever -env_path
        # says, and fails when that folder does not exist yet.
        os.makedirs(os.path.expanduser(DEFAULT_ENV_PATH), exist_ok=True)

    class BoundApplication(run_server.Application):
        """Visdom's app, listening on exactly `host` whatever visdom itself would choose."""

        def listen(self, port, address=None, **kwargs):
            return super().listen(port, address=host, **kwargs)

    scope = "loopback only" if is_loopback(host) else "REACHABLE FROM OTHER MACHINES"
    shown = f"[{host}]" if ":" in host else host
    base = "" if base_url in ("", "/") else "/" + base_url.strip("/")

    def announce(bound_port):
        print(f"Visdom server at http://{shown}:{bound_port}{base} ({scope}"
              f"{', login required' if enable_login else ''}); Ctrl-C stops it.", flush=True)

    argv = visdom_argv(port, env_path, base_url, enable_login, force_new_cookie, readonly, host)
    try:
        # visdom turns on tornado's debug mode, whose autoreload re-runs the process with
        # sys.argv whenever an imported source file changes; a server must not restart itself.
        with mock.patch.object(run_server, "Application", BoundApplication), \
                mock.patch.dict(visdom_app.tornado_settings, {"autoreload": False}), \
                mock.patch.object(sys, "argv", argv):
            run_server.main(print_func=announce)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ServerError(f"port {port} on {host} is already in use (a Visdom server "
                              f"running already? try http://{shown}:{port}), or pick "
                              "another with --port") from exc
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ServerError(f"cannot bind {host}: not an address of this machine") from exc
        raise
    except KeyboardInterrupt:
        print("Visdom server stopped.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dnc_lab.viz.server",
                                     description="Start a Visdom server (see module docstring).")
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default loopback; 0.0.0.0 = every interface)")
    parser.add_argument("--env-path", default=None, help="where Visdom saves envs")
    parser.add_argument("--base-url", default="")
    parser.add_argument("--enable-login", action="store_true")
    parser.add_argument("--force-new-cookie", action="store_true")
    parser.add_argument("--readonly", action="store_true")
    args = parser.parse_args(argv)
    try:
        serve(args.port, args.host, args.env_path, args.base_url, args.enable_login,
              args.force_new_cookie, args.readonly)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
