"""Speed and memory of dnc_lab against pytorch-dnc 1.1.0, side by side.

    python benchmarks/bench_speed.py                     # speed + memory, configs a b c
    python benchmarks/bench_speed.py --quick             # a short run (smoke test)
    python benchmarks/bench_speed.py --configs c --repeats 20
    python benchmarks/bench_speed.py --profile           # torch.profiler top ops, configs a and c
    python benchmarks/bench_speed.py --scaling           # memory of each --impls vs batch, cells, steps
    python benchmarks/bench_speed.py --threads 1         # on a shared machine: far steadier
    python benchmarks/bench_speed.py --cuda              # on a GPU, adds the batch-1000 runs

What is timed is one training step: zero_grad, forward over the whole sequence, binary
cross-entropy on the logits, backward, gradient-norm clipping (50, as pytorch-dnc's copy task),
Adam step. Both implementations get the same input and target tensors, and their steps
alternate in one process (A, B, A, B, ...), so a load change on this shared machine hits both
alike; we report medians. Peak memory is measured per model in a fresh child process, so one
model's peak cannot hide the other's: on the CPU it is the child's peak resident set size
(VmHWM, reset after imports, model and data) minus its RSS just before the first step, with
``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors leave RSS (see ``EXACT_MALLOC_ENV``); on
a GPU ``torch.cuda.max_memory_allocated`` minus what was allocated before the step. We also count
the bytes autograd saves for backward in one forward pass (unique storages): that figure is
deterministic and is what grows as B·N²·T.

Implementations are named on the command line (``--impls``): ``pytorch-dnc`` and ``dnc_lab``
(``DNC`` as a user gets it: ``backend="auto"``), each with constructor overrides after a colon,
e.g. ``dnc_lab:backend=reference`` or ``dnc_lab:backend=native:checkpoint_steps=6`` (several
options: colons). The default compares pytorch-dnc, the default DNC, and each CPU backend forced.

pytorch-dnc 1.1.0 is installed from its wheel (``pip install -e ".[bench]"``). Its wheel
requires ``flann``, whose pure-Python wheel installs fine but cannot load the native FLANN
library; that does not matter here, because pytorch-dnc imports FLANN (and FAISS) lazily, only
when a sparse memory (SDNC/SAM) is built. The dense ``dnc.DNC`` we benchmark imports and runs
unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Config:
    """One benchmark configuration: a copy task of ``length`` bits-vectors -> 2*length+1 steps."""

    name: str
    nr_cells: int
    cell_size: int
    read_heads: int
    hidden_size: int
    batch: int
    steps: int
    input_size: int = 6  # pytorch-dnc's copy task: 5 bits + an end-of-sequence marker
    num_hidden_layers: int = 2
    num_layers: int = 1

    def describe(self) -> str:
        return (
            f"N={self.nr_cells} W={self.cell_size} R={self.read_heads} LSTM {self.hidden_size}x"
            f"{self.num_hidden_layers} B={self.batch} T={self.steps}"
        )


CONFIGS = {
    # pytorch-dnc's tasks/copy_task.py defaults (input 6, nhid 64, nhlayer 2, mem_slot 16,
    # mem_size 20, read_heads 4, batch 100) at copy length 8.
    "a": Config("a", nr_cells=16, cell_size=20, read_heads=4, hidden_size=64, batch=100, steps=17),
    "b": Config("b", nr_cells=64, cell_size=32, read_heads=4, hidden_size=128, batch=32, steps=41),
    "c": Config("c", nr_cells=256, cell_size=32, read_heads=4, hidden_size=128, batch=16, steps=41),
    # Must run on this machine (issue 5); memory only by default, it is slow.
    "d": Config("d", nr_cells=1024, cell_size=32, read_heads=4, hidden_size=128, batch=8, steps=41),
}


# ----------------------------------------------------------------------------------------------
# Implementations


IMPLS = ("pytorch-dnc", "dnc_lab")


def parse_impl(spec: str) -> tuple[str, dict]:
    """'dnc_lab:clip=0:checkpoint_steps=8' -> ('dnc_lab', {'clip': 0, 'checkpoint_steps': 8})."""
    name, *items = spec.split(":")
    kwargs = {}
    for item in filter(None, items):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"bad implementation option {item!r} in {spec!r}: expected key=value")
        try:
            kwargs[key] = json.loads(value.lower() if value in ("True", "False") else value)
        except json.JSONDecodeError:
            kwargs[key] = value
    if name not in IMPLS:
        raise SystemExit(f"unknown implementation {name!r}: expected one of {', '.join(IMPLS)}")
    return name, kwargs


def build_model(spec: str, cfg: Config, device: torch.device) -> torch.nn.Module:
    name, overrides = parse_impl(spec)
    kwargs = dict(
        input_size=cfg.input_size,
        hidden_size=cfg.hidden_size,
        rnn_type="lstm",
        num_layers=cfg.num_layers,
        num_hidden_layers=cfg.num_hidden_layers,
        nr_cells=cfg.nr_cells,
        cell_size=cfg.cell_size,
        read_heads=cfg.read_heads,
        batch_first=True,
    )
    if name == "pytorch-dnc":
        from dnc import DNC as Baseline  # pytorch-dnc 1.1.0

        # pytorch-dnc places tensors with gpu_id, not .to(device).
        kwargs["gpu_id"] = (device.index or 0) if device.type == "cuda" else -1
        model = Baseline(**kwargs, **overrides)
    else:
        from dnc_lab import DNC

        if device.type == "cuda":
            kwargs["gpu_id"] = device.index or 0
        model = DNC(**kwargs, **overrides)
    return model.to(device)


def make_batch(cfg: Config, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch-dnc's copy-task data: random bits, an end marker, then the bits again as target."""
    length = (cfg.steps - 1) // 2
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(cfg.batch, cfg.steps, cfg.input_size)
    y = torch.zeros_like(x)
    bits = torch.randint(0, 2, (cfg.batch, length, cfg.input_size - 1), generator=g).float()
    x[:, :length, :-1] = bits
    x[:, length, -1] = 1
    y[:, length + 1 : length + 1 + length, :-1] = bits
    return x.to(device), y.to(device)


