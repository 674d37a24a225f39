"""The memory access: the interface vector, the state, and one step of write-then-read.

Shape convention: B batch, N cells, W cell width, R read heads, H write heads.

The state is a plain dict of tensors so that code written for pytorch-dnc, which passes this
dict around as ``hx[1]``, keeps working. Its keys and shapes:

    memory         [B, N, W]     M_t
    link_matrix    [B, H, N, N]  L_t, one per write head
    precedence     [B, H, N]     p_t
    read_weights   [B, R, N]     w^r_t
    write_weights  [B, H, N]     w^w_t
    usage_vector   [B, N]        u_t
"""

from __future__ import annotations

from typing import NamedTuple, Optional, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from dnc_lab import addressing


class MemoryState(TypedDict):
    memory: torch.Tensor
    link_matrix: torch.Tensor
    precedence: torch.Tensor
    read_weights: torch.Tensor
    write_weights: torch.Tensor
    usage_vector: torch.Tensor


STATE_KEYS = tuple(MemoryState.__annotations__)


class Interface(NamedTuple):
    """The interface vector ξ_t, split into named fields with the paper's nonlinearities."""

    read_keys: torch.Tensor  # [B, R, W]   k^r, no nonlinearity
    read_strengths: torch.Tensor  # [B, R]   β^r = oneplus(·) ≥ 1
    write_keys: torch.Tensor  # [B, H, W]  k^w
    write_strengths: torch.Tensor  # [B, H]  β^w = oneplus(·)
    erase_vectors: torch.Tensor  # [B, H, W]  e = σ(·)
    write_vectors: torch.Tensor  # [B, H, W]  v
    free_gates: torch.Tensor  # [B, R]   f = σ(·)
    allocation_gates: torch.Tensor  # [B, H]  g^a = σ(·)
    write_gates: torch.Tensor  # [B, H]  g^w = σ(·)
    read_modes: torch.Tensor  # [B, R, 2H+1]  π = softmax(·): H backward, H forward, content
    # Csordás & Schmidhuber's variants (ICLR 2019); None when the model does not use them.
    read_masks: Optional[torch.Tensor] = None  # [B, R, W]  m^r = m_min + (1 - m_min) σ(·)  (masked_lookup)
    write_masks: Optional[torch.Tensor] = None  # [B, H, W]  m^w, likewise
    forward_sharpness: Optional[torch.Tensor] = None  # [B, R]  s^f = oneplus(·) ≥ 1  (link_sharpness)
    backward_sharpness: Optional[torch.Tensor] = None  # [B, R]  s^b = oneplus(·)


class MemoryStep(NamedTuple):
    """What one memory step produces: the read vectors, the new state, and the interface used."""

    read_vectors: torch.Tensor  # [B, R, W]
    state: MemoryState
    interface: Optional[Interface]  # None from a fast backend's step, which does not return it


def interface_sizes(cell_size: int, read_heads: int, num_writes: int, masked_lookup: bool = False,
                    link_sharpness: bool = False) -> dict[str, int]:
    """Width of each raw interface field, in the order of :class:`Interface`.

    The variants' fields come after the paper's, and only when asked for: without them the
    layout (and so every saved model and the native kernels' layout) is the plain DNC's.
    """
    w, r, h = cell_size, read_heads, num_writes
    sizes = {
        "read_keys": r * w,
        "read_strengths": r,
        "write_keys": h * w,
        "write_strengths": h,
        "erase_vectors": h * w,
        "write_vectors": h * w,
        "free_gates": r,
        "allocation_gates": h,
        "write_gates": h,
        "read_modes": r * (2 * h + 1),
    }
    if masked_lookup:
        sizes.update(read_masks=r * w, write_masks=h * w)
    if link_sharpness:
        sizes.update(forward_sharpness=r, backward_sharpness=r)
    return sizes


def oneplus(x: torch.Tensor) -> torch.Tensor:
    """oneplus(x) = 1 + log(1 + e^x): a strength in [1, ∞)."""
    return 1 + F.softplus(x)


def lookup_mask(raw: torch.Tensor, mask_min: float) -> torch.Tensor:
    """m = m_min + (1 - m_min) σ(raw): a content-lookup mask in [m_min, 1].

    The floor keeps every position of key and cell in the similarity a little, so a head cannot
    mask everything away; Csordás & Schmidhuber report that a floor of 0.1 trained faster than 0.
    """
    return mask_min + (1 - mask_min) * torch.sigmoid(raw)


