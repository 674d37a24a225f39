"""Visdom's JavaScript, CSS and fonts, installed from npm packages instead of public CDNs.

At its first start Visdom's server calls `visdom.server.build.download_scripts()`, which fetches
about thirty files from public CDNs into `<visdom package>/static/`. Offline (air-gapped
clusters, this project's CI) those fetches fail and the server exits. Every one of those files is
also published in an npm package, and the npm registry is reachable wherever `npm` works.

`install()` therefore runs Visdom's own `download_scripts()` with its two ways of fetching a URL
(urllib's opener and `requests.get`) replaced by a look-up in npm tarballs (`npm pack
NAME@VERSION`, cached under `cache_dir()`). Visdom thus writes its own file names and its own
`version.built` stamp, and later starts find everything in place and fetch nothing.

    python -m dnc_lab.viz.assets install     # what `make setup` runs; idempotent
    python -m dnc_lab.viz.assets status      # lists what is missing, exit 1 if anything is

The files go into site-packages, so `install` must run again after (re)installing visdom; the
cached tarballs make that fast and offline.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator
from unittest import mock
from urllib.parse import urlsplit


class AssetError(RuntimeError):
    """An asset could not be provided; the message names the npm package and file."""


@dataclass(frozen=True)
class NpmFile:
    """One file inside one npm package: `spec` is `name@version`, `path` is relative to the
    package root (npm tarballs store it under `package/`)."""

    spec: str
    path: str


# Files Visdom fetches from places that are not `<name>@<version>/<path>` URLs, keyed by the last
# part of the URL path. The versions are the ones Visdom 0.2.4 asks for.
_BY_FILE_NAME = {
    "plotly-2.11.1.min.js": NpmFile("plotly.js-dist-min@2.11.1", "plotly.min.js"),
    "d3.v3.min.js": NpmFile("d3@3.5.17", "d3.min.js"),
    "d3-selection-multi.v1.js": NpmFile("d3-selection-multi@1.0.1", "build/d3-selection-multi.js"),
}
# MathJax is fetched from a CDN path `.../mathjax/<version>/<path inside the package>`.
_MATHJAX = re.compile(r"/mathjax/(?P<version>[0-9.]+)/(?P<path>.+)$")
# Most files come from URLs shaped `/<name>@<version>[/<path>]`.
_NAME_AT_VERSION = re.compile(r"^/(?P<name>(@[^/]+/)?[^/@]+)@(?P<version>[^/]+)(/(?P<path>.*))?$")


def npm_file_for_url(url: str) -> NpmFile:
    """The npm package file that holds the same bytes as `url` (one of Visdom's CDN URLs).

    Query strings (`?V=2.7.5`) and fragments (`#glyphicons_halflingsregular`) are not part of the
    file. A URL naming a package without a path means the package's main file; `path` is then
    empty and resolved from package.json when the tarball is read.
    """
    parts = urlsplit(url)
    url_path = parts.path
    name = url_path.rsplit("/", 1)[-1]
    if name in _BY_FILE_NAME:
        return _BY_FILE_NAME[name]
    match = _MATHJAX.search(url_path)
    if match:
        return NpmFile(f"mathjax@{match['version']}", match["path"])
    match = _NAME_AT_VERSION.match(url_path)
    if match:
        return NpmFile(f"{match['name']}@{match['version']}", match["path"] or "")
    raise AssetError(
        f"visdom asks for {url}, which dnc_lab does not know how to find in an npm package; "
        "this visdom version is not supported by dnc_lab.viz.assets (expected visdom 0.2.4)"
    )


def cache_dir() -> Path:
    """Where npm tarballs are kept: $DNCLAB_CACHE/visdom-npm, else $XDG_CACHE_HOME/dnc_lab/
    visdom-npm, else ~/.cache/dnc_lab/visdom-npm."""
    if os.environ.get("DNCLAB_CACHE"):
        return Path(os.environ["DNCLAB_CACHE"]) / "visdom-npm"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dnc_lab" / "visdom-npm"


def _tarball_name(spec: str) -> str:
    """npm pack's file name for `name@version`: `@scope/name` becomes `scope-name`."""
    name, version = spec.rsplit("@", 1)
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


class NpmTarballs:
    """Reads files out of npm package tarballs, packing each package once into `cache`."""

    def __init__(self, cache: Path, npm: str = "npm"):
        self.cache = cache
        self.npm = npm
        self._open: dict[str, tarfile.TarFile] = {}
        self.packed: list[str] = []  # specs fetched with npm during this run (not from cache)

    def tarball(self, spec: str) -> Path:
        """Path of the cached tarball of `spec`, running `npm pack` if it is not cached yet."""
        path = self.cache / _tarball_name(spec)
        if path.is_file():
            return path
        if shutil.which(self.npm) is None:
            raise AssetError(
                f"npm package {spec} is needed for Visdom's offline assets, but the `{self.npm}` "
                "command is not installed (Debian: apt-get install npm)"
            )
        self.cache.mkdir(parents=True, exist_ok=True)
        # Pack into a scratch folder first so an interrupted run never leaves half a tarball
        # under the name the cache looks for.
        with tempfile.TemporaryDirectory(dir=self.cache) as scratch:
            proc = subprocess.run(
                [self.npm, "pack", spec, "--json", "--pack-destination", scratch],
                capture_output=True, text=True, cwd=scratch,
            )
            if proc.returncode != 0:
                detail = (proc.stderr or proc.stdout).strip().splitlines()
                raise AssetError(
                    f"`npm pack {spec}` failed (exit {proc.returncode}); Visdom's offline assets "
                    f"need this package. npm said: {' / '.join(detail[-3:]) or 'nothing'}"
                )
            packed = [p for p in Path(scratch).iterdir() if p.suffix == ".tgz"]
            if len(packed) != 1:
                raise AssetError(f"`npm pack {spec}` produced {len(packed)} tarballs, expected 1")
            os.replace(packed[0], path)
        self.packed.append(spec)
        return path

    def read(self, item: NpmFile) -> bytes:
        """The bytes of `item.path` inside package `item.spec`."""
        tar = self._open.get(item.spec)
        if tar is None:
            tar = self._open[item.spec] = tarfile.open(self.tarball(item.spec), "r:gz")
        path = item.path or self._main_file(tar, item.spec)
        try:
            member = tar.extractfile(f"package/{path}")
        except KeyError:
            member = None
        if member is None:
            raise AssetError(f"npm package {item.spec} has no file {path!r}")
        return member.read()

    @staticmethod
    def _main_file(tar: tarfile.TarFile, spec: str) -> str:
        """The package's main file (package.json `main`, default index.js), as a CDN serves it."""
        try:
            meta = json.load(tar.extractfile("package/package.json"))
        except (KeyError, TypeError, ValueError) as exc:
            raise AssetError(f"npm package {spec} has no readable package.json") from exc
        main = meta.get("main") or "index.js"
        main = main[2:] if main.startswith("./") else main
        return main if main.endswith(".js") else main + ".js"

    def close(self) -> None:
        for tar in self._open.values():
            tar.close()
        self._open.clear()


class _Response:
    """What download_scripts reads from a fetched URL: `.read()` (urllib) or `.content`
    (requests)."""

    def __init__(self, data: bytes):
        self.content = data
        self.status_code = 200

    def read(self) -> bytes:
        return self.content


class _Opener:
    """Stands in for urllib's opener: answers a Request from `fetch(url)`."""

    def __init__(self, fetch):
        self.fetch = fetch

    def open(self, req, *args, **kwargs):
        url = req.full_url if hasattr(req, "full_url") else str(req)
        return _Response(self.fetch(url))


@contextlib.contextmanager
def _visdom_fetches_from(fetch) -> Iterator[None]:
    """Within the block, visdom's download_scripts gets every URL's bytes from `fetch(url)`.

    It uses `urllib.request.build_opener(...).open(Request)` for most files and `requests.get`
    for MathJax; both are replaced only as seen from visdom.server.build (plus `requests.get`
    while the block runs). `install_opener` is made a no-op so urllib's global opener is never
    touched.
    """
    import requests
    from urllib import request as urllib_request

    import visdom.server.build as build

    fake_request = SimpleNamespace(
        Request=urllib_request.Request,
        ProxyHandler=urllib_request.ProxyHandler,
        BaseHandler=urllib_request.BaseHandler,
        build_opener=lambda *handlers: _Opener(fetch),
        install_opener=lambda opener: None,
    )
    with mock.patch.object(build, "request", fake_request), \
            mock.patch.object(requests, "get", lambda url, *a, **k: _Response(fetch(url))):
        yield


def visdom_dir() -> Path:
    """The installed visdom package folder; its static/ is the only place Visdom's server
    serves assets from."""
    from visdom.utils.shared_utils import get_visdom_path

    return Path(get_visdom_path())


def expected_files() -> list[str]:
    """Every file (relative to visdom's static/) that visdom's download_scripts would write.

    Found by running download_scripts against a scratch folder with every URL answering empty
    bytes, so the list always matches the installed visdom rather than a copy kept here.
    """
    import visdom.server.build as build

    with tempfile.TemporaryDirectory() as scratch:
        with _visdom_fetches_from(lambda url: b""), contextlib.redirect_stdout(io.StringIO()):
            build.download_scripts(install_dir=scratch)
        static = Path(scratch) / "static"
        return sorted(
            str(p.relative_to(static)) for p in static.rglob("*")
            if p.is_file() and p.name != "version.built"
        )


@dataclass
class Status:
    """What is installed: `missing` lists files (relative to static/) absent or empty;
    `built` says whether static/version.built names the installed visdom version."""

    static_dir: Path
    missing: list[str]
    built: bool
    written: int = 0         # files written by the install that returned this status
    packed: tuple = ()       # npm packages that install had to `npm pack` (not in the cache)

    @property
    def ok(self) -> bool:
        return self.built and not self.missing


def status(install_dir: Path | None = None) -> Status:
    """What is in `<install_dir>/static` (default: the installed visdom's)."""
    import visdom

    static = Path(install_dir or visdom_dir()) / "static"
    missing = [
        rel for rel in expected_files()
        if not (static / rel).is_file() or (static / rel).stat().st_size == 0
    ]
    stamp = static / "version.built"
    built = stamp.is_file() and stamp.read_text().strip() == visdom.__version__
    return Status(static, missing, built)


def install(cache: Path | None = None, npm: str = "npm", quiet: bool = False,
            install_dir: Path | None = None) -> Status:
    """Put every file Visdom's server needs into its static/ folder, from npm tarballs.

    Idempotent: when visdom's `version.built` stamp is current and every file is there, visdom's
    own check skips all fetching and nothing is read. Raises AssetError naming the npm package
    (and file) that could not be had. `install_dir` (default: the visdom package folder) is
    where visdom's download_scripts puts static/.
    """
    import visdom.server.build as build

    tarballs = NpmTarballs(cache or cache_dir(), npm=npm)
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        item = npm_file_for_url(url)
        fetched.append(f"{item.spec}/{item.path or '<main>'}")
        return tarballs.read(item)

    sink = io.StringIO() if quiet else sys.stdout
    try:
        with _visdom_fetches_from(fetch), contextlib.redirect_stdout(sink):
            build.download_scripts(install_dir=str(install_dir or visdom_dir()))
    finally:
        tarballs.close()
    result = status(install_dir)
    result.written, result.packed = len(fetched), tuple(tarballs.packed)
    if not result.ok:
        raise AssetError(
            "visdom's assets are still incomplete after installing from npm tarballs; missing: "
            + (", ".join(result.missing) or "static/version.built")
        )
    if not quiet:
        source = f"npm pack of {len(tarballs.packed)} package(s)" if tarballs.packed else "cache"
        what = f"{len(fetched)} file(s) written from {source}" if fetched else "already installed"
        print(f"Visdom assets: {what}; {result.static_dir}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dnc_lab.viz.assets",
        description="Install Visdom's JavaScript/CSS/fonts from npm packages (no CDN needed).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="fetch (npm pack, cached) and install every file")
    inst.add_argument("--cache", type=Path, default=None,
                      help=f"tarball cache folder (default: {cache_dir()})")
    sub.add_parser("status", help="list missing files; exit status 1 if any")
    args = parser.parse_args(argv)

    if args.command == "install":
        try:
            install(cache=args.cache)
        except AssetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    result = status()
    print(f"visdom static folder: {result.static_dir}")
    print(f"version.built current: {'yes' if result.built else 'no'}")
    if result.missing:
        print("missing: " + ", ".join(result.missing))
        print("run: python -m dnc_lab.viz.assets install")
        return 1
    print("all assets present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
