"""The Triton memory step: ``memory.memory_step`` as three GPU kernels forward and three backward.

The same kernel set as the CPU native backend (``native.py``, ``csrc/kernels.cpp``), with the same
contract (``dnc_lab.backends.Kernels``), so that the whole-sequence operator (``sequence.py``) runs
on either: ``memory_forward`` / ``memory_backward`` (one memory step, one write head),
``link_forward`` (the link matrix alone, for recomputing it in backward), ``lstm_forward`` /
``lstm_backward`` (the LSTM cell after its matrix products, which stay on cuBLAS), and
``memory_step`` (the step with autograd, for the other controllers). float32 and float64. The
specification is the reference path, ``memory.memory_step(parse_interface(raw))`` with
``addressing.py``; tests/test_triton.py checks values and gradients against it in float64.
All three of Csordás & Schmidhuber's variants (``dnc_lab.backends.Variants``), alone or together.

Why: on a GPU the reference step is ~120 ATen ops forward and ~260 backward, each a kernel launch
of 5-10 µs whatever the batch, so a DNC there is launch-bound. Here a time step is 8 launches
(forward and backward, memory and LSTM together; ``LAUNCHES`` counts them and a test checks it).
On CPU tensors the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI
tests them: slow, but the same kernel code.

The kernels, and why each split is where it is
----------------------------------------------
A kernel boundary is needed exactly where a value depends on a reduction over the whole batch
element that another program computes: Triton programs cannot wait for each other, and
reductions across programs without atomics (which would make results depend on timing) must be
written out and summed by a later launch in a fixed order.

Forward (B = batch, N cells, W cell width, R read heads; programs in brackets)::

    1. _write_kernel [B]       interface nonlinearities, usage and retention, write content
                               lookup on M_{t-1}, allocation, write weights, precedence,
                               erase and write (M_t), and the read content lookups on M_t
    2. _link_kernel  [B, N/TI] L_t row tile by row tile, with f = L_t w^r_{t-1} (complete per
                               row) and per-tile partial sums of b = L_tᵀ w^r_{t-1}
    3. _read_kernel  [B]       sums the partials of b in tile order, read modes, read weights,
                               read vectors

The link kernel needs the write weights (all of them: kernel 1); the read weights need b, whose
columns sum over every row tile (kernel 2). Everything that only needs the write weights or M_t
(the read content lookups) sits in kernel 1, so that kernel 3 is short.

Backward::

    4. _read_backward_kernel  [B]       read vectors, read weights and read modes, read content
                                        lookups, and erase-and-write: dM_{t-1} (its first part),
                                        de, dv and the memory's share of dw^w; dL_t's row and
                                        column weights df, db
    5. _link_backward_kernel  [B, N/TI] dL_{t-1} tile by tile (L_t recomputed from L_{t-1}, not
                                        kept), with the row sums of dw^w and dw^r_{t-1} complete
                                        per row and partial column sums per tile
    6. _write_backward_kernel [B]       sums the partials, precedence, write weights, write
                                        content lookup (dM_{t-1}, second part), allocation,
                                        usage, the rest of the interface nonlinearities

Kernel 5 needs df and db, which need dw^r_t, which needs dr (kernel 4) summed over all cells;
kernel 6 needs dw^w, which has column sums over all row tiles of kernel 5.

The LSTM cell is one launch forward (``lstm_forward``) and one backward per layer and step. So a
time step of a one-layer DNC is 3 + 3 + 1 + 1 = 8 launches, 9 where ``checkpoint_steps``
recomputes a link matrix (``link_forward``, one launch); the issue's budget is 12. Nothing else
launches: outputs and scratch are ``torch.empty`` (an allocation, not a kernel), every kernel
writes every element it owns, and tensors are made contiguous only when they are not already.

Tiling
------
Per-cell vectors ([N], [R, N]) are held whole in one program (next power of two of N), which is
fine up to several thousand cells. The matrices are never held whole: [N, W] memory is visited
in tiles of ROWS rows (ROWS·W·R elements at most ``TILE_ELEMENTS``), the [N, N] link matrix in
``LINK_TILE`` × ``LINK_TILE`` tiles (row tiles across programs, column tiles in a loop), and the
allocation's rank comparison in ``RANK_TILE`` × ``RANK_TILE`` tiles. So 1024 cells (and more)
run; tests/test_triton.py shrinks the tiles to run every multi-tile path at small N.

The variants (Csordás & Schmidhuber, ICLR 2019)
-----------------------------------------------
Each is a compile-time flag of the kernels it touches (MASKED with its floor MASK_MIN, DEALLOC, SHARP), so it
adds no launch and the plain DNC's kernels are compiled without its code (the same instructions as before the
variants existed; their extra pointer arguments are unused). The variants' raw fields come after the paper's
(``memory.interface_sizes``): read masks [R*W], write mask [W], then forward and backward sharpness [R] each.

- ``masked_lookup``: kernel 1 computes both lookups with masked keys and norms, and keeps each read head's own
  masked norm of every cell (new_norms [R, N]); kernels 4 and 6 add the masks' gradients, with the same
  coefficients as the plain cosine's backward (see ``_read_backward_kernel``).
- ``deallocation``: kernel 1 keeps ψ and scales M_{t-1} by it row by row before the erase; kernel 4 writes the
  memory's share of dLoss/dψ, which kernel 6 adds to the usage's before it reaches the free gates and w^r_{t-1}.
- ``link_sharpness``: kernel 3 sharpens f and b (whole rows are there: max and sum over the cells); forward
  keeps them unsharpened and kernel 4 sharpens them again to backpropagate. The link kernels are unchanged.

Allocation without a sort
-------------------------
Cell i's place in the free list is its rank, the number of cells j with (u_j, j) < (u_i, i):
ties go to the lower index, as the CPU's stable sort does (an empty memory is all ties). The
usage is scattered to its rank (a permutation: no two programs write one place), the exclusive
cumulative product is a scan, and backward's recurrence over the sorted order,
Q_j = s_{j+1} Q_{j+1} + dA_{j+1} (1 - s_{j+1}), is a reverse associative scan of that linear
recurrence (no division by a usage that may be 0). O(N²) comparisons: at N = 1024 that is 1M per
batch element, small beside the link matrix's.

Determinism
-----------
No atomics. Every reduction is either inside one program (a fixed tree for a fixed shape) or a
partial per tile written to its own place and summed by a later kernel in tile order. Two runs
on the same inputs give the same bits, and exact resume holds on a GPU.

Within a program, a value written to global memory and read back by other threads of the same
program (the scatter and gather of the sort, tile results gathered as whole vectors) is
separated by ``tl.debug_barrier()``. The same barrier precedes each store that may overwrite a
gradient input (``memory_backward``'s results may be its ``grads``: sequence.py reuses one set).

Checking without a GPU: the interpreter runs Python and accepts some things the compiler refuses,
so ``python -m dnc_lab.backends.triton [fp32|fp64] [N W R]`` (``compile_kernels``) compiles every
kernel for an sm_90 GPU on any machine (a slow test does it in CI).

Differences from the reference, all rounding: sums and products are taken in a different order
(tree reductions, parallel scans). The reference's backward uses ``cumsum``/``scatter``-style
ops that are not deterministic on CUDA; these kernels are.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from dnc_lab.backends import PLAIN, Saved, Variants, check_variants
from dnc_lab.memory import interface_sizes

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # the module still imports, so that available() can say why not
    triton = None
    _IMPORT_ERROR = f"triton is not installed ({error})"

# Tile sizes (elements per tile of [N, W] memory work; rows/columns of a link-matrix tile; cells
# per tile of the rank comparison). Module attributes so that tests can shrink them.
TILE_ELEMENTS = 4096
LINK_TILE = 32
RANK_TILE = 64

# Kernel launches by kernel name, counted by _launch (every launch in this module goes through it).
LAUNCHES: Counter = Counter()


def available() -> tuple[bool, str]:
    """(True, '') when the Triton kernels can run here, else (False, the reason).

    They run on CUDA tensors, and on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1,
    which must be set before this module is first imported).
    """
    if triton is None:
        return False, _IMPORT_ERROR
    if _interpreted():
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device (and TRITON_INTERPRET=1 is not set, which runs the kernels on CPU tensors)"
    return True, ""


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(kernel, grid: tuple, *args, **meta) -> None:
    LAUNCHES[kernel.fn.__name__] += 1
    kernel[grid](*args, **meta)


def _empty(like: torch.Tensor, *shape: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Every output and scratch buffer of this module: uninitialised memory, no fill kernel. (Tests fill it with
    NaN instead, to show that no kernel reads an element that no kernel wrote.)"""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


NAME = "triton"  # its key in dnc_lab.backends.MODULES
SUPPORTED_VARIANTS: tuple = ("masked_lookup", "deallocation", "link_sharpness")  # all of dnc_lab.backends.VARIANTS


