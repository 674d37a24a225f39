"""A fast path for the temporal link matrix: no B·N² tensor kept per time step for backward.

The reference (``addressing.link_matrix`` then ``addressing.directional_weightings``) lets
autograd keep, at every time step, the link matrix and the scale (1 - w_i - w_j): about
2·B·H·N² floats per step, 2·B·H·N²·T for a sequence. At 256 cells that is most of a DNC's
training memory, and the many B·N² element-wise passes autograd makes in backward are most of
its time.

``link_and_directional_weightings`` computes the same values with one autograd Function per step
whose backward is written out by hand (the derivation is in ``_LinkStep.backward``). It keeps only
the step's vectors (write weights, previous precedence, previous read weights: O(B·N)) and, every
``checkpoint_every`` steps, the incoming link matrix. In backward, which visits the steps in
reverse order, the link matrices of a segment are recomputed once from its checkpoint. Memory for
the links drops from 2·B·H·N²·T to about (T/k + k + 3)·B·H·N² floats for k = ``checkpoint_every``,
for one more pass of the (cheap) link recurrence.

How the steps find each other: the link tensor a step returns carries a weak reference to that
step's record (``_LinkNode``); the next step finds it on its ``prev_link`` argument. A step whose
``prev_link`` carries no record (the first step, a state passed in by the caller, a detached
tensor) checkpoints ``prev_link`` itself. The records form a chain held by the autograd graph, so
they are freed with it.

Values and gradients match the reference to float64 rounding (tests/test_fused.py).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

_NODE_ATTRIBUTE = "_dnclab_link_node"


class _LinkNode:
    """What one step keeps: its inputs except the link matrix, and that only at checkpoints.

    write_weights [B, H, N], prev_precedence [B, H, N]; ``checkpoint`` is the step's incoming
    link L_{t-1} [B, H, N, N] (kept until the graph is freed); ``cached_input`` / ``cached_output``
    hold recomputed L_{t-1} / L_t transiently during backward.
    """

    __slots__ = ("prev", "write_weights", "prev_precedence", "depth", "checkpoint", "cached_input",
                 "cached_output", "__weakref__")

    def __init__(self, prev: Optional["_LinkNode"], write_weights, prev_precedence, checkpoint):
        self.prev = prev
        self.write_weights = write_weights
        self.prev_precedence = prev_precedence
        self.checkpoint = checkpoint
        self.depth = 0 if checkpoint is not None else prev.depth + 1
        self.cached_input = None
        self.cached_output = None

    def incoming_link(self) -> torch.Tensor:
        """L_{t-1}: from the checkpoint, the cache, or by replaying the segment from a checkpoint."""
        if self.checkpoint is not None:
            return self.checkpoint
        if self.cached_input is not None:
            return self.cached_input
        # Walk back to the nearest node whose input is known, then replay forward, caching every
        # input on the way: the next backward steps (earlier times) find theirs ready.
        path = []
        node = self
        while node.checkpoint is None and node.cached_input is None:
            path.append(node)
            node = node.prev
        link = node.checkpoint if node.checkpoint is not None else node.cached_input
        for later in reversed(path):
            link = _link_forward(link, node.write_weights, node.prev_precedence)
            later.cached_input = link
            node = later
        return self.cached_input


def _scale(write_weights: torch.Tensor) -> torch.Tensor:
    """1 - w_i - w_j, [B, H, N, N]."""
    return (1 - write_weights).unsqueeze(-1) - write_weights.unsqueeze(-2)


def _link_forward(prev_link: torch.Tensor, write_weights: torch.Tensor, prev_precedence: torch.Tensor) -> torch.Tensor:
    """L_t = (1 - w_i - w_j) L_{t-1} + w_i p_{t-1,j}, zero diagonal. No autograd; 3 passes over B·H·N²."""
    b, h, n = write_weights.shape
    link = _scale(write_weights).mul_(prev_link)
    link.view(b * h, n, n).baddbmm_(write_weights.reshape(b * h, n, 1), prev_precedence.reshape(b * h, 1, n))
    link.diagonal(dim1=-2, dim2=-1).zero_()
    return link


class _LinkStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prev_link, prev_precedence, write_weights, prev_read_weights, node):
        link = _link_forward(prev_link, write_weights, prev_precedence)
        reads = prev_read_weights.unsqueeze(1)  # [B, 1, R, N]
        forward = torch.matmul(reads, link.transpose(-1, -2))  # [B, H, R, N]: (L w)[i] = Σ_j L[i, j] w[j]
        backward = torch.matmul(reads, link)  # [B, H, R, N]: (Lᵀ w)[j] = Σ_i w[i] L[i, j]
        ctx.node = node
        ctx.save_for_backward(prev_precedence, write_weights, prev_read_weights)
        ctx.set_materialize_grads(False)
        return link, forward, backward

    @staticmethod
    def backward(ctx, grad_link, grad_forward, grad_backward):
        """Gradients of the link step and of the directional weightings.

        With G = dLoss/dL_t (masked off the diagonal), summed over every use of L_t:
            from the link output:          G  = grad_link
            from forward  f = L r:         G += grad_fᵀ r        ([N, R] @ [R, N])
            from backward b = Lᵀ r:        G += rᵀ grad_b
        then, since L_t = (1 - w_i - w_j) ∘ L_{t-1} + w pᵀ:
            dL_{t-1}   = G ∘ (1 - w_i - w_j)
            dw[k]      = Σ_j G[k, j] p[j] - Σ_j G[k, j] L_{t-1}[k, j] - Σ_i G[i, k] L_{t-1}[i, k]
            dp[j]      = Σ_i G[i, j] w[i]
            dr         = Σ_h grad_f L_t + grad_b L_tᵀ
        """
        prev_precedence, write_weights, prev_read_weights = ctx.saved_tensors
        node: _LinkNode = ctx.node
        b, h, n = write_weights.shape
        r = prev_read_weights.shape[1]
        prev_link = node.incoming_link()
        link = node.cached_output
        if link is None and ctx.needs_input_grad[3] and (grad_forward is not None or grad_backward is not None):
            link = _link_forward(prev_link, write_weights, prev_precedence)

        # Both outer-product sums in one batched matmul with inner size 2R:
        # G += [grad_fᵀ | rᵀ] @ [r ; grad_b]  ([B*H, N, 2R] @ [B*H, 2R, N]).
        reads = prev_read_weights.unsqueeze(1).expand(b, h, r, n).reshape(b * h, r, n)
        zeros = None
        g_f = grad_forward.reshape(b * h, r, n) if grad_forward is not None else None  # [B, H, R, N] as returned
        g_b = grad_backward.reshape(b * h, r, n) if grad_backward is not None else None
        if g_f is None or g_b is None:
            zeros = torch.zeros_like(reads)
        left = torch.cat([zeros if g_f is None else g_f, reads], dim=1)  # [B*H, 2R, N]
        right = torch.cat([reads, zeros if g_b is None else g_b], dim=1)  # [B*H, 2R, N]
        if grad_link is None:
            grad = torch.bmm(left.transpose(1, 2), right)
        else:
            grad = torch.baddbmm(grad_link.reshape(b * h, n, n), left.transpose(1, 2), right)
        grad = grad.view(b, h, n, n)
        grad.diagonal(dim1=-2, dim2=-1).zero_()  # L_t[i, i] = 0 whatever its inputs

        grad_reads = None
        if ctx.needs_input_grad[3] and (g_f is not None or g_b is not None):
            flat = link.view(b * h, n, n)
            if g_f is not None:
                grad_reads = torch.bmm(g_f, flat)
            if g_b is not None:
                from_backward = torch.bmm(g_b, flat.transpose(1, 2))
                grad_reads = from_backward if grad_reads is None else grad_reads.add_(from_backward)
            grad_reads = grad_reads.view(b, h, r, n).sum(1)
        # L_t is not needed any more: let it go before the temporaries below are allocated.
        link = flat = None
        node.cached_output = None

        # One scratch B·H·N² buffer serves the three products below, and dL_{t-1} is computed in
        # place in G (ours), which therefore comes last: backward holds ~4 link-sized tensors.
        grad_prev_link = grad_precedence = grad_write = None
        if ctx.needs_input_grad[1]:
            grad_precedence = torch.matmul(write_weights.unsqueeze(-2), grad).squeeze(-2)
        scratch = None
        if ctx.needs_input_grad[2]:
            scratch = torch.mul(grad, prev_link)
            grad_write = -(scratch.sum(-1) + scratch.sum(-2))
            # Σ_j G[k, j] p[j] as a product and a row sum: a matrix-vector bmm is several times
            # slower on the CPU.
            grad_write += torch.mul(grad, prev_precedence.unsqueeze(-2), out=scratch).sum(-1)
        if ctx.needs_input_grad[0]:
            if scratch is None:
                scale = _scale(write_weights)
            else:
                scale = torch.sub((1 - write_weights).unsqueeze(-1), write_weights.unsqueeze(-2), out=scratch)
            grad_prev_link = grad.mul_(scale)
        scratch = scale = None

        # Hand L_{t-1} to the previous step's backward (it is that step's output), drop our caches.
        if node.prev is not None:
            node.prev.cached_output = prev_link
        node.cached_input = None
        node.cached_output = None
        return grad_prev_link, grad_precedence, grad_write, grad_reads, None


# Opaque to torch.compile: the step records live on Python objects (see the module docstring),
# which Dynamo cannot trace; a compiled caller runs this eagerly between its compiled graphs.
@torch.compiler.disable
def link_and_directional_weightings(
    prev_link: torch.Tensor,
    prev_precedence: torch.Tensor,
    write_weights: torch.Tensor,
    prev_read_weights: torch.Tensor,
    checkpoint_every: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``addressing.link_matrix`` followed by ``addressing.directional_weightings``, fused.

    prev_link [B, H, N, N], prev_precedence [B, H, N], write_weights [B, H, N],
    prev_read_weights [B, R, N] -> (link [B, H, N, N], forward [B, R, H, N], backward [B, R, H, N]).

    ``checkpoint_every`` k: keep the incoming link matrix every k steps of a chain (see the module
    docstring); k = 1 keeps every one (no recomputation). Do not modify the returned link in place.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every!r}: expected an integer >= 1")
    tracking = torch.is_grad_enabled() and any(
        t.requires_grad for t in (prev_link, prev_precedence, write_weights, prev_read_weights)
    )
    if not tracking:
        with torch.no_grad():
            link, forward, backward = _LinkStep.forward(
                _NoContext(), prev_link, prev_precedence, write_weights, prev_read_weights, None
            )
        return link, forward.transpose(1, 2), backward.transpose(1, 2)

    prev_ref = getattr(prev_link, _NODE_ATTRIBUTE, None)
    prev_node = prev_ref() if prev_ref is not None else None
    if prev_node is None or prev_node.depth + 1 >= checkpoint_every:
        node = _LinkNode(prev_node, write_weights.detach(), prev_precedence.detach(), prev_link.detach())
    else:
        node = _LinkNode(prev_node, write_weights.detach(), prev_precedence.detach(), None)
    link, forward, backward = _LinkStep.apply(prev_link, prev_precedence, write_weights, prev_read_weights, node)
    setattr(link, _NODE_ATTRIBUTE, weakref.ref(node))
    return link, forward.transpose(1, 2), backward.transpose(1, 2)


class _NoContext:
    """Stands in for ``ctx`` when no graph is recorded (inference)."""

    def save_for_backward(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass
