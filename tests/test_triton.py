"""The Triton kernels (dnc_lab/backends/triton.py) against the reference path, values and gradients.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before they are defined): the same kernel code, slowly, which is why the shapes
here are small. Every comparison is in float64 against ``memory.memory_step(parse_interface(raw))``
with autograd, to rounding; float32 at a looser tolerance. Small tile sizes (the ``small_tiles``
fixture) run the multi-tile paths (partial sums over row tiles, several column and rank tiles) at
small N.

The ``cuda``-marked tests at the end run the same comparisons with the kernels compiled for a GPU,
plus determinism and 1024 cells; they are skipped without one (``make gpu-check`` runs them).

Triton missing: skipped, except in CI (CI=true), where it is a failure.
"""

from __future__ import annotations

import os

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("triton is not installed (it comes with the dev extra: pip install -e '.[dev]')",
                allow_module_level=True)

from dnc_lab import memory as M
from dnc_lab import sequence
from dnc_lab.backends import PLAIN, Variants, native
from dnc_lab.backends import triton as kernels

TOL = dict(rtol=1e-9, atol=1e-11)
TOL32 = dict(rtol=2e-4, atol=2e-5)

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
compiled_on_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                      reason="needs a CUDA device, and the kernels compiled for it")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 link rows/columns, 8 rank cells, and a few memory rows: every multi-tile path at small N."""
    monkeypatch.setattr(kernels, "LINK_TILE", 8)
    monkeypatch.setattr(kernels, "RANK_TILE", 8)
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 64)


def interface_width(width, heads, variants=PLAIN):
    return sum(M.interface_sizes(width, heads, 1, variants.masked_lookup, variants.link_sharpness).values())


def random_state(batch, cells, width, heads, dtype=torch.float64, generator=None, device="cpu"):
    """A valid, non-trivial state (as list in STATE_KEYS order): weightings sum to at most 1, links in [0, 1),
    zero diagonal."""
    g = generator

    def softmax(*shape, scale=1.0):
        return torch.softmax(torch.randn(*shape, generator=g, dtype=dtype), -1) * scale

    link = torch.rand(batch, 1, cells, cells, generator=g, dtype=dtype) / cells * (1 - torch.eye(cells, dtype=dtype))
    state = [torch.randn(batch, cells, width, generator=g, dtype=dtype), link, softmax(batch, 1, cells, scale=0.9),
             softmax(batch, heads, cells), softmax(batch, 1, cells, scale=0.8),
             torch.rand(batch, cells, generator=g, dtype=dtype)]
    return [t.to(device) for t in state]


def empty_state(batch, cells, width, heads, dtype=torch.float64, device="cpu"):
    state = M.initial_state(batch, cells, width, heads, dtype=dtype, device=device)
    return [state[key] for key in M.STATE_KEYS]


def reference_step(raw, state, width, heads, variants=PLAIN):
    """The specification: memory.memory_step of parse_interface(raw), outputs as memory_forward's."""
    sizes = M.interface_sizes(width, heads, 1, variants.masked_lookup, variants.link_sharpness)
    fields = dict(zip(sizes, torch.split(raw, list(sizes.values()), dim=-1)))
    interface = M.parse_interface(fields, width, heads, 1, variants.mask_min)
    reads, new = M.memory_step(dict(zip(M.STATE_KEYS, state)), interface, variants.deallocation)
    return [reads] + [new[key] for key in M.STATE_KEYS]


