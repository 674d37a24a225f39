"""The native backend against the reference path: the memory step (dnc_lab/backends/native.py,
backends/csrc/kernels.cpp) and the whole LSTM-controlled sequence with hand-written BPTT (dnc_lab/sequence.py).

The issue's ground rule: the fast path matches the readable reference to 1e-5, values and
gradients, on random inputs in float64. In float64 the two agree to rounding (~1e-15), so the
tolerance here is far tighter than that.

These tests need a C++ compiler; outside CI they are skipped when there is none. In CI (CI=true)
a missing compiler fails them, and a compiler that fails to build the source is always a failure.
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

from dnc_lab import DNC, backends
from dnc_lab import memory as M
from dnc_lab.backends import Variants, native

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and os.environ.get("CI") != "true",
                                reason="no C++ compiler (g++) to build the native step")

TOL = dict(rtol=1e-9, atol=1e-11)


def random_state(batch, cells, width, heads, dtype=torch.float64, generator=None):
    """A valid, non-trivial memory state: weightings sum to at most 1, links in [0, 1), zero diagonal."""
    g = generator

    def softmax(*shape, scale=1.0):
        return torch.softmax(torch.randn(*shape, generator=g, dtype=dtype), -1) * scale

    link = torch.rand(batch, 1, cells, cells, generator=g, dtype=dtype) / cells
    link = link * (1 - torch.eye(cells, dtype=dtype))
    return M.MemoryState(
        memory=torch.randn(batch, cells, width, generator=g, dtype=dtype),
        link_matrix=link,
        precedence=softmax(batch, 1, cells, scale=0.9),
        read_weights=softmax(batch, heads, cells),
        write_weights=softmax(batch, 1, cells, scale=0.8),
        usage_vector=torch.rand(batch, cells, generator=g, dtype=dtype),
    )


def reference_step(raw, state, width, heads):
    sizes = M.interface_sizes(width, heads, 1)
    fields = dict(zip(sizes, torch.split(raw, list(sizes.values()), dim=-1)))
    return M.memory_step(state, M.parse_interface(fields, width, heads, 1))


def native_step(state, raw):
    """native.memory_step with the state as a dict, like memory.memory_step."""
    reads, new_state = native.memory_step(raw, [state[key] for key in M.STATE_KEYS])
    return reads, dict(zip(M.STATE_KEYS, new_state))


def flatten(reads, state):
    return (reads,) + tuple(state[key] for key in M.STATE_KEYS)


def test_library_builds():
    ok, why = native.available()
    assert ok, why


@pytest.mark.parametrize(
    "batch, cells, width, heads",
    [
        (3, 7, 5, 2),  # N not a multiple of the 4-row blocks
        (2, 16, 20, 4),  # pytorch-dnc's copy defaults
        (2, 9, 3, 1),
        (2, 70, 6, 3),  # N > 64: the other sort
    ],
)
def test_values_and_gradients_match_reference(batch, cells, width, heads):
    g = torch.Generator().manual_seed(cells)
    size = sum(M.interface_sizes(width, heads, 1).values())
    raw = (3 * torch.randn(batch, size, generator=g, dtype=torch.float64)).requires_grad_()
    state = {k: v.requires_grad_() for k, v in random_state(batch, cells, width, heads, generator=g).items()}
    leaves = [raw] + [state[k] for k in M.STATE_KEYS]

    expected = flatten(*reference_step(raw, state, width, heads))
    got = flatten(*native_step(state, raw))
    for name, e, o in zip(("reads",) + M.STATE_KEYS, expected, got):
        assert o.shape == e.shape, name
        torch.testing.assert_close(o, e, **TOL, msg=name)

    upstream = [torch.randn(e.shape, generator=g, dtype=torch.float64) for e in expected]
    grads_expected = torch.autograd.grad(expected, leaves, upstream)
    grads_got = torch.autograd.grad(got, leaves, upstream)
    for name, e, o in zip(("raw",) + M.STATE_KEYS, grads_expected, grads_got):
        torch.testing.assert_close(o, e, **TOL, msg=f"gradient of {name}")


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    width, heads = 3, 2
    size = sum(M.interface_sizes(width, heads, 1).values())
    raw = torch.randn(2, size, generator=g, dtype=torch.float64, requires_grad=True)
    state = random_state(2, 5, width, heads, generator=g)
    values = [state[k].requires_grad_() for k in M.STATE_KEYS]

    def step(raw, *values):
        return flatten(*native_step(dict(zip(M.STATE_KEYS, values)), raw))

    assert torch.autograd.gradcheck(step, (raw, *values))


def test_empty_memory_allocates_like_the_reference():
    """All usages tie at the start: both paths must pick the same (lowest) free cell."""
    width, heads, cells = 4, 2, 12
    state = M.initial_state(3, cells, width, heads, 1, dtype=torch.float64)
    raw = torch.randn(3, sum(M.interface_sizes(width, heads, 1).values()), dtype=torch.float64)
    raw[:, -3 * heads - 3 : -3 * heads] = 10.0  # free, allocation and write gates open: write by allocation
    reads_ref, ref = reference_step(raw, state, width, heads)
    reads, got = native_step(state, raw)
    assert ref["write_weights"][:, 0].argmax(-1).tolist() == [0, 0, 0]
    for key in M.STATE_KEYS:
        torch.testing.assert_close(got[key], ref[key], **TOL, msg=key)
    torch.testing.assert_close(reads, reads_ref, **TOL)


def test_threads_give_the_same_numbers():
    """B·N² above the threshold runs the batch on several OpenMP threads: same result as one."""
    g = torch.Generator().manual_seed(1)
    batch, cells, width, heads = 16, 64, 4, 2
    raw = torch.randn(batch, sum(M.interface_sizes(width, heads, 1).values()), generator=g, dtype=torch.float64)
    state = random_state(batch, cells, width, heads, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = flatten(*native_step(state, raw))
        torch.set_num_threads(2)
        two = flatten(*native_step(state, raw))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def _pair(seed=0, **kwargs):
    """The same DNC (same weights) on the reference and the native backend."""
    torch.manual_seed(seed)
    reference = DNC(**kwargs, backend="reference").double()
    fast = DNC(**kwargs, backend="native").double()
    assert (reference.backend, fast.backend) == ("reference", "native")
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _loss(output, hx):
    """Depends on the output and on every part of the final state, so that their gradients are checked too."""
    (h, c), memory, reads = hx[0][0], hx[1], hx[2]
    return (output.pow(2).sum() + 0.3 * h.sum() + 0.4 * c.sum() + 0.2 * reads.sum()
            + sum(0.1 * (i + 1) * memory[key].sin().sum() for i, key in enumerate(M.STATE_KEYS)))


@pytest.mark.parametrize(
    "kwargs",
    [
        # whole sequence in dnc_lab.sequence (LSTM, one DNC layer)
        dict(num_hidden_layers=2),
        dict(num_hidden_layers=3, bias=False, independent_linears=True, clip=0.2),
        dict(num_hidden_layers=2, checkpoint_steps=3),  # links recomputed in segments of 3 steps
        dict(checkpoint_steps=5),
        # per time step through autograd, memory step native
        dict(rnn_type="gru", num_layers=2, share_memory=False, independent_linears=True),
        dict(rnn_type="ff", bidirectional=True, checkpoint_steps=3),
    ],
    ids=["lstm", "lstm-3-layers-no-bias-independent-linears-clipped", "lstm-checkpointed-3", "lstm-checkpointed-5",
         "gru-2-layers", "ff-bidirectional-checkpointed"],
)
def test_dnc_native_matches_reference(kwargs):
    reference, fast = _pair(input_size=5, hidden_size=12, nr_cells=9, cell_size=4, read_heads=3, **kwargs)
    x_ref = torch.randn(4, 11, 5, dtype=torch.float64, requires_grad=True)
    x_fast = x_ref.detach().clone().requires_grad_()
    out_ref, hx_ref = reference(x_ref)
    out_fast, hx_fast = fast(x_fast)
    torch.testing.assert_close(out_fast, out_ref, **TOL)
    if kwargs.get("rnn_type", "lstm") == "lstm":
        _loss(out_ref, hx_ref).backward()
        _loss(out_fast, hx_fast).backward()
    else:
        out_ref.pow(2).sum().backward()
        out_fast.pow(2).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad, **TOL)
    for (name, p_ref), p_fast in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, **TOL, msg=name)


def test_gradients_reach_a_given_initial_state():
    """Truncated BPTT without detach: the gradient flows into the state passed in as hx."""
    reference, fast = _pair(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2, num_hidden_layers=2)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    grads = []
    for model in (reference, fast):
        _, hx = model(x[:, :3])
        (h, c), memory, reads = hx[0][0], hx[1], hx[2]
        leaves = [h, c, reads] + [memory[key] for key in M.STATE_KEYS]
        leaves = [t.detach().requires_grad_() for t in leaves]
        state = ([(leaves[0], leaves[1])], dict(zip(M.STATE_KEYS, leaves[3:])), leaves[2])
        out, _ = model(x[:, 3:], state)
        grads.append(torch.autograd.grad(out.pow(2).sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **TOL)


def test_dropout_in_training_uses_the_per_step_path():
    """The sequence path has no dropout; with dropout in training mode the per-step path runs, drawing
    the same dropout masks as the reference (same values and gradients from the same seed); eval mode,
    where dropout is off, is the sequence path again."""
    reference, fast = _pair(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2, num_hidden_layers=2,
                            dropout=0.5)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    results = []
    for model in (reference, fast):
        model.train()
        torch.manual_seed(11)
        out, _ = model(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    (out_ref, grads_ref), (out_fast, grads_fast) = results
    assert not torch.equal(out_ref, reference.eval()(x)[0])  # dropout was really on
    torch.testing.assert_close(out_fast, out_ref, **TOL)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, **TOL)
    reference.eval(), fast.eval()
    torch.testing.assert_close(fast(x)[0], reference(x)[0], **TOL)


def test_state_carries_across_calls_like_the_reference():
    reference, fast = _pair(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2)
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    _, hx_ref = reference(x[:, :4])
    _, hx_fast = fast(x[:, :4])
    out_ref, _ = reference(x[:, 4:], hx_ref)
    out_fast, _ = fast(x[:, 4:], hx_fast)
    torch.testing.assert_close(out_fast, out_ref, **TOL)


def test_float32_close_to_float64_reference():
    reference, fast = _pair(input_size=4, hidden_size=16, nr_cells=32, cell_size=8, read_heads=2)
    x = torch.randn(3, 10, 4, dtype=torch.float64)
    expected, _ = reference(x)
    got, _ = fast.float()(x.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_trace_shows_the_same_run():
    """trace() needs the parsed interface, so it steps the reference path: same output."""
    _, fast = _pair(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    out, _ = fast(x)
    traced, _, views = fast.trace(x)
    torch.testing.assert_close(traced, out, **TOL)
    assert views["write_gate"].shape == (5, 1)


def test_falls_back_with_a_warning_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: (False, "a test says no"))
    monkeypatch.setattr(backends, "_said", set())
    torch.manual_seed(0)
    reference = DNC(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2, backend="reference").double()
    with pytest.warns(UserWarning, match="a test says no"):
        fast = DNC(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2, native=True).double()
        assert fast.backend == "reference"
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(fast(x)[0], reference(x)[0], rtol=0, atol=0)
    auto = DNC(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2)
    assert auto.backend_choice() == ("reference", "native passed over: a test says no")


def test_several_write_heads_fall_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(backends, "_said", set())
    model = DNC(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2, num_writes=2, native=True)
    with pytest.warns(UserWarning, match="num_writes=2"):
        assert model.backend == "reference"


def test_native_alias_conflicting_with_backend_is_refused():
    with pytest.raises(ValueError, match="native=True means backend='native', but backend='reference'"):
        DNC(input_size=3, hidden_size=8, native=True, backend="reference")
    assert DNC(input_size=3, hidden_size=8, native=False).backend == "reference"


def test_no_warning_when_native_runs():
    _, fast = _pair(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast(torch.randn(2, 3, 3, dtype=torch.float64))


def test_backward_may_write_over_its_incoming_gradients():
    """native.memory_backward's results may be the gradient tensors it reads (sequence.py relies on it)."""
    g = torch.Generator().manual_seed(3)
    batch, cells, width, heads = 3, 10, 4, 2
    raw = torch.randn(batch, sum(M.interface_sizes(width, heads, 1).values()), generator=g, dtype=torch.float64)
    state = random_state(batch, cells, width, heads, generator=g)
    outputs, kept = native.memory_forward(raw, [state[k] for k in M.STATE_KEYS])
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outputs]
    fresh = native.memory_backward(kept, [t.clone() for t in grads])
    aliased = [torch.empty_like(raw)] + grads[1:]
    native.memory_backward(kept, grads, aliased)
    for a, b in zip(fresh, aliased):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vectorised_exp_is_within_two_ulp(dtype):
    """The kernels' own exp (softmaxes, LSTM gates): close to torch.exp, and inf, NaN and underflow as exp's."""
    x = torch.cat([torch.linspace(-80, 80, 100_001, dtype=dtype), torch.linspace(-3, 3, 10_001, dtype=dtype)])
    got, expected = native.exp(x), torch.exp(x)
    relative = ((got - expected).abs() / expected).max().item()
    assert relative <= 2 * torch.finfo(dtype).eps, relative
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4, -1e4], dtype=dtype)
    got = native.exp(special)
    assert torch.isnan(got[0]) and got[1] == float("inf") and got[2] == 0 and got[3] == float("inf") and got[4] == 0