def parse_interface(raw: dict[str, torch.Tensor], cell_size: int, read_heads: int, num_writes: int,
                    mask_min: float = 0.0) -> Interface:
    """Apply the paper's nonlinearities to the raw fields (each [B, width]) and shape them.

    The variants' fields (see ``interface_sizes``) are parsed when ``raw`` has them; mask_min is
    the floor of the lookup masks.
    """
    batch = raw["read_keys"].shape[0]
    w, r, h = cell_size, read_heads, num_writes
    masked = "read_masks" in raw
    sharp = "forward_sharpness" in raw
    return Interface(
        read_keys=raw["read_keys"].view(batch, r, w),
        read_strengths=oneplus(raw["read_strengths"]),
        write_keys=raw["write_keys"].view(batch, h, w),
        write_strengths=oneplus(raw["write_strengths"]),
        erase_vectors=torch.sigmoid(raw["erase_vectors"]).view(batch, h, w),
        write_vectors=raw["write_vectors"].view(batch, h, w),
        free_gates=torch.sigmoid(raw["free_gates"]),
        allocation_gates=torch.sigmoid(raw["allocation_gates"]),
        write_gates=torch.sigmoid(raw["write_gates"]),
        read_modes=torch.softmax(raw["read_modes"].view(batch, r, 2 * h + 1), dim=-1),
        read_masks=lookup_mask(raw["read_masks"], mask_min).view(batch, r, w) if masked else None,
        write_masks=lookup_mask(raw["write_masks"], mask_min).view(batch, h, w) if masked else None,
        forward_sharpness=oneplus(raw["forward_sharpness"]) if sharp else None,
        backward_sharpness=oneplus(raw["backward_sharpness"]) if sharp else None,
    )