def run_both(raws, state, width, heads, generator, device="cpu", variants=PLAIN):
    """A sequence of steps through the reference (autograd) and through the kernels (memory_backward stepping
    back through time with one reused set of state-gradient buffers, as sequence.py does).

    Returns ((outputs per step, grads of raws and initial state) for the reference, then the same for the kernels).
    The loss is Σ_t <reads_t, G_t> + <final state, G>, with random G.
    """
    dtype = state[0].dtype
    leaves = [r.detach().clone().requires_grad_() for r in raws] + [s.detach().clone().requires_grad_() for s in state]
    raw_ref, state_ref = leaves[:len(raws)], leaves[len(raws):]
    outs_ref, current = [], state_ref
    for raw in raw_ref:
        out = reference_step(raw, current, width, heads, variants)
        outs_ref.append(out)
        current = out[1:]
    # Drawn in float64 whatever the dtype, so that a float32 run gets the same numbers, rounded.
    grads_reads = [torch.randn(o[0].shape, generator=generator, dtype=torch.float64).to(dtype) for o in outs_ref]
    grads_final = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(dtype)
                   for t in outs_ref[-1][1:]]
    loss = sum((o[0] * g).sum() for o, g in zip(outs_ref, grads_reads))
    loss = loss + sum((t * g).sum() for t, g in zip(outs_ref[-1][1:], grads_final))
    grads_ref = torch.autograd.grad(loss, leaves)

    to = lambda t: t.detach().to(device)  # noqa: E731
    outs, kepts, current = [], [], [to(s) for s in state]
    for raw in raws:
        out, kept = kernels.memory_forward(to(raw), current, variants=variants)
        outs.append(out)
        kepts.append(kept)
        current = out[1:]
    grad_state = [to(g).clone() for g in grads_final]
    # The caller's result buffers start as NaN: the kernels must write every element.
    spare = [torch.full_like(t, float("nan")) for t in grad_state]
    grad_raws = [None] * len(raws)
    for t in reversed(range(len(raws))):
        results = [torch.full_like(kepts[t][0], float("nan"))] + spare
        step = kernels.memory_backward(kepts[t], [to(grads_reads[t])] + grad_state, results, variants=variants)
        grad_raws[t] = step[0]
        grad_state, spare = step[1:], grad_state  # results written over the grads they read, the next step's turn
    grads = grad_raws + grad_state
    return (outs_ref, grads_ref), (outs, grads)


def assert_match(reference, fast, tol):
    (outs_ref, grads_ref), (outs, grads) = reference, fast
    names = ["reads", *M.STATE_KEYS]
    for t, (o_ref, o) in enumerate(zip(outs_ref, outs)):
        for name, a, b in zip(names, o, o_ref):
            torch.testing.assert_close(a.cpu().to(b.dtype), b.detach(), **tol, msg=lambda m: f"step {t} {name}: {m}")
    steps = len(outs_ref)
    for k, (a, b) in enumerate(zip(grads, grads_ref)):
        what = f"grad of raw_{k}" if k < steps else f"grad of initial {M.STATE_KEYS[k - steps]}"
        torch.testing.assert_close(a.cpu().to(b.dtype), b, **tol, msg=lambda m: f"{what}: {m}")


def compare(batch, cells, width, heads, steps, seed, dtype=torch.float64, empty=False, tol=TOL, device="cpu",
            variants=PLAIN):
    g = torch.Generator().manual_seed(seed)
    size = interface_width(width, heads, variants)
    raws = [3 * torch.randn(batch, size, generator=g, dtype=dtype) for _ in range(steps)]
    state = empty_state(batch, cells, width, heads, dtype) if empty else random_state(batch, cells, width, heads, dtype, g)
    if dtype == torch.float32:  # the reference in float64, the kernels in float32
        reference, _ = run_both([r.double() for r in raws], [s.double() for s in state], width, heads,
                                torch.Generator().manual_seed(seed), variants=variants)
        _, fast = run_both(raws, state, width, heads, torch.Generator().manual_seed(seed), device, variants)
    else:
        reference, fast = run_both(raws, state, width, heads, g, device, variants)
    assert_match(reference, fast, tol)


# ---- Values and gradients against the reference -------------------------------------------------------------

@interpreted
@pytest.mark.parametrize(
    "batch, cells, width, heads, steps",
    [
        (1, 1, 3, 1, 1),  # one cell: the link matrix is its zero diagonal
        (2, 2, 1, 2, 2),
        (3, 7, 5, 2, 1),  # N not a power of two
        (2, 16, 20, 4, 1),  # pytorch-dnc's copy defaults
        (5, 5, 4, 3, 2),
        (1, 9, 3, 1, 7),  # a sequence of 7 steps: non-trivial states in and out
        (1, 64, 4, 4, 1),
    ],
)
def test_steps_match_reference(batch, cells, width, heads, steps):
    compare(batch, cells, width, heads, steps, seed=100 * cells + steps)


