"""dnc_lab.fused matches the reference addressing functions, values and gradients, in float64."""

from __future__ import annotations

import pytest
import torch

from dnc_lab import addressing, fused


def random_sequence(batch=3, heads=1, cells=7, read_heads=2, steps=6, seed=0):
    """Leaf tensors of a link-matrix recurrence: per-step write and read weightings, initial state.

    Write weightings are softmaxes scaled by a gate, so rows sum to at most 1 as in a DNC; some
    are nearly one-hot (sharp allocation writes are where 1 - w_i - w_j goes to zero).
    """
    g = torch.Generator().manual_seed(seed)
    d = torch.float64

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=d)

    logits = 4 * torch.randn(steps, batch, heads, cells, generator=g, dtype=d)
    write = (torch.softmax(logits, -1) * rand(steps, batch, heads, 1)).requires_grad_()
    reads = torch.softmax(2 * torch.randn(steps, batch, read_heads, cells, generator=g, dtype=d), -1).requires_grad_()
    link0 = (0.1 * rand(batch, heads, cells, cells) * (1 - torch.eye(cells, dtype=d))).requires_grad_()
    prec0 = (torch.softmax(torch.randn(batch, heads, cells, generator=g, dtype=d), -1) * 0.5).requires_grad_()
    # Fixed random projections turn every output into one scalar loss.
    proj_f = torch.randn(steps, batch, read_heads, heads, cells, generator=g, dtype=d)
    proj_b = torch.randn(steps, batch, read_heads, heads, cells, generator=g, dtype=d)
    proj_l = torch.randn(batch, heads, cells, cells, generator=g, dtype=d)
    return (write, reads, link0, prec0), (proj_f, proj_b, proj_l)


def run(step_fn, leaves, projections):
    """Unroll the recurrence; the read weights fed to step t are reads[t] (given, not computed)."""
    write, reads, link, prec = leaves
    proj_f, proj_b, proj_l = projections
    loss = 0
    outputs = []
    for t in range(write.shape[0]):
        link, forward, backward = step_fn(link, prec, write[t], reads[t])
        prec = addressing.precedence(prec, write[t])
        loss = loss + (forward * proj_f[t]).sum() + (backward * proj_b[t]).sum()
        outputs += [forward, backward]
    loss = loss + (link * proj_l).sum()
    return loss, outputs + [link]


def reference_step(link, prec, write, reads):
    link = addressing.link_matrix(link, prec, write)
    forward, backward = addressing.directional_weightings(link, reads)
    return link, forward, backward


def fused_step(k):
    return lambda link, prec, write, reads: fused.link_and_directional_weightings(
        link, prec, write, reads, checkpoint_every=k
    )


def grads(leaves, loss):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_values_and_gradients_match_reference(heads, k):
    leaves, proj = random_sequence(heads=heads, steps=7)
    ref_loss, ref_out = run(reference_step, leaves, proj)
    ref_grads = grads(leaves, ref_loss)
    loss, out = run(fused_step(k), leaves, proj)
    got_grads = grads(leaves, loss)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("write", "reads", "link0", "prec0"), got_grads, ref_grads):
        assert b.abs().max() > 0, f"reference gradient of {name} is zero: the test would not see an error"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"gradient of {name}: {m}")


def test_gradcheck_short_chain():
    leaves, proj = random_sequence(batch=2, cells=4, read_heads=2, steps=3, seed=1)

    def f(write, reads, link0, prec0):
        return run(fused_step(2), (write, reads, link0, prec0), proj)[0]

    assert torch.autograd.gradcheck(f, leaves)


def test_second_backward_recomputes_from_checkpoints():
    leaves, proj = random_sequence(steps=9)
    loss, _ = run(fused_step(4), leaves, proj)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def count_saved_link_sized(step_fn, leaves, proj, size):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _, outputs = run(step_fn, leaves, proj)
    return sum(n == size for n in saved), outputs


