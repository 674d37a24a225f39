"""Headless Chromium opens the streamed run's Visdom env and finds every plot rendered."""

import re
import subprocess

import pytest

from viz_fixtures import ARTIFACTS, chromium_argv

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_browser_renders_every_window_of_a_streamed_run(streamed_run, visdom_server, chromium,
                                                        tmp_path):
    windows = visdom_server.connection().windows(streamed_run.env)
    heatmaps = [w for w, spec in windows.items()
                if spec["content"]["data"][0]["type"] == "heatmap"]
    url = f"http://127.0.0.1:{visdom_server.port}/env/{streamed_run.env}"

    dom = subprocess.run(chromium_argv(chromium, tmp_path / "profile-dom", "--dump-dom", url),
                         capture_output=True, text=True, timeout=120).stdout
    # Plotly draws every plot into <svg class="main-svg"> layers, each heatmap as a <g class="hm">
    # and each line trace with a path of class "js-line"; titles carry their raw text.
    titles = re.findall(r'class="gtitle"[^>]*data-unformatted="([^"]*)"', dom)
    assert len(titles) == len(windows), titles
    assert dom.count('class="main-svg"') >= 2 * len(windows)
    assert dom.count('class="hm"') == len(heatmaps) == 7
    assert dom.count('class="js-line"') >= 2 + 3 + 3  # loss, ber train+eval; 3 gates; 3 modes
    assert any("read weighting, head 0" in t for t in titles)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    subprocess.run(chromium_argv(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", url),
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 50_000  # a page of plots, not a blank one