@interpreted
@pytest.mark.parametrize("batch, cells, width, heads, steps", [(2, 13, 3, 3, 2), (1, 40, 5, 2, 1), (2, 33, 6, 4, 1)])
def test_several_tiles_match_reference(small_tiles, batch, cells, width, heads, steps):
    """Tiles far smaller than N: the link matrix in up to 5 x 5 tiles, memory in tiles of a few rows."""
    compare(batch, cells, width, heads, steps, seed=cells)


@interpreted
@pytest.mark.parametrize("cells, steps", [(1, 2), (6, 3), (20, 1)])
def test_empty_memory_matches_reference(cells, steps):
    """An empty memory: all usage ties, zero memory rows (cosine 0, finite gradients), zero links."""
    compare(2, cells, 4, 2, steps, seed=cells, empty=True)


@interpreted
def test_ties_go_to_the_lowest_cell(small_tiles):
    """Equal usage: the first cell of each tie comes first in the free list, as with the CPU's stable sort."""
    batch, cells, width, heads = 1, 12, 3, 1
    size = interface_width(width, heads)
    raw = torch.zeros(batch, size, dtype=torch.float64)
    sizes = M.interface_sizes(width, heads, 1)
    gates_at = sum(list(sizes.values())[:7])  # allocation and write gates: fully open
    raw[:, gates_at:gates_at + 2] = 30.0
    state = empty_state(batch, cells, width, heads)
    usage = torch.tensor([[0.5, 0.2, 0.5, 0.2, 0.9, 0.2, 0.5, 0.9, 0.0, 0.2, 0.0, 0.5]], dtype=torch.float64)
    state[5] = usage
    outputs, _ = kernels.memory_forward(raw, state)
    write_weights = outputs[5][0, 0]
    assert int(write_weights.argmax()) == 8  # of the two empty cells (8 and 10), the lower
    reference = reference_step(raw, state, width, heads)
    torch.testing.assert_close(write_weights, reference[5][0, 0], **TOL)
    for name, a, b in zip(["reads", *M.STATE_KEYS], outputs, reference):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    # Gradients through the tied order too (gates half open, so that every path carries some).
    raw[:, gates_at:gates_at + 2] = 0.5
    assert_match(*run_both([raw], state, width, heads, torch.Generator().manual_seed(1)), TOL)
    # Every cell tied: the free list is the cells in order, allocation goes to cell 0.
    raw[:, gates_at:gates_at + 2] = 30.0
    state[5] = torch.full_like(usage, 0.3)
    outputs, _ = kernels.memory_forward(raw, state)
    assert int(outputs[5][0, 0].argmax()) == 0
    torch.testing.assert_close(outputs[5], reference_step(raw, state, width, heads)[5], **TOL)


@interpreted
def test_float32_close_to_float64_reference():
    compare(2, 10, 4, 2, 1, seed=7, dtype=torch.float32, tol=TOL32)


@interpreted
@pytest.mark.parametrize("cells", [5, 11])
def test_link_forward_is_bit_identical_to_the_step(small_tiles, cells):
    g = torch.Generator().manual_seed(cells)
    state = random_state(3, cells, 4, 2, generator=g)
    raw = torch.randn(3, interface_width(4, 2), generator=g, dtype=torch.float64)
    outputs, kept = kernels.memory_forward(raw, state)
    recomputed = kernels.link_forward(state[1], state[2], kept.new_write_weights, torch.empty_like(state[1]))
    assert torch.equal(recomputed, outputs[2])


@interpreted
@pytest.mark.parametrize("variants", [PLAIN, kernels.ALL_VARIANTS], ids=["plain", "all-variants"])
def test_extra_shapes_are_what_forward_keeps(variants):
    state = random_state(3, 7, 5, 2)
    raw = torch.randn(3, interface_width(5, 2, variants), dtype=torch.float64)
    _, saved = kernels.memory_forward(raw, state, variants=variants)
    assert [(tuple(e.shape), e.dtype) for e in saved.extra] == kernels.extra_shapes(3, 7, 5, 2, torch.float64, variants)


