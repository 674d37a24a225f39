"""The DNC's memory addressing, one pure function per equation.

Graves et al., "Hybrid computing using a neural network with dynamic external memory",
Nature 538 (2016), Methods section "Memory addressing". Symbols follow the paper.

Shape convention (all tensors batch-first):
    B  batch size            N  memory cells (``nr_cells``)     W  cell width (``cell_size``)
    R  read heads            H  write heads (``num_writes``; the paper has one)

Nothing here holds state or parameters: each function maps tensors to tensors, so each can be
tested on its own, including with ``torch.autograd.gradcheck`` in float64.

Three optional variants follow Csordás & Schmidhuber, "Improving Differentiable Neural Computers
Through Memory Masking, De-allocation, and Link Distribution Sharpness Control" (ICLR 2019):
``masked_content_weighting`` (Section 3.1), ``deallocate`` (Section 3.2, Eq. 1) and ``sharpen``
(Section 3.3, Eq. 2). ``dnc_lab.memory`` uses them only when the model asks for them.
"""

from __future__ import annotations

import torch

# Added inside square roots and before divisions. Large enough to keep float32 gradients finite
# when memory or keys are exactly zero (the start of every sequence), small enough not to matter
# for the values.
EPSILON = 1e-6


def cosine_similarity(memory: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """D(u, v) = u·v / (|u| |v|) between every key and every memory row.

    memory [B, N, W], keys [B, K, W] -> [B, K, N].

    Norms are sqrt(sum(x²) + ε) rather than ``Tensor.norm``, whose gradient is NaN at a zero
    vector; all-zero memory (every sequence starts that way) therefore has similarity 0 and a
    finite gradient.
    """
    # M kᵀ rather than k Mᵀ: autograd then keeps M itself, not a transposed copy of it.
    dot = torch.matmul(memory, keys.transpose(1, 2)).transpose(1, 2)  # [B, K, N]
    key_norm = torch.sqrt(keys.pow(2).sum(-1, keepdim=True) + EPSILON)  # [B, K, 1]
    memory_norm = torch.sqrt(memory.pow(2).sum(-1) + EPSILON).unsqueeze(1)  # [B, 1, N]
    return dot / (key_norm * memory_norm)


def content_weighting(memory: torch.Tensor, keys: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
    """Content-based addressing: C(M, k, β)[i] = exp(β D(k, M[i])) / Σ_j exp(β D(k, M[j])).

    memory [B, N, W], keys [B, K, W], strengths β [B, K] (≥ 1 after oneplus) -> [B, K, N].
    Each row is a softmax over cells, so it sums to 1.
    """
    similarity = cosine_similarity(memory, keys)
    return torch.softmax(similarity * strengths.unsqueeze(-1), dim=-1)


def masked_content_weighting(memory: torch.Tensor, keys: torch.Tensor, strengths: torch.Tensor,
                             masks: torch.Tensor) -> torch.Tensor:
    """Masked content lookup: C(M, k, β, m)[i] = softmax_i(β D(k ∘ m, M[i] ∘ m)) (Csordás & Schmidhuber, 3.1).

    memory [B, N, W], keys [B, K, W], strengths β [B, K], masks m [B, K, W] in [0, 1] -> [B, K, N].

    Each head multiplies both its key and every memory row by its own mask before the cosine
    similarity, so the parts of a cell the head does not search for (the value to be retrieved)
    count neither in the dot product nor in the norms. m = 1 everywhere is ``content_weighting``.

    Computed without a [B, K, N, W] tensor: (k ∘ m)·(M[i] ∘ m) = Σ_w k_w m_w² M[i, w], and
    |M[i] ∘ m|² = Σ_w M[i, w]² m_w², each one matrix product. Norms get the same ε as
    ``cosine_similarity`` (finite gradients at an all-zero memory or mask).
    """
    mask_sq = masks.pow(2)  # [B, K, W]
    dot = torch.matmul(keys * mask_sq, memory.transpose(1, 2))  # [B, K, N]
    key_norm = torch.sqrt((keys * masks).pow(2).sum(-1, keepdim=True) + EPSILON)  # [B, K, 1]
    memory_norm = torch.sqrt(torch.matmul(mask_sq, memory.pow(2).transpose(1, 2)) + EPSILON)  # [B, K, N]
    similarity = dot / (key_norm * memory_norm)
    return torch.softmax(similarity * strengths.unsqueeze(-1), dim=-1)


def retention(free_gates: torch.Tensor, prev_read_weights: torch.Tensor) -> torch.Tensor:
    """Memory retention vector ψ_t = Π_i (1 - f_t^i w_{t-1}^{r,i}).

    free_gates f [B, R] in [0, 1], prev_read_weights [B, R, N] -> ψ [B, N] in [0, 1].
    A cell a head has just read may be freed when that head's free gate is open.
    """
    return torch.prod(1 - free_gates.unsqueeze(-1) * prev_read_weights, dim=1)


def usage(
    prev_usage: torch.Tensor,
    prev_write_weights: torch.Tensor,
    free_gates: torch.Tensor,
    prev_read_weights: torch.Tensor,
) -> torch.Tensor:
    """Usage u_t = (u_{t-1} + w^w_{t-1} - u_{t-1} ∘ w^w_{t-1}) ∘ ψ_t.

    prev_usage [B, N], prev_write_weights [B, H, N], free_gates [B, R],
    prev_read_weights [B, R, N] -> [B, N] in [0, 1].

    With several write heads the combined write is 1 - Π_h (1 - w^w_h), which reduces to the
    paper's w^w for one head and keeps usage within [0, 1].
    """
    written = 1 - torch.prod(1 - prev_write_weights, dim=1)  # [B, N]
    usage_after_write = prev_usage + written - prev_usage * written
    return usage_after_write * retention(free_gates, prev_read_weights)


def allocation_weighting(usage_vector: torch.Tensor) -> torch.Tensor:
    """Allocation a_t[φ_t[j]] = (1 - u_t[φ_t[j]]) Π_{i<j} u_t[φ_t[i]], φ_t = cells by ascending usage.

    usage_vector [B, N] -> [B, N], non-negative and summing to at most 1.

    The least-used cell gets weight 1 - u; each following cell gets what the cells before it
    leave over, so a fully used memory (u = 1 everywhere) allocates nothing. Gradients flow
    through the sorted values, not through the (discrete) sort order, as in the paper.

    Ties (an empty memory is all ties) go to the lowest-numbered cell first, as with
    deepmind/dnc's top_k: a stable sort, so every device and the native step agree.
    """
    sorted_usage, order = torch.sort(usage_vector, dim=-1, stable=True)
    # Exclusive cumulative product: the first cell in the free list has nothing before it.
    ones = torch.ones_like(sorted_usage[..., :1])
    before = torch.cumprod(torch.cat([ones, sorted_usage[..., :-1]], dim=-1), dim=-1)
    sorted_allocation = (1 - sorted_usage) * before
    return torch.zeros_like(sorted_allocation).scatter(-1, order, sorted_allocation)


def deallocate(memory: torch.Tensor, retention_vector: torch.Tensor) -> torch.Tensor:
    """De-allocation erases the freed cells: M_{t-1} ∘ ψ_t 1^T (Csordás & Schmidhuber, 3.2).

    memory [B, N, W], retention_vector ψ [B, N] in [0, 1] -> [B, N, W].

    The paper's memory update is M_t = M_{t-1} ∘ ψ_t 1^T ∘ (E - w^w_t e_t^T) + w^w_t v_t^T (its Eq. 1),
    i.e. ``erase_and_write(deallocate(M_{t-1}, ψ_t), ...)``. In the plain DNC ψ lowers only the
    usage, so a freed cell keeps its contents and content lookup still finds it (aliasing with
    a newer cell written with a similar key); scaling the row by ψ removes it.
    """
    return memory * retention_vector.unsqueeze(-1)


def write_allocation_weights(usage_vector: torch.Tensor, write_gates: torch.Tensor, num_writes: int) -> torch.Tensor:
    """Allocation weightings for H write heads, allocated one head after another.

    usage_vector [B, N], write_gates g^w [B, H] -> [B, H, N].

    Head h sees the usage the heads before it will cause, u ← u + (1 - u) g^w_h a_h, so two heads
    never both allocate the same free cell (deepmind/dnc's extension; H = 1 is the paper).
    """
    allocations = []
    for head in range(num_writes):
        allocation = allocation_weighting(usage_vector)
        allocations.append(allocation)
        usage_vector = usage_vector + (1 - usage_vector) * write_gates[:, head : head + 1] * allocation
    return torch.stack(allocations, dim=1)


def write_weighting(
    content_weights: torch.Tensor,
    allocation_weights: torch.Tensor,
    allocation_gates: torch.Tensor,
    write_gates: torch.Tensor,
) -> torch.Tensor:
    """Write weighting w^w_t = g^w_t [g^a_t a_t + (1 - g^a_t) c^w_t].

    content_weights c^w [B, H, N], allocation_weights a [B, H, N], allocation_gates g^a [B, H],
    write_gates g^w [B, H] -> [B, H, N], each row summing to at most 1.
    """
    allocation_gates = allocation_gates.unsqueeze(-1)
    mixed = allocation_gates * allocation_weights + (1 - allocation_gates) * content_weights
    return write_gates.unsqueeze(-1) * mixed


def erase_and_write(
    memory: torch.Tensor,
    write_weights: torch.Tensor,
    erase_vectors: torch.Tensor,
    write_vectors: torch.Tensor,
) -> torch.Tensor:
    """M_t = M_{t-1} ∘ (E - w^w_t e_t^T) + w^w_t v_t^T.

    memory [B, N, W], write_weights [B, H, N], erase_vectors e [B, H, W] in [0, 1],
    write_vectors v [B, H, W] -> [B, N, W].

    With several heads the erases multiply, Π_h (1 - w_h e_h^T), and the writes add.
    """
    if write_weights.shape[1] == 1:
        # One head: no product over heads, whose backward would keep a [B, 1, N, W] copy.
        erase = 1 - write_weights.transpose(1, 2) * erase_vectors  # [B, N, 1] * [B, 1, W]
    else:
        erase = torch.prod(1 - write_weights.unsqueeze(-1) * erase_vectors.unsqueeze(2), dim=1)  # [B, N, W]
    add = torch.matmul(write_weights.transpose(1, 2), write_vectors)  # [B, N, W]
    return memory * erase + add


def precedence(prev_precedence: torch.Tensor, write_weights: torch.Tensor) -> torch.Tensor:
    """Precedence p_t = (1 - Σ_i w^w_t[i]) p_{t-1} + w^w_t.

    prev_precedence [B, H, N], write_weights [B, H, N] -> [B, H, N].
    p_t[i] is how much cell i was the last one written to.
    """
    return (1 - write_weights.sum(-1, keepdim=True)) * prev_precedence + write_weights


def link_matrix(prev_link: torch.Tensor, prev_precedence: torch.Tensor, write_weights: torch.Tensor) -> torch.Tensor:
    """Temporal link L_t[i, j] = (1 - w^w_t[i] - w^w_t[j]) L_{t-1}[i, j] + w^w_t[i] p_{t-1}[j], L_t[i, i] = 0.

    prev_link [B, H, N, N], prev_precedence [B, H, N], write_weights [B, H, N] -> [B, H, N, N].
    L_t[i, j] is how much cell i was written right after cell j. Entries stay in [0, 1] and every
    row and column sums to at most 1.
    """
    w_i = write_weights.unsqueeze(-1)  # [B, H, N, 1]
    w_j = write_weights.unsqueeze(-2)  # [B, H, 1, N]
    link = (1 - w_i - w_j) * prev_link + w_i * prev_precedence.unsqueeze(-2)
    # A cell is never linked to itself.
    return link * (1 - torch.eye(link.shape[-1], dtype=link.dtype, device=link.device))


def directional_weightings(link: torch.Tensor, prev_read_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward f^i_t = L_t w^{r,i}_{t-1} and backward b^i_t = L_t^T w^{r,i}_{t-1} weightings.

    link [B, H, N, N], prev_read_weights [B, R, N] -> (forward, backward), each [B, R, H, N]:
    one pair per read head and write head. Forward moves a read head to the cell written after
    the one it read; backward to the cell written before.
    """
    reads = prev_read_weights.unsqueeze(1)  # [B, 1, R, N]
    # (w L^T)[j] = Σ_i L[j, i] w[i] = (L w)[j]: the forward weighting, computed as a batched row-vector product.
    forward = torch.matmul(reads, link.transpose(-1, -2))  # [B, H, R, N]
    backward = torch.matmul(reads, link)  # [B, H, R, N]
    return forward.transpose(1, 2), backward.transpose(1, 2)


def sharpen(weightings: torch.Tensor, sharpness: torch.Tensor) -> torch.Tensor:
    """Link-distribution sharpening S(d, s)_i = d_i^s / Σ_j d_j^s (Csordás & Schmidhuber, 3.3, Eq. 2).

    weightings d [B, R, H, N] (the forward or backward weightings of ``directional_weightings``),
    sharpness s [B, R] (≥ 1 after oneplus; one per read head, used for every write head's
    weighting) -> [B, R, H, N], each row summing to exactly 1.

    Applied to the forward weightings f = L_t w^r_{t-1} and, with its own exponent, to the backward
    weightings b = L_t^T w^r_{t-1}, right before the read modes mix them with content lookup.
    The exponent counters the blur that builds up in L_t when write weightings are not one-hot
    and compounds with every step a head follows the links.

    Stabilised as in the paper: S uses ((d_i + ε) / max_j(d_j + ε))^s. Dividing by the maximum
    cancels in the ratio, so it only keeps the powers in (0, 1]; it is detached, which changes no
    gradient (S does not depend on it) and keeps ties of the maximum out of the backward pass.
    Note the renormalisation: a weighting that is 0 everywhere (no cell written after the one
    read) becomes uniform, 1/N per cell, where the plain DNC's stays 0.
    """
    shifted = weightings + EPSILON
    scaled = shifted / shifted.amax(dim=-1, keepdim=True).detach()  # in (0, 1]
    powered = scaled.pow(sharpness[:, :, None, None])
    return powered / powered.sum(dim=-1, keepdim=True)


def read_weighting(
    content_weights: torch.Tensor,
    forward_weights: torch.Tensor,
    backward_weights: torch.Tensor,
    read_modes: torch.Tensor,
) -> torch.Tensor:
    """Read weighting w^{r,i}_t = π^i_t[1] b^i_t + π^i_t[2] c^{r,i}_t + π^i_t[3] f^i_t.

    content_weights [B, R, N], forward_weights and backward_weights [B, R, H, N],
    read_modes π [B, R, 2H + 1] (a softmax: H backward modes, H forward modes, then content)
    -> [B, R, N], each row summing to at most 1.
    """
    num_writes = forward_weights.shape[2]
    backward_mode = read_modes[..., :num_writes].unsqueeze(-1)  # [B, R, H, 1]
    forward_mode = read_modes[..., num_writes : 2 * num_writes].unsqueeze(-1)
    content_mode = read_modes[..., 2 * num_writes :]  # [B, R, 1]
    return (
        content_mode * content_weights
        + (backward_mode * backward_weights).sum(2)
        + (forward_mode * forward_weights).sum(2)
    )


def read(memory: torch.Tensor, read_weights: torch.Tensor) -> torch.Tensor:
    """Read vectors r^i_t = M_t^T w^{r,i}_t.

    memory [B, N, W], read_weights [B, R, N] -> [B, R, W].
    """
    return torch.matmul(read_weights, memory)
