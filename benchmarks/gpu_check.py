"""`make gpu-check`: everything that needs a GPU, in one call, on a machine with its own torch.

    python3 benchmarks/gpu_check.py [--wheels .gpu-wheels] [--out FILE] [--budget 450]

Meant for a CUDA machine whose Python already holds torch (with Triton), possibly without network:
it must not touch that torch. In order, each phase with a time limit so that the whole stays
within ``--budget`` seconds (default 460):

    install   the packages this machine lacks, from wheels brought along (``make gpu-wheels``
              downloads them, for Python 3.12, into .gpu-wheels/), each with --no-deps, then the
              project itself (``pip install --no-deps --no-build-isolation -e .``); torch's version
              is read before and after and must not change
    tests     every ``cuda``-marked test (tests/test_cuda.py: a step with no host sync, the CUDA
              graph, determinism across two runs, exact resume, TF32; and any backend's kernel
              tests marked ``cuda``)
    bench     benchmarks/bench_speed.py --cuda against pytorch-dnc (what `make bench` runs, with
              this machine's Python): batch 1000 at pytorch-dnc's copy defaults (config a, 16
              cells), 64 cells (b) and 256 cells (c), step times and peak GPU memory
    train     `dnclab train configs/copy.yaml --cuda 0 --set train.batch_size=1000` for 45 s, with
              train.cuda_graph on: the training path the benchmark does not time
    bench d   1024 cells at batch 64, T = 41
    viz       on Python >= 3.12, the dashboard tests against visdom 0.3.0 (which pyproject allows
              there), installed apart with its JavaScript from npm tarballs brought along

and writes one Markdown file (``--out``) with the machine, each phase's result and time, and the
outputs. Exit status 0 when every phase passed. Standard library only: it runs before anything
is installed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as metadata
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Distributions the checks import, besides torch and numpy (which the GPU machine's image brings):
# runtime dependencies of dnc_lab, the test runner, and pytorch-dnc for the benchmark. Only the
# ones missing there are installed, each from a wheel and with --no-deps, so that nothing can
# pull another torch. pytorch-dnc's own requirement `flann` is left out: it imports FLANN only
# for its sparse memories, which the benchmark never builds.
NEEDED = ["click", "PyYAML", "tqdm", "requests", "urllib3", "idna", "charset-normalizer", "certifi",
          "tornado", "jsonpatch", "jsonpointer", "websocket-client", "visdom",
          "pytest", "pytest-timeout", "iniconfig", "pluggy", "packaging", "dnc"]


class Report:
    """The results file, written again after every phase (a killed check still leaves one)."""

    def __init__(self, path: Path):
        self.path, self.rows, self.sections = path, [], []
        self.started = time.monotonic()

    def phase(self, name: str, ok: bool, seconds: float, summary: str, output: str = "") -> None:
        self.rows.append((name, "passed" if ok else "FAILED", f"{seconds:.0f} s", summary))
        if output:
            self.sections.append(f"## {name}\n\n```\n{output.rstrip()}\n```\n")
        print(f"[gpu-check] {name}: {'passed' if ok else 'FAILED'} in {seconds:.0f} s: {summary}", flush=True)
        self.write()

    def write(self, header: str = "") -> None:
        if header:
            self.header = header
        table = ["| phase | result | time | summary |", "| --- | --- | --- | --- |"]
        table += [f"| {' | '.join(row)} |" for row in self.rows]
        total = f"\nTotal: {time.monotonic() - self.started:.0f} s.\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(getattr(self, "header", "") + "\n".join(table) + "\n" + total + "\n"
                             + "\n".join(self.sections))


def run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    """(exit status, output, seconds); status 124 when it ran out of time."""
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=max(timeout, 1))
        return done.returncode, done.stdout, time.monotonic() - start
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n(stopped after {timeout:.0f} s)", time.monotonic() - start


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def version_of(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> str:
    code = ("import torch, json; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))")
    _, out, _ = run([sys.executable, "-c", code], 120)
    return (f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"- python: {platform.python_version()} ({sys.executable})\n"
            f"- torch/CUDA/GPU: {out.strip().splitlines()[-1] if out.strip() else '?'}\n"
            f"- triton: {version_of('triton')}\n")


def install(wheels: Path, timeout: float) -> tuple[bool, str, str]:
    torch_before = version_of("torch")
    missing = [name for name in NEEDED if version_of(name) is None]
    log = [f"torch {torch_before}; missing before: {', '.join(missing) or 'nothing'}"]
    ok = True
    if missing:
        if not wheels.is_dir():
            return False, f"{len(missing)} packages missing and no wheel folder {wheels}", "\n".join(log)
        files = [str(p) for p in sorted(wheels.glob("*.whl"))
                 if _dist_name(p.name) in {_norm(name) for name in missing}]
        code, out, _ = run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir",
                            *files], timeout)
        log.append(tail(out, 20))
        ok = code == 0
    code, out, _ = run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                        "--no-cache-dir", "-e", "."], timeout)
    log.append(tail(out, 10))
    editable = code == 0  # otherwise the phases below import dnc_lab from the checkout (PYTHONPATH)
    still = [name for name in NEEDED if version_of(name) is None]
    torch_after = version_of("torch")
    ok = ok and not still and torch_after == torch_before
    summary = (f"torch {torch_after} {'untouched' if torch_after == torch_before else 'CHANGED'}; installed "
               f"{len(missing) - len(still)} of {len(missing)} missing packages"
               + (f"; still missing: {', '.join(still)}" if still else "")
               + ("; project installed editable" if editable else "; project NOT installed, using PYTHONPATH"))
    return ok, summary, "\n".join(log)


def visdom_0_3(wheels: Path, timeout: float, env: dict, report: Report) -> bool:
    """The dashboard tests against visdom 0.3.0, which pyproject allows from Python 3.12 on: installed
    apart (--target), its JavaScript from the npm tarballs in wheels/visdom-npm (no network)."""
    found = sorted((wheels / "visdom-0.3").glob("visdom-0.3*.whl"))
    if sys.version_info < (3, 12) or not found:
        report.phase("dashboard tests with visdom 0.3", True, 0, "not run: " + (
            "Python < 3.12" if sys.version_info < (3, 12) else f"no visdom 0.3 wheel in {wheels}/visdom-0.3"))
        return True
    target = Path(tempfile.mkdtemp())
    code, out, secs = run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                           str(target), str(found[-1])], timeout)
    if code == 0:
        code, out, more = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
                               "tests/test_viz_assets.py", "tests/test_viz_dashboard.py"], timeout - secs,
                              {**env, "PYTHONPATH": f"{target}{os.pathsep}{ROOT}", "DNCLAB_CACHE": str(wheels)})
        secs += more
    counts = re.findall(r"\d+ (?:passed|failed|skipped|error|errors)", out)
    report.phase("dashboard tests with visdom 0.3", code == 0, secs, ", ".join(counts) or f"exit {code}",
                 tail(out, 40))
    return code == 0


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_name(wheel: str) -> str:
    return _norm(wheel.split("-")[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    p.add_argument("--out", type=Path, default=None, help="the results file (default benchmarks/results/"
                                                          "gpu-check-<date>.md)")
    p.add_argument("--budget", type=float, default=460.0, help="seconds for all phases together")
    p.add_argument("--skip", default="", help="comma-separated phases to leave out (install,tests,bench,train,viz)")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    deadline = time.monotonic() + args.budget
    left = lambda cap: max(1.0, min(cap, deadline - time.monotonic()))  # noqa: E731
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu-check-{datetime.date.today()}.md"
    report = Report(out)
    report.write(f"# gpu-check\n\n{machine()}\n")
    env = {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "DNCLAB_EXPERIMENTS": "/tmp/gpu-check-experiments"}
    all_ok = True

    if "install" not in skip:
        start = time.monotonic()
        ok, summary, log = install(args.wheels, left(90))
        report.phase("install", ok, time.monotonic() - start, summary, log)
        all_ok &= ok

    if "tests" not in skip:
        code, text, secs = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                "-o", "addopts=-ra", "tests/"], left(150), env)
        counts = re.findall(r"\d+ (?:passed|failed|skipped|error|errors|deselected)", text)
        ok = code == 0 and "passed" in " ".join(counts)
        report.phase("tests (-m cuda)", ok, secs, ", ".join(counts) or f"exit {code}", tail(text, 80))
        all_ok &= ok

    def bench(name: str, extra: list[str], cap: float) -> bool:
        md = Path(tempfile.mkdtemp()) / "bench.md"  # copied into the one results file
        code, text, secs = run([sys.executable, "benchmarks/bench_speed.py", "--cuda", "--impls", "pytorch-dnc,dnc_lab",
                                *extra, "--out", str(md)], left(cap), env)
        lines = [line for line in text.splitlines() if line.startswith(("[speed]", "[memory]"))]
        report.phase(name, code == 0, secs, f"exit {code}",
                     "\n".join(lines) + "\n\n" + (md.read_text() if md.is_file() else tail(text, 40)))
        return code == 0

    if "bench" not in skip:
        all_ok &= bench("bench a,b,c at batch 1000",
                        ["--configs", "a,b,c", "--batch", "1000", "--repeats", "8", "--warmup", "1"], 160)

    if "train" not in skip:
        code, text, secs = run([sys.executable, "-m", "dnc_lab.cli", "train", "configs/copy.yaml", "--cuda", "0",
                                "--no-progress", "--set", "train.batch_size=1000", "--set", "viz.enabled=false",
                                "--set", "train.cuda_graph=true", "--set", "train.max_seconds=45"], left(75), env)
        report.phase("train copy.yaml, batch 1000, CUDA graph, 45 s", code == 0, secs, f"exit {code}",
                     tail(text, 30))
        all_ok &= code == 0

    if "bench" not in skip:
        all_ok &= bench("bench d (1024 cells) at batch 64", ["--configs", "d", "--batch", "64", "--repeats", "5"], 60)

    if "viz" not in skip:
        all_ok &= visdom_0_3(args.wheels, left(60), env, report)

    report.write()
    print(f"[gpu-check] results in {out}", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