@interpreted
def test_backward_may_write_over_its_incoming_gradients():
    """memory_backward's state results may be the very gradient tensors it reads (sequence.py relies on it)."""
    g = torch.Generator().manual_seed(3)
    state = random_state(2, 9, 4, 3, generator=g)
    raw = torch.randn(2, interface_width(4, 3), generator=g, dtype=torch.float64)
    outputs, kept = kernels.memory_forward(raw, state)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outputs]
    separate = kernels.memory_backward(kept, [t.clone() for t in grads])
    in_place = [t.clone() for t in grads]
    results = kernels.memory_backward(kept, in_place, [torch.empty_like(raw)] + in_place[1:])
    for a, b in zip(results, separate):
        assert torch.equal(a, b)


@interpreted
@pytest.mark.parametrize("variants", [PLAIN, kernels.ALL_VARIANTS], ids=["plain", "all-variants"])
def test_no_kernel_reads_what_no_kernel_wrote(small_tiles, monkeypatch, variants):
    """Outputs and scratch are uninitialised memory. Filled with NaN instead, a kernel reading an element that no
    kernel wrote (a mask or tile bound off by one) would spread NaN: the results must still match, bit for bit."""
    def run():
        g = torch.Generator().manual_seed(5)
        state = random_state(2, 11, 3, 2, generator=g)
        raws = [torch.randn(2, interface_width(3, 2, variants), generator=g, dtype=torch.float64) for _ in range(2)]
        return run_both(raws, state, 3, 2, g, variants=variants)

    reference, clean = run()
    monkeypatch.setattr(kernels, "_empty", lambda like, *shape, dtype=None: torch.full(
        shape, float("nan") if (dtype or like.dtype).is_floating_point else 0, dtype=dtype or like.dtype))
    _, dirty = run()
    assert_match(reference, dirty, TOL)
    for a, b in zip([*[t for step in clean[0] for t in step], *clean[1]], [*[t for step in dirty[0] for t in step],
                                                                           *dirty[1]]):
        assert torch.equal(a, b)


# ---- Csordás & Schmidhuber's variants (ICLR 2019) -------------------------------------------------------------

VARIANTS = {
    "link_sharpness": Variants(link_sharpness=True),
    "deallocation": Variants(deallocation=True),
    "masked_lookup": Variants(masked_lookup=True, mask_min=0.1),
    "all": kernels.ALL_VARIANTS,
}


@interpreted
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("batch, cells, width, heads, steps", [(1, 1, 3, 1, 2), (2, 5, 4, 3, 3), (2, 16, 3, 1, 2)])
def test_variant_steps_match_reference(name, batch, cells, width, heads, steps):
    """Each variant alone and all together, values and gradients (the new interface fields' and the initial
    state's too); and still three launches forward and three backward a step: the variants add no kernel."""
    before = kernels.LAUNCHES.copy()
    compare(batch, cells, width, heads, steps, seed=10 * cells + heads, variants=VARIANTS[name])
    launched = kernels.LAUNCHES - before
    assert dict(launched) == {name: steps for name in ("_write_kernel", "_link_kernel", "_read_kernel",
                                                        "_read_backward_kernel", "_link_backward_kernel",
                                                        "_write_backward_kernel")}


@interpreted
def test_variants_in_several_tiles_and_float32(small_tiles):
    """Every variant at once through the multi-tile paths (per-head masked norms of memory tiles, ψ row by row);
    then in float32 against the float64 reference."""
    compare(2, 13, 3, 2, 1, seed=13, variants=kernels.ALL_VARIANTS)
    compare(2, 10, 4, 2, 1, seed=7, dtype=torch.float32, tol=TOL32, variants=kernels.ALL_VARIANTS)


@interpreted
@pytest.mark.parametrize("name", ["link_sharpness", "all"])
def test_variants_on_empty_memory_match_reference(name):
    """An empty memory: the first step's forward and backward weightings are 0 everywhere, which sharpening makes
    uniform (1/N); masked cosines of zero rows; ψ of zero read weights."""
    compare(2, 6, 4, 2, 3, seed=6, empty=True, variants=VARIANTS[name])


# ---- The LSTM cell's element-wise part ------------------------------------------------------------------------

def lstm_reference(gates, c_prev):
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c_prev + i * g
    return torch.cat([i, f, g, o], 1), c, torch.tanh(c), o * torch.tanh(c)


