"""Priority sort (Graves, Wayne & Danihelka 2014, "Neural Turing Machines", section 4.5).

L random vectors of ``bits`` bits, each with a scalar priority drawn uniformly from [-1, 1] on its
own channel, then an end marker: the model must write the K vectors of highest priority, highest
first, where K = ceil(keep · L). The NTM paper sorted 20 vectors and kept the top 16 (keep = 0.8).
The natural length (``min_length``..``max_length``, ``dnclab eval --lengths``) is L, the number
of input vectors. Input width bits + 2 (data, priority, end marker), output width bits. Example
with bits=2, L=3, keep=0.67 (K=2), vectors A (priority -0.5), B (0.9), C (0.1):

                 t:    0    1    2  3  4  5
    input      ch0:    A    B    C  .  .  .
               ch1:    A    B    C  .  .  .
    priority   ch2: -0.5  0.9  0.1  .  .  .
    marker     ch3:    .    .    .  1  .  .
    target     ch0:    .    .    .  .  B  C
               ch1:    .    .    .  .  B  C
    mask          :    0    0    0  0  1  1

A batch is padded with zero steps at the end to T = cap + 1 + ceil(keep · cap), cap its longest L.
Priorities are continuous, so ties have probability zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from dnc_lab.tasks.base import Batch, TaskConfig, draw_lengths, random_bits, setting


@dataclass
class PrioritySortConfig(TaskConfig):
    name: Literal["priority_sort"] = setting("priority_sort", "the priority-sort task")
    min_length: int = setting(1, "fewest input vectors", min=1)
    max_length: int = setting(20, "most input vectors", min=1)
    bits: int = setting(8, "bits per vector", min=1)
    keep: float = setting(0.8, "fraction of the input written back: the ceil(keep * L) highest priorities",
                          gt=0.0, max=1.0)


def kept(length: torch.Tensor | int, keep: float) -> torch.Tensor | int:
    """K = ceil(keep * L), the number of vectors in the answer (at least 1 for L >= 1)."""
    if isinstance(length, int):
        return math.ceil(keep * length - 1e-9)
    return torch.ceil(length * keep - 1e-9).long()


class PrioritySortTask:
    """Generates priority-sort batches on ``device`` from a caller's torch.Generator."""

    Config = PrioritySortConfig
    length_meaning = "input vectors"

    def __init__(self, cfg: PrioritySortConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.input_size = cfg.bits + 2
        self.output_size = cfg.bits

    def sample(self, batch_size: int, generator: torch.Generator, max_length: Optional[int] = None,
               length: Optional[int] = None) -> Batch:
        """L uniform in [min_length, max_length] (or all ``length``)."""
        c, dev = self.cfg, self.device
        L, cap = draw_lengths(c, batch_size, generator, dev, max_length, length)  # [B]
        K = kept(L, c.keep)  # [B]
        T = cap + 1 + kept(cap, c.keep)
        data = random_bits((batch_size, cap, c.bits), generator, dev)  # [B, cap, bits]
        priority = torch.rand(batch_size, cap, generator=generator, device=dev) * 2 - 1  # [B, cap]
        t = torch.arange(T, device=dev)[None, :]  # [1, T]
        present = t[:, :cap] < L[:, None]  # [B, cap] real vectors, not padding
        priority = priority * present

        # Highest priority first; padding sorts last.
        order = torch.where(present, priority, torch.full_like(priority, -math.inf)).argsort(dim=1, descending=True)
        answer = (t > L[:, None]) & (t <= (L + K)[:, None])  # [B, T]
        rank = (t - L[:, None] - 1).clamp(0, cap - 1)  # which place of the sorted list step t writes
        source = order.gather(1, rank)  # [B, T] input step written at t
        targets = data.gather(1, source[..., None].expand(-1, -1, c.bits)) * answer[..., None]

        inputs = torch.zeros(batch_size, T, c.bits + 2, device=dev)
        inputs[:, :cap, :c.bits] = data * present[..., None]
        inputs[:, :cap, c.bits] = priority
        inputs[:, :, c.bits + 1] = (t == L[:, None]).float()
        return Batch(inputs, targets, answer.float(), L)