def test_inference_without_a_graph_matches_and_returns_its_own_state():
    """Under no_grad the sequence keeps nothing for backward (links go to two reused buffers), yet
    returns the same numbers, and the final state it returns is not overwritten by a later call."""
    reference, fast = _pair(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2, num_hidden_layers=2)
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    with torch.no_grad():
        out, hx = fast(x)
        link = hx[1]["link_matrix"].clone()
        fast(torch.randn(2, 9, 3, dtype=torch.float64))
        out_ref, hx_ref = reference(x)
    torch.testing.assert_close(out, out_ref, **TOL)
    assert torch.equal(hx[1]["link_matrix"], link)
    torch.testing.assert_close(link, hx_ref[1]["link_matrix"], **TOL)


def test_double_backward_is_refused():
    _, fast = _pair(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2)
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    out, _ = fast(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="lstm_dnc_sequence_backward.*no autograd formula"):
        grad.sum().backward()


# ---- Csordás & Schmidhuber's variants (ICLR 2019) ---------------------------------------------------
# The reference is memory.memory_step of memory.parse_interface with the variants' fields, as
# MemoryAccess runs it; the native step gets the same raw interface and backends.Variants.

VARIANTS = {
    "link_sharpness": backends.Variants(link_sharpness=True),
    "deallocation": backends.Variants(deallocation=True),
    "masked_lookup": backends.Variants(masked_lookup=True, mask_min=0.1),
    "all": backends.Variants(masked_lookup=True, mask_min=0.25, deallocation=True, link_sharpness=True),
}


