"""The native backend: the memory step in C++ (``csrc/kernels.cpp``) for CPU tensors, forward and backward.

The kernel set of ``dnc_lab.backends`` (see :class:`dnc_lab.backends.Kernels`): ``memory_forward``
takes the previous state (the six tensors of ``memory.STATE_KEYS``) and the *raw* interface
vector (before the nonlinearities) and returns the same read vectors and new state as the
reference (``memory.memory_step`` of ``memory.parse_interface``), to float rounding;
tests/test_native.py checks values and gradients against it in float64.

Why it exists: the reference step is ~500 small ATen ops, each with a fixed cost of about 10 µs on
a CPU, which is most of a DNC's training time (benchmarks/RESULTS.md). The C++ source does the
same arithmetic in loops, one batch element at a time, in a single pass over the B·N² link matrix
each way.

The boundary is checked: before any pointer reaches C++, ``check_step`` verifies one device (the
CPU), one dtype (float32 or float64) for every tensor, every shape and the interface width, and
raises the same kind of ValueError the reference path gives; tensors are made contiguous. The
step is a registered operator (``dnc_lab::native_memory_step``, with a fake implementation for
meta tensors and ``torch.compile``; tests run ``torch.library.opcheck`` on it).

Threads: the kernels use ``torch.get_num_threads()`` threads (when the work is large enough to
pay for them), so ``torch.set_num_threads`` and ``train.threads`` govern them as they govern
torch's own operations.

The library is compiled on first use with the system's C++ compiler (``$CXX``, else ``g++``) into
``$DNC_LAB_CACHE`` (default ``~/.cache/dnc_lab``)/native/, keyed by the source, the compiler and
its version, the flags and the CPU's model and full feature flags, so a home directory shared by
machines with different CPUs keeps one build per CPU type and never loads another's. No PyTorch
headers are involved: building takes a few seconds. ``available()`` says whether it can be used,
and why not; ``DNC(backend="auto")`` then takes the reference path, saying why once.

Csordás & Schmidhuber's variants (ICLR 2019: ``masked_lookup`` with ``mask_min``, ``deallocation``,
``link_sharpness``) are computed when the ``variants`` argument (a ``backends.Variants``) asks for
them: the kernels receive them as a bit set (``variant_bits``) and ``mask_min``, the raw interface
then carries the variants' fields after the paper's, and the saved buffer grows by what their
backward needs (``aux_size``). The plain DNC's step is unchanged by them.

Limits: CPU tensors, float32 or float64, one write head (``num_writes=1``, the paper's DNC).
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

from dnc_lab.backends import PLAIN, Saved, Variants, check_variants
from dnc_lab.memory import interface_sizes

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
    """The CPU's model and its full feature flags: -march=native code may not run on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = ("vendor_id", "model name", "cpu family", "model\t", "flags", "Features", "CPU part")
    first_cpu = lines[:lines.index("")] if "" in lines else lines  # the first processor's block
    found = [line for line in first_cpu if line.startswith(wanted)]
    return "\n".join(found) if found else f"{platform.machine()} {platform.processor()}"


def _compiler_id(compiler: str) -> str:
    """What ``compiler --version`` prints: another compiler version may generate other code."""
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True)
    return result.stdout.strip() or result.stderr.strip()


def _cache_dir() -> Path:
    root = os.environ.get("DNC_LAB_CACHE") or Path.home() / ".cache" / "dnc_lab"
    return Path(root) / "native"


