"""Each addressing equation on its own: hand-computed cases, planted cases, invariants, gradients."""

import pytest
import torch
from torch.autograd import gradcheck

from dnc_lab import addressing as A



@pytest.fixture(autouse=True)
def float64_by_default():
    """This module's tests compare hand-computed values and run gradcheck: float64 throughout."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def t(*values):
    """t(1, 2) or t([[1, 2]]): a float64 tensor."""
    return torch.tensor(values[0] if len(values) == 1 else values, dtype=torch.float64)


def random_weighting(*shape, generator=None):
    """Rows that sum to at most 1 (softmax over N+1 slots, the last one dropped)."""
    logits = torch.randn(*shape[:-1], shape[-1] + 1, generator=generator)
    return torch.softmax(logits, -1)[..., :-1]


# --- content lookup -------------------------------------------------------------------------------

def test_cosine_similarity_hand_computed():
    memory = t([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]).unsqueeze(0)  # [1, 3, 2]
    key = t([[1.0, 0.0]]).unsqueeze(0)  # [1, 1, 2]
    eps = A.EPSILON  # norms are sqrt(|x|² + ε)
    key_norm = (1 + eps) ** 0.5
    expected = t([1 / (key_norm * key_norm), 1 / (key_norm * (2 + eps) ** 0.5), 0.0])
    assert torch.allclose(A.cosine_similarity(memory, key)[0, 0], expected, rtol=0, atol=1e-12)


def test_content_weighting_hand_computed_and_sums_to_one():
    memory = t([[1.0, 0.0], [0.0, 1.0]]).unsqueeze(0)
    key = t([[1.0, 0.0]]).unsqueeze(0)
    strength = t([[2.0]])
    weights = A.content_weighting(memory, key, strength)[0, 0]
    # softmax([2 D(k, M0), 2 D(k, M1)]) with D = 1 / (1 + ε) and 0
    expected = torch.softmax(t(2.0 / (1 + A.EPSILON), 0.0), 0)
    assert torch.allclose(weights, expected, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    w = A.content_weighting(torch.randn(3, 7, 4, generator=g), torch.randn(3, 2, 4, generator=g), 1 + torch.rand(3, 2, generator=g))
    assert torch.allclose(w.sum(-1), torch.ones(3, 2))


def test_content_weighting_planted_key_finds_its_row():
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(2, 10, 6, generator=g)
    keys = memory[:, [7, 3]] * 3.0  # scale must not matter for cosine similarity
    weights = A.content_weighting(memory, keys, torch.full((2, 2), 50.0))
    assert weights.argmax(-1).tolist() == [[7, 3], [7, 3]]


def test_content_weighting_on_zero_memory_is_uniform_with_finite_gradient():
    memory = torch.zeros(1, 4, 3, requires_grad=True)
    key = torch.zeros(1, 1, 3, requires_grad=True)
    weights = A.content_weighting(memory, key, t([[5.0]]))
    assert torch.allclose(weights, torch.full((1, 1, 4), 0.25))
    (weights * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(memory.grad).all() and torch.isfinite(key.grad).all()


# --- usage and allocation -------------------------------------------------------------------------

def test_usage_hand_computed():
    prev_usage = t([[0.5, 0.0, 1.0]])
    prev_write = t([[[0.5, 1.0, 0.0]]])  # one write head
    free_gates = t([[1.0, 0.5]])
    prev_read = t([[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    # after write: u + w - u*w = [0.75, 1, 1]; retention: head 0 frees cell 2 fully, head 1 half of cell 1
    expected = t([[0.75, 0.5, 0.0]])
    assert torch.allclose(A.usage(prev_usage, prev_write, free_gates, prev_read), expected)


def test_usage_stays_in_unit_interval():
    g = torch.Generator().manual_seed(2)
    usage = torch.zeros(4, 9)
    for _ in range(20):
        usage = A.usage(usage, random_weighting(4, 2, 9, generator=g), torch.rand(4, 3, generator=g),
                        random_weighting(4, 3, 9, generator=g))
        assert (usage >= 0).all() and (usage <= 1).all()


def test_allocation_hand_computed():
    usage = t([[0.5, 0.2, 0.9]])
    # free list by ascending usage: cell 1 (0.2), cell 0 (0.5), cell 2 (0.9)
    expected = t([[0.5 * 0.2, 0.8, 0.1 * 0.2 * 0.5]])
    assert torch.allclose(A.allocation_weighting(usage), expected)


def test_max_allocation_goes_to_min_usage():
    g = torch.Generator().manual_seed(3)
    usage = torch.rand(8, 12, generator=g)
    allocation = A.allocation_weighting(usage)
    assert torch.equal(allocation.argmax(-1), usage.argmin(-1))
    assert (allocation >= 0).all() and (allocation.sum(-1) <= 1 + 1e-12).all()


def test_full_memory_allocates_nothing_and_empty_memory_allocates_first_free_cell():
    assert torch.allclose(A.allocation_weighting(torch.ones(1, 5)), torch.zeros(1, 5))
    usage = t([[1.0, 1.0, 0.0, 1.0]])
    assert torch.allclose(A.allocation_weighting(usage), t([[0.0, 0.0, 1.0, 0.0]]))


def test_two_write_heads_allocate_different_cells():
    usage = t([[0.9, 0.0, 0.8, 0.0, 0.7]])
    allocation = A.write_allocation_weights(usage, torch.ones(1, 2), num_writes=2)
    first, second = allocation[0].argmax(-1).tolist()
    assert {first, second} == {1, 3}
    # a closed gate for head 0 leaves its cell free for head 1
    allocation = A.write_allocation_weights(usage, t([[0.0, 1.0]]), num_writes=2)
    assert allocation[0, 0].argmax() == allocation[0, 1].argmax()


# --- writing ------------------------------------------------------------------------------------

def test_write_weighting_hand_computed():
    content = t([[[0.2, 0.8]]])
    allocation = t([[[1.0, 0.0]]])
    weights = A.write_weighting(content, allocation, allocation_gates=t([[0.25]]), write_gates=t([[0.5]]))
    # 0.5 * (0.25 * [1, 0] + 0.75 * [0.2, 0.8])
    assert torch.allclose(weights, t([[[0.5 * (0.25 + 0.15), 0.5 * 0.6]]]))


def test_erase_and_write_hand_computed():
    memory = t([[[1.0, 2.0], [3.0, 4.0]]])
    weights = t([[[1.0, 0.5]]])
    erase = t([[[1.0, 0.0]]])
    vector = t([[[10.0, 20.0]]])
    # row 0: [1*(1-1), 2*(1-0)] + [10, 20]; row 1: [3*(1-0.5), 4] + 0.5*[10, 20]
    expected = t([[[10.0, 22.0], [6.5, 14.0]]])
    assert torch.allclose(A.erase_and_write(memory, weights, erase, vector), expected)


def test_precedence_hand_computed():
    prev = t([[[0.5, 0.5, 0.0]]])
    write = t([[[0.0, 0.0, 0.6]]])
    assert torch.allclose(A.precedence(prev, write), t([[[0.2, 0.2, 0.6]]]))


def test_link_from_slot_0_to_slot_1_after_writing_0_then_1():
    n = 4
    link, prec = torch.zeros(1, 1, n, n), torch.zeros(1, 1, n)
    for cell in (0, 1):
        write = torch.zeros(1, 1, n)
        write[0, 0, cell] = 1
        link = A.link_matrix(link, prec, write)
        prec = A.precedence(prec, write)
    expected = torch.zeros(n, n)
    expected[1, 0] = 1  # cell 1 was written right after cell 0
    assert torch.allclose(link[0, 0], expected)
    forward, backward = A.directional_weightings(link, t([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]]))
    assert torch.allclose(forward[0, 0, 0], t(0, 1.0, 0, 0))  # from 0, forward goes to 1
    assert torch.allclose(backward[0, 1, 0], t(1.0, 0, 0, 0))  # from 1, backward goes to 0


def test_link_matrix_invariants_over_random_writes():
    g = torch.Generator().manual_seed(4)
    b, h, n = 3, 2, 8
    link, prec = torch.zeros(b, h, n, n), torch.zeros(b, h, n)
    for _ in range(30):
        write = random_weighting(b, h, n, generator=g)
        link = A.link_matrix(link, prec, write)
        prec = A.precedence(prec, write)
        assert (link >= 0).all() and (link <= 1).all()
        assert torch.allclose(torch.diagonal(link, dim1=-2, dim2=-1), torch.zeros(b, h, n))
        assert (link.sum(-1) <= 1 + 1e-9).all() and (link.sum(-2) <= 1 + 1e-9).all()
        assert (prec.sum(-1) <= 1 + 1e-9).all()


# --- reading ------------------------------------------------------------------------------------

def test_read_weighting_modes_select_each_weighting():
    content = t([[[1.0, 0, 0]]])
    forward = t([[[[0, 1.0, 0]]]])
    backward = t([[[[0, 0, 1.0]]]])
    for modes, expected in (([1.0, 0, 0], backward), ([0, 1.0, 0], forward), ([0, 0, 1.0], content)):
        result = A.read_weighting(content, forward, backward, t([[modes]]))
        assert torch.allclose(result.flatten(), expected.flatten())
    mixed = A.read_weighting(content, forward, backward, t([[[0.2, 0.3, 0.5]]]))
    assert torch.allclose(mixed, t([[[0.5, 0.3, 0.2]]]))


def test_read_hand_computed():
    memory = t([[[1.0, 2.0], [3.0, 4.0]]])
    assert torch.allclose(A.read(memory, t([[[0.5, 0.5]]])), t([[[2.0, 3.0]]]))


# --- gradients ----------------------------------------------------------------------------------

def _inputs(g):
    b, h, r, n, w = 2, 2, 2, 5, 3

    def leaf(x):
        return x.detach().to(torch.float64).requires_grad_(True)

    return {
        "memory": leaf(torch.randn(b, n, w, generator=g)),
        "keys": leaf(torch.randn(b, r, w, generator=g)),
        "strengths": leaf(1 + torch.rand(b, r, generator=g)),
        "usage": leaf(torch.linspace(0.05, 0.95, n).repeat(b, 1) + 0.01 * torch.rand(b, n, generator=g)),
        "write": leaf(random_weighting(b, h, n, generator=g)),
        "read": leaf(random_weighting(b, r, n, generator=g)),
        "gates_h": leaf(torch.rand(b, h, generator=g)),
        "gates_r": leaf(torch.rand(b, r, generator=g)),
        "vectors": leaf(torch.rand(b, h, w, generator=g)),
        "link": leaf(random_weighting(b, h, n, n, generator=g) * 0.5),
        "prec": leaf(random_weighting(b, h, n, generator=g)),
        "modes": leaf(torch.softmax(torch.randn(b, r, 2 * h + 1, generator=g), -1)),
        "fwd": leaf(random_weighting(b, r, h, n, generator=g)),
        # independent leaves: gradcheck perturbs each input on its own
        "bwd": leaf(random_weighting(b, r, h, n, generator=g)),
        "alloc": leaf(random_weighting(b, h, n, generator=g)),
        "gates_h2": leaf(torch.rand(b, h, generator=g)),
        "vectors2": leaf(torch.randn(b, h, w, generator=g)),
    }


GRADCHECKS = {
    "content_weighting": lambda x: (A.content_weighting, (x["memory"], x["keys"], x["strengths"])),
    "usage": lambda x: (A.usage, (x["usage"], x["write"], x["gates_r"], x["read"])),
    "allocation_weighting": lambda x: (A.allocation_weighting, (x["usage"],)),
    "write_allocation_weights": lambda x: (lambda u, gate: A.write_allocation_weights(u, gate, 2), (x["usage"], x["gates_h"])),
    "write_weighting": lambda x: (A.write_weighting, (x["write"], x["alloc"], x["gates_h"], x["gates_h2"])),
    "erase_and_write": lambda x: (A.erase_and_write, (x["memory"], x["write"], x["vectors"], x["vectors2"])),
    "precedence": lambda x: (A.precedence, (x["prec"], x["write"])),
    "link_matrix": lambda x: (A.link_matrix, (x["link"], x["prec"], x["write"])),
    "directional_weightings": lambda x: (A.directional_weightings, (x["link"], x["read"])),
    "read_weighting": lambda x: (A.read_weighting, (x["read"], x["fwd"], x["bwd"], x["modes"])),
    "read": lambda x: (A.read, (x["memory"], x["read"])),
}


@pytest.mark.parametrize("name", sorted(GRADCHECKS))
def test_gradcheck_float64(name):
    fn, args = GRADCHECKS[name](_inputs(torch.Generator().manual_seed(5)))
    assert gradcheck(fn, args, eps=1e-6, atol=1e-8)
