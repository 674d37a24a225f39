"""The memory access as a whole: interface parsing, one write-then-read step, invariants, gradients."""

import torch
from torch.autograd import gradcheck

from dnc_lab.memory import Interface, MemoryAccess, initial_state, interface_sizes, memory_step, parse_interface


def raw_interface(batch, cell_size, read_heads, num_writes, generator, scale=1.0):
    sizes = interface_sizes(cell_size, read_heads, num_writes)
    return {name: scale * torch.randn(batch, size, generator=generator, dtype=torch.float64) for name, size in sizes.items()}


def test_parse_interface_applies_the_papers_nonlinearities():
    g = torch.Generator().manual_seed(0)
    iface = parse_interface(raw_interface(3, 4, 2, 2, g, scale=5.0), cell_size=4, read_heads=2, num_writes=2)
    assert iface.read_keys.shape == (3, 2, 4) and iface.write_keys.shape == (3, 2, 4)
    assert (iface.read_strengths >= 1).all() and (iface.write_strengths >= 1).all()
    for gate in (iface.erase_vectors, iface.free_gates, iface.allocation_gates, iface.write_gates):
        assert (gate > 0).all() and (gate < 1).all()
    assert iface.read_modes.shape == (3, 2, 5)
    assert torch.allclose(iface.read_modes.sum(-1), torch.ones(3, 2, dtype=torch.float64))


def test_written_vector_is_read_back_by_content():
    n, w = 6, 4
    state = initial_state(1, n, w, read_heads=1, num_writes=1, dtype=torch.float64)
    vector = torch.tensor([[[1.0, -2.0, 3.0, 0.5]]], dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    iface = Interface(
        read_keys=vector.clone(), read_strengths=100 * one,
        write_keys=torch.zeros(1, 1, w, dtype=torch.float64), write_strengths=one,
        erase_vectors=torch.ones(1, 1, w, dtype=torch.float64), write_vectors=vector,
        free_gates=0 * one, allocation_gates=one, write_gates=one,
        read_modes=torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64),  # content mode only
    )
    reads, new = memory_step(state, iface)
    assert torch.allclose(new["write_weights"].sum(), torch.tensor(1.0, dtype=torch.float64))
    cell = int(new["write_weights"][0, 0].argmax())
    assert torch.allclose(new["memory"][0, cell], vector[0, 0])
    assert torch.allclose(reads[0, 0], vector[0, 0], atol=1e-6)
    # the next step: that cell counts as used, so allocation moves to another one
    _, after = memory_step(new, iface)
    assert int(after["write_weights"][0, 0].argmax()) != cell


def test_invariants_hold_over_a_random_sequence():
    g = torch.Generator().manual_seed(1)
    b, n, w, r, h = 4, 8, 3, 3, 2
    state = initial_state(b, n, w, r, h, dtype=torch.float64)
    for _ in range(25):
        iface = parse_interface(raw_interface(b, w, r, h, g, scale=3.0), w, r, h)
        _, state = memory_step(state, iface)
        assert ((state["usage_vector"] >= 0) & (state["usage_vector"] <= 1)).all()
        assert (state["write_weights"].sum(-1) <= 1 + 1e-9).all()
        assert (state["read_weights"].sum(-1) <= 1 + 1e-9).all()
        link = state["link_matrix"]
        assert (link.sum(-1) <= 1 + 1e-9).all() and (link.sum(-2) <= 1 + 1e-9).all()
        assert torch.diagonal(link, dim1=-2, dim2=-1).abs().max() == 0


def test_no_nan_gradient_from_all_zero_memory_in_float32():
    torch.manual_seed(2)
    access = MemoryAccess(input_size=5, nr_cells=7, cell_size=4, read_heads=2, num_writes=1)
    controller_output = torch.zeros(3, 5, requires_grad=True)  # zero keys and zero memory
    state = access.initial_state(3, torch.float32, torch.device("cpu"))
    reads, new_state, _ = access(controller_output, state)
    (reads.sum() + new_state["memory"].sum()).backward()
    assert torch.isfinite(controller_output.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in access.parameters())


def test_gradcheck_of_a_whole_memory_step_float64():
    g = torch.Generator().manual_seed(3)
    b, n, w, r, h = 2, 4, 3, 2, 1
    names = list(interface_sizes(w, r, h))
    raw = [x.requires_grad_(True) for x in raw_interface(b, w, r, h, g).values()]
    start = initial_state(b, n, w, r, h, dtype=torch.float64)
    # a non-trivial previous state, reached by two steps from empty memory
    for _ in range(2):
        _, start = memory_step(start, parse_interface(raw_interface(b, w, r, h, g), w, r, h))
    start = {k: v.detach().requires_grad_(True) for k, v in start.items()}
    keys = list(start)

    def step(*tensors):
        fields = dict(zip(names, tensors[: len(names)]))
        prev = dict(zip(keys, tensors[len(names):]))
        reads, new = memory_step(prev, parse_interface(fields, w, r, h))
        return reads, new["memory"], new["link_matrix"], new["usage_vector"]

    assert gradcheck(step, (*raw, *start.values()), eps=1e-6, atol=1e-8)


def test_independent_linears_are_the_same_function_as_one_interface_layer():
    """One linear layer per field, stacked, is the one interface layer: same fields, same values."""
    torch.manual_seed(4)
    x = torch.randn(2, 6, dtype=torch.float64)
    shared = MemoryAccess(6, nr_cells=5, cell_size=3, read_heads=2, num_writes=2, independent_linears=False).double()
    separate = MemoryAccess(6, nr_cells=5, cell_size=3, read_heads=2, num_writes=2, independent_linears=True).double()
    with torch.no_grad():
        shared.interface.weight.copy_(torch.cat([f.weight for f in separate.fields.values()]))
        shared.interface.bias.copy_(torch.cat([f.bias for f in separate.fields.values()]))
    a, b = shared.interface_from(x), separate.interface_from(x)
    assert a._fields == b._fields
    for name, u, v in zip(a._fields, a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-14, msg=name)  # one product or several: rounding only