class Trainer:
    """One model, its optimizer and one copy-task batch; ``step()`` is the timed unit."""

    def __init__(self, spec: str, cfg: Config, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        self.spec, self.cfg, self.device = spec, cfg, device
        self.model = build_model(spec, cfg, device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.x, self.y = make_batch(cfg, device, seed)

    def forward_loss(self) -> torch.Tensor:
        output = self.model(self.x, None, reset_experience=True)[0]
        return F.binary_cross_entropy_with_logits(output, self.y)

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 50)
        self.optimizer.step()
        return loss.item()  # .item() also synchronizes a GPU


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000.0


# ----------------------------------------------------------------------------------------------
# Speed


def bench_speed(specs: list[str], cfg: Config, device: torch.device, repeats: int, warmup: int) -> dict:
    """Alternate one step of each implementation, ``repeats`` rounds; return per-impl ms lists."""
    trainers = [Trainer(spec, cfg, device) for spec in specs]
    # Same data for everyone (each Trainer built it from the same seed).
    for t in trainers[1:]:
        assert torch.equal(t.x, trainers[0].x) and torch.equal(t.y, trainers[0].y)
    for _ in range(warmup):
        for t in trainers:
            t.step()
    times: dict[str, list[float]] = {spec: [] for spec in specs}
    loads = []
    for i in range(repeats):
        # Alternate who goes first each round, so neither always runs right after the other.
        order = trainers if i % 2 == 0 else trainers[::-1]
        for t in order:
            times[t.spec].append(timed(t.step, device))
        loads.append(os.getloadavg()[0])
    return {
        "config": asdict(cfg),
        "times_ms": times,
        "median_ms": {s: statistics.median(v) for s, v in times.items()},
        "min_ms": {s: min(v) for s, v in times.items()},
        "load_1min": [min(loads), max(loads)],
    }


# ----------------------------------------------------------------------------------------------
# Memory (each measurement in a fresh child process)


def saved_tensor_bytes(trainer: Trainer) -> int:
    """Bytes autograd keeps for backward during one forward pass (unique storages)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.forward_loss()
    del loss
    return sum(storages.values())


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(spec: str, cfg: Config, device: torch.device, steps: int) -> dict:
    """Runs in a fresh process: peak memory of ``steps`` training steps of one model.

    The peak RSS (VmHWM) is reset after imports, model and data are set up, so what remains is
    the step's own peak: activations kept for backward, gradients, Adam state, temporaries.
    """
    trainer = Trainer(spec, cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    exact = reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS") * 1024
    if not exact:  # fall back on the lifetime peak: an over-estimate of the baseline
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ms = [timed(trainer.step, device) for _ in range(steps)]
    result = {
        "spec": spec,
        "config": asdict(cfg),
        "ms": ms,
        "rss_before_bytes": rss_before,
        "rss_peak_bytes": _proc_status_kib("VmHWM") * 1024,
        "peak_reset": exact,
    }
    result["rss_delta_bytes"] = result["rss_peak_bytes"] - rss_before
    if device.type == "cuda":
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    result["saved_for_backward_bytes"] = saved_tensor_bytes(trainer)
    return result


# glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so RSS can stay high
# after tensors are freed, and by an amount that depends on the order of earlier allocations.
# A fixed threshold of 128 KiB makes every tensor larger than that an mmap of its own, returned to
# the OS when freed: the child's peak RSS then follows its peak of live tensors.
EXACT_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def bench_memory(spec: str, cfg: Config, device: torch.device, steps: int = 2, threads: int | None = None,
                 exact_malloc: bool = True) -> dict:
    env = dict(os.environ, **EXACT_MALLOC_ENV) if exact_malloc else None
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec, "--child-config",
           json.dumps(asdict(cfg)), "--child-steps", str(steps), "--device", str(device)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"spec": spec, "config": asdict(cfg), "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Profile


def profile(spec: str, cfg: Config, device: torch.device, steps: int, top: int) -> dict:
    """torch.profiler over ``steps`` training steps: the top ops by self CPU time, op counts."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    trainer = Trainer(spec, cfg, device)
    trainer.step()  # warm-up (first steps create oneDNN primitives, allocator pools)
    trainer.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.optimizer.zero_grad(set_to_none=True)
            with record_function("## forward"):
                loss = trainer.forward_loss()
            with record_function("## backward"):
                loss.backward()
            with record_function("## optimizer"):
                torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 50)
                trainer.optimizer.step()
    # ATen ops called directly by Python code or by the autograd engine (not from inside another
    # ATen op): what a step dispatches, hence what its per-op overhead scales with.
    top_level = 0
    for ev in prof.events():
        if ev.name.startswith("aten::"):
            parent = ev.cpu_parent
            if parent is None or not parent.name.startswith("aten::"):
                top_level += 1
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events)
    phases = {e.key: e.cpu_time_total / steps / 1000 for e in events if e.key.startswith("## ")}
    rows = []
    op_calls = 0
    for e in events:
        if e.key.startswith("## "):
            continue
        # Count the ATen ops a step launches: top-level calls are what costs dispatch time.
        if e.key.startswith("aten::"):
            op_calls += e.count
        rows.append((e.key, e.self_cpu_time_total, e.count))
    rows.sort(key=lambda r: -r[1])
    return {
        "spec": spec,
        "config": asdict(cfg),
        "steps": steps,
        "phases_ms_per_step": phases,
        "self_cpu_ms_per_step": total_self / steps / 1000,
        "aten_calls_per_step": op_calls / steps,
        "top_level_aten_calls_per_step": top_level / steps,
        "top": [
            {"op": k, "self_cpu_ms_per_step": t / steps / 1000, "share": t / total_self, "calls_per_step": c / steps}
            for k, t, c in rows[:top]
        ],
    }


