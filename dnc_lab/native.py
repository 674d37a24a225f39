"""The native memory step: ``memory.memory_step`` as one compiled CPU call forward and one backward.

``memory_step`` here takes the same previous state (a list, in ``memory.STATE_KEYS`` order) and
the *raw* interface vector (before the nonlinearities), and returns the same read vectors and new
state as the reference path (``memory.memory_step`` of ``memory.parse_interface``), to float
rounding; tests/test_native.py checks values and gradients against it in float64. It is what ``DNC(native=True)`` uses.

Why it exists: the reference step is ~500 small ATen ops, each with a fixed cost of about 10 µs on
a CPU, which is most of a DNC's training time (benchmarks/RESULTS.md). The C++ source
(``csrc/kernels.cpp``) does the same arithmetic in loops, one batch element at a time, in a
single pass over the B·N² link matrix each way.

The library is compiled on first use with the system's C++ compiler (``$CXX``, else ``g++``) into
``$DNC_LAB_CACHE`` (default ``~/.cache/dnc_lab``)/native/, keyed by the source, the flags and the
CPU, so a shared home directory on a cluster with mixed CPUs keeps one build per CPU type. No
PyTorch headers are involved: building takes a few seconds. ``available()`` says whether it can be
used, and why not.

Limits: CPU tensors, float32 or float64, one write head (``num_writes=1``, the paper's DNC).
Backward keeps each step's incoming link matrix (B·N² floats per step, as the reference does);
``DNC(checkpoint_steps=k)`` trades that for recomputation.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

SOURCE = Path(__file__).with_name("csrc") / "kernels.cpp"
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-fPIC", "-shared", "-fopenmp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # On AVX-512 CPUs, GCC's own vectorised loops over a cell (20-32 floats) are faster in 8-float
    # vectors than in 16 (measured: ~18% on the whole step here); the kernel's explicit vectors are 8 anyway.
    FLAGS.append("-mprefer-vector-width=256")

# Below this much work per call (see _threads), starting OpenMP threads costs more than it saves.
_PARALLEL_MIN_WORK = 1 << 16

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None


def _cpu_id() -> str:
    """Something that differs between CPU types: -march=native code may not run on another one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("DNC_LAB_CACHE") or Path.home() / ".cache" / "dnc_lab"
    return Path(root) / "native"


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: '{compiler}' is not on PATH (install g++, or set CXX)")
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join([compiler, *FLAGS]).encode(), _cpu_id().encode()])
    ).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: several processes may build at once.
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed:\n{result.stderr.strip()[-2000:]}")
            os.replace(out, target)
    library = ctypes.CDLL(str(target))
    i64, c_int, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    for name in ("dnc_interface_size", "dnc_aux_size"):
        getattr(library, name).restype = i64
        getattr(library, name).argtypes = [i64, i64, i64]
    for suffix in ("f32", "f64"):
        forward = getattr(library, f"dnc_forward_{suffix}")
        forward.restype = None
        forward.argtypes = [i64, i64, i64, i64, c_int] + [ptr] * 16
        backward = getattr(library, f"dnc_backward_{suffix}")
        backward.restype = None
        backward.argtypes = [i64, i64, i64, i64, c_int] + [ptr] * 26
        link = getattr(library, f"dnc_link_{suffix}")
        link.restype = None
        link.argtypes = [i64, i64, c_int] + [ptr] * 4
        for name, pointers in (("lstm_forward", 6), ("lstm_backward", 7)):
            function = getattr(library, f"dnc_{name}_{suffix}")
            function.restype = None
            function.argtypes = [i64, i64] + [ptr] * pointers
        exp = getattr(library, f"dnc_exp_{suffix}")
        exp.restype = None
        exp.argtypes = [i64, ptr, ptr]
    return library


def load() -> ctypes.CDLL:
    """The compiled library, building it on first use. Raises RuntimeError saying why it cannot."""
    global _library, _failure
    with _lock:
        if _library is None and _failure is None:
            if os.environ.get("DNC_LAB_NATIVE", "1") == "0":
                _failure = "disabled by DNC_LAB_NATIVE=0"
            else:
                try:
                    _library = _build()
                except (OSError, RuntimeError) as error:
                    _failure = str(error)
        if _library is None:
            raise RuntimeError(f"the native memory step is unavailable: {_failure}")
        return _library


def available() -> tuple[bool, str]:
    """(True, '') when the native step can be used here, else (False, the reason)."""
    try:
        load()
    except RuntimeError as error:
        return False, str(error)
    return True, ""