@interpreted
@pytest.mark.parametrize("batch, hidden", [(1, 1), (3, 7), (5, 300)])
def test_lstm_matches_reference(batch, hidden):
    g = torch.Generator().manual_seed(hidden)
    gates = (4 * torch.randn(batch, 4 * hidden, generator=g, dtype=torch.float64)).requires_grad_()
    c_prev = torch.randn(batch, hidden, generator=g, dtype=torch.float64).requires_grad_()
    gates[0, :1].data.fill_(1e-9)  # tanh and σ near 0, where a naive tanh loses its relative precision
    act_ref, c_ref, tanh_ref, h_ref = lstm_reference(gates, c_prev)
    act, c, tanh_c = (torch.full_like(t, float("nan")) for t in (gates, c_prev, c_prev))
    h = kernels.lstm_forward(gates.detach(), c_prev.detach(), act, c, tanh_c)
    for name, a, b in [("act", act, act_ref), ("c", c, c_ref), ("tanh_c", tanh_c, tanh_ref), ("h", h, h_ref)]:
        torch.testing.assert_close(a, b.detach(), rtol=1e-13, atol=1e-15, msg=name)
    grad_h, grad_c = torch.randn_like(h), torch.randn_like(c)
    grads_ref = torch.autograd.grad([h_ref, c_ref], [gates, c_prev], [grad_h, grad_c])
    grad_gates = torch.full_like(gates, float("nan"))
    grad_c_prev = kernels.lstm_backward(act, c_prev.detach(), tanh_c, grad_h, grad_c, grad_gates)
    torch.testing.assert_close(grad_gates, grads_ref[0], **TOL)
    torch.testing.assert_close(grad_c_prev, grads_ref[1], **TOL)


# ---- The whole sequence (sequence.py) on these kernels, and the launch budget ----------------------------------

def sequence_inputs(steps, batch, inputs, hidden, cells, width, heads, layers, generator, device="cpu"):
    g = generator

    def rand(*shape, scale=0.5):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device).requires_grad_()

    read_size = heads * width
    size = interface_width(width, heads)
    lstm = []
    for l in range(layers):
        below = inputs + read_size if l == 0 else hidden
        lstm.append((rand(4 * hidden, below), rand(4 * hidden, hidden), rand(4 * hidden), rand(4 * hidden)))
    weights = sequence.Weights(lstm=lstm, interface_weight=rand(size, hidden), interface_bias=rand(size))
    state = [t.to(device).requires_grad_() for t in random_state(batch, cells, width, heads, generator=g)]
    return (rand(steps, batch, inputs, scale=1.0), rand(layers, batch, hidden), rand(layers, batch, hidden),
            rand(batch, read_size), state, weights)


def run_sequence(module, args, link_every):
    x, h0, c0, reads, state, weights = args
    out = sequence.run(module, x, h0, c0, reads, state, weights, clip=0.8, link_every=link_every)
    features, h_t, c_t, reads_t, memory_t = out
    values = [features, h_t, c_t, reads_t, *memory_t]
    g = torch.Generator().manual_seed(0)
    loss = sum((v * torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device)).sum() for v in values)
    leaves = [x, h0, c0, reads, *state] + [t for layer in weights.lstm for t in layer] + [weights.interface_weight,
                                                                                          weights.interface_bias]
    return values, torch.autograd.grad(loss, leaves)