def variant_steps(variants, batch, cells, width, heads, steps, empty=False, seed=0):
    """``steps`` chained steps from one state, on both paths: (outputs, gradients) of each, the outputs
    being every step's reads and the final state, the gradients those of every step's raw interface
    and of the initial state (for one random upstream gradient)."""
    g = torch.Generator().manual_seed(seed)
    sizes = M.interface_sizes(width, heads, 1, variants.masked_lookup, variants.link_sharpness)
    assert native.interface_size(cells, width, heads, variants) == sum(sizes.values())
    start = M.initial_state(batch, cells, width, heads, 1, dtype=torch.float64) if empty else \
        random_state(batch, cells, width, heads, generator=g)
    leaves = [start[key].clone().requires_grad_() for key in M.STATE_KEYS]
    raws = [(2 * torch.randn(batch, sum(sizes.values()), generator=g, dtype=torch.float64)).requires_grad_()
            for _ in range(steps)]

    def reference():
        state, reads = dict(zip(M.STATE_KEYS, leaves)), []
        for raw in raws:
            fields = dict(zip(sizes, torch.split(raw, list(sizes.values()), dim=-1)))
            interface = M.parse_interface(fields, width, heads, 1, variants.mask_min)
            r, state = M.memory_step(state, interface, deallocation=variants.deallocation)
            reads.append(r)
        return reads + [state[key] for key in M.STATE_KEYS]

    def fast():
        state, reads = leaves, []
        for raw in raws:
            r, state = native.memory_step(raw, state, variants)
            reads.append(r)
        return reads + list(state)

    results = []
    for path in (reference, fast):
        outputs = path()
        upstream = [torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64)
                    for i, o in enumerate(outputs)]
        results.append((outputs, torch.autograd.grad(outputs, raws + leaves, upstream)))
    return results