def _pointer(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def _kernel(name: str, dtype: torch.dtype):
    return getattr(load(), f"dnc_{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def _threads(batch: int, cells: int, width: int, heads: int) -> int:
    work = batch * cells * (cells + width * (heads + 1))  # ~ the multiply-adds of a step
    return torch.get_num_threads() if work >= _PARALLEL_MIN_WORK else 1


# The kernels as functions of tensors, without autograd. Every tensor is made contiguous; the
# results are new tensors.


def memory_forward(raw: torch.Tensor, state: list[torch.Tensor], link_out: Optional[torch.Tensor] = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """raw [B, S], state (memory, link, precedence, read weights, write weights, usage) ->
    (outputs: reads [B, R, W] and the six new state tensors, kept: what ``memory_backward`` needs).

    link_out: a contiguous [B, 1, N, N] tensor to write the new link matrix to (a new one if None).
    """
    memory, link, precedence, read_weights, write_weights, usage = state
    b, n, w = memory.shape
    r = read_weights.shape[1]
    inputs = [t.contiguous() for t in (raw, *state)]
    new = memory.new_empty
    link_out = new(b, 1, n, n) if link_out is None else link_out
    outputs = [new(b, r, w), new(b, n, w), link_out, new(b, 1, n), new(b, r, n), new(b, 1, n), new(b, n)]
    aux = new(b, load().dnc_aux_size(n, w, r))
    order = torch.empty(b, n, dtype=torch.int32)
    _kernel("forward", memory.dtype)(
        b, n, w, r, _threads(b, n, w, r), *map(_pointer, inputs), *map(_pointer, outputs), _pointer(aux), _pointer(order)
    )
    # The step's own inputs, then the new memory, read weights and write weights, then the rest.
    kept = inputs + [outputs[1], outputs[4], outputs[5], aux, order]
    return outputs, kept


def memory_backward(kept: list[torch.Tensor], grads: list[torch.Tensor],
                    results: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
    """kept (from ``memory_forward``), grads of its seven outputs -> grads of raw and the six state tensors.

    results: seven contiguous tensors to write them to (shaped like raw and the state); new ones if None.
    The six state gradients may be the very tensors passed in ``grads`` (each element is read before
    its result is written), which lets a caller stepping backward through time reuse one set.
    """
    inputs = kept[:7]
    memory = inputs[1]
    b, n, w = memory.shape
    r = inputs[4].shape[1]
    grads = [g.contiguous() for g in grads]
    if results is None:
        results = [torch.empty_like(t) for t in inputs]
    _kernel("backward", memory.dtype)(
        b, n, w, r, _threads(b, n, w, r), *map(_pointer, kept), *map(_pointer, grads), *map(_pointer, results)
    )
    return results


def link_forward(prev_link: torch.Tensor, prev_precedence: torch.Tensor, write_weights: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
    """L_t [B, 1, N, N] into ``out`` from L_{t-1}, p_{t-1} [B, 1, N] and w^w_t [B, 1, N]: the link
    matrix ``memory_forward`` computes, bit for bit, without the rest of the step."""
    b, _, n, _ = prev_link.shape
    _kernel("link", prev_link.dtype)(b, n, _threads(b, n, 0, 0), *map(_pointer, (prev_link, prev_precedence,
                                                                               write_weights, out)))
    return out


def lstm_forward(gates: torch.Tensor, c_prev: torch.Tensor, act: torch.Tensor, c: torch.Tensor,
                 tanh_c: torch.Tensor) -> torch.Tensor:
    """The LSTM cell after its matrix products. gates [B, 4H] (pre-activations, torch's i, f, g, o
    order), c_prev [B, H]; writes σ(i), σ(f), tanh(g), σ(o) to act [B, 4H], c = f c_prev + i g to c
    and tanh(c) to tanh_c (all contiguous); returns h = o tanh(c) [B, H]."""
    gates, c_prev = gates.contiguous(), c_prev.contiguous()
    b, h = c_prev.shape
    out = torch.empty_like(c_prev)
    _kernel("lstm_forward", gates.dtype)(b, h, *map(_pointer, (gates, c_prev, act, c, tanh_c, out)))
    return out


def lstm_backward(act: torch.Tensor, c_prev: torch.Tensor, tanh_c: torch.Tensor, grad_h: torch.Tensor,
                  grad_c: torch.Tensor, grad_gates: torch.Tensor) -> torch.Tensor:
    """Backward of ``lstm_forward``: writes dLoss/dgates to grad_gates [B, 4H] (contiguous) and
    returns dLoss/dc_prev [B, H], from dLoss/dh and dLoss/dc of the step's outputs."""
    grad_h, grad_c = grad_h.contiguous(), grad_c.contiguous()
    b, h = c_prev.shape
    grad_c_prev = torch.empty_like(c_prev)
    _kernel("lstm_backward", act.dtype)(
        b, h, *map(_pointer, (act, c_prev.contiguous(), tanh_c, grad_h, grad_c, grad_gates, grad_c_prev))
    )
    return grad_c_prev


def exp(x: torch.Tensor) -> torch.Tensor:
    """The kernels' vectorised exp, elementwise (exposed for tests/test_native.py)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _kernel("exp", x.dtype)(x.numel(), _pointer(x), _pointer(out))
    return out


class _MemoryStep(torch.autograd.Function):
    """(raw interface [B, S], the six state tensors) -> (reads [B, R, W], the six new state tensors)."""

    @staticmethod
    def forward(ctx, raw, *state):
        outputs, kept = memory_forward(raw, list(state))
        ctx.save_for_backward(*kept)
        return tuple(outputs)

    @staticmethod
    @once_differentiable  # the backward kernel is not itself differentiable: refuse double backward
    def backward(ctx, *grads):
        return tuple(memory_backward(list(ctx.saved_tensors), list(grads)))


@torch.compiler.disable
def memory_step(raw_interface: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One memory step from the raw interface vector, with autograd: (read vectors [B, R, W], new state).

    raw_interface [B, S], the fields in ``memory.interface_sizes`` order, before their
    nonlinearities; state: the six state tensors in ``memory.STATE_KEYS`` order (link_matrix
    [B, 1, N, N]), and the new state in the same order.
    """
    reads, *new_state = _MemoryStep.apply(raw_interface, *state)
    return reads, new_state


if __name__ == "__main__":  # `python -m dnc_lab.native`: build now and say where, or why not
    ok, why = available()
    print(f"dnc_lab native kernels: {_library._name if ok else 'unavailable: ' + why}")
    raise SystemExit(0 if ok else 1)