def library_path(compiler: str) -> Path:
    """Where the build for this source, compiler (and its version), flags and CPU lives in the cache."""
    key = hashlib.sha256(b"\0".join([
        SOURCE.read_bytes(), compiler.encode(), _compiler_id(compiler).encode(), " ".join(FLAGS).encode(),
        _cpu_id().encode(),
    ])).hexdigest()[:16]
    return _cache_dir() / f"kernels-{key}.so"


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: '{compiler}' is not on PATH (install g++, or set CXX)")
    target = library_path(compiler)
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
        getattr(library, name).argtypes = [i64, i64, i64, c_int]
    for suffix in ("f32", "f64"):
        forward = getattr(library, f"dnc_forward_{suffix}")
        forward.restype = None
        forward.argtypes = [i64, i64, i64, i64, c_int, ctypes.c_double, c_int] + [ptr] * 16
        backward = getattr(library, f"dnc_backward_{suffix}")
        backward.restype = None
        backward.argtypes = [i64, i64, i64, i64, c_int, ctypes.c_double, c_int] + [ptr] * 26
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
    """(True, '') when the native kernels can be used here, else (False, the reason)."""
    try:
        load()
    except RuntimeError as error:
        return False, str(error)
    return True, ""


NAME = "native"
SUPPORTED_VARIANTS: tuple = ("masked_lookup", "deallocation", "link_sharpness")  # all of dnc_lab.backends.VARIANTS


def variant_bits(variants: Variants) -> int:
    """The bit set the kernels receive for ``variants`` (csrc's LINK_SHARPNESS, ...); 0 for the plain DNC."""
    return variants.link_sharpness | variants.deallocation << 1 | variants.masked_lookup << 2


def unsupported(config, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why a DNC of ``config`` (dnc.CoreConfig) cannot run here on ``dtype`` tensors on ``device``; None if it can."""
    if device.type != "cpu":
        return f"it runs on the CPU, not on {device.type}"
    if dtype not in DTYPES:
        return f"it computes in float32 or float64, not {dtype}"
    if config.num_writes != 1:
        return f"it has one write head, not num_writes={config.num_writes}"
    return None


# ---- The boundary: what is checked before a pointer reaches C++ --------------------------------

DTYPES = (torch.float32, torch.float64)
STATE_NAMES = ("memory", "link_matrix", "precedence", "read_weights", "write_weights", "usage_vector")


def interface_size(cells: int, width: int, reads: int, variants: Variants = PLAIN) -> int:
    """S, the raw interface width for one write head and ``variants``: memory.interface_sizes summed
    (csrc's Dims::S computes the same; a test checks they agree)."""
    return sum(interface_sizes(width, reads, 1, variants.masked_lookup, variants.link_sharpness).values())


def aux_size(cells: int, width: int, reads: int, variants: Variants = PLAIN) -> int:
    """Per batch element, the floats forward keeps for backward (csrc's Dims::aux)."""
    plain = (7 + 4 * reads) * cells + reads + 1
    return (plain + (2 * reads * cells if variants.link_sharpness else 0)  # the weightings before sharpening
            + (reads * cells if variants.masked_lookup else 0))  # each read head's row norms


def state_shapes(batch: int, cells: int, width: int, reads: int) -> list[tuple[int, ...]]:
    """The shapes of the six state tensors, in STATE_NAMES order."""
    b, n, w, r = batch, cells, width, reads
    return [(b, n, w), (b, 1, n, n), (b, 1, n), (b, r, n), (b, 1, n), (b, n)]


def check_step(raw: torch.Tensor, state: list[torch.Tensor], device_type: str = "cpu", variants: Variants = PLAIN
               ) -> tuple[int, int, int, int]:
    """Raise ValueError unless raw [B, S] and the six state tensors are one device's (the CPU's),
    of one dtype (float32 or float64), and of consistent shapes with S the interface width of one
    write head and ``variants``. Returns (B, N, W, R)."""
    if len(state) != 6:
        raise ValueError(f"native memory step: expected the six state tensors {list(STATE_NAMES)}, got {len(state)}")
    named = [("raw interface", raw), *zip(STATE_NAMES, state)]
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"native memory step: {name} is a {type(tensor).__name__}, expected a tensor")
        if tensor.device.type != device_type:
            raise ValueError(f"native memory step: {name} is on {tensor.device}, expected {device_type} tensors")
    if raw.dtype not in DTYPES:
        raise ValueError(f"native memory step: the raw interface is {raw.dtype}, expected float32 or float64")
    for name, tensor in named[1:]:
        if tensor.dtype != raw.dtype:
            raise ValueError(f"native memory step: {name} is {tensor.dtype} but the raw interface is {raw.dtype}: "
                             f"every tensor of the step must have one dtype")
    memory, read_weights = state[0], state[3]
    if memory.dim() != 3 or read_weights.dim() != 3:
        raise ValueError(f"native memory step: memory has shape {tuple(memory.shape)} and read_weights "
                         f"{tuple(read_weights.shape)}, expected [B, N, W] and [B, R, N]")
    b, n, w = memory.shape
    r = read_weights.shape[1]
    for name, tensor, shape in zip(STATE_NAMES, state, state_shapes(b, n, w, r)):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"native memory step: {name} has shape {tuple(tensor.shape)}, expected {list(shape)} "
                             f"(B={b}, N={n}, W={w}, R={r}, one write head)")
    s = interface_size(n, w, r, variants)
    if tuple(raw.shape) != (b, s):
        on = variants.names()
        raise ValueError(f"native memory step: the raw interface has shape {tuple(raw.shape)}, expected [{b}, {s}] "
                         f"(the interface width for N={n}, W={w}, R={r}, one write head and "
                         f"{'the variants ' + ', '.join(on) if on else 'no variants'})")
    return b, n, w, r


