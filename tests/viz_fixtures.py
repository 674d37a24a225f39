"""Fixtures for the dashboard tests: a real Visdom server, servers that are not there, a real
DNC's memory views, a short real training run, and headless Chromium.

Loaded by tests/conftest.py (`pytest_plugins = ["viz_fixtures"]`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


def free_port() -> int:
    """A loopback TCP port nobody listens on (as of now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VisdomServer:
    port: int
    env_path: Path
    log: Path
    process: subprocess.Popen

    def connection(self, timeout_s: float = 10.0):
        from dnc_lab.viz.client import VisdomConnection

        return VisdomConnection("http://127.0.0.1", self.port, timeout_s=timeout_s)


@pytest.fixture(scope="session")
def visdom_assets():
    """Visdom's JavaScript installed (from npm tarballs; a no-op once `make setup` did it)."""
    from dnc_lab.viz import assets

    if not assets.status().ok:
        assets.install(quiet=True)
    return assets.status()


def start_visdom(argv: list[str], port: int, log: Path, wait_s: float = 60.0) -> subprocess.Popen:
    """Start a server process and wait until it answers on `port` (fails with its log if not)."""
    from dnc_lab.viz.client import VisdomConnection, VisdomUnavailable

    log_file = open(log, "w")
    process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    log_file.close()
    probe = VisdomConnection("http://127.0.0.1", port, timeout_s=2.0)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            probe.envs()
            return process
        except VisdomUnavailable:
            if process.poll() is not None or time.monotonic() > deadline:
                stop(process)
                pytest.fail(f"Visdom server did not start ({' '.join(argv)}):\n{log.read_text()}")
            time.sleep(0.2)
        finally:
            probe.close()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="session")
def visdom_server(tmp_path_factory, visdom_assets):
    """A real Visdom server on a free loopback port, started the way `dnclab server` starts it,
    saving envs under a temporary folder. Killed at the end of the session."""
    root = tmp_path_factory.mktemp("visdom")
    port = free_port()
    argv = [sys.executable, "-m", "dnc_lab.viz.server", "--port", str(port),
            "--env-path", str(root / "envs")]
    process = start_visdom(argv, port, root / "server.log")
    yield VisdomServer(port, root / "envs", root / "server.log", process)
    stop(process)


@pytest.fixture
def dead_port():
    """A loopback port with nothing listening: connections are refused at once."""
    return free_port()


@pytest.fixture
def hung_port():
    """A loopback port that accepts connections (the kernel completes the handshake for the
    listen backlog) but never reads or answers: Visdom's own client would wait forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


MODEL_DIMS = {"nr_cells": 12, "cell_size": 6, "read_heads": 2, "num_writes": 1}


@pytest.fixture(scope="session")
def dnc_sample():
    """Memory views of a real (untrained) DNC on a copy-like input of 9 steps:
    (views, inputs [T, 5], targets [T, 4], outputs [T, 4], mask [T])."""
    import torch

    from dnc_lab import DNC

    torch.manual_seed(0)
    d = MODEL_DIMS
    model = DNC(input_size=5, hidden_size=16, nr_cells=d["nr_cells"], cell_size=d["cell_size"],
                read_heads=d["read_heads"], num_writes=d["num_writes"], output_size=4)
    gen = torch.Generator().manual_seed(1)
    bits = (torch.rand(1, 4, 4, generator=gen) > 0.5).float()
    inputs = torch.zeros(1, 9, 5)
    inputs[0, :4, :4] = bits[0]
    inputs[0, 4, 4] = 1.0  # end marker
    targets = torch.zeros(1, 9, 4)
    targets[0, 5:] = bits[0]
    mask = torch.zeros(9)
    mask[5:] = 1.0
    with torch.no_grad():
        logits, _, views = model.trace(inputs)
    return (views, inputs[0].numpy(), targets[0].numpy(), torch.sigmoid(logits[0]).numpy(),
            mask.numpy())


def expected_windows(dims: dict, curves=("loss", "ber")) -> set[str]:
    """The window names the issue asks for, spelled out independently of dnc_lab.viz.figures."""
    names = set(curves) | {"memory", "usage", "gates", "read-modes", "io"}
    names |= {f"read-weights-{r}" for r in range(dims["read_heads"])}
    for h in range(dims["num_writes"]):
        names |= {f"write-weights-{h}", f"precedence-{h}", f"link-{h}"}
    return names


def run_cli(args: list[str]):
    """`dnclab ARGS` in this process (saves starting Python and torch again)."""
    from click.testing import CliRunner

    from dnc_lab.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


TINY_TRAIN = ["--set", "train.steps=4", "--set", "train.summarize_freq=2",
              "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4",
              "--set", "train.seed=3"]


@dataclass
class TrainedRun:
    run_id: str
    run_dir: Path
    env: str
    seconds: float


@pytest.fixture(scope="session")
def streamed_run(visdom_server, tmp_path_factory):
    """A short real copy run (`dnclab train configs/copy.yaml`) streaming to `visdom_server`."""
    root = tmp_path_factory.mktemp("experiments")
    mp = pytest.MonkeyPatch()
    mp.setenv("DNCLAB_EXPERIMENTS", str(root))
    try:
        start = time.monotonic()
        result = run_cli(["train", "configs/copy.yaml", *TINY_TRAIN,
                          "--set", f"viz.port={visdom_server.port}", "--run-id", "viz_stream"])
        seconds = time.monotonic() - start
        assert result.exit_code == 0, result.output
    finally:
        mp.undo()
    return TrainedRun("viz_stream", root / "viz_stream", "viz-stream", seconds)


@pytest.fixture(scope="session")
def chromium():
    """Path of headless-capable Chromium. Skips locally without it; in CI (CI set) a missing
    browser is a failure, since .ci/run installs it."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is not installed, but CI must run the browser tests "
                    "(.ci/run: apt-get install -y chromium)")
    pytest.skip("Chromium not installed (Debian: apt-get install chromium)")


def chromium_argv(binary: str, profile: Path, *extra: str) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            "--window-size=1600,1500", "--virtual-time-budget=15000", *extra]


def random_views(rng: np.random.Generator, steps: int, dims: dict) -> dict[str, np.ndarray]:
    """Views shaped like DNC.trace's, with random values (for queue/timing tests where the
    numbers do not matter)."""
    n, w, r, wh = dims["nr_cells"], dims["cell_size"], dims["read_heads"], dims["num_writes"]
    sizes = {"memory": n * w, "link_matrix": wh * n * n, "precedence": wh * n,
             "read_weights": r * n, "write_weights": wh * n, "usage_vector": n,
             "write_gate": wh, "allocation_gate": wh, "free_gates": r,
             "read_modes": r * (1 + 2 * wh)}
    return {k: rng.random((steps, size)) for k, size in sizes.items()}