def assert_variant_steps_match(variants, *args, **kwargs):
    (expected, grads_expected), (got, grads_got) = variant_steps(variants, *args, **kwargs)
    steps = len(expected) - len(M.STATE_KEYS)
    names = [f"reads of step {t}" for t in range(steps)] + list(M.STATE_KEYS)
    for name, e, o in zip(names, expected, got):
        torch.testing.assert_close(o, e, **TOL, msg=name)
    names = [f"raw interface of step {t}" for t in range(steps)] + [f"initial {key}" for key in M.STATE_KEYS]
    for name, e, o in zip(names, grads_expected, grads_got):
        torch.testing.assert_close(o, e, **TOL, msg=f"gradient of {name}")


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("cells, heads, batch", [(n, r, b) for n in (1, 5, 16) for r in (1, 3) for b in (1, 3)])
def test_variant_steps_match_reference(name, cells, heads, batch):
    assert_variant_steps_match(VARIANTS[name], batch, cells, 4, heads, steps=3, seed=cells * 10 + heads)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("cells", [1, 5, 16])
def test_variant_steps_from_an_empty_memory_match_reference(name, cells):
    """Zero links and read weights: the sharpened weightings are uniform at the first step, not zero.
    Two steps: from the third on, cells still exactly tied in usage are sorted by rounding noise."""
    assert_variant_steps_match(VARIANTS[name], 3, cells, 3, 2, steps=2, empty=True, seed=cells)