@interpreted
@pytest.mark.skipif(not native.available()[0], reason="the native kernels cannot be built here")
@pytest.mark.parametrize("link_every", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_sequence_matches_native_and_keeps_the_launch_budget(link_every):
    """sequence.run on the Triton kernels equals it on the native ones, values and gradients; and a time step is
    8 kernel launches forward and backward together (9 with a link recomputed), under the issue's 12."""
    steps, layers = 4, 1
    args = sequence_inputs(steps, 2, 3, 5, cells=6, width=3, heads=2, layers=layers,
                           generator=torch.Generator().manual_seed(link_every))
    values_native, grads_native = run_sequence(native, args, link_every)
    before = kernels.LAUNCHES.copy()
    values, grads = run_sequence(kernels, args, link_every)
    launched = kernels.LAUNCHES - before
    for a, b in zip(values, values_native):
        torch.testing.assert_close(a, b, **TOL)
    for k, (a, b) in enumerate(zip(grads, grads_native)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"gradient {k}: {m}")
    recomputed = steps - -(-steps // link_every)  # steps whose incoming link is not kept
    assert dict(launched) == {
        "_write_kernel": steps, "_link_kernel": steps + recomputed, "_read_kernel": steps,
        "_read_backward_kernel": steps, "_link_backward_kernel": steps, "_write_backward_kernel": steps,
        "_lstm_forward_kernel": steps * layers, "_lstm_backward_kernel": steps * layers,
    }
    assert sum(launched.values()) <= 12 * steps


# ---- The DNC on backend="triton" --------------------------------------------------------------------------------

def dnc_loss(output, hx):
    """Depends on the output and on every part of the final memory state, so that their gradients are checked."""
    memory, reads = hx[1], hx[2]
    return (output.pow(2).sum() + 0.2 * reads.sum()
            + sum(0.1 * (i + 1) * memory[key].sin().sum() for i, key in enumerate(M.STATE_KEYS)))


# The DNC keywords of every variant these kernels implement.
VARIANT_KWARGS = dict(masked_lookup=True, mask_min=0.1, deallocation=True, link_sharpness=True)


@interpreted
@pytest.mark.parametrize("kwargs", [dict(num_hidden_layers=2, checkpoint_steps=2), dict(rnn_type="gru"),
                                    dict(checkpoint_steps=2, **VARIANT_KWARGS), dict(rnn_type="gru", **VARIANT_KWARGS)],
                         ids=["lstm-whole-sequence-checkpointed", "gru-per-step-memory_step", "lstm-variants",
                              "gru-variants"])
def test_dnc_on_triton_matches_reference(kwargs):
    """DNC(backend="triton"): the LSTM runs the whole sequence in sequence.py on these kernels, the GRU steps
    through ``memory_step`` (autograd); both equal the reference DNC, values and gradients."""
    from dnc_lab import DNC

    torch.manual_seed(0)
    config = dict(input_size=3, hidden_size=6, nr_cells=5, cell_size=3, read_heads=2, **kwargs)
    reference = DNC(**config, backend="reference").double()
    fast = DNC(**config, backend="triton").double()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    out_ref, hx_ref = reference(x)
    out, hx = fast(x)
    assert fast.backend == "triton"
    torch.testing.assert_close(out, out_ref, **TOL)
    dnc_loss(out_ref, hx_ref).backward()
    dnc_loss(out, hx).backward()
    for (name, p_ref), p in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **TOL, msg=name)


@interpreted
def test_the_sequence_operator_with_variants_passes_opcheck():
    """The whole-sequence operator on these kernels with every variant: its fake implementation (the saved tensors
    sized by ``extra_shapes`` with the variants) and its registration agree with the real run."""
    from torch.library import opcheck

    from dnc_lab import DNC
    from dnc_lab.controller import rnn_weights

    torch.manual_seed(0)
    model = DNC(4, 6, nr_cells=5, cell_size=3, read_heads=2, num_hidden_layers=1, backend="triton",
                **VARIANT_KWARGS).double()
    core, steps, batch = model.cores[0], 3, 2
    lstm = [t for layer in rnn_weights(core.controllers[0]) for t in layer]
    access = core.memories[0]
    memory = list(access.initial_state(batch, torch.float64, torch.device("cpu")).values())
    x = torch.randn(steps, batch, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(1, batch, 6, dtype=torch.float64)
    args = ("triton", x, h0, h0.clone(), torch.zeros(batch, 6, dtype=torch.float64), memory, lstm,
            access.interface.weight, access.interface.bias, 20.0, 2, *Variants.of(model.core_config))
    results = opcheck(sequence._sequence_op, args, test_utils=("test_schema", "test_faketensor"))
    assert set(results.values()) == {"SUCCESS"}


@interpreted
def test_choose_takes_triton_for_the_variants(monkeypatch):
    """A model with the variants runs on these kernels when asked for them, and ``auto`` on a GPU takes them."""
    from dnc_lab import backends
    from dnc_lab.dnc import DNC

    monkeypatch.setattr(backends, "_said", set())
    config = DNC(3, 6, nr_cells=5, cell_size=3, read_heads=2, backend="reference", **VARIANT_KWARGS).core_config
    assert backends.choose("triton", config, torch.device("cpu"), torch.float64) == backends.Choice("triton")
    assert backends.choose("auto", config, torch.device("cuda"), torch.float32) == backends.Choice("triton")


# ---- Clear errors ----------------------------------------------------------------------------------------------

@interpreted
def test_bad_inputs_are_refused_with_a_reason():
    state = random_state(2, 4, 3, 1)
    raw = torch.randn(2, interface_width(3, 1), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"raw interface is torch.float64 \(2, 5\) on cpu, expected torch.float64 \[2, 20\]"):
        kernels.memory_forward(raw[:, :5], state)
    two_heads = list(state)
    two_heads[1] = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="one write head"):
        kernels.memory_forward(raw, two_heads)
    with pytest.raises(TypeError, match="float32 or float64 tensors, got torch.float16"):
        kernels.memory_forward(raw.half(), [s.half() for s in state])
    with pytest.raises(ValueError, match=r"raw interface is torch.float64 \(2, 20\) on cpu, expected torch.float64 "
                                         r"\[2, 28\] on cpu \(for N=4, W=3, R=1, masked_lookup, link_sharpness\)"):
        kernels.memory_forward(raw, state, variants=Variants(masked_lookup=True, link_sharpness=True))


def test_unsupported_says_why(monkeypatch):
    """The reasons backends.choose records when it passes this backend over."""
    class Config:  # what unsupported() reads of a dnc.CoreConfig
        num_writes = 1

    cuda_device, cpu = torch.device("cuda"), torch.device("cpu")
    assert kernels.unsupported(Config, cuda_device, torch.float32) is None
    assert kernels.unsupported(Config, cuda_device, torch.float16) == "it computes in float32 or float64, not torch.float16"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.unsupported(Config, cpu, torch.float64) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels.unsupported(Config, cpu, torch.float64).startswith("it runs on CUDA (on the CPU only in Triton's")
    Config.num_writes = 2
    assert kernels.unsupported(Config, cuda_device, torch.float64) == "it has one write head, not num_writes=2"


def test_available_says_why_not(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = kernels.available()
    assert not ok and "no CUDA device" in why and "TRITON_INTERPRET=1" in why


# ---- Large memories -------------------------------------------------------------------------------------------

@interpreted
@pytest.mark.slow
def test_1024_cells_match_reference(monkeypatch):
    """N = 1024, still tiled (no N x N block anywhere), in 128 x 128 link tiles and 256 x 256 rank tiles: the
    interpreter's cost is per tile. The default tiles at this N are compiled by test_kernels_compile_for_a_gpu and
    run by the cuda test."""
    monkeypatch.setattr(kernels, "LINK_TILE", 128)
    monkeypatch.setattr(kernels, "RANK_TILE", 256)
    compare(1, 1024, 4, 1, 1, seed=1024)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, sizes", [("fp32", ("16", "20", "4")), ("fp64", ("7", "5", "3")),
                                          ("fp32", ("1024", "64", "1")), ("fp64", ("5", "3", "2", "masked_lookup"))])