def initial_state(
    batch_size: int,
    nr_cells: int,
    cell_size: int,
    read_heads: int,
    num_writes: int = 1,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> MemoryState:
    """An empty memory: every tensor zero (nothing written, nothing read, nothing used)."""
    b, n, w, r, h = batch_size, nr_cells, cell_size, read_heads, num_writes

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    return MemoryState(
        memory=zeros(b, n, w),
        link_matrix=zeros(b, h, n, n),
        precedence=zeros(b, h, n),
        read_weights=zeros(b, r, n),
        write_weights=zeros(b, h, n),
        usage_vector=zeros(b, n),
    )


def memory_step(prev: MemoryState, interface: Interface, deallocation: bool = False) -> tuple[torch.Tensor, MemoryState]:
    """One time step of the DNC memory: write, then read. Pure; returns (read vectors [B, R, W], new state).

    This is the specification every backend (dnc_lab/backends/) is tested against.
    Csordás & Schmidhuber's variants: lookup masks in ``interface`` make both content lookups
    masked; sharpness exponents in ``interface`` sharpen the forward and backward weightings;
    ``deallocation`` erases what the free gates release (memory scaled by the retention vector ψ
    before the write).

    The order is the paper's: usage from the previous step's weightings and this step's free
    gates; allocation and content lookup on the previous memory; erase and write; link matrix and
    precedence; then the read heads address the new memory and the new links, moving from where
    they read at the previous step.
    """
    num_writes = interface.write_gates.shape[1]
    usage_vector = addressing.usage(
        prev["usage_vector"], prev["write_weights"], interface.free_gates, prev["read_weights"]
    )
    write_content = _content_weighting(prev["memory"], interface.write_keys, interface.write_strengths,
                                       interface.write_masks)
    allocation = addressing.write_allocation_weights(
        usage_vector, interface.allocation_gates * interface.write_gates, num_writes
    )
    write_weights = addressing.write_weighting(
        write_content, allocation, interface.allocation_gates, interface.write_gates
    )
    memory = prev["memory"]
    if deallocation:
        # ψ_t again (usage() computes it inside): one [B, N] product, and usage() keeps the paper's signature.
        memory = addressing.deallocate(memory, addressing.retention(interface.free_gates, prev["read_weights"]))
    memory = addressing.erase_and_write(memory, write_weights, interface.erase_vectors, interface.write_vectors)
    link = addressing.link_matrix(prev["link_matrix"], prev["precedence"], write_weights)
    forward, backward = addressing.directional_weightings(link, prev["read_weights"])
    if interface.forward_sharpness is not None:
        forward = addressing.sharpen(forward, interface.forward_sharpness)
        backward = addressing.sharpen(backward, interface.backward_sharpness)
    precedence = addressing.precedence(prev["precedence"], write_weights)

    read_content = _content_weighting(memory, interface.read_keys, interface.read_strengths, interface.read_masks)
    read_weights = addressing.read_weighting(read_content, forward, backward, interface.read_modes)
    read_vectors = addressing.read(memory, read_weights)

    state = MemoryState(
        memory=memory,
        link_matrix=link,
        precedence=precedence,
        read_weights=read_weights,
        write_weights=write_weights,
        usage_vector=usage_vector,
    )
    return read_vectors, state


def _content_weighting(memory: torch.Tensor, keys: torch.Tensor, strengths: torch.Tensor,
                       masks: Optional[torch.Tensor]) -> torch.Tensor:
    """The paper's content lookup, or the masked one when the interface carries masks."""
    if masks is None:
        return addressing.content_weighting(memory, keys, strengths)
    return addressing.masked_content_weighting(memory, keys, strengths, masks)


class MemoryAccess(nn.Module):
    """Parameters of one DNC memory: the map from controller output to the interface vector.

    ``independent_linears=False`` uses one linear layer for the whole interface vector (the
    paper's W_ξ); ``True`` uses one linear layer per field, as pytorch-dnc's option does. The
    two are the same function class; the option exists so that pytorch-dnc configs keep working.

    ``masked_lookup`` (with its floor ``mask_min``), ``deallocation`` and ``link_sharpness`` are
    Csordás & Schmidhuber's variants (see ``memory_step``); a backend whose kernels lack one is
    passed over by ``dnc_lab.backends.choose``.
    """

    def __init__(
        self,
        input_size: int,
        nr_cells: int,
        cell_size: int,
        read_heads: int,
        num_writes: int = 1,
        independent_linears: bool = False,
        masked_lookup: bool = False,
        mask_min: float = 0.0,
        deallocation: bool = False,
        link_sharpness: bool = False,
    ):
        super().__init__()
        self.mask_min = mask_min
        self.deallocation = deallocation
        self.nr_cells = nr_cells
        self.cell_size = cell_size
        self.read_heads = read_heads
        self.num_writes = num_writes
        self.sizes = interface_sizes(cell_size, read_heads, num_writes, masked_lookup, link_sharpness)
        self.independent_linears = independent_linears
        if independent_linears:
            self.fields = nn.ModuleDict({name: nn.Linear(input_size, size) for name, size in self.sizes.items()})
        else:
            self.interface = nn.Linear(input_size, sum(self.sizes.values()))

    def initial_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> MemoryState:
        return initial_state(
            batch_size, self.nr_cells, self.cell_size, self.read_heads, self.num_writes, dtype=dtype, device=device
        )

    def interface_from(self, controller_output: torch.Tensor) -> Interface:
        """controller_output [B, input_size] -> Interface."""
        flat = self.raw_interface(controller_output)
        raw = dict(zip(self.sizes, torch.split(flat, list(self.sizes.values()), dim=-1)))
        return parse_interface(raw, self.cell_size, self.read_heads, self.num_writes, self.mask_min)

    def raw_interface(self, controller_output: torch.Tensor) -> torch.Tensor:
        """controller_output [B, input_size] -> the raw interface vector [B, S], fields in ``sizes`` order."""
        if self.independent_linears:
            return torch.cat([layer(controller_output) for layer in self.fields.values()], dim=-1)
        return self.interface(controller_output)

    def forward(self, controller_output: torch.Tensor, state: MemoryState) -> MemoryStep:
        """controller_output [B, input_size], state -> MemoryStep(read_vectors [B, R, W], new state, interface).

        The reference step. A DNC with a fast backend calls the backend's ``memory_step`` on
        ``raw_interface(controller_output)`` instead (dnc_lab/dnc.py).
        """
        interface = self.interface_from(controller_output)
        read_vectors, new_state = memory_step(state, interface, self.deallocation)
        return MemoryStep(read_vectors, new_state, interface)
