"""Talking to a Visdom server over HTTP, with every request bounded by a timeout.

Visdom's own client (`visdom.Visdom`) posts without a timeout, so a server that accepts a
connection but never answers blocks it forever. We build message bodies with Visdom's client
(see `figures`) and post them here, the same way (`POST <server>:<port>/<endpoint>`, body =
JSON text), with `timeout=`.

A server started with `-enable_login` answers 400 to anyone not logged in: set VISDOM_USERNAME
and VISDOM_PASSWORD (the variables visdom's own server reads) and we log in first, as
Visdom's client does.
"""

from __future__ import annotations

import hashlib
import json
import os
from urllib.parse import urlsplit

import requests


class VisdomUnavailable(ConnectionError):
    """The server did not answer (refused, timed out) or rejected a request; the message says
    which, without the URL (callers name the server)."""


def server_url(server: str = "http://localhost", port: int = 8097, base_url: str = "") -> str:
    """`http://host:port[/base]` from Visdom-style settings (`server` may omit the scheme)."""
    parts = urlsplit(server if "://" in server else f"http://{server}")
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host  # IPv6 literal
    base = "" if base_url in ("", "/") else "/" + base_url.strip("/")
    return f"{parts.scheme or 'http'}://{host}:{int(port)}{base}"


class VisdomConnection:
    """Posts Visdom messages; raises VisdomUnavailable instead of hanging or printing."""

    def __init__(self, server: str = "http://localhost", port: int = 8097,
                 timeout_s: float = 2.0, base_url: str = "",
                 username: str | None = None, password: str | None = None):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.url = server_url(server, port, base_url)
        self.timeout_s = float(timeout_s)
        self.username = username if username is not None else os.environ.get("VISDOM_USERNAME")
        self.password = password if password is not None else os.environ.get("VISDOM_PASSWORD")
        self._session: requests.Session | None = None

    def _request(self, path: str, **kwargs) -> requests.Response:
        if self._session is None:
            session = requests.Session()
            if self.username and self.password:
                digest = hashlib.sha256(self.password.encode("utf-8")).hexdigest()
                self._post(session, self.url + "/", what="login (VISDOM_USERNAME / "
                           "VISDOM_PASSWORD)", json={"username": self.username, "password": digest})
            self._session = session  # logged in (when needed): keep it
        return self._post(self._session, f"{self.url}/{path}", **kwargs)

    def _post(self, session: requests.Session, url: str, what: str | None = None,
              **kwargs) -> requests.Response:
        try:
            response = session.post(url, timeout=self.timeout_s, **kwargs)
        except requests.Timeout as exc:
            raise VisdomUnavailable(f"no answer within {self.timeout_s:g} s") from exc
        except requests.ConnectionError as exc:
            raise VisdomUnavailable("connection refused or failed") from exc
        except requests.RequestException as exc:
            raise VisdomUnavailable(type(exc).__name__) from exc
        if response.status_code != 200:
            hint = " (login needed? set VISDOM_USERNAME and VISDOM_PASSWORD)" \
                if response.status_code == 400 and not self.username else ""
            raise VisdomUnavailable(
                f"{what or 'request'} answered HTTP {response.status_code}{hint}")
        return response

    def post(self, endpoint: str, body: dict) -> str:
        """Send one message (as built by `figures`); returns the server's answer text."""
        return self._request(endpoint, data=json.dumps(body)).text

    def open_env(self, env: str) -> None:
        """Make sure env exists on the server (what Visdom's client does on start); a cheap probe."""
        self.post(f"env/{env}", {"eid": env})

    def windows(self, env: str) -> dict[str, dict]:
        """Every window of env, as the server stores it: win name -> window (type, title,
        content ...). Uses the server's `win_data` endpoint."""
        return json.loads(self.post("win_data", {"eid": env, "win": None}))

    def envs(self) -> list[str]:
        return json.loads(self.post("env_state", {}))

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