def test_kernels_compile_for_a_gpu(dtype, sizes):
    """Triton's interpreter runs Python and is more permissive than its compiler; this compiles every kernel for
    an sm_90 GPU (no GPU needed) so that CI catches what only the compiler refuses: the plain DNC's nine, then the
    four memory kernels with variant code, with every variant (or the one named)."""
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "dnc_lab.backends.triton", dtype, *sizes], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    variants = sizes[3] if len(sizes) > 3 else "masked_lookup+deallocation+link_sharpness"
    assert len(lines) == 13 and "_write_backward_kernel" in lines[6]
    assert [line.split(":")[0] for line in lines[9:]] == ["_write_kernel", "_read_kernel", "_read_backward_kernel",
                                                           "_write_backward_kernel"]
    assert all(line.endswith(f"({variants})") for line in lines[9:])


# ---- Compiled for a GPU (skipped without one; `make gpu-check` runs them) ------------------------------------------

# Each distinct (N, W, R, dtype, tiles) compiles the kernels anew (seconds each): the grid is kept small.
@pytest.mark.cuda
@compiled_on_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float64, TOL), (torch.float32, TOL32)])
@pytest.mark.parametrize("batch, cells, width, heads, steps", [(1, 1, 3, 1, 2), (3, 7, 5, 2, 3), (5, 16, 20, 4, 7),
                                                               (2, 100, 6, 4, 2)])
