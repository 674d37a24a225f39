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


class MemoryStep(NamedTuple):
    """What one memory step produces: the read vectors, the new state, and the interface used."""

    read_vectors: torch.Tensor  # [B, R, W]
    state: MemoryState
    interface: Optional[Interface]  # None from a fast backend's step, which does not return it


def interface_sizes(cell_size: int, read_heads: int, num_writes: int) -> dict[str, int]:
    """Width of each raw interface field, in the order of :class:`Interface`."""
    w, r, h = cell_size, read_heads, num_writes
    return {
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


def oneplus(x: torch.Tensor) -> torch.Tensor:
    """oneplus(x) = 1 + log(1 + e^x): a strength in [1, ∞)."""
    return 1 + F.softplus(x)


def parse_interface(raw: dict[str, torch.Tensor], cell_size: int, read_heads: int, num_writes: int) -> Interface:
    """Apply the paper's nonlinearities to the raw fields (each [B, width]) and shape them."""
    batch = raw["read_keys"].shape[0]
    w, r, h = cell_size, read_heads, num_writes
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


def memory_step(prev: MemoryState, interface: Interface) -> tuple[torch.Tensor, MemoryState]:
    """One time step of the DNC memory: write, then read. Pure; returns (read vectors [B, R, W], new state).

    This is the specification every backend (dnc_lab/backends/) is tested against.
    The order is the paper's: usage from the previous step's weightings and this step's free
    gates; allocation and content lookup on the previous memory; erase and write; link matrix and
    precedence; then the read heads address the new memory and the new links, moving from where
    they read at the previous step.
    """
    num_writes = interface.write_gates.shape[1]
    usage_vector = addressing.usage(
        prev["usage_vector"], prev["write_weights"], interface.free_gates, prev["read_weights"]
    )
    write_content = addressing.content_weighting(prev["memory"], interface.write_keys, interface.write_strengths)
    allocation = addressing.write_allocation_weights(
        usage_vector, interface.allocation_gates * interface.write_gates, num_writes
    )
    write_weights = addressing.write_weighting(
        write_content, allocation, interface.allocation_gates, interface.write_gates
    )
    memory = addressing.erase_and_write(
        prev["memory"], write_weights, interface.erase_vectors, interface.write_vectors
    )
    link = addressing.link_matrix(prev["link_matrix"], prev["precedence"], write_weights)
    forward, backward = addressing.directional_weightings(link, prev["read_weights"])
    precedence = addressing.precedence(prev["precedence"], write_weights)

    read_content = addressing.content_weighting(memory, interface.read_keys, interface.read_strengths)
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


class MemoryAccess(nn.Module):
    """Parameters of one DNC memory: the map from controller output to the interface vector.

    ``independent_linears=False`` uses one linear layer for the whole interface vector (the
    paper's W_ξ); ``True`` uses one linear layer per field, as pytorch-dnc's option does. The
    two are the same function class; the option exists so that pytorch-dnc configs keep working.
    """

    def __init__(
        self,
        input_size: int,
        nr_cells: int,
        cell_size: int,
        read_heads: int,
        num_writes: int = 1,
        independent_linears: bool = False,
    ):
        super().__init__()
        self.nr_cells = nr_cells
        self.cell_size = cell_size
        self.read_heads = read_heads
        self.num_writes = num_writes
        self.sizes = interface_sizes(cell_size, read_heads, num_writes)
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
        return parse_interface(raw, self.cell_size, self.read_heads, self.num_writes)

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
        read_vectors, new_state = memory_step(state, interface)
        return MemoryStep(read_vectors, new_state, interface)