def test_sharpened_weightings_of_an_empty_memory_are_uniform():
    """The one place link_sharpness changes a value qualitatively: the forward weighting of an empty
    link matrix is 0, its sharpened version 1/N per cell (what the read mode mixes in)."""
    cells, width, heads = 6, 3, 1
    variants = backends.Variants(link_sharpness=True)
    raw = torch.zeros(2, native.interface_size(cells, width, heads, variants), dtype=torch.float64)
    raw[:, -2 * heads - 3 * heads:-2 * heads] = torch.tensor([-30.0, 30.0, -30.0], dtype=torch.float64)  # forward mode
    raw[:, -3 * heads - 2 * heads - 2] = -30.0  # write gate closed: the memory stays empty
    state = M.initial_state(2, cells, width, heads, 1, dtype=torch.float64)
    _, plain = native.memory_step(raw[:, :-2 * heads], [state[key] for key in M.STATE_KEYS])
    _, sharp = native.memory_step(raw, [state[key] for key in M.STATE_KEYS], variants)
    torch.testing.assert_close(plain[3], torch.zeros(2, heads, cells, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(sharp[3], torch.full((2, heads, cells), 1 / cells, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_variant_interface_width_is_checked():
    variants = backends.Variants(link_sharpness=True)
    raw, state = torch.randn(2, native.interface_size(5, 3, 2), dtype=torch.float64), \
        list(M.initial_state(2, 5, 3, 2, 1, dtype=torch.float64).values())
    with pytest.raises(ValueError, match=r"shape \(2, 28\), expected \[2, 32\] .*the variants link_sharpness"):
        native.memory_forward(raw, state, variants=variants)
    lib = native.load()
    for v in VARIANTS.values():
        bits = native.variant_bits(v)
        assert lib.dnc_interface_size(5, 3, 2, bits) == native.interface_size(5, 3, 2, v)
        assert lib.dnc_aux_size(5, 3, 2, bits) == native.aux_size(5, 3, 2, v)


@pytest.mark.parametrize("name, kwargs", [(name, dict(num_hidden_layers=2, checkpoint_steps=2)) for name in VARIANTS]
                         + [("all", dict(rnn_type="gru"))],
                         ids=[f"lstm-{name}" for name in VARIANTS] + ["gru-all"])
def test_dnc_with_variants_native_matches_reference(name, kwargs):
    """The whole sequence (dnc_lab.sequence, hand-written BPTT; links recomputed in segments of 2) and
    the per-step path (GRU), variants on: output, final state and every gradient."""
    variants = VARIANTS[name]
    flags = dict(masked_lookup=variants.masked_lookup, deallocation=variants.deallocation,
                 link_sharpness=variants.link_sharpness, **(dict(mask_min=variants.mask_min) if variants.masked_lookup
                                                            else {}))
    reference, fast = _pair(input_size=5, hidden_size=12, nr_cells=7, cell_size=4, read_heads=2, **kwargs, **flags)
    assert Variants.of(fast.core_config) == variants
    x_ref = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    x_fast = x_ref.detach().clone().requires_grad_()
    out_ref, hx_ref = reference(x_ref)
    out_fast, hx_fast = fast(x_fast)
    torch.testing.assert_close(out_fast, out_ref, **TOL)
    loss = _loss if kwargs.get("rnn_type", "lstm") == "lstm" else lambda out, hx: out.pow(2).sum()
    loss(out_ref, hx_ref).backward()
    loss(out_fast, hx_fast).backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad, **TOL)
    for (param, p_ref), p_fast in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, **TOL, msg=param)


def test_the_step_passes_opcheck_with_variants():
    """The operator's fake implementation (extra_shapes, the interface width) and autograd
    registration with every variant on."""
    from torch.library import opcheck

    variants = VARIANTS["all"]
    g = torch.Generator().manual_seed(4)
    raw = torch.randn(2, native.interface_size(5, 3, 2, variants), generator=g, dtype=torch.float64,
                      requires_grad=True)
    state = [t.requires_grad_() for t in random_state(2, 5, 3, 2, generator=g).values()]
    assert set(opcheck(native._step_op, (raw, *state, *variants)).values()) == {"SUCCESS"}


@pytest.mark.slow
def test_the_sequence_passes_opcheck_with_variants():
    from torch.library import opcheck

    from dnc_lab import sequence
    from dnc_lab.controller import rnn_weights

    variants = VARIANTS["all"]
    torch.manual_seed(0)
    model = DNC(4, 8, nr_cells=5, cell_size=3, read_heads=2, backend="native", masked_lookup=True, mask_min=0.25,
                deallocation=True, link_sharpness=True).double()
    core, steps, batch = model.cores[0], 3, 2
    access = core.memories[0]
    layers = rnn_weights(core.controllers[0])
    lstm = [t for layer in layers for t in layer]
    memory = list(access.initial_state(batch, torch.float64, torch.device("cpu")).values())
    x = torch.randn(steps, batch, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(len(layers), batch, 8, dtype=torch.float64)
    args = ("native", x, h0, h0.clone(), torch.zeros(batch, 6, dtype=torch.float64), memory, lstm,
            access.interface.weight, access.interface.bias, 20.0, 2, *variants)
    assert set(opcheck(sequence._sequence_op, args).values()) == {"SUCCESS"}


def test_auto_takes_native_for_the_variants_it_implements():
    for name in native.SUPPORTED_VARIANTS:
        flags = dict(mask_min=0.1) if name == "masked_lookup" else {}
        choice = DNC(input_size=3, hidden_size=8, nr_cells=6, cell_size=4, read_heads=2, **{name: True},
                     **flags).backend_choice()
        assert choice == ("native", ""), (name, choice)