def test_only_links_at_checkpoints_are_kept():
    """Autograd saves O(B·N) per fused step; B·N² tensors are kept only at every k-th step."""
    batch, cells, steps, k = 2, 16, 12, 4
    leaves, proj = random_sequence(batch=batch, cells=cells, steps=steps)
    size = batch * cells * cells
    reference_saved, _ = count_saved_link_sized(reference_step, leaves, proj, size)
    fused_saved, outputs = count_saved_link_sized(fused_step(k), leaves, proj, size)
    assert reference_saved >= 2 * steps  # the reference keeps link and scale at every step
    assert fused_saved <= 1  # only the loss's own (link * proj_l) keeps one
    node = getattr(outputs[-1], fused._NODE_ATTRIBUTE)()
    checkpoints = 0
    while node is not None:
        checkpoints += node.checkpoint is not None
        node = node.prev
    assert checkpoints == steps // k


def test_inference_matches_and_records_nothing():
    leaves, proj = random_sequence(steps=4)
    with torch.no_grad():
        loss, out = run(fused_step(2), leaves, proj)
        ref_loss, ref_out = run(reference_step, leaves, proj)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not hasattr(out[-1], fused._NODE_ATTRIBUTE)


def test_rejects_bad_checkpoint_interval():
    leaves, _ = random_sequence(steps=1)
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        fused.link_and_directional_weightings(leaves[2], leaves[3], leaves[0][0], leaves[1][0], checkpoint_every=0)


@pytest.mark.parametrize("h", [1, 2])
def test_memory_step_matches_reference_over_a_sequence(h):
    """memory_step with the fused link against the reference, chained, values and gradients."""
    from dnc_lab import memory

    torch.manual_seed(3)
    b, n, w, r, steps = 2, 6, 4, 2, 5
    access = memory.MemoryAccess(8, n, w, r, h).double()
    inputs = torch.randn(steps, b, 8, dtype=torch.float64, requires_grad=True)

    def unroll(step_fn):
        state = access.initial_state(b, torch.float64, torch.device("cpu"))
        total = 0
        for t in range(steps):
            reads, state = step_fn(state, access.interface_from(inputs[t]))
            total = total + (reads * (t + 1)).sum() + state["link_matrix"].pow(2).sum()
        return total

    ref = unroll(memory.memory_step)
    ref_grads = torch.autograd.grad(ref, [inputs, *access.parameters()])
    got = unroll(lambda s, i: memory.memory_step(s, i, fused_link=2))
    got_grads = torch.autograd.grad(got, [inputs, *access.parameters()])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, g in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, g, rtol=1e-5, atol=1e-5)


def test_memory_step_under_activation_checkpointing_matches_reference():
    """The fused link inside torch.utils.checkpoint chunks (as DNC(checkpoint_steps=k) runs it)."""
    from torch.utils.checkpoint import checkpoint

    from dnc_lab import memory

    torch.manual_seed(4)
    b, n, w, r, h, steps, chunk = 2, 6, 4, 2, 1, 7, 3
    access = memory.MemoryAccess(8, n, w, r, h).double()
    inputs = torch.randn(steps, b, 8, dtype=torch.float64, requires_grad=True)

    def run_chunk(step_fn, xs, state):
        total = 0
        for x in xs:
            reads, state = step_fn(state, access.interface_from(x))
            total = total + reads.pow(2).sum()
        return total, state

    def unroll(step_fn, checkpointed):
        state = access.initial_state(b, torch.float64, torch.device("cpu"))
        total = 0
        for start in range(0, steps, chunk):
            xs = inputs[start : start + chunk]
            if checkpointed:
                part, state = checkpoint(run_chunk, step_fn, xs, state, use_reentrant=False)
            else:
                part, state = run_chunk(step_fn, xs, state)
            total = total + part
        return total + state["link_matrix"].sum()

    params = [inputs, *access.parameters()]
    ref = unroll(memory.memory_step, checkpointed=False)
    ref_grads = torch.autograd.grad(ref, params)
    got = unroll(lambda s, i: memory.memory_step(s, i, fused_link=2), checkpointed=True)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, g in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, g, rtol=1e-5, atol=1e-5)