def test_cuda_steps_match_reference(batch, cells, width, heads, steps, dtype, tol):
    compare(batch, cells, width, heads, steps, seed=cells, dtype=dtype, tol=tol, device="cuda")


@pytest.mark.cuda
@compiled_on_cuda
def test_cuda_several_tiles_match_reference(small_tiles):
    compare(3, 40, 6, 3, 3, seed=40, device="cuda")


@pytest.mark.cuda
@compiled_on_cuda
@pytest.mark.parametrize("cells", [6, 256])
def test_cuda_empty_memory_matches_reference(cells):
    compare(2, cells, 8, 2, 3, seed=cells, empty=True, device="cuda")


@pytest.mark.cuda
@compiled_on_cuda
def test_cuda_1024_cells_match_reference_and_repeat_exactly():
    compare(2, 1024, 16, 2, 2, seed=1024, device="cuda")
    g = torch.Generator().manual_seed(9)
    state = random_state(4, 1024, 16, 4, dtype=torch.float32, generator=g, device="cuda")
    raw = torch.randn(4, interface_width(16, 4), generator=g).cuda()
    runs = []
    for _ in range(2):
        outputs, kept = kernels.memory_forward(raw, state)
        runs.append(outputs + kernels.memory_backward(kept, [torch.ones_like(o) for o in outputs]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    recomputed = kernels.link_forward(state[1], state[2], kept.new_write_weights, torch.empty_like(state[1]))
    assert torch.equal(recomputed, runs[0][2])


@pytest.mark.cuda
@compiled_on_cuda
@pytest.mark.skipif(not native.available()[0], reason="the native kernels cannot be built here")
@pytest.mark.parametrize("link_every", [1, 3])
def test_cuda_sequence_matches_native(link_every):
    args = sequence_inputs(6, 3, 3, 8, cells=12, width=4, heads=2, layers=2,
                           generator=torch.Generator().manual_seed(link_every))
    values_native, grads_native = run_sequence(native, args, link_every)
    on_gpu = [t.detach().cuda().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args[:4]]
    x, h0, c0, reads = on_gpu
    state = [t.detach().cuda().requires_grad_() for t in args[4]]
    w = args[5]
    lstm = [tuple(t.detach().cuda().requires_grad_() for t in layer) for layer in w.lstm]
    weights = sequence.Weights(lstm, w.interface_weight.detach().cuda().requires_grad_(),
                               w.interface_bias.detach().cuda().requires_grad_())
    values, grads = run_sequence(kernels, (x, h0, c0, reads, state, weights), link_every)
    for a, b in zip(values, values_native):
        torch.testing.assert_close(a.cpu(), b, **TOL)
    for a, b in zip(grads, grads_native):
        torch.testing.assert_close(a.cpu(), b, **TOL)


@pytest.mark.cuda
@compiled_on_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float64, TOL), (torch.float32, TOL32)])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cuda_variants_match_reference(name, dtype, tol):
    """The variants compiled for the GPU: float64 to rounding (mask_min a float64 constant, not a float32
    argument), several tiles at the default sizes' N, and an empty memory (sharpening's uniform case)."""
    compare(3, 40, 6, 3, 3, seed=41, dtype=dtype, tol=tol, device="cuda", variants=VARIANTS[name])
    compare(2, 6, 8, 2, 3, seed=6, dtype=dtype, tol=tol, empty=True, device="cuda", variants=VARIANTS[name])


@pytest.mark.cuda
@compiled_on_cuda
def test_cuda_dnc_with_every_variant_picks_triton_and_matches_reference():
    from dnc_lab import DNC

    torch.manual_seed(0)
    config = dict(input_size=3, hidden_size=6, nr_cells=12, cell_size=4, read_heads=2, checkpoint_steps=2,
                  **VARIANT_KWARGS)
    reference = DNC(**config, backend="reference").double().cuda()
    fast = DNC(**config).double().cuda()  # backend="auto"
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64, device="cuda")
    out_ref, hx_ref = reference(x)
    out, hx = fast(x)
    assert fast.backend == "triton", fast.backend_choice().describe()
    torch.testing.assert_close(out, out_ref, **TOL)
    dnc_loss(out_ref, hx_ref).backward()
    dnc_loss(out, hx).backward()
    for (name, p_ref), p in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **TOL, msg=name)