def unsupported(config, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why a DNC of ``config`` (dnc.CoreConfig) cannot run here on ``dtype`` tensors on ``device``; None if it can."""
    if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not _interpreted()):
        return f"it runs on CUDA (on the CPU only in Triton's interpreter, TRITON_INTERPRET=1), not on {device.type}"
    if dtype not in (torch.float32, torch.float64):
        return f"it computes in float32 or float64, not {dtype}"
    if config.num_writes != 1:
        return f"it has one write head, not num_writes={config.num_writes}"
    return None


def extra_shapes(batch: int, cells: int, width: int, reads: int, dtype: torch.dtype, variants: Variants = PLAIN
                 ) -> list[tuple[tuple, torch.dtype]]:
    """Shapes and dtypes of ``Saved.extra`` for one step: the values kept per batch element, the allocation ranks."""
    return [((batch, _kept_layout(cells, reads, variants.masked_lookup, variants.deallocation).size), dtype),
            ((batch, cells), torch.int32)]


def _check(device: torch.device, dtype: torch.dtype) -> None:
    ok, why = available()
    if not ok:
        raise RuntimeError(f"the Triton memory step is unavailable: {why}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the Triton kernels take float32 or float64 tensors, got {dtype}")
    if device.type == "cpu" and not _interpreted():
        raise RuntimeError("the Triton kernels got CPU tensors: they run on CUDA, or on the CPU with TRITON_INTERPRET=1")


_STATE_NAMES = ("memory", "link_matrix", "precedence", "read_weights", "write_weights", "usage_vector")


def _interface_width(width: int, reads: int, variants: Variants) -> int:
    """S, the raw interface's width for one write head: the paper's fields, then the variants' (memory.interface_sizes)."""
    return sum(interface_sizes(width, reads, 1, variants.masked_lookup, variants.link_sharpness).values())


def _check_step(raw: torch.Tensor, state: list[torch.Tensor], variants: Variants) -> tuple[int, int, int, int]:
    """Raise unless raw [B, S] and the six state tensors share one device and dtype and have consistent shapes
    for one write head (and S holds the variants' fields). Returns (B, N, W, R)."""
    if len(state) != 6:
        raise ValueError(f"Triton memory step: expected the six state tensors {list(_STATE_NAMES)}, got {len(state)}")
    memory, link, read_weights = state[0], state[1], state[3]
    _check(memory.device, memory.dtype)
    if memory.dim() != 3 or read_weights.dim() != 3:
        raise ValueError(f"Triton memory step: memory has shape {tuple(memory.shape)} and read_weights "
                         f"{tuple(read_weights.shape)}, expected [B, N, W] and [B, R, N]")
    b, n, w = memory.shape
    r = read_weights.shape[1]
    if link.dim() == 4 and link.shape[1] != 1:
        raise ValueError(f"Triton memory step: it has one write head; the link matrix is {tuple(link.shape)}, "
                         f"expected [{b}, 1, {n}, {n}]")
    shapes = [(b, n, w), (b, 1, n, n), (b, 1, n), (b, r, n), (b, 1, n), (b, n)]
    for name, tensor, shape in zip(_STATE_NAMES, state, shapes):
        if tuple(tensor.shape) != shape or tensor.dtype != memory.dtype or tensor.device != memory.device:
            raise ValueError(f"Triton memory step: {name} is {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}, "
                             f"expected {memory.dtype} {list(shape)} on {memory.device} (B={b}, N={n}, W={w}, R={r})")
    size = _interface_width(w, r, variants)
    if tuple(raw.shape) != (b, size) or raw.dtype != memory.dtype or raw.device != memory.device:
        raise ValueError(f"Triton memory step: the raw interface is {raw.dtype} {tuple(raw.shape)} on {raw.device}, "
                         f"expected {memory.dtype} [{b}, {size}] on {memory.device} (for N={n}, W={w}, R={r}"
                         f"{''.join(', ' + v for v in variants.names())})")
    return b, n, w, r


class _Blocks(NamedTuple):
    """Compile-time sizes for one (N, W, R): whole-vector blocks and the tiles of the matrices."""

    N: int
    W: int
    R: int
    BLOCK_N: int
    BLOCK_W: int
    BLOCK_R: int
    ROWS: int  # rows of a [N, W] memory tile
    LINK: int  # rows and columns of a link-matrix tile
    RANK: int  # cells per tile of the rank comparison

    @property
    def link_tiles(self) -> int:
        return -(-self.N // self.LINK)

    def meta(self, *names: str) -> dict:
        return {name: getattr(self, name) for name in names}


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _blocks(n: int, w: int, r: int) -> _Blocks:
    block_n, block_w, block_r = _pow2(n), _pow2(w), _pow2(r)
    rows = max(1, min(block_n, _pow2(max(1, TILE_ELEMENTS // (block_w * block_r) + 1) // 2)))
    return _Blocks(n, w, r, block_n, block_w, block_r, rows, min(block_n, LINK_TILE), min(block_n, RANK_TILE))


class _Layout:
    """Named [B, size] views into one buffer per batch element: ``views(buffer)[name]``."""

    def __init__(self, **sizes: int):
        self.sizes = sizes
        self.size = sum(sizes.values())

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for name, size in self.sizes.items():
            out[name] = buffer[:, at:at + size]
            at += size
        return out


@functools.lru_cache(maxsize=None)
def _kept_layout(n: int, r: int, masked: bool = False, deallocation: bool = False) -> _Layout:
    """What forward keeps for backward (``Saved.extra[0]``), per batch element.

    The plain DNC's layout, except: with masked lookup each read head sees its own masked norm of every cell
    (new_norms [R, N], not [N]; prev_norms and key_norms are the masked ones); with de-allocation the retention
    vector ψ is kept. The forward and backward weightings are kept before sharpening (backward recomputes it).
    """
    extra = {"retention": n} if deallocation else {}
    return _Layout(write_content=n, write_cosine=n, prev_norms=n, allocation=n, sorted_usage=n, before=n,
                   new_norms=r * n if masked else n, scratch=n, forward=r * n, backward=r * n, read_content=r * n,
                   read_cosine=r * n, key_norms=r + 1, **extra)


@functools.lru_cache(maxsize=None)
def _work_layout(n: int, r: int, deallocation: bool = False) -> _Layout:
    """Backward's scratch, per batch element (with de-allocation: the memory's share of dLoss/dψ)."""
    extra = {"grad_retention": n} if deallocation else {}
    return _Layout(grad_read=r * n, grad_forward=r * n, grad_backward=r * n, coef_a=r * n, coef_b=r * n,
                   grad_ww_memory=n, link_ww=n, link_wr=r * n, sorted_a=n, sorted_b=n, coef_wa=n, coef_wb=n, **extra)


def _flags(variants: Variants) -> dict:
    """The variants as the memory kernels' compile-time flags: each flag's code exists only in the kernels compiled
    with it, so the plain DNC's kernels are the ones without any. (mask_min is a constexpr too: as a run-time float
    argument Triton would pass it as a float32, which would round it in the float64 kernels.)"""
    return dict(MASKED=variants.masked_lookup, MASK_MIN=float(variants.mask_min) if variants.masked_lookup else 0.0,
                DEALLOC=variants.deallocation, SHARP=variants.link_sharpness)


def _warps(blocks: _Blocks) -> int:
    return 4 if blocks.BLOCK_N * blocks.BLOCK_R <= 1024 else 8


# ---- The kernels ------------------------------------------------------------------------------------------
# Interface fields per batch element, in memory.interface_sizes order (one write head):
#   k^r [R*W], β^r [R], k^w [W], β^w [1], e [W], v [W], f [R], g^a [1], g^w [1], π [3R] (backward, forward,
#   content per read head).

if triton is not None:
    EPSILON = tl.constexpr(1e-6)  # addressing.EPSILON

    @triton.jit
    def _mul(a, b):
        return a * b

    @triton.jit
    def _linear_recurrence(a1, b1, a2, b2):
        # x_k = a_k x_{k-1} + b_k as an associative combine (the scan direction decides k-1)
        return a1 * a2, b1 * a2 + b2

    @triton.jit
    def _sigmoid(x):
        return 1 / (1 + tl.exp(-x))

    @triton.jit
    def _log1p(z):
        # Kahan's: log(u) z / (u - 1) with u = 1 + z is accurate where log(1 + z) alone loses z. (v stands in for
        # u where the quotient is 0/0, so that no lane computes a NaN even in the branch not taken.)
        u = 1 + z
        v = tl.where(u == 1, 2.0, u)
        return tl.where(u == 1, z, tl.log(v) * z / (v - 1))

    @triton.jit
    def _expm1(x):
        # Kahan's again: (u - 1) x / log(u) with u = e^x; exactly x where u rounds to 1, -1 where it underflows.
        u = tl.exp(x)
        exact = (u == 1) | (u == 0)
        v = tl.where(exact, 2.0, u)
        return tl.where(u == 1, x, tl.where(u == 0, -1.0, (v - 1) * x / tl.log(v)))

    @triton.jit
    def _tanh(x):
        e = _expm1(-2 * tl.abs(x))  # tanh|x| = -e / (2 + e), accurate near 0 too
        t = -e / (2 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def _softplus(x):
        # torch.nn.functional.softplus with its default threshold 20 (identity above it)
        return tl.where(x > 20, x, _log1p(tl.exp(tl.minimum(x, 20))))

    @triton.jit
    def _softplus_slope(x):
        return tl.where(x > 20, 1.0, _sigmoid(x))

    @triton.jit
    def _link_value(prev, w_row, w_col, p_col):
        # L_t[i, j] = (1 - w_i - w_j) L_{t-1}[i, j] + w_i p_{t-1}[j]: one expression wherever a link is
        # computed, so that recomputed links are bit-equal to the forward pass's.
        return (1 - w_row - w_col) * prev + w_row * p_col

    @triton.jit
    def _modes(xi, heads, in_r, MODES: tl.constexpr):
        """π = softmax over each read head's three raw modes: (backward, forward, content), each [BLOCK_R]."""
        m0 = tl.load(xi + MODES + 3 * heads, mask=in_r, other=0.0)
        m1 = tl.load(xi + MODES + 3 * heads + 1, mask=in_r, other=0.0)
        m2 = tl.load(xi + MODES + 3 * heads + 2, mask=in_r, other=0.0)
        top = tl.maximum(tl.maximum(m0, m1), m2)
        z0, z1, z2 = tl.exp(m0 - top), tl.exp(m1 - top), tl.exp(m2 - top)
        total = z0 + z1 + z2
        return z0 / total, z1 / total, z2 / total

    @triton.jit
    def _mask(raw_mask, MASK_MIN: tl.constexpr):
        """memory.lookup_mask m = m_min + (1 - m_min) σ(raw), and dm/draw."""
        sig = _sigmoid(raw_mask)
        return MASK_MIN + (1 - MASK_MIN) * sig, (1 - MASK_MIN) * sig * (1 - sig)

    @triton.jit
    def _sharpen(d, s, valid):
        """addressing.sharpen of each row of d [BLOCK_R, BLOCK_N] with exponent s [BLOCK_R]: S = P / ΣP,
        P = (x / max x)^s, x = d + ε. Returns S (0 off ``valid``), log(x / max x) and x (1 off ``valid``), what
        ``_sharpen_backward`` needs. Dividing by the maximum only keeps P in (0, 1]; S does not depend on it."""
        x = tl.where(valid, d + EPSILON, 1.0)
        top = tl.max(tl.where(valid, x, 0.0), 1)
        top = tl.where(top > 0, top, 1.0)  # a padding head (no valid lane): anything finite
        log_scaled = tl.log(x / top[:, None])
        powered = tl.where(valid, tl.exp(s[:, None] * log_scaled), 0.0)
        total = tl.sum(powered, 1)
        return powered / tl.where(total > 0, total, 1.0)[:, None], log_scaled, x

    @triton.jit
    def _sharpen_backward(grad, sharp, log_scaled, x, s):
        """dLoss/dd and dLoss/ds of S = _sharpen(d, s) from G = dLoss/dS. With C = S ∘ (G - <G, S>):
        dd = s C / x and ds = Σ C log(x / max x) (the maximum's share, log max Σ C, is 0: Σ C = 0)."""
        centred = sharp * (grad - tl.sum(grad * sharp, 1)[:, None])
        return s[:, None] * centred / x, tl.sum(centred * log_scaled, 1)

    @triton.jit
    def _write_kernel(raw, memory_prev, precedence_prev, read_prev, write_prev, usage_prev,
                      memory, precedence, write_weights, usage,
                      write_content, write_cosine, prev_norms, allocation, sorted_usage, before, new_norms, scratch,
                      read_content, read_cosine, key_norms, rank, aux_stride, kept_retention,
                      N: tl.constexpr, W: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr, RANK: tl.constexpr,
                      MASKED: tl.constexpr, MASK_MIN: tl.constexpr, DEALLOC: tl.constexpr, SHARP: tl.constexpr):
        """Everything of a step up to M_t: usage, write lookup, allocation, write weights, precedence, erase and
        write; then the read content lookups on M_t. One program per batch element."""
        S: tl.constexpr = R * W + 3 * W + 5 * R + 3 + MASKED * (R * W + W) + SHARP * 2 * R
        KEY_W: tl.constexpr = R * W + R
        b = tl.program_id(0).to(tl.int64)
        xi = raw + b * S
        aux = b * aux_stride
        cells = tl.arange(0, BLOCK_N)
        in_n = cells < N
        cols = tl.arange(0, BLOCK_W)
        in_w = cols < W
        heads = tl.arange(0, BLOCK_R)
        in_r = heads < R
        head_cells = in_r[:, None] & in_n[None, :]

        write_key = tl.load(xi + KEY_W + cols, mask=in_w, other=0.0)
        beta_w = 1 + _softplus(tl.load(xi + KEY_W + W))
        erase = _sigmoid(tl.load(xi + KEY_W + W + 1 + cols, mask=in_w, other=0.0))
        vector = tl.load(xi + KEY_W + 2 * W + 1 + cols, mask=in_w, other=0.0)
        FREE: tl.constexpr = KEY_W + 3 * W + 1
        ga = _sigmoid(tl.load(xi + FREE + R))
        gw = _sigmoid(tl.load(xi + FREE + R + 1))

        # Usage u = (u' + w^w' - u' w^w') ψ,  ψ = Π_r (1 - f_r w^r'[r])
        retention = tl.full([BLOCK_N], 1.0, dtype=raw.dtype.element_ty)
        for r in tl.static_range(R):
            f_r = _sigmoid(tl.load(xi + FREE + r))
            retention *= 1 - f_r * tl.load(read_prev + (b * R + r) * N + cells, mask=in_n, other=0.0)
        u_prev = tl.load(usage_prev + b * N + cells, mask=in_n, other=0.0)
        ww_prev = tl.load(write_prev + b * N + cells, mask=in_n, other=0.0)
        u = (u_prev + ww_prev - u_prev * ww_prev) * retention
        tl.store(usage + b * N + cells, u, mask=in_n)
        if DEALLOC:  # ψ again below, row by row (and in backward)
            tl.store(kept_retention + aux + cells, retention, mask=in_n)

        # Write content lookup on M_{t-1}: cosines tile by tile, then the softmax over all cells. Masked (q = m²):
        # cos = Σ k q M[n] / (|k ∘ m| |M[n] ∘ m|), the norms kept are the masked ones.
        MASK_AT: tl.constexpr = R * W + 3 * W + 5 * R + 3
        if MASKED:
            write_mask, _ = _mask(tl.load(xi + MASK_AT + R * W + cols, mask=in_w, other=0.0), MASK_MIN)
            write_q = write_mask * write_mask
            key_norm_w = tl.sqrt(tl.sum(write_key * write_key * write_q, 0) + EPSILON)
            lookup_key = write_key * write_q
        else:
            key_norm_w = tl.sqrt(tl.sum(write_key * write_key, 0) + EPSILON)
            lookup_key = write_key
        for start in range(0, N, ROWS):
            rows = start + tl.arange(0, ROWS)
            in_rows = rows < N
            tile = tl.load(memory_prev + (b * N + rows[:, None]) * W + cols[None, :],
                           mask=in_rows[:, None] & in_w[None, :], other=0.0)
            if MASKED:
                norm = tl.sqrt(tl.sum(tile * tile * write_q[None, :], 1) + EPSILON)
            else:
                norm = tl.sqrt(tl.sum(tile * tile, 1) + EPSILON)
            tl.store(prev_norms + aux + rows, norm, mask=in_rows)
            tl.store(write_cosine + aux + rows, tl.sum(tile * lookup_key[None, :], 1) / (key_norm_w * norm), mask=in_rows)
        tl.debug_barrier()
        cos_w = tl.load(write_cosine + aux + cells, mask=in_n, other=0.0)
        z = tl.where(in_n, beta_w * cos_w, float("-inf"))
        cw = tl.exp(z - tl.max(z, 0))
        cw = cw / tl.sum(cw, 0)
        tl.store(write_content + aux + cells, cw, mask=in_n)

        # Allocation. Rank of cell i = #{j : (u_j, j) < (u_i, i)}; the usage goes to its rank (a permutation).
        for i0 in range(0, N, RANK):
            ii = i0 + tl.arange(0, RANK)
            in_i = ii < N
            u_i = tl.load(usage + b * N + ii, mask=in_i, other=0.0)
            count = tl.zeros([RANK], dtype=tl.int32)
            for j0 in range(0, N, RANK):
                jj = j0 + tl.arange(0, RANK)
                u_j = tl.load(usage + b * N + jj, mask=jj < N, other=0.0)
                earlier = (u_j[None, :] < u_i[:, None]) | ((u_j[None, :] == u_i[:, None]) & (jj[None, :] < ii[:, None]))
                count += tl.sum((earlier & (jj < N)[None, :]).to(tl.int32), 1)
            tl.store(rank + b * N + ii, count, mask=in_i)
            tl.store(sorted_usage + aux + count, u_i, mask=in_i)
        tl.debug_barrier()
        # a[φ_j] = (1 - s_j) Π_{i<j} s_i with s the sorted usage: an exclusive cumulative product.
        shifted = tl.load(sorted_usage + aux + cells - 1, mask=in_n & (cells > 0), other=1.0)
        product_before = tl.cumprod(shifted, 0)
        s = tl.load(sorted_usage + aux + cells, mask=in_n, other=1.0)
        tl.store(before + aux + cells, product_before, mask=in_n)
        tl.store(scratch + aux + cells, (1 - s) * product_before, mask=in_n)
        tl.debug_barrier()
        place = tl.load(rank + b * N + cells, mask=in_n, other=0)
        alloc = tl.load(scratch + aux + place, mask=in_n, other=0.0)
        tl.store(allocation + aux + cells, alloc, mask=in_n)

        # Write weights w^w = g^w (g^a a + (1 - g^a) c^w); precedence p = (1 - Σ w^w) p' + w^w.
        ww = tl.where(in_n, gw * (ga * alloc + (1 - ga) * cw), 0.0)
        tl.store(write_weights + b * N + cells, ww, mask=in_n)
        p_prev = tl.load(precedence_prev + b * N + cells, mask=in_n, other=0.0)
        tl.store(precedence + b * N + cells, (1 - tl.sum(ww, 0)) * p_prev + ww, mask=in_n)
        tl.debug_barrier()

        # Erase and write M = M' (1 - w^w eᵀ) + w^w vᵀ, tile by tile, and the read heads' cosines on M.
        keys = tl.load(xi + heads[:, None] * W + cols[None, :], mask=in_r[:, None] & in_w[None, :], other=0.0)
        if MASKED:  # each read head its own mask: masked norms per head and cell ([R, N] kept)
            read_masks, _ = _mask(tl.load(xi + MASK_AT + heads[:, None] * W + cols[None, :],
                                          mask=in_r[:, None] & in_w[None, :], other=0.0), MASK_MIN)
            read_q = read_masks * read_masks
            key_norms_r = tl.sqrt(tl.sum(keys * keys * read_q, 1) + EPSILON)
        else:
            key_norms_r = tl.sqrt(tl.sum(keys * keys, 1) + EPSILON)
        for start in range(0, N, ROWS):
            rows = start + tl.arange(0, ROWS)
            in_rows = rows < N
            at = (b * N + rows[:, None]) * W + cols[None, :]
            in_tile = in_rows[:, None] & in_w[None, :]
            w_n = tl.load(write_weights + b * N + rows, mask=in_rows, other=0.0)
            kept_rows = tl.load(memory_prev + at, mask=in_tile, other=0.0)
            if DEALLOC:  # M' ∘ ψ 1ᵀ: what the free gates release is erased before the write
                kept_rows = kept_rows * tl.load(kept_retention + aux + rows, mask=in_rows, other=0.0)[:, None]
            new = kept_rows * (1 - w_n[:, None] * erase[None, :]) + w_n[:, None] * vector[None, :]
            tl.store(memory + at, new, mask=in_tile)
            if MASKED:
                norms = tl.sqrt(tl.sum(read_q[:, None, :] * (new * new)[None, :, :], 2) + EPSILON)  # [BLOCK_R, ROWS]
                tl.store(new_norms + aux + heads[:, None] * N + rows[None, :], norms,
                         mask=in_r[:, None] & in_rows[None, :])
                dots = tl.sum((keys * read_q)[:, None, :] * new[None, :, :], 2)
                tl.store(read_cosine + aux + heads[:, None] * N + rows[None, :],
                         dots / (key_norms_r[:, None] * norms), mask=in_r[:, None] & in_rows[None, :])
            else:
                norm = tl.sqrt(tl.sum(new * new, 1) + EPSILON)
                tl.store(new_norms + aux + rows, norm, mask=in_rows)
                dots = tl.sum(keys[:, None, :] * new[None, :, :], 2)  # [BLOCK_R, ROWS]
                tl.store(read_cosine + aux + heads[:, None] * N + rows[None, :],
                         dots / (key_norms_r[:, None] * norm[None, :]), mask=in_r[:, None] & in_rows[None, :])
        tl.debug_barrier()
        cos_r = tl.load(read_cosine + aux + heads[:, None] * N + cells[None, :], mask=head_cells, other=0.0)
        beta_r = 1 + _softplus(tl.load(xi + R * W + heads, mask=in_r, other=0.0))
        z = tl.where(in_n[None, :], beta_r[:, None] * cos_r, float("-inf"))
        cr = tl.exp(z - tl.max(z, 1)[:, None])
        cr = cr / tl.sum(cr, 1)[:, None]
        tl.store(read_content + aux + heads[:, None] * N + cells[None, :], cr, mask=head_cells)
        tl.store(key_norms + aux + heads, key_norms_r, mask=in_r)
        tl.store(key_norms + aux + R, key_norm_w)

    @triton.jit
    def _link_kernel(link_prev, precedence_prev, write_weights, read_prev, link, forward, partial, aux_stride,
                     N: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, LINK: tl.constexpr,
                     WEIGHTINGS: tl.constexpr):
        """L_t for one tile of rows (and all columns, in tiles). With WEIGHTINGS, also f = L_t w^r' for these
        rows and this tile's part of b = L_tᵀ w^r', partial[b, tile, r, j] = Σ_{i in tile} L_t[i, j] w^r'[r, i]."""
        b = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        TILES: tl.constexpr = (N + LINK - 1) // LINK
        ii = tile * LINK + tl.arange(0, LINK)
        in_i = ii < N
        heads = tl.arange(0, BLOCK_R)
        in_r = heads < R
        w_i = tl.load(write_weights + b * N + ii, mask=in_i, other=0.0)
        if WEIGHTINGS:
            wr_i = tl.load(read_prev + (b * R + heads[:, None]) * N + ii[None, :], mask=in_r[:, None] & in_i[None, :],
                           other=0.0)
            f = tl.zeros([BLOCK_R, LINK], dtype=link_prev.dtype.element_ty)
        for j0 in range(0, N, LINK):
            jj = j0 + tl.arange(0, LINK)
            in_j = jj < N
            at = (b * N + ii[:, None]) * N + jj[None, :]
            in_tile = in_i[:, None] & in_j[None, :]
            w_j = tl.load(write_weights + b * N + jj, mask=in_j, other=0.0)
            p_j = tl.load(precedence_prev + b * N + jj, mask=in_j, other=0.0)
            value = _link_value(tl.load(link_prev + at, mask=in_tile, other=0.0), w_i[:, None], w_j[None, :], p_j[None, :])
            value = tl.where(ii[:, None] == jj[None, :], 0.0, value)
            tl.store(link + at, value, mask=in_tile)
            if WEIGHTINGS:
                wr_j = tl.load(read_prev + (b * R + heads[:, None]) * N + jj[None, :],
                               mask=in_r[:, None] & in_j[None, :], other=0.0)
                f += tl.sum(value[None, :, :] * wr_j[:, None, :], 2)
                part = tl.sum(value[None, :, :] * wr_i[:, :, None], 1)  # [BLOCK_R, LINK]
                tl.store(partial + ((b * TILES + tile) * R + heads[:, None]) * N + jj[None, :], part,
                         mask=in_r[:, None] & in_j[None, :])
        if WEIGHTINGS:
            tl.store(forward + b * aux_stride + heads[:, None] * N + ii[None, :], f, mask=in_r[:, None] & in_i[None, :])

    @triton.jit
    def _read_kernel(raw, memory, forward, backward, read_content, partial, read_weights, reads, aux_stride,
                     N: tl.constexpr, W: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                     BLOCK_R: tl.constexpr, ROWS: tl.constexpr, LINK: tl.constexpr,
                     MASKED: tl.constexpr, MASK_MIN: tl.constexpr, DEALLOC: tl.constexpr, SHARP: tl.constexpr):
        """b from the link kernel's partials (in tile order), w^r = π_b b + π_f f + π_c c^r, and r = M_tᵀ w^r."""
        S: tl.constexpr = R * W + 3 * W + 5 * R + 3 + MASKED * (R * W + W) + SHARP * 2 * R
        TILES: tl.constexpr = (N + LINK - 1) // LINK
        b = tl.program_id(0).to(tl.int64)
        xi = raw + b * S
        aux = b * aux_stride
        cells = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_W)
        in_w = cols < W
        heads = tl.arange(0, BLOCK_R)
        in_r = heads < R
        head_cells = in_r[:, None] & (cells < N)[None, :]
        at = heads[:, None] * N + cells[None, :]
        bwd = tl.zeros([BLOCK_R, BLOCK_N], dtype=raw.dtype.element_ty)
        for t in range(TILES):
            bwd += tl.load(partial + (b * TILES + t) * R * N + at, mask=head_cells, other=0.0)
        tl.store(backward + aux + at, bwd, mask=head_cells)
        fwd = tl.load(forward + aux + at, mask=head_cells, other=0.0)
        if SHARP:  # f and b sharpened, each read head with its own two exponents; kept unsharpened
            SHARP_AT: tl.constexpr = R * W + 3 * W + 5 * R + 3 + MASKED * (R * W + W)
            fwd, _, _ = _sharpen(fwd, 1 + _softplus(tl.load(xi + SHARP_AT + heads, mask=in_r, other=0.0)), head_cells)
            bwd, _, _ = _sharpen(bwd, 1 + _softplus(tl.load(xi + SHARP_AT + R + heads, mask=in_r, other=0.0)),
                                 head_cells)
        cr = tl.load(read_content + aux + at, mask=head_cells, other=0.0)
        pb, pf, pc = _modes(xi, heads, in_r, R * W + 3 * W + 2 * R + 3)
        wr = pb[:, None] * bwd + pf[:, None] * fwd + pc[:, None] * cr
        tl.store(read_weights + b * R * N + at, wr, mask=head_cells)
        tl.debug_barrier()
        out = tl.zeros([BLOCK_R, BLOCK_W], dtype=raw.dtype.element_ty)
        for start in range(0, N, ROWS):
            rows = start + tl.arange(0, ROWS)
            in_rows = rows < N
            tile = tl.load(memory + (b * N + rows[:, None]) * W + cols[None, :], mask=in_rows[:, None] & in_w[None, :],
                           other=0.0)
            w_tile = tl.load(read_weights + (b * R + heads[:, None]) * N + rows[None, :],
                             mask=in_r[:, None] & in_rows[None, :], other=0.0)
            out += tl.sum(w_tile[:, :, None] * tile[None, :, :], 1)
        tl.store(reads + (b * R + heads[:, None]) * W + cols[None, :], out, mask=in_r[:, None] & in_w[None, :])

    @triton.jit
    def _read_backward_kernel(raw, memory_prev, memory, read_weights, write_weights,
                              forward, backward, read_content, read_cosine, new_norms, key_norms, aux_stride,
                              grad_reads, grad_memory, grad_read_weights, grad_raw, grad_memory_prev,
                              grad_read, grad_forward, grad_backward, coef_a, coef_b, grad_ww_memory, work_stride,
                              kept_retention, grad_retention,
                              N: tl.constexpr, W: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr,
                              MASKED: tl.constexpr, MASK_MIN: tl.constexpr, DEALLOC: tl.constexpr,
                              SHARP: tl.constexpr):
        """Backward of the reads, read weights, read content lookups and erase-and-write. Writes dM_{t-1} (first
        part), dk^r, dβ^r, dπ, de, dv into grad_raw, and df, db and the memory's share of dw^w to scratch."""
        S: tl.constexpr = R * W + 3 * W + 5 * R + 3 + MASKED * (R * W + W) + SHARP * 2 * R
        KEY_W: tl.constexpr = R * W + R
        b = tl.program_id(0).to(tl.int64)
        xi = raw + b * S
        gxi = grad_raw + b * S
        aux = b * aux_stride
        work = b * work_stride
        cells = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_W)
        in_w = cols < W
        heads = tl.arange(0, BLOCK_R)
        in_r = heads < R
        head_cells = in_r[:, None] & (cells < N)[None, :]
        head_cols = in_r[:, None] & in_w[None, :]
        at = heads[:, None] * N + cells[None, :]
        grad_r = tl.load(grad_reads + (b * R + heads[:, None]) * W + cols[None, :], mask=head_cols, other=0.0)

        # r = M_tᵀ w^r:  dw^r[r, n] += dr_r · M_t[n]
        for start in range(0, N, ROWS):
            rows = start + tl.arange(0, ROWS)
            in_rows = rows < N
            tile = tl.load(memory + (b * N + rows[:, None]) * W + cols[None, :], mask=in_rows[:, None] & in_w[None, :],
                           other=0.0)
            head_rows = heads[:, None] * N + rows[None, :]
            in_hr = in_r[:, None] & in_rows[None, :]
            g = tl.load(grad_read_weights + b * R * N + head_rows, mask=in_hr, other=0.0) \
                + tl.sum(grad_r[:, None, :] * tile[None, :, :], 2)
            tl.store(grad_read + work + head_rows, g, mask=in_hr)
        tl.debug_barrier()

        # w^r = π_b b + π_f f + π_c c^r; then c^r = softmax(β^r cos(k^r, M_t[n])).
        g_wr = tl.load(grad_read + work + at, mask=head_cells, other=0.0)
        bwd = tl.load(backward + aux + at, mask=head_cells, other=0.0)
        fwd = tl.load(forward + aux + at, mask=head_cells, other=0.0)
        cr = tl.load(read_content + aux + at, mask=head_cells, other=0.0)
        cos = tl.load(read_cosine + aux + at, mask=head_cells, other=0.0)
        MODES: tl.constexpr = R * W + 3 * W + 2 * R + 3
        pb, pf, pc = _modes(xi, heads, in_r, MODES)
        if SHARP:  # forward's sharpening again, from the unsharpened f and b it kept; one direction at a time
            SHARP_AT: tl.constexpr = R * W + 3 * W + 5 * R + 3 + MASKED * (R * W + W)
            sharp_raw = tl.load(xi + SHARP_AT + heads, mask=in_r, other=0.0)
            sharp = 1 + _softplus(sharp_raw)
            fwd, log_scaled, x = _sharpen(fwd, sharp, head_cells)
            g_pf = tl.sum(g_wr * fwd, 1)
            g_fwd, g_sharp = _sharpen_backward(pf[:, None] * g_wr, fwd, log_scaled, x, sharp)
            tl.store(grad_forward + work + at, g_fwd, mask=head_cells)
            tl.store(gxi + SHARP_AT + heads, g_sharp * _softplus_slope(sharp_raw), mask=in_r)
            sharp_raw = tl.load(xi + SHARP_AT + R + heads, mask=in_r, other=0.0)
            sharp = 1 + _softplus(sharp_raw)
            bwd, log_scaled, x = _sharpen(bwd, sharp, head_cells)
            g_pb = tl.sum(g_wr * bwd, 1)
            g_bwd, g_sharp = _sharpen_backward(pb[:, None] * g_wr, bwd, log_scaled, x, sharp)
            tl.store(grad_backward + work + at, g_bwd, mask=head_cells)
            tl.store(gxi + SHARP_AT + R + heads, g_sharp * _softplus_slope(sharp_raw), mask=in_r)
            g_pc = tl.sum(g_wr * cr, 1)
        else:
            g_pb, g_pf, g_pc = tl.sum(g_wr * bwd, 1), tl.sum(g_wr * fwd, 1), tl.sum(g_wr * cr, 1)
            tl.store(grad_forward + work + at, pf[:, None] * g_wr, mask=head_cells)
            tl.store(grad_backward + work + at, pb[:, None] * g_wr, mask=head_cells)
        g_cr = pc[:, None] * g_wr
        g_z = cr * (g_cr - tl.sum(g_cr * cr, 1)[:, None])  # softmax backward
        beta_raw = tl.load(xi + R * W + heads, mask=in_r, other=0.0)
        beta_r = 1 + _softplus(beta_raw)
        g_beta = tl.sum(g_z * cos, 1)
        g_cos = beta_r[:, None] * g_z
        # cos = M[n]·k / (|k| |M[n]|):  d/dk = M[n] / (|k||M[n]|) - cos k / |k|²,
        #                                d/dM[n] = k / (|k||M[n]|) - cos M[n] / |M[n]|²
        # Masked (q = m², norms masked, per head): d/dk = q (Σ_n a M[n] - c_key k), d/dM[n] = q (a k - c M[n]),
        # d/dq = k Σ_n a M[n] - c_key k² / 2 - Σ_n c M[n]² / 2, with the same coefficients a, c, c_key.
        if MASKED:
            norms = tl.load(new_norms + aux + at, mask=head_cells, other=1.0)
            key_norm = tl.load(key_norms + aux + heads, mask=in_r, other=1.0)
            tl.store(coef_a + work + at, g_cos / (key_norm[:, None] * norms), mask=head_cells)
            tl.store(coef_b + work + at, g_cos * cos / (norms * norms), mask=head_cells)
        else:
            norms = tl.load(new_norms + aux + cells, mask=cells < N, other=1.0)
            key_norm = tl.load(key_norms + aux + heads, mask=in_r, other=1.0)
            tl.store(coef_a + work + at, g_cos / (key_norm[:, None] * norms[None, :]), mask=head_cells)
            tl.store(coef_b + work + at, g_cos * cos / (norms * norms)[None, :], mask=head_cells)
        c_key = tl.sum(g_cos * cos, 1) / (key_norm * key_norm)
        tl.debug_barrier()

        # dM_t from the next step, the reads and the read lookups; then M_t = M' (1 - w^w eᵀ) + w^w vᵀ.
        keys = tl.load(xi + heads[:, None] * W + cols[None, :], mask=head_cols, other=0.0)
        MASK_AT: tl.constexpr = R * W + 3 * W + 5 * R + 3
        if MASKED:
            read_masks, read_slopes = _mask(tl.load(xi + MASK_AT + heads[:, None] * W + cols[None, :], mask=head_cols,
                                                    other=0.0), MASK_MIN)
            read_q = read_masks * read_masks
            g_squares = tl.zeros([BLOCK_R, BLOCK_W], dtype=raw.dtype.element_ty)  # Σ_n c M[n]²
        erase = _sigmoid(tl.load(xi + KEY_W + W + 1 + cols, mask=in_w, other=0.0))
        vector = tl.load(xi + KEY_W + 2 * W + 1 + cols, mask=in_w, other=0.0)
        g_keys = tl.zeros([BLOCK_R, BLOCK_W], dtype=raw.dtype.element_ty)
        g_erase = tl.zeros([BLOCK_W], dtype=raw.dtype.element_ty)
        g_vector = tl.zeros([BLOCK_W], dtype=raw.dtype.element_ty)
        for start in range(0, N, ROWS):
            rows = start + tl.arange(0, ROWS)
            in_rows = rows < N
            at_rows = (b * N + rows[:, None]) * W + cols[None, :]
            in_tile = in_rows[:, None] & in_w[None, :]
            head_rows = heads[:, None] * N + rows[None, :]
            in_hr = in_r[:, None] & in_rows[None, :]
            tile = tl.load(memory + at_rows, mask=in_tile, other=0.0)
            prev = tl.load(memory_prev + at_rows, mask=in_tile, other=0.0)
            w_n = tl.load(write_weights + b * N + rows, mask=in_rows, other=0.0)
            w_r = tl.load(read_weights + b * R * N + head_rows, mask=in_hr, other=0.0)
            a = tl.load(coef_a + work + head_rows, mask=in_hr, other=0.0)
            c = tl.load(coef_b + work + head_rows, mask=in_hr, other=0.0)
            if MASKED:
                g_m = tl.load(grad_memory + at_rows, mask=in_tile, other=0.0) \
                    + tl.sum(w_r[:, :, None] * grad_r[:, None, :] + read_q[:, None, :] * (
                        a[:, :, None] * keys[:, None, :] - c[:, :, None] * tile[None, :, :]), 0)
                g_squares += tl.sum(c[:, :, None] * (tile * tile)[None, :, :], 1)
            else:
                g_m = tl.load(grad_memory + at_rows, mask=in_tile, other=0.0) \
                    + tl.sum(w_r[:, :, None] * grad_r[:, None, :] + a[:, :, None] * keys[:, None, :]
                             - c[:, :, None] * tile[None, :, :], 0)
            g_keys += tl.sum(a[:, :, None] * tile[None, :, :], 1)
            kept_rows = prev
            if DEALLOC:  # M_t's erase and write act on M' ∘ ψ 1ᵀ
                psi = tl.load(kept_retention + aux + rows, mask=in_rows, other=0.0)
                kept_rows = prev * psi[:, None]
            g_erase -= tl.sum(g_m * kept_rows * w_n[:, None], 0)
            g_vector += tl.sum(g_m * w_n[:, None], 0)
            g_ww = tl.sum(g_m * (vector[None, :] - kept_rows * erase[None, :]), 1)
            tl.debug_barrier()  # every thread has read its grad_memory before any grad_memory_prev (maybe the same) is written
            if DEALLOC:  # dψ's share from the memory (the usage's is added by the write backward kernel)
                g_kept = g_m * (1 - w_n[:, None] * erase[None, :])
                tl.store(grad_retention + work + rows, tl.sum(g_kept * prev, 1), mask=in_rows)
                tl.store(grad_memory_prev + at_rows, g_kept * psi[:, None], mask=in_tile)
            else:
                tl.store(grad_memory_prev + at_rows, g_m * (1 - w_n[:, None] * erase[None, :]), mask=in_tile)
            tl.store(grad_ww_memory + work + rows, g_ww, mask=in_rows)
        if MASKED:
            g_q = keys * g_keys - 0.5 * c_key[:, None] * keys * keys - 0.5 * g_squares
            tl.store(gxi + MASK_AT + heads[:, None] * W + cols[None, :], g_q * 2 * read_masks * read_slopes,
                     mask=head_cols)
            g_keys = read_q * (g_keys - c_key[:, None] * keys)
        else:
            g_keys -= c_key[:, None] * keys

        tl.store(gxi + heads[:, None] * W + cols[None, :], g_keys, mask=head_cols)
        tl.store(gxi + R * W + heads, g_beta * _softplus_slope(beta_raw), mask=in_r)
        tl.store(gxi + KEY_W + W + 1 + cols, g_erase * erase * (1 - erase), mask=in_w)
        tl.store(gxi + KEY_W + 2 * W + 1 + cols, g_vector, mask=in_w)
        dot = g_pb * pb + g_pf * pf + g_pc * pc  # softmax backward of each head's modes
        tl.store(gxi + MODES + 3 * heads, pb * (g_pb - dot), mask=in_r)
        tl.store(gxi + MODES + 3 * heads + 1, pf * (g_pf - dot), mask=in_r)
        tl.store(gxi + MODES + 3 * heads + 2, pc * (g_pc - dot), mask=in_r)

    @triton.jit
    def _link_backward_kernel(link_prev, precedence_prev, write_weights, read_prev, grad_link, grad_forward,
                              grad_backward, grad_link_prev, link_ww, link_wr, partial, work_stride,
                              N: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, LINK: tl.constexpr):
        """dL_{t-1} for one tile of rows. With G = dLoss/dL_t from every use (the next step, f and b; zero on
        the diagonal):
            dL_{t-1}[i,j] = (1 - w_i - w_j) G[i,j]
            dw^w_i += Σ_j G[i,j] (p'_j - L'[i,j]);   dw^w_j -= Σ_i G[i,j] L'[i,j];   dp'_j += Σ_i G[i,j] w_i
            dw^r'[r,j] += Σ_i L[i,j] df_r[i];       dw^r'[r,i] += Σ_j L[i,j] db_r[j]
        Sums over j are complete here (link_ww, link_wr); sums over i are this tile's part, partial[b, tile, k, j]
        with k = 0 for Σ G L', 1 for Σ G w, 2 + r for Σ L df_r."""
        b = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        TILES: tl.constexpr = (N + LINK - 1) // LINK
        K: tl.constexpr = R + 2
        ii = tile * LINK + tl.arange(0, LINK)
        in_i = ii < N
        heads = tl.arange(0, BLOCK_R)
        in_r = heads < R
        work = b * work_stride
        w_i = tl.load(write_weights + b * N + ii, mask=in_i, other=0.0)
        in_hi = in_r[:, None] & in_i[None, :]
        wr_i = tl.load(read_prev + (b * R + heads[:, None]) * N + ii[None, :], mask=in_hi, other=0.0)
        gf_i = tl.load(grad_forward + work + heads[:, None] * N + ii[None, :], mask=in_hi, other=0.0)
        acc_w = tl.zeros([LINK], dtype=link_prev.dtype.element_ty)
        acc_wr = tl.zeros([BLOCK_R, LINK], dtype=link_prev.dtype.element_ty)
        base = partial + (b * TILES + tile) * K * N
        for j0 in range(0, N, LINK):
            jj = j0 + tl.arange(0, LINK)
            in_j = jj < N
            at = (b * N + ii[:, None]) * N + jj[None, :]
            in_tile = in_i[:, None] & in_j[None, :]
            in_hj = in_r[:, None] & in_j[None, :]
            prev = tl.load(link_prev + at, mask=in_tile, other=0.0)
            w_j = tl.load(write_weights + b * N + jj, mask=in_j, other=0.0)
            p_j = tl.load(precedence_prev + b * N + jj, mask=in_j, other=0.0)
            wr_j = tl.load(read_prev + (b * R + heads[:, None]) * N + jj[None, :], mask=in_hj, other=0.0)
            gb_j = tl.load(grad_backward + work + heads[:, None] * N + jj[None, :], mask=in_hj, other=0.0)
            diagonal = ii[:, None] == jj[None, :]
            g = tl.load(grad_link + at, mask=in_tile, other=0.0) \
                + tl.sum(gf_i[:, :, None] * wr_j[:, None, :] + wr_i[:, :, None] * gb_j[:, None, :], 0)
            g = tl.where(diagonal, 0.0, g)
            value = tl.where(diagonal, 0.0, _link_value(prev, w_i[:, None], w_j[None, :], p_j[None, :]))
            acc_w += tl.sum(g * (p_j[None, :] - prev), 1)
            acc_wr += tl.sum(value[None, :, :] * gb_j[:, None, :], 2)
            tl.store(base + jj, tl.sum(g * prev, 0), mask=in_j)
            tl.store(base + N + jj, tl.sum(g * w_i[:, None], 0), mask=in_j)
            tl.store(base + (2 + heads[:, None]) * N + jj[None, :], tl.sum(value[None, :, :] * gf_i[:, :, None], 1),
                     mask=in_hj)
            tl.debug_barrier()  # grad_link_prev may be grad_link: all of this tile is read before it is written
            tl.store(grad_link_prev + at, (1 - w_i[:, None] - w_j[None, :]) * g, mask=in_tile)
        tl.store(link_ww + work + ii, acc_w, mask=in_i)
        tl.store(link_wr + work + heads[:, None] * N + ii[None, :], acc_wr, mask=in_hi)

    @triton.jit
    def _write_backward_kernel(raw, memory_prev, precedence_prev, read_prev, write_prev, usage_prev, write_weights,
                               write_content, write_cosine, prev_norms, allocation, sorted_usage, before, key_norms,
                               rank, aux_stride,
                               grad_precedence, grad_write_weights, grad_usage,
                               grad_raw, grad_memory_prev, grad_precedence_prev, grad_read_prev, grad_write_prev,
                               grad_usage_prev,
                               grad_ww_memory, link_ww, link_wr, sorted_a, sorted_b, coef_wa, coef_wb, partial,
                               work_stride, grad_retention,
                               N: tl.constexpr, W: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_W: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr, LINK: tl.constexpr,
                               MASKED: tl.constexpr, MASK_MIN: tl.constexpr, DEALLOC: tl.constexpr,
                               SHARP: tl.constexpr):
        """Backward of precedence, write weights, the write content lookup, allocation and usage; the rest of
        dM_{t-1} and of the interface's gradient."""
        S: tl.constexpr = R * W + 3 * W + 5 * R + 3 + MASKED * (R * W + W) + SHARP * 2 * R
        KEY_W: tl.constexpr = R * W + R
        FREE: tl.constexpr = KEY_W + 3 * W + 1
        TILES: tl.constexpr = (N + LINK - 1) // LINK
        K: tl.constexpr = R + 2
        b = tl.program_id(0).to(tl.int64)
        xi = raw + b * S
        gxi = grad_raw + b * S
        aux = b * aux_stride
        work = b * work_stride
        cells = tl.arange(0, BLOCK_N)
        in_n = cells < N
        cols = tl.arange(0, BLOCK_W)
        in_w = cols < W
        heads = tl.arange(0, BLOCK_R)
        in_r = heads < R
        head_cells = in_r[:, None] & in_n[None, :]
        at = heads[:, None] * N + cells[None, :]

        # Every gradient input this kernel reads, read before any result (which may be the same tensor) is written.
        g_p = tl.load(grad_precedence + b * N + cells, mask=in_n, other=0.0)
        g_ww_in = tl.load(grad_write_weights + b * N + cells, mask=in_n, other=0.0)
        g_u_in = tl.load(grad_usage + b * N + cells, mask=in_n, other=0.0)

        # The link kernel's sums over row tiles, in tile order.
        col_gl = tl.zeros([BLOCK_N], dtype=raw.dtype.element_ty)
        col_gw = tl.zeros([BLOCK_N], dtype=raw.dtype.element_ty)
        col_wr = tl.zeros([BLOCK_R, BLOCK_N], dtype=raw.dtype.element_ty)
        for t in range(TILES):
            base = partial + (b * TILES + t) * K * N
            col_gl += tl.load(base + cells, mask=in_n, other=0.0)
            col_gw += tl.load(base + N + cells, mask=in_n, other=0.0)
            col_wr += tl.load(base + 2 * N + at, mask=head_cells, other=0.0)

        # p = (1 - Σ w^w) p' + w^w, and the link's and the memory's shares of dw^w.
        ww = tl.load(write_weights + b * N + cells, mask=in_n, other=0.0)
        p_prev = tl.load(precedence_prev + b * N + cells, mask=in_n, other=0.0)
        g_ww = g_ww_in + tl.load(grad_ww_memory + work + cells, mask=in_n, other=0.0) \
            + (g_p - tl.sum(g_p * p_prev, 0)) + tl.load(link_ww + work + cells, mask=in_n, other=0.0) - col_gl
        g_p_prev = (1 - tl.sum(ww, 0)) * g_p + col_gw

        # w^w = g^w (g^a a + (1 - g^a) c^w)
        ga_raw = tl.load(xi + FREE + R)
        gw_raw = tl.load(xi + FREE + R + 1)
        ga, gw = _sigmoid(ga_raw), _sigmoid(gw_raw)
        alloc = tl.load(allocation + aux + cells, mask=in_n, other=0.0)
        cw = tl.load(write_content + aux + cells, mask=in_n, other=0.0)
        g_gw = tl.sum(g_ww * (ga * alloc + (1 - ga) * cw), 0)
        g_mixed = gw * g_ww
        g_ga = tl.sum(g_mixed * (alloc - cw), 0)
        g_alloc = ga * g_mixed
        g_cw = (1 - ga) * g_mixed

        # Write content lookup on M_{t-1} (as in the read backward kernel, one key).
        cos_w = tl.load(write_cosine + aux + cells, mask=in_n, other=0.0)
        g_z = cw * (g_cw - tl.sum(g_cw * cw, 0))
        beta_raw = tl.load(xi + KEY_W + W)
        g_beta_w = tl.sum(g_z * cos_w, 0)
        g_cos = (1 + _softplus(beta_raw)) * g_z
        norms = tl.load(prev_norms + aux + cells, mask=in_n, other=1.0)
        key_norm = tl.load(key_norms + aux + R)
        tl.store(coef_wa + work + cells, g_cos / (key_norm * norms), mask=in_n)
        tl.store(coef_wb + work + cells, g_cos * cos_w / (norms * norms), mask=in_n)
        c_key = tl.sum(g_cos * cos_w, 0) / (key_norm * key_norm)

        # Allocation, in sorted order: ds_j = P_j (Q_j - da_j) with Q_j = s_{j+1} Q_{j+1} + da_{j+1} (1 - s_{j+1}).
        place = tl.load(rank + b * N + cells, mask=in_n, other=0)
        tl.store(sorted_a + work + place, g_alloc, mask=in_n)
        tl.debug_barrier()
        following = in_n & (cells + 1 < N)
        s_next = tl.load(sorted_usage + aux + cells + 1, mask=following, other=0.0)
        ga_next = tl.load(sorted_a + work + cells + 1, mask=following, other=0.0)
        _, later = tl.associative_scan((s_next, ga_next * (1 - s_next)), 0, _linear_recurrence, reverse=True)
        d_sorted = tl.load(before + aux + cells, mask=in_n, other=0.0) \
            * (later - tl.load(sorted_a + work + cells, mask=in_n, other=0.0))
        tl.store(sorted_b + work + cells, d_sorted, mask=in_n)
        tl.debug_barrier()
        g_u = g_u_in + tl.load(sorted_b + work + place, mask=in_n, other=0.0)

        # Usage u = (u' + w^w' - u' w^w') ψ, ψ = Π_r (1 - f_r w^r'[r]).
        u_prev = tl.load(usage_prev + b * N + cells, mask=in_n, other=0.0)
        ww_prev = tl.load(write_prev + b * N + cells, mask=in_n, other=0.0)
        retention = tl.full([BLOCK_N], 1.0, dtype=raw.dtype.element_ty)
        for r in tl.static_range(R):
            f_r = _sigmoid(tl.load(xi + FREE + r))
            retention *= 1 - f_r * tl.load(read_prev + (b * R + r) * N + cells, mask=in_n, other=0.0)
        g_written = g_u * retention
        g_psi = g_u * (u_prev + ww_prev - u_prev * ww_prev)
        if DEALLOC:  # ψ scaled M' too
            g_psi += tl.load(grad_retention + work + cells, mask=in_n, other=0.0)
        g_wr = tl.load(link_wr + work + at, mask=head_cells, other=0.0) + col_wr
        g_free = tl.zeros([BLOCK_R], dtype=raw.dtype.element_ty)
        for r in tl.static_range(R):
            others = tl.full([BLOCK_N], 1.0, dtype=raw.dtype.element_ty)  # Π over the other heads: no division
            for q in tl.static_range(R):
                if q != r:
                    others *= 1 - _sigmoid(tl.load(xi + FREE + q)) \
                        * tl.load(read_prev + (b * R + q) * N + cells, mask=in_n, other=0.0)
            f_r = _sigmoid(tl.load(xi + FREE + r))
            wr_r = tl.load(read_prev + (b * R + r) * N + cells, mask=in_n, other=0.0)
            g_free = tl.where(heads == r, -tl.sum(g_psi * others * wr_r, 0), g_free)
            g_wr = tl.where(heads[:, None] == r, g_wr - (g_psi * others * f_r)[None, :], g_wr)

        # The rest of dM_{t-1}: the write lookup's, added to what the read backward kernel wrote.
        write_key = tl.load(xi + KEY_W + cols, mask=in_w, other=0.0)
        g_key = tl.zeros([BLOCK_W], dtype=raw.dtype.element_ty)
        MASK_AT: tl.constexpr = R * W + 3 * W + 5 * R + 3
        if MASKED:  # as in the read backward kernel (its comment), for the one write head
            write_mask, write_slope = _mask(tl.load(xi + MASK_AT + R * W + cols, mask=in_w, other=0.0), MASK_MIN)
            write_q = write_mask * write_mask
            g_squares = tl.zeros([BLOCK_W], dtype=raw.dtype.element_ty)
        tl.debug_barrier()
        for start in range(0, N, ROWS):
            rows = start + tl.arange(0, ROWS)
            in_rows = rows < N
            at_rows = (b * N + rows[:, None]) * W + cols[None, :]
            in_tile = in_rows[:, None] & in_w[None, :]
            prev = tl.load(memory_prev + at_rows, mask=in_tile, other=0.0)
            a = tl.load(coef_wa + work + rows, mask=in_rows, other=0.0)
            c = tl.load(coef_wb + work + rows, mask=in_rows, other=0.0)
            g_key += tl.sum(a[:, None] * prev, 0)
            g_m = tl.load(grad_memory_prev + at_rows, mask=in_tile, other=0.0)
            if MASKED:
                g_squares += tl.sum(c[:, None] * prev * prev, 0)
                tl.store(grad_memory_prev + at_rows,
                         g_m + write_q[None, :] * (a[:, None] * write_key[None, :] - c[:, None] * prev), mask=in_tile)
            else:
                tl.store(grad_memory_prev + at_rows, g_m + a[:, None] * write_key[None, :] - c[:, None] * prev,
                         mask=in_tile)
        if MASKED:
            g_q = write_key * g_key - 0.5 * c_key * write_key * write_key - 0.5 * g_squares
            tl.store(gxi + MASK_AT + R * W + cols, g_q * 2 * write_mask * write_slope, mask=in_w)
            g_key = write_q * (g_key - c_key * write_key)
        else:
            g_key -= c_key * write_key

        tl.store(grad_precedence_prev + b * N + cells, g_p_prev, mask=in_n)
        tl.store(grad_usage_prev + b * N + cells, g_written * (1 - ww_prev), mask=in_n)
        tl.store(grad_write_prev + b * N + cells, g_written * (1 - u_prev), mask=in_n)
        tl.store(grad_read_prev + b * R * N + at, g_wr, mask=head_cells)
        tl.store(gxi + KEY_W + cols, g_key, mask=in_w)
        tl.store(gxi + KEY_W + W, g_beta_w * _softplus_slope(beta_raw))
        free = _sigmoid(tl.load(xi + FREE + heads, mask=in_r, other=0.0))
        tl.store(gxi + FREE + heads, g_free * free * (1 - free), mask=in_r)
        tl.store(gxi + FREE + R, g_ga * ga * (1 - ga))
        tl.store(gxi + FREE + R + 1, g_gw * gw * (1 - gw))

    @triton.jit
    def _lstm_forward_kernel(gates, c_prev, act, c, tanh_c, h, TOTAL, H: tl.constexpr, BLOCK: tl.constexpr):
        """act = σ(i), σ(f), tanh(g), σ(o); c = f c' + i g; h = o tanh(c). gates [B, 4H], the rest [B, H]."""
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < TOTAL
        z = (idx // H) * 4 * H + idx % H
        i = _sigmoid(tl.load(gates + z, mask=ok, other=0.0))
        f = _sigmoid(tl.load(gates + z + H, mask=ok, other=0.0))
        g = _tanh(tl.load(gates + z + 2 * H, mask=ok, other=0.0))
        o = _sigmoid(tl.load(gates + z + 3 * H, mask=ok, other=0.0))
        tl.store(act + z, i, mask=ok)
        tl.store(act + z + H, f, mask=ok)
        tl.store(act + z + 2 * H, g, mask=ok)
        tl.store(act + z + 3 * H, o, mask=ok)
        cell = f * tl.load(c_prev + idx, mask=ok, other=0.0) + i * g
        tc = _tanh(cell)
        tl.store(c + idx, cell, mask=ok)
        tl.store(tanh_c + idx, tc, mask=ok)
        tl.store(h + idx, o * tc, mask=ok)

    @triton.jit
    def _lstm_backward_kernel(act, c_prev, tanh_c, grad_h, grad_c, grad_gates, grad_c_prev, TOTAL,
                              H: tl.constexpr, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < TOTAL
        z = (idx // H) * 4 * H + idx % H
        i = tl.load(act + z, mask=ok, other=0.0)
        f = tl.load(act + z + H, mask=ok, other=0.0)
        g = tl.load(act + z + 2 * H, mask=ok, other=0.0)
        o = tl.load(act + z + 3 * H, mask=ok, other=0.0)
        tc = tl.load(tanh_c + idx, mask=ok, other=0.0)
        gh = tl.load(grad_h + idx, mask=ok, other=0.0)
        dc = tl.load(grad_c + idx, mask=ok, other=0.0) + gh * o * (1 - tc * tc)
        tl.store(grad_gates + z, dc * g * i * (1 - i), mask=ok)
        tl.store(grad_gates + z + H, dc * tl.load(c_prev + idx, mask=ok, other=0.0) * f * (1 - f), mask=ok)
        tl.store(grad_gates + z + 2 * H, dc * i * (1 - g * g), mask=ok)
        tl.store(grad_gates + z + 3 * H, gh * tc * o * (1 - o), mask=ok)
        tl.store(grad_c_prev + idx, dc * f, mask=ok)


# ---- The kernels as functions of tensors (the contract of dnc_lab.backends.Kernels) ---------------------------------------


def _contiguous(tensors) -> list[torch.Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def memory_forward(raw: torch.Tensor, state: list[torch.Tensor], out: Optional[list] = None, trusted: bool = False,
                   variants: Variants = PLAIN) -> tuple[list[torch.Tensor], Saved]:
    """raw [B, S], state (memory, link, precedence, read weights, write weights, usage) ->
    (outputs: reads [B, R, W] and the six new state tensors, saved: what ``memory_backward`` needs).

    out: where to write the seven outputs and then the extra tensors (``extra_shapes``), each
    contiguous and of exactly its shape and dtype, or None for a new tensor (the default: all new).
    saved.extra is this module's own: (per-element values kept for backward [B, size], allocation ranks [B, N]).
    trusted: skip the checks, for a caller that checked the first step of a sequence and made every
    later buffer itself (sequence.py).
    """
    if not trusted:
        check_variants(NAME, SUPPORTED_VARIANTS, variants)
    b, n, w, r = (*state[0].shape, state[3].shape[1]) if trusted else _check_step(raw, state, variants)
    memory = state[0]
    shapes = [(b, r, w), (b, n, w), (b, 1, n, n), (b, 1, n), (b, r, n), (b, 1, n), (b, n)]
    wanted = [(shape, memory.dtype) for shape in shapes] + extra_shapes(b, n, w, r, memory.dtype, variants)
    given = list(out or []) + [None] * (len(wanted) - len(out or []))
    for i, (t, (shape, dtype)) in enumerate(zip(given, wanted)):
        if t is not None and not trusted and (tuple(t.shape) != shape or t.dtype != dtype or t.device != memory.device
                              or not t.is_contiguous()):
            raise ValueError(f"out[{i}] must be a contiguous {dtype} {list(shape)} tensor on {memory.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    inputs = _contiguous((raw, *state))
    blocks = _blocks(n, w, r)
    new = functools.partial(_empty, memory)
    results = [_empty(memory, *shape, dtype=dtype) if t is None else t for t, (shape, dtype) in zip(given, wanted)]
    outputs, (aux, rank) = results[:7], results[7:]
    layout = _kept_layout(n, r, variants.masked_lookup, variants.deallocation)
    views = layout.views(aux)
    flags = _flags(variants)  # a variant's buffers exist only with it; without, any tensor fills the unused argument
    partial = new(b, blocks.link_tiles, r, n)
    warps = _warps(blocks)
    raw_c, memory_prev, link_prev, precedence_prev, read_prev, write_prev, usage_prev = inputs
    reads, memory_new, link_out, precedence_new, read_new, write_new, usage_new = outputs
    _launch(_write_kernel, (b,), raw_c, memory_prev, precedence_prev, read_prev, write_prev, usage_prev,
            memory_new, precedence_new, write_new, usage_new,
            *(views[k] for k in ("write_content", "write_cosine", "prev_norms", "allocation", "sorted_usage",
                                 "before", "new_norms", "scratch", "read_content", "read_cosine", "key_norms")),
            rank, aux.stride(0), views.get("retention", aux), num_warps=warps,
            **blocks.meta("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS", "RANK"), **flags)
    _launch(_link_kernel, (b, blocks.link_tiles), link_prev, precedence_prev, write_new, read_prev, link_out,
            views["forward"], partial, aux.stride(0), WEIGHTINGS=True, **blocks.meta("N", "R", "BLOCK_R", "LINK"))
    _launch(_read_kernel, (b,), raw_c, memory_new, views["forward"], views["backward"], views["read_content"],
            partial, read_new, reads, aux.stride(0), num_warps=warps,
            **blocks.meta("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS", "LINK"), **flags)
    return outputs, Saved(*inputs, memory_new, read_new, write_new, (aux, rank))


def memory_backward(saved: Saved, grads: list[torch.Tensor], results: Optional[list[torch.Tensor]] = None,
                    trusted: bool = False, variants: Variants = PLAIN) -> list[torch.Tensor]:
    """saved (from ``memory_forward``), grads of its seven outputs -> grads of raw and the six state tensors.

    results: seven contiguous tensors to write them to (shaped like raw and the state); new ones if None.
    The six state gradients may be the very tensors passed in ``grads`` (each is read before its result is
    written), which lets a caller stepping backward through time reuse one set.
    """
    raw, memory_prev, link_prev, precedence_prev, read_prev, write_prev, usage_prev = saved[:7]
    memory, read_new, write_new = saved.new_memory, saved.new_read_weights, saved.new_write_weights
    aux, rank = saved.extra
    if not trusted:
        check_variants(NAME, SUPPORTED_VARIANTS, variants)
    b, n, w, r = (*memory_prev.shape, read_prev.shape[1]) if trusted else _check_step(raw, list(saved[1:7]), variants)
    if not trusted and len(grads) != 7:
        raise ValueError(f"Triton memory backward: expected 7 gradients (reads and the six state tensors), "
                         f"got {len(grads)}")
    shapes = [(b, r, w), (b, n, w), (b, 1, n, n), (b, 1, n), (b, r, n), (b, 1, n), (b, n)]
    for name, grad, shape in (zip(("reads", *_STATE_NAMES), grads, shapes) if not trusted else ()):
        if tuple(grad.shape) != shape or grad.dtype != raw.dtype or grad.device != raw.device:
            raise ValueError(f"Triton memory backward: the gradient of {name} is {grad.dtype} {tuple(grad.shape)} on "
                             f"{grad.device}, expected {raw.dtype} {list(shape)} on {raw.device}")
    grad_reads, grad_memory, grad_link, grad_precedence, grad_read, grad_write, grad_usage = _contiguous(grads)
    if results is None:
        results = [_empty(t, *t.shape) for t in saved[:7]]
    elif any(not t.is_contiguous() or t.shape != x.shape for t, x in zip(results, saved[:7])):
        raise ValueError("Triton memory backward: results must be seven contiguous tensors shaped like raw and the state")
    g_raw, g_memory, g_link, g_precedence, g_read, g_write, g_usage = results
    blocks = _blocks(n, w, r)
    views = _kept_layout(n, r, variants.masked_lookup, variants.deallocation).views(aux)
    work_layout = _work_layout(n, r, variants.deallocation)
    flags = _flags(variants)
    work = _empty(memory_prev, b, work_layout.size)
    scratch = work_layout.views(work)
    partial = _empty(memory_prev, b, blocks.link_tiles, r + 2, n)
    warps = _warps(blocks)
    _launch(_read_backward_kernel, (b,), raw, memory_prev, memory, read_new, write_new,
            *(views[k] for k in ("forward", "backward", "read_content", "read_cosine", "new_norms", "key_norms")),
            aux.stride(0), grad_reads, grad_memory, grad_read, g_raw, g_memory,
            *(scratch[k] for k in ("grad_read", "grad_forward", "grad_backward", "coef_a", "coef_b", "grad_ww_memory")),
            work.stride(0), views.get("retention", aux), scratch.get("grad_retention", work), num_warps=warps, **blocks.meta("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS"),
            **flags)
    _launch(_link_backward_kernel, (b, blocks.link_tiles), link_prev, precedence_prev, write_new, read_prev,
            grad_link, scratch["grad_forward"], scratch["grad_backward"], g_link, scratch["link_ww"],
            scratch["link_wr"], partial, work.stride(0), **blocks.meta("N", "R", "BLOCK_R", "LINK"))
    _launch(_write_backward_kernel, (b,), raw, memory_prev, precedence_prev, read_prev, write_prev, usage_prev,
            write_new,
            *(views[k] for k in ("write_content", "write_cosine", "prev_norms", "allocation", "sorted_usage", "before",
                                 "key_norms")),
            rank, aux.stride(0), grad_precedence, grad_write, grad_usage,
            g_raw, g_memory, g_precedence, g_read, g_write, g_usage,
            *(scratch[k] for k in ("grad_ww_memory", "link_ww", "link_wr", "sorted_a", "sorted_b", "coef_wa",
                                   "coef_wb")),
            partial, work.stride(0), scratch.get("grad_retention", work), num_warps=warps,
            **blocks.meta("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS", "LINK"), **flags)
    return results


def link_forward(prev_link: torch.Tensor, prev_precedence: torch.Tensor, write_weights: torch.Tensor,
                 out: torch.Tensor, trusted: bool = False) -> torch.Tensor:
    """L_t [B, 1, N, N] into ``out`` from L_{t-1}, p_{t-1} [B, 1, N] and w^w_t [B, 1, N]: the link
    matrix ``memory_forward`` computes, bit for bit, without the rest of the step."""
    b, _, n, _ = prev_link.shape
    if not trusted:
        _check(prev_link.device, prev_link.dtype)
    prev_link, prev_precedence, write_weights = _contiguous((prev_link, prev_precedence, write_weights))
    blocks = _blocks(n, 1, 1)
    # The weighting arguments are unused without WEIGHTINGS; any tensor of the right dtype fills their places.
    _launch(_link_kernel, (b, blocks.link_tiles), prev_link, prev_precedence, write_weights, write_weights, out,
            out, out, 0, N=n, R=1, BLOCK_R=1, LINK=blocks.LINK, WEIGHTINGS=False)
    return out


_LSTM_BLOCK = 1024


def lstm_forward(gates: torch.Tensor, c_prev: torch.Tensor, act: torch.Tensor, c: torch.Tensor,
                 tanh_c: torch.Tensor, trusted: bool = False) -> torch.Tensor:
    """The LSTM cell after its matrix products. gates [B, 4H] (pre-activations, torch's i, f, g, o
    order), c_prev [B, H]; writes σ(i), σ(f), tanh(g), σ(o) to act [B, 4H], c = f c_prev + i g to c
    and tanh(c) to tanh_c (all contiguous); returns h = o tanh(c) [B, H]."""
    if not trusted:
        _check(gates.device, gates.dtype)
    gates, c_prev = _contiguous((gates, c_prev))
    b, h = c_prev.shape
    out = _empty(c_prev, b, h)
    total = b * h
    block = min(_LSTM_BLOCK, _pow2(total))
    _launch(_lstm_forward_kernel, (-(-total // block),), gates, c_prev, act, c, tanh_c, out, total, H=h, BLOCK=block)
    return out


def lstm_backward(act: torch.Tensor, c_prev: torch.Tensor, tanh_c: torch.Tensor, grad_h: torch.Tensor,
                  grad_c: torch.Tensor, grad_gates: torch.Tensor, trusted: bool = False) -> torch.Tensor:
    """Backward of ``lstm_forward``: writes dLoss/dgates to grad_gates [B, 4H] (contiguous) and
    returns dLoss/dc_prev [B, H], from dLoss/dh and dLoss/dc of the step's outputs."""
    if not trusted:
        _check(act.device, act.dtype)
    c_prev, grad_h, grad_c = _contiguous((c_prev, grad_h, grad_c))
    b, h = c_prev.shape
    grad_c_prev = _empty(c_prev, b, h)
    total = b * h
    block = min(_LSTM_BLOCK, _pow2(total))
    _launch(_lstm_backward_kernel, (-(-total // block),), act, c_prev, tanh_c, grad_h, grad_c, grad_gates,
            grad_c_prev, total, H=h, BLOCK=block)
    return grad_c_prev


# ---- The step with autograd --------------------------------------------------------------------------------


class _MemoryStep(torch.autograd.Function):
    """(raw interface [B, S], the six state tensors) -> (reads [B, R, W], the six new state tensors)."""

    @staticmethod
    def forward(ctx, variants, raw, *state):
        outputs, saved = memory_forward(raw, list(state), variants=variants)
        ctx.variants = variants
        ctx.save_for_backward(*saved.tensors())
        return tuple(outputs)

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiable: refuse double backward
    def backward(ctx, *grads):
        return (None, *memory_backward(Saved.from_tensors(ctx.saved_tensors), list(grads), variants=ctx.variants))


@torch.compiler.disable
def memory_step(raw_interface: torch.Tensor, state: list[torch.Tensor], variants: Variants = PLAIN
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One memory step from the raw interface vector, with autograd: (read vectors [B, R, W], new state).

    raw_interface [B, S], the fields in ``memory.interface_sizes`` order, before their nonlinearities; state:
    the six state tensors in ``memory.STATE_KEYS`` order (link_matrix [B, 1, N, N]), and the new state in the
    same order.
    """
    reads, *new_state = _MemoryStep.apply(variants, raw_interface, *state)
    return reads, new_state


# ---- Compiling without a GPU ----------------------------------------------------------------------------------


def compile_kernels(dtype: str = "fp32", cells: int = 16, width: int = 20, heads: int = 4, arch: int = 90,
                    variants: Optional[Variants] = None) -> list[str]:
    """Compile every kernel for an sm_``arch`` GPU with the given sizes (no GPU needed: Triton's front end, its
    passes and the bundled ptxas), and return one line per kernel. Raises on a kernel that only the interpreter
    accepts. Needs TRITON_INTERPRET unset when this module was imported (the kernels are then JIT functions).

    variants None: the plain DNC's nine kernels. A ``Variants``: only the four memory kernels whose code its flags
    change (the link and LSTM kernels have no variant code), compiled with those flags.
    """
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _interpreted():
        raise RuntimeError("compile_kernels needs the kernels compiled, not interpreted: unset TRITON_INTERPRET")
    blocks = _blocks(cells, width, heads)
    ints = {"aux_stride", "work_stride", "TOTAL"}
    target = GPUTarget("cuda", arch, 32)

    def build(kernel, constexprs: dict, warps: int = 4) -> str:
        signature = {}
        for name in inspect.signature(kernel.fn).parameters:
            signature[name] = ("constexpr" if name in constexprs else "i64" if name in ints
                               else "*i32" if name == "rank" else f"*{dtype}")
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                                  options={"num_warps": warps})
        return f"{kernel.fn.__name__}: {len(compiled.asm['cubin'])} bytes of sm_{arch} code"

    m = blocks.meta
    warps = _warps(blocks)
    if variants is not None:
        flags = _flags(variants)
        name = "+".join(variants.names()) or "plain"
        return [f"{line} ({name})" for line in (
            build(_write_kernel, dict(m("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS", "RANK"), **flags), warps),
            build(_read_kernel, dict(m("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS", "LINK"), **flags), warps),
            build(_read_backward_kernel, dict(m("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS"), **flags),
                  warps),
            build(_write_backward_kernel, dict(m("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS", "LINK"),
                                               **flags), warps))]
    plain = _flags(PLAIN)
    return [
        build(_write_kernel, dict(m("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS", "RANK"), **plain), warps),
        build(_link_kernel, dict(m("N", "R", "BLOCK_R", "LINK"), WEIGHTINGS=True)),
        build(_link_kernel, dict(N=cells, R=1, BLOCK_R=1, LINK=blocks.LINK, WEIGHTINGS=False)),
        build(_read_kernel, dict(m("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS", "LINK"), **plain), warps),
        build(_read_backward_kernel, dict(m("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS"), **plain), warps),
        build(_link_backward_kernel, m("N", "R", "BLOCK_R", "LINK")),
        build(_write_backward_kernel, dict(m("N", "W", "R", "BLOCK_N", "BLOCK_W", "BLOCK_R", "ROWS", "LINK"), **plain),
              warps),
        build(_lstm_forward_kernel, dict(H=width, BLOCK=_LSTM_BLOCK)),
        build(_lstm_backward_kernel, dict(H=width, BLOCK=_LSTM_BLOCK)),
    ]


# Every variant switched on (each flag's code, and their interplay): what `python -m dnc_lab.backends.triton` compiles
# after the plain kernels.
ALL_VARIANTS = Variants(masked_lookup=True, mask_min=0.1, deallocation=True, link_sharpness=True)

if __name__ == "__main__":  # `python -m dnc_lab.backends.triton [fp32|fp64] [N W R] [VARIANT,...|plain]`: compile, no GPU
    import sys

    if triton is None:
        raise SystemExit(f"dnc_lab Triton kernels: {_IMPORT_ERROR}")
    args = sys.argv[1:]
    sizes = [int(a) for a in args[1:4]] if len(args) >= 4 else []
    # The plain kernels, then the memory kernels with every variant (or with the ones named, comma-separated).
    chosen = ALL_VARIANTS
    if len(args) in (2, 5):
        names = [] if args[-1] == "plain" else args[-1].split(",")
        unknown = sorted(set(names) - set(SUPPORTED_VARIANTS))
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}: expected 'plain' or names from {list(SUPPORTED_VARIANTS)}")
        chosen = Variants(**{name: True for name in names}, **({"mask_min": 0.1} if "masked_lookup" in names else {}))
    dtype = args[0] if args else "fp32"
    lines = compile_kernels(dtype, *sizes)
    if chosen.names():
        lines += compile_kernels(dtype, *sizes, variants=chosen)
    for line in lines:
        print(line)
