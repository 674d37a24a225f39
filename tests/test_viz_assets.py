"""Visdom's assets from npm tarballs: URL mapping, install (offline once cached), server start."""

import sys

import pytest
import visdom

from dnc_lab.viz import assets
from viz_fixtures import free_port, start_visdom, stop


@pytest.mark.parametrize("url, spec, path", [
    ("https://unpkg.com/jquery@3.1.1/dist/jquery.min.js", "jquery@3.1.1", "dist/jquery.min.js"),
    ("https://unpkg.com/bootstrap@3.3.7/dist/fonts/glyphicons-halflings-regular.svg"
     "#glyphicons_halflingsregular", "bootstrap@3.3.7", "dist/fonts/glyphicons-halflings-regular.svg"),
    ("https://unpkg.com/classnames@2.2.5", "classnames@2.2.5", ""),
    ("https://cdn.plot.ly/plotly-2.11.1.min.js", "plotly.js-dist-min@2.11.1", "plotly.min.js"),
    ("http://d3js.org/d3.v3.min.js", "d3@3.5.17", "d3.min.js"),
    ("https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.5/MathJax.js?config=TeX-AMS-MML_HTMLorMML",
     "mathjax@2.7.5", "MathJax.js"),
    ("https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.5/jax/output/SVG/jax.js?V=2.7.5",
     "mathjax@2.7.5", "jax/output/SVG/jax.js"),
])
def test_each_visdom_url_maps_to_a_file_in_an_npm_package(url, spec, path):
    assert assets.npm_file_for_url(url) == assets.NpmFile(spec, path)


def test_an_unknown_url_is_a_clear_error():
    with pytest.raises(assets.AssetError, match="visdom 0.2.4"):
        assets.npm_file_for_url("https://example.invalid/some/file.js")


def test_installed_assets_are_complete_and_real(visdom_assets):
    assert visdom_assets.ok, visdom_assets
    static = visdom_assets.static_dir
    expected = assets.expected_files()
    assert len(expected) == 29  # what visdom 0.2.4's download_scripts asks for
    assert (static / "version.built").read_text().strip() == visdom.__version__
    assert (static / "js/jquery.min.js").read_bytes().startswith(b"/*! jQuery v3.1.1")
    assert b"Plotly" in (static / "js/plotly-plotly.min.js").read_bytes()[:20000]
    assert (static / "js/mathjax/2.7.5/MathJax.js").stat().st_size > 10_000


def test_install_is_idempotent_and_works_offline_from_the_cache(visdom_assets, tmp_path):
    # The session fixture (or `make setup`) filled the tarball cache; from there a fresh install
    # needs no npm at all, and a second run finds everything in place and writes nothing.
    fresh = tmp_path / "visdom"
    first = assets.install(install_dir=fresh, npm=str(tmp_path / "no-npm-here"), quiet=True)
    assert first.ok and first.written == 29 and first.packed == ()
    assert sorted(str(p.relative_to(fresh / "static")) for p in (fresh / "static").rglob("*")
                  if p.is_file() and p.name != "version.built") == assets.expected_files()
    again = assets.install(install_dir=fresh, npm=str(tmp_path / "no-npm-here"), quiet=True)
    assert again.ok and again.written == 0


def test_a_package_npm_cannot_provide_is_named(tmp_path):
    with pytest.raises(assets.AssetError, match=r"jquery@3\.1\.1.*not installed"):
        assets.install(cache=tmp_path / "empty-cache", npm=str(tmp_path / "no-npm-here"),
                       install_dir=tmp_path / "visdom", quiet=True)
    assert not (tmp_path / "visdom/static/version.built").exists()


def test_visdoms_own_server_starts_offline_after_install(visdom_assets, tmp_path):
    # `python -m visdom.server` runs download_scripts first: with everything installed it must
    # fetch nothing (no "while downloading" errors) and come up.
    port = free_port()
    log = tmp_path / "visdom.log"
    process = start_visdom([sys.executable, "-m", "visdom.server", "-port", str(port),
                            "-env_path", str(tmp_path / "envs"), "-bind_local"], port, log)
    stop(process)
    text = log.read_text()
    assert "It's Alive!" in text
    assert "Downloading scripts" not in text and "while downloading" not in text


@pytest.mark.parametrize("url, spec, path", [
    ("https://unpkg.com/react-grid-layout@2.2.3/css/styles.css", "react-grid-layout@2.2.3", "css/styles.css"),
    ("https://unpkg.com/react-resizable@3.1.3/css/styles.css", "react-resizable@3.1.3", "css/styles.css"),
    ("https://cdnjs.cloudflare.com/ajax/libs/mathjax/3.2.2/es5/tex-mml-svg.js", "mathjax@3.2.2", "es5/tex-mml-svg.js"),
    ("https://d3js.org/d3.v3.min.js", "d3@3.5.17", "d3.min.js"),
])
def test_urls_that_only_visdom_0_3_asks_for_map_to_npm_files(url, spec, path):
    """visdom 0.3.0 (Python >= 3.12) changed these URLs of its download_scripts()."""
    assert assets.npm_file_for_url(url) == assets.NpmFile(spec, path)


def test_the_visdom_release_is_the_one_pyproject_allows_for_this_python():
    """0.2.4 below Python 3.12 (the dashboard tests here run against it); 0.2.4 or 0.3.x from 3.12 on,
    where these same tests then run against whichever is installed (`make gpu-check` installs 0.3.0)."""
    version = visdom.__version__
    if sys.version_info < (3, 12):
        assert version == "0.2.4"
    else:
        assert version == "0.2.4" or version.startswith("0.3."), version