# ----------------------------------------------------------------------------------------------
# Reporting


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Core(s) per socket", "Thread(s) per core"):
                info[key.strip()] = value.strip()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import dnc

        info["pytorch-dnc"] = getattr(dnc, "__version__", None) or _dist_version("dnc")
    except ImportError:
        info["pytorch-dnc"] = "not installed"
    return info


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def markdown(report: dict) -> str:
    lines = []
    m = report["machine"]
    lines.append(f"### Run of {report['date']}")
    lines.append("")
    lines.append(f"- command: `{report['command']}`")
    lines.append(f"- machine: {m.get('Model name', '?')}, {m.get('CPU(s)', m['cpus'])} CPUs, "
                 f"torch {m['torch']} ({m['threads']} threads), Python {m['python']}, "
                 f"pytorch-dnc {m['pytorch-dnc']}" + (f", GPU {m['gpu']}" if "gpu" in m else ""))
    lines.append(f"- device: {report['device']}; load average (1 min) before: {report['load_before']}")
    specs = report["impls"]
    base = specs[0]
    if report.get("speed"):
        lines.append("")
        lines.append("Median ms per training step (forward + backward + clip + Adam), alternating in one "
                     "process; ratio = " + f"`{base}` median / other median (higher is faster):")
        lines.append("")
        head = "| config | " + " | ".join(f"{s} ms" for s in specs) + " | " + " | ".join(
            f"speed-up {s}" for s in specs[1:]) + " | repeats | load 1 min |"
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        for r in report["speed"]:
            cfg = Config(**r["config"])
            med = r["median_ms"]
            cells = [f"{med[s]:.1f}" for s in specs] + [f"{med[base] / med[s]:.2f}×" for s in specs[1:]]
            n = len(next(iter(r["times_ms"].values())))
            lines.append(f"| {cfg.name}: {cfg.describe()} | " + " | ".join(cells) +
                         f" | {n} | {r['load_1min'][0]:.2f}–{r['load_1min'][1]:.2f} |")
    if report.get("memory"):
        lines.append("")
        key = "cuda_peak_bytes" if report["device"].startswith("cuda") else "rss_delta_bytes"
        what = "torch.cuda.max_memory_allocated during the steps" if key == "cuda_peak_bytes" else \
            "peak RSS during 2 training steps minus RSS just before them, in a fresh process per model" + (
                ", glibc defaults" if report.get("glibc_default") else
                ", MALLOC_MMAP_THRESHOLD_=131072 so that freed tensors leave RSS")
        lines.append(f"Peak memory, MiB ({what}); saved-for-backward = bytes autograd holds after one forward:")
        lines.append("")
        head = "| config | " + " | ".join(f"{s} peak | {s} saved" for s in specs) + " | " + " | ".join(
            f"peak ratio {s}/{base}" for s in specs[1:]) + " |"
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        by_cfg: dict[str, dict] = {}
        for r in report["memory"]:
            by_cfg.setdefault(r["config"]["name"], {})[r["spec"]] = r
        for name, rs in by_cfg.items():
            cfg = Config(**next(iter(rs.values()))["config"])
            cells = []
            for s in specs:
                r = rs.get(s, {})
                if "error" in r or not r:
                    cells += [f"error: {' '.join(r.get('error', ['missing']))[:60]}", "–"]
                else:
                    cells += [mib(r[key]), mib(r["saved_for_backward_bytes"])]
            for s in specs[1:]:
                a, b = rs.get(base, {}), rs.get(s, {})
                cells.append(f"{b[key] / a[key]:.2f}" if key in a and key in b and a[key] else "–")
            lines.append(f"| {name}: {cfg.describe()} | " + " | ".join(cells) + " |")
    for p in report.get("profile", []):
        cfg = Config(**p["config"])
        lines.append("")
        ph = ", ".join(f"{k[3:]} {v:.1f} ms" for k, v in p["phases_ms_per_step"].items())
        lines.append(f"Profile `{p['spec']}`, config {cfg.name} ({cfg.describe()}), {p['steps']} steps: "
                     f"{p['top_level_aten_calls_per_step']:.0f} top-level ATen calls per step "
                     f"({p['aten_calls_per_step']:.0f} with nested ones); per step: {ph} "
                     f"(profiler overhead included)")
        lines.append("")
        lines.append("| op | self CPU ms/step | share | calls/step |")
        lines.append("|---|---|---|---|")
        for row in p["top"]:
            lines.append(f"| `{row['op']}` | {row['self_cpu_ms_per_step']:.2f} | {100 * row['share']:.1f}% "
                         f"| {row['calls_per_step']:.0f} |")
    if report.get("scaling"):
        lines.append("")
        lines.append("Memory against batch B, cells N and steps T (W=32, R=4, LSTM 128x2; two training steps in a "
                     "fresh process; MiB; peak = peak RSS minus RSS before the steps):")
        lines.append("")
        lines.append("| impl | B | N | T | saved for backward | peak | ms (2nd step) | B·N²·T floats |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in report["scaling"]:
            c = r["config"]
            floor = c["batch"] * c["nr_cells"] ** 2 * c["steps"] * 4
            if "error" in r:
                lines.append(f"| {r['spec']} | {c['batch']} | {c['nr_cells']} | {c['steps']} | error: "
                             f"{' '.join(r['error'])[:80]} | | | {mib(floor)} |")
                continue
            lines.append(f"| {r['spec']} | {c['batch']} | {c['nr_cells']} | {c['steps']} | "
                         f"{mib(r['saved_for_backward_bytes'])} | {mib(r['rss_delta_bytes'])} | {r['ms'][-1]:.0f} | "
                         f"{mib(floor)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="a,b,c", help="comma-separated names from: " + ", ".join(
        f"{k} ({c.describe()})" for k, c in CONFIGS.items()))
    p.add_argument("--impls", default="pytorch-dnc,dnc_lab,dnc_lab:backend=native,dnc_lab:backend=reference",
                   help="comma-separated; the first is the baseline of the ratios; dnc_lab alone is the "
                        "default DNC (backend auto). Options after colons, e.g. dnc_lab:backend=native:checkpoint_steps=6")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per config (default 15, --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2, --quick 1)")
    p.add_argument("--quick", action="store_true", help="a short run: few repeats, batch capped at 8")
    p.add_argument("--batch", type=int, default=None, help="override every config's batch size")
    p.add_argument("--cuda", action="store_true", help="run on the GPU; also runs every config at batch 1000")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--glibc-default", action="store_true",
                   help="memory children with glibc's default malloc tuning (RSS then includes freed heap)")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops (configs a and c)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--scaling", action="store_true", help="memory of each --impls vs batch, cells, steps")
    p.add_argument("--out", type=Path, default=None,
                   help="write the Markdown report here (default benchmarks/results/<date>-<device>.md)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    # Internal: one memory measurement in a fresh process.
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        device = torch.device(args.device or "cpu")
        cfg = Config(**json.loads(args.child_config))
        print(json.dumps(memory_child(args.child, cfg, device, args.child_steps)))
        return 0

    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda given but torch.cuda.is_available() is False")
    device = torch.device("cuda", 0) if args.cuda else torch.device("cpu")
    specs = [s.strip() for s in args.impls.split(",") if s.strip()]
    for s in specs:
        parse_impl(s)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"unknown config {n!r}: expected one of {', '.join(CONFIGS)}")
    configs = [CONFIGS[n] for n in names]
    if args.batch:
        configs = [replace(c, batch=args.batch) for c in configs]
    if args.quick:
        configs = [replace(c, batch=min(c.batch, 8)) for c in configs]
    if args.cuda and not args.batch:
        configs += [replace(c, name=c.name + "1000", batch=1000) for c in configs if c.name != "d"]
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(device),
        "device": str(device),
        "impls": specs,
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "glibc_default": args.glibc_default,
    }
    print(f"# {report['date']}  torch {torch.__version__}  device {device}  threads {torch.get_num_threads()}  "
          f"load {report['load_before']}", flush=True)

    if not args.no_speed:
        report["speed"] = []
        for cfg in configs:
            if cfg.name == "d" and not args.cuda:
                print(f"[speed] {cfg.name}: skipped on the CPU (memory only)", flush=True)
                continue
            r = bench_speed(specs, cfg, device, repeats, warmup)
            report["speed"].append(r)
            med = r["median_ms"]
            ratio = "  ".join(f"{s}: {med[specs[0]] / med[s]:.2f}x" for s in specs[1:])
            print(f"[speed] {cfg.name} {cfg.describe()}: " +
                  "  ".join(f"{s} {med[s]:.1f} ms" for s in specs) + f"  | speed-up {ratio}", flush=True)

    if not args.no_memory:
        report["memory"] = []
        for cfg in configs:
            for spec in specs:
                r = bench_memory(spec, cfg, device, threads=args.threads, exact_malloc=not args.glibc_default)
                report["memory"].append(r)
                key = "cuda_peak_bytes" if args.cuda else "rss_delta_bytes"
                print(f"[memory] {cfg.name} {spec}: " + (f"error {r['error']}" if "error" in r else
                      f"peak {mib(r[key])} MiB, saved for backward {mib(r['saved_for_backward_bytes'])} MiB"),
                      flush=True)

    if args.profile:
        report["profile"] = []
        for name in ("a", "c"):
            cfg = CONFIGS[name] if not args.quick else replace(CONFIGS[name], batch=min(CONFIGS[name].batch, 8))
            for spec in specs:
                r = profile(spec, cfg, device, args.profile_steps, top=15)
                report["profile"].append(r)
                print(f"[profile] {name} {spec}: {r['top_level_aten_calls_per_step']:.0f} top-level aten calls/step, phases " +
                      ", ".join(f"{k[3:]} {v:.1f} ms" for k, v in r["phases_ms_per_step"].items()), flush=True)
                for row in r["top"][:8]:
                    print(f"    {row['op']:<40} {row['self_cpu_ms_per_step']:8.2f} ms {row['calls_per_step']:6.0f} calls")

    if args.scaling:
        points = [(16, 256, 41), (8, 256, 41), (4, 256, 41), (16, 128, 41), (16, 64, 41),
                  (16, 256, 21), (16, 256, 11), (8, 512, 41), (8, 1024, 41)]
        if args.quick:
            points = [(4, 64, 11), (2, 64, 11), (4, 32, 11), (4, 64, 5)]
        report["scaling"] = []
        for spec in specs:
            for b, n, t in points:
                cfg = replace(CONFIGS["c"], name=f"B{b}N{n}T{t}", batch=b, nr_cells=n, steps=t)
                r = bench_memory(spec, cfg, device, steps=2, threads=args.threads,
                                 exact_malloc=not args.glibc_default)
                report["scaling"].append(r)
                print(f"[scaling] {spec} B={b} N={n} T={t}: " + (f"error {r['error']}" if "error" in r else
                      f"saved {mib(r['saved_for_backward_bytes'])} MiB, peak delta {mib(r['rss_delta_bytes'])} MiB, "
                      f"{r['ms'][-1]:.0f} ms"), flush=True)

    text = markdown(report)
    out = args.out or HERE / "results" / f"{report['date'][:10]}-{device.type}{'-quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print()
    print(text)
    print(f"(report written to {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