def extra_shapes(batch: int, cells: int, width: int, reads: int, dtype: torch.dtype, variants: Variants = PLAIN
                 ) -> list[tuple[tuple, torch.dtype]]:
    """Shapes and dtypes of ``Saved.extra`` for one step: the aux floats and the allocation's sort order."""
    return [((batch, aux_size(cells, width, reads, variants)), dtype), ((batch, cells), torch.int32)]


def _dims(state: list[torch.Tensor]) -> tuple[int, int, int, int]:
    """(B, N, W, R) of a state already checked."""
    b, n, w = state[0].shape
    return b, n, w, state[3].shape[1]


def _check_out(name: str, tensor: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A tensor the kernel writes into must be exactly what it expects: it cannot be made so by a copy."""
    dtype = dtype or like.dtype
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype or tensor.device != like.device \
            or not tensor.is_contiguous():
        raise ValueError(f"native kernels: {name} must be a contiguous {dtype} tensor of shape {list(shape)} "
                         f"on {like.device}, got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
                         f"{'' if tensor.is_contiguous() else ', not contiguous'}")
    return tensor


def _pointer(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def _kernel(name: str, dtype: torch.dtype):
    return getattr(load(), f"dnc_{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def _threads(batch: int, cells: int, width: int, heads: int) -> int:
    work = batch * cells * (cells + width * (heads + 1))  # ~ the multiply-adds of a step
    return torch.get_num_threads() if work >= _PARALLEL_MIN_WORK else 1


# ---- The kernel set (dnc_lab.backends.Kernels), without autograd ---------------------------------


def memory_forward(raw: torch.Tensor, state: list[torch.Tensor], out: Optional[list] = None, trusted: bool = False,
                   variants: Variants = PLAIN) -> tuple[list[torch.Tensor], Saved]:
    """raw [B, S], state (memory, link, precedence, read weights, write weights, usage) ->
    (outputs: reads [B, R, W] and the six new state tensors, saved: what ``memory_backward`` needs).

    out: where to write the seven outputs and then the extra tensors (``extra_shapes``), each
    contiguous and of exactly its shape and dtype, or None for a new tensor (the default: all new).
    trusted: skip the checks, for a caller that checked the first step of a sequence and made every
    later buffer itself (sequence.py): at small sizes the checks cost as much as the kernel.
    """
    if not trusted:
        check_variants(NAME, SUPPORTED_VARIANTS, variants)
    b, n, w, r = _dims(state) if trusted else check_step(raw, state, variants=variants)
    inputs = [t.contiguous() for t in (raw, *state)]
    shapes = [((b, r, w), raw.dtype), *((shape, raw.dtype) for shape in state_shapes(b, n, w, r)),
              *extra_shapes(b, n, w, r, raw.dtype, variants)]
    given = list(out or []) + [None] * (len(shapes) - len(out or []))
    names = ("reads", *STATE_NAMES, "aux", "order")
    results = [torch.empty(shape, dtype=dtype) if t is None else
               t if trusted else _check_out(f"out {name}", t, shape, raw, dtype)
               for t, (shape, dtype), name in zip(given, shapes, names)]
    outputs, (aux, order) = results[:7], results[7:]
    _kernel("forward", raw.dtype)(
        b, n, w, r, variant_bits(variants), variants.mask_min, _threads(b, n, w, r), *map(_pointer, inputs), *map(_pointer, outputs), _pointer(aux), _pointer(order)
    )
    return outputs, Saved(*inputs, outputs[1], outputs[4], outputs[5], (aux, order))


def memory_backward(saved: Saved, grads: list[torch.Tensor], results: Optional[list[torch.Tensor]] = None,
                    trusted: bool = False, variants: Variants = PLAIN) -> list[torch.Tensor]:
    """saved (from ``memory_forward``), grads of its seven outputs -> grads of raw and the six state tensors.

    results: seven contiguous tensors to write them to (shaped like raw and the state); new ones if None.
    The six state gradients may be the very tensors passed in ``grads`` (each element is read before
    its result is written), which lets a caller stepping backward through time reuse one set.
    trusted: skip the checks (see ``memory_forward``).
    """
    inputs = list(saved[:7])
    if trusted:
        b, n, w, r = _dims(inputs[1:])
    else:
        check_variants(NAME, SUPPORTED_VARIANTS, variants)
        b, n, w, r = check_step(inputs[0], inputs[1:], variants=variants)
        grads = _checked_grads(grads, inputs[1].dtype, [(b, r, w), *state_shapes(b, n, w, r)])
        if results is not None:
            results = [_check_out(f"result {i}", t, tuple(x.shape), x) for i, (t, x) in enumerate(zip(results, inputs))]
    if results is None:
        results = [torch.empty_like(t) for t in inputs]
    aux, order = saved.extra
    kept = [*inputs, saved.new_memory, saved.new_read_weights, saved.new_write_weights, aux, order]
    _kernel("backward", inputs[1].dtype)(
        b, n, w, r, variant_bits(variants), variants.mask_min, _threads(b, n, w, r), *map(_pointer, kept), *map(_pointer, grads), *map(_pointer, results)
    )
    return results


def _checked_grads(grads: list[torch.Tensor], dtype: torch.dtype, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """The gradients of the step's seven outputs, checked and made contiguous."""
    if len(grads) != 7:
        raise ValueError(f"native memory backward: expected 7 gradients (reads and the six state tensors), got {len(grads)}")
    for name, grad, shape in zip(("reads", *STATE_NAMES), grads, shapes):
        if tuple(grad.shape) != shape or grad.dtype != dtype or grad.device.type != "cpu":
            raise ValueError(f"native memory backward: the gradient of {name} is {grad.dtype} {tuple(grad.shape)} on "
                             f"{grad.device}, expected {dtype} {list(shape)} on the CPU")
    return [grad.contiguous() for grad in grads]


def link_forward(prev_link: torch.Tensor, prev_precedence: torch.Tensor, write_weights: torch.Tensor,
                 out: torch.Tensor, trusted: bool = False) -> torch.Tensor:
    """L_t [B, 1, N, N] into ``out`` from L_{t-1}, p_{t-1} [B, 1, N] and w^w_t [B, 1, N]: the link
    matrix ``memory_forward`` computes, bit for bit, without the rest of the step."""
    b, _, n, _ = prev_link.shape
    for name, tensor, shape in (("prev_link", prev_link, (b, 1, n, n)), ("prev_precedence", prev_precedence, (b, 1, n)),
                                ("write_weights", write_weights, (b, 1, n)), ("out", out, (b, 1, n, n))):
        if not trusted:
            _check_out(name, tensor, shape, prev_link)
    if prev_link.dtype not in DTYPES or prev_link.device.type != "cpu":
        raise ValueError(f"native link_forward: expected CPU float32/float64 tensors, got {prev_link.dtype} on "
                         f"{prev_link.device}")
    _kernel("link", prev_link.dtype)(b, n, _threads(b, n, 0, 0), *map(_pointer, (prev_link, prev_precedence,
                                                                               write_weights, out)))
    return out


def _check_lstm(gates: torch.Tensor, c_prev: torch.Tensor, **others: torch.Tensor) -> None:
    """gates or act [B, 4H] and c_prev [B, H] on the CPU in one float dtype; the other tensors [B, H],
    or [B, 4H] for names starting with 'act'/'grad_gates', contiguous."""
    if c_prev.dim() != 2 or gates.shape != (c_prev.shape[0], 4 * c_prev.shape[1]):
        raise ValueError(f"native LSTM cell: gates {tuple(gates.shape)} and c_prev {tuple(c_prev.shape)}, expected "
                         f"[B, 4H] and [B, H]")
    if c_prev.dtype not in DTYPES or c_prev.device.type != "cpu":
        raise ValueError(f"native LSTM cell: expected CPU float32/float64 tensors, got {c_prev.dtype} on {c_prev.device}")
    _check_out("gates", gates, tuple(gates.shape), c_prev)
    for name, tensor in others.items():
        _check_out(name, tensor, tuple(gates.shape if name in ("act", "grad_gates") else c_prev.shape), c_prev)


def lstm_forward(gates: torch.Tensor, c_prev: torch.Tensor, act: torch.Tensor, c: torch.Tensor,
                 tanh_c: torch.Tensor, trusted: bool = False) -> torch.Tensor:
    """The LSTM cell after its matrix products. gates [B, 4H] (pre-activations, torch's i, f, g, o
    order), c_prev [B, H]; writes σ(i), σ(f), tanh(g), σ(o) to act [B, 4H], c = f c_prev + i g to c
    and tanh(c) to tanh_c (all contiguous); returns h = o tanh(c) [B, H]."""
    gates, c_prev = gates.contiguous(), c_prev.contiguous()
    b, h = c_prev.shape
    if not trusted:
        _check_lstm(gates, c_prev, act=act, c=c, tanh_c=tanh_c)
    out = torch.empty_like(c_prev)
    _kernel("lstm_forward", gates.dtype)(b, h, *map(_pointer, (gates, c_prev, act, c, tanh_c, out)))
    return out


def lstm_backward(act: torch.Tensor, c_prev: torch.Tensor, tanh_c: torch.Tensor, grad_h: torch.Tensor,
                  grad_c: torch.Tensor, grad_gates: torch.Tensor, trusted: bool = False) -> torch.Tensor:
    """Backward of ``lstm_forward``: writes dLoss/dgates to grad_gates [B, 4H] (contiguous) and
    returns dLoss/dc_prev [B, H], from dLoss/dh and dLoss/dc of the step's outputs."""
    grad_h, grad_c, c_prev = grad_h.contiguous(), grad_c.contiguous(), c_prev.contiguous()
    b, h = c_prev.shape
    if not trusted:
        _check_lstm(act, c_prev, tanh_c=tanh_c, grad_h=grad_h, grad_c=grad_c, grad_gates=grad_gates)
    grad_c_prev = torch.empty_like(c_prev)
    _kernel("lstm_backward", act.dtype)(
        b, h, *map(_pointer, (act, c_prev, tanh_c, grad_h, grad_c, grad_gates, grad_c_prev))
    )
    return grad_c_prev


def exp(x: torch.Tensor) -> torch.Tensor:
    """The kernels' vectorised exp, elementwise (exposed for tests/test_native.py)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _kernel("exp", x.dtype)(x.numel(), _pointer(x), _pointer(out))
    return out


# ---- The step with autograd, as a registered operator ---------------------------------------------
# Registered so that torch sees a real operator with a schema: fake tensors (meta device,
# torch.compile) get the output shapes from ``_step_fake`` without running C++, and
# torch.library.opcheck can test the registration (tests/test_native.py).


@torch.library.custom_op("dnc_lab::native_memory_step", mutates_args=())
def _step_op(raw: torch.Tensor, memory: torch.Tensor, link: torch.Tensor, precedence: torch.Tensor,
             read_weights: torch.Tensor, write_weights: torch.Tensor, usage: torch.Tensor, masked_lookup: bool,
             mask_min: float, deallocation: bool, link_sharpness: bool) -> list[torch.Tensor]:
    """(raw, six state tensors, the Variants' four fields) -> [reads, six new state tensors, the extra tensors]
    (the extra ones for backward)."""
    variants = Variants(masked_lookup, mask_min, deallocation, link_sharpness)
    outputs, saved = memory_forward(raw, [memory, link, precedence, read_weights, write_weights, usage],
                                    variants=variants)
    return [*outputs, *saved.extra]


@_step_op.register_fake
def _step_fake(raw, memory, link, precedence, read_weights, write_weights, usage, masked_lookup, mask_min,
               deallocation, link_sharpness):
    state = [memory, link, precedence, read_weights, write_weights, usage]
    variants = Variants(masked_lookup, mask_min, deallocation, link_sharpness)
    b, n, w, r = check_step(raw, state, device_type=raw.device.type, variants=variants)
    new = memory.new_empty
    return [new(b, r, w), *(new(shape) for shape in state_shapes(b, n, w, r)),
            *(new(shape, dtype=dtype) for shape, dtype in extra_shapes(b, n, w, r, raw.dtype, variants))]


@torch.library.custom_op("dnc_lab::native_memory_step_backward", mutates_args=())
def _step_backward_op(saved: list[torch.Tensor], grads: list[torch.Tensor], masked_lookup: bool, mask_min: float,
                      deallocation: bool, link_sharpness: bool) -> list[torch.Tensor]:
    """(the forward's saved tensors, gradients of its seven outputs, the Variants' fields) -> gradients of its
    seven inputs."""
    variants = Variants(masked_lookup, mask_min, deallocation, link_sharpness)
    return memory_backward(Saved.from_tensors(saved), grads, variants=variants)


@_step_backward_op.register_fake
def _step_backward_fake(saved, grads, masked_lookup, mask_min, deallocation, link_sharpness):
    return [torch.empty_like(t) for t in saved[:7]]


def _step_setup_context(ctx, inputs, output):
    reads, memory, link, precedence, read_weights, write_weights, usage, *extra = output
    ctx.variants = Variants(*inputs[7:])
    ctx.mark_non_differentiable(*extra)
    ctx.set_materialize_grads(False)  # no zero gradients made for the extra tensors (backward fills in what it needs)
    ctx.save_for_backward(*inputs[:7], memory, read_weights, write_weights, *extra)


def _step_backward(ctx, grads):
    saved = list(ctx.saved_tensors)
    b, n, w = saved[1].shape
    r = saved[4].shape[1]
    shapes = [(b, r, w), *state_shapes(b, n, w, r)]
    # An output that did not reach the loss has no gradient: zeros of its shape.
    grads = [g if g is not None else saved[1].new_zeros(shape) for g, shape in zip(grads[:7], shapes)]
    return (*_step_backward_op(saved, grads, *ctx.variants), None, None, None, None)


_step_op.register_autograd(_step_backward, setup_context=_step_setup_context)


def memory_step(raw_interface: torch.Tensor, state: list[torch.Tensor], variants: Variants = PLAIN
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One memory step from the raw interface vector, with autograd: (read vectors [B, R, W], new state).

    raw_interface [B, S], the fields in ``memory.interface_sizes`` order, before their
    nonlinearities; state: the six state tensors in ``memory.STATE_KEYS`` order (link_matrix
    [B, 1, N, N]), and the new state in the same order. Its backward is not itself differentiable:
    double backward is refused.
    """
    reads, *new_state = _step_op(raw_interface, *state, *variants)[:7]
    return reads, new_state


if __name__ == "__main__":  # `python -m dnc_lab.backends.native`: build now and say where, or why not
    ok, why = available()
    print(f"dnc_lab native kernels: {_library._name if ok else 'unavailable: ' + why}")
    raise SystemExit(0 if ok else 1)
