"""Where a dnc_lab training step spends its time, part by part.

    python benchmarks/bench_parts.py --configs a,c --threads 1

Runs one forward pass of dnc_lab's DNC on a benchmark config and captures the real arguments of
every call into ``dnc_lab.addressing`` at the middle time step, and of the controller, the
interface layer and the whole memory step. Each part is then timed on its own, forward and
forward + backward (gradient of ones on every output), and its ATen ops are counted. Multiplied
by the calls per time step and the number of steps, this estimates each part's share of one
training step (parts overlap: ``memory_step`` contains the addressing functions).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import CONFIGS, Trainer  # noqa: E402


def _detach(value):
    if isinstance(value, torch.Tensor):
        v = value.detach().clone()
        return v.requires_grad_() if v.is_floating_point() else v
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_detach(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def capture(trainer: Trainer) -> tuple[dict, dict]:
    """Arguments of each part at the middle time step, and how many calls each part gets per step."""
    from dnc_lab import addressing, memory

    steps = trainer.cfg.steps
    calls: dict[str, int] = {}
    captured: dict[str, tuple] = {}
    originals = {}

    def wrap(owner, name, label):
        fn = getattr(owner, name)
        originals[(owner, name)] = fn

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls[label] = calls.get(label, 0) + 1
            # The middle step's first call of this label: a representative, non-zero state.
            if calls[label] == (steps // 2) * calls.get(label + "/per_step", 1) + 1 and label not in captured:
                captured[label] = (fn, _detach(args), _detach(kwargs))
            return fn(*args, **kwargs)

        setattr(owner, name, wrapper)

    names = [n for n in dir(addressing) if not n.startswith("_") and callable(getattr(addressing, n))
             and getattr(getattr(addressing, n), "__module__", "") == addressing.__name__]
    for n in names:
        wrap(addressing, n, n)
    wrap(memory, "memory_step", "memory_step")
    # Nested calls inside addressing (e.g. content_weighting -> cosine_similarity) go through the
    # module globals too, so they are counted: fine, they are reported as parts of their own.
    model = trainer.model
    controller = model.cores[0].controllers[0]
    access = model.cores[0].memories[0]
    ctrl_calls = []
    iface_calls = []
    h1 = controller.register_forward_hook(lambda m, a, o: ctrl_calls.append(_detach(a)))
    orig_iface = access.interface_from

    def iface(x):
        iface_calls.append(_detach((x,)))
        return orig_iface(x)

    access.interface_from = iface
    try:
        with torch.no_grad():
            trainer.forward_loss()
        # Calls per time step
        per_step = {k: v / steps for k, v in calls.items()}
        # Recapture at the middle step now that we know calls per step.
        calls.clear()
        captured.clear()
        for k, v in per_step.items():
            calls[k + "/per_step"] = max(1, round(v))
        with torch.no_grad():
            trainer.forward_loss()
    finally:
        for (owner, name), fn in originals.items():
            setattr(owner, name, fn)
        h1.remove()
        del access.interface_from
    parts = {k: v for k, v in captured.items()}
    parts["controller (nn.LSTM step)"] = (controller, ctrl_calls[steps // 2], {})
    parts["interface (linear + parse)"] = (orig_iface, iface_calls[steps // 2], {})
    per_step["controller (nn.LSTM step)"] = 1
    per_step["interface (linear + parse)"] = 1
    return parts, per_step


def time_part(fn, args, kwargs, repeats: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    def run_forward():
        return fn(*args, **kwargs)

    def run_both():
        out = run_forward()
        outs = [t for t in _tensors(out) if t.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])

    def med(f):
        f()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            ts.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(ts)

    forward_us = med(run_forward)
    both_us = med(run_both)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_both()
    ops = 0
    for ev in prof.events():
        if ev.name.startswith("aten::") and (ev.cpu_parent is None or not ev.cpu_parent.name.startswith("aten::")):
            ops += 1
    return {"forward_us": forward_us, "fwd_bwd_us": both_us, "aten_ops": ops}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="a,c")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        trainer = Trainer("dnc_lab", cfg, torch.device("cpu"))
        parts, per_step = capture(trainer)
        rows = []
        for label, (fn, a, kw) in parts.items():
            r = time_part(fn, a, kw, args.repeats)
            n = per_step.get(label, 1) * cfg.steps
            rows.append((label, per_step.get(label, 1), r, n))
        rows.sort(key=lambda row: -row[2]["fwd_bwd_us"] * row[3])
        print(f"\nconfig {name}: {cfg.describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        print("| part | calls/time step | fwd µs/call | fwd+bwd µs/call | ATen ops/call (fwd+bwd) | "
              "fwd+bwd ms per training step |")
        print("|---|---|---|---|---|---|")
        for label, per, r, n in rows:
            print(f"| `{label}` | {per:g} | {r['forward_us']:.0f} | {r['fwd_bwd_us']:.0f} | {r['aten_ops']} | "
                  f"{r['fwd_bwd_us'] * n / 1000:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
