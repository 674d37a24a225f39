"""Associative recall (Graves, Wayne & Danihelka 2014, "Neural Turing Machines", section 4.3).

A list of n items, each ``item_length`` random vectors of ``bits`` bits and each opened by an
item delimiter, then a query item between two query delimiters: the model must answer with the
item that followed the query in the list. The natural length (``min_length``..``max_length``,
and ``dnclab eval --lengths``) is the number of items n (at least 2). The query is one of the
first n-1 items, uniformly. Input width bits + 2 (data, item delimiter, query delimiter), output
width bits. Example with bits=2, item_length=2, n=3 items A B C, query B, answer C (rows are
channels, columns time steps; T = n(k+1) + 2k + 2 = 15 with k = item_length):

                   t: 0 1 2  3 4 5  6 7 8  9 10 11 12 13 14
    input        ch0: . A A  . B B  . C C  .  B  B  .  .  .
                 ch1: . A A  . B B  . C C  .  B  B  .  .  .
    item delim   ch2: 1 . .  1 . .  1 . .  .  .  .  .  .  .
    query delim  ch3: . . .  . . .  . . .  1  .  .  1  .  .
    target       ch0: . . .  . . .  . . .  .  .  .  .  C  C
                 ch1: . . .  . . .  . . .  .  .  .  .  C  C
    mask            : 0 0 0  0 0 0  0 0 0  0  0  0  0  1  1

(A, B, C stand for the item's bits in that step and channel.) A batch with fewer items than the
longest is padded with zero steps at the end. Items are independent random bits, so two items
can be equal (probability about n² / 2^(bits·k+1)); the target is then still the item after the
queried position. The NTM paper used bits=6, item_length=3, 2-6 items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from dnc_lab.tasks.base import Batch, TaskConfig, draw_lengths, random_bits, setting


@dataclass
class AssociativeRecallConfig(TaskConfig):
    name: Literal["associative_recall"] = setting("associative_recall", "the associative-recall task")
    min_length: int = setting(2, "fewest items in the list", min=2)
    max_length: int = setting(6, "most items in the list", min=2)
    curriculum_start: int = setting(2, "most items at the start of a curriculum", min=2)
    bits: int = setting(6, "bits per vector", min=1)
    item_length: int = setting(3, "vectors per item", min=1)


class AssociativeRecallTask:
    """Generates associative-recall batches on ``device`` from a caller's torch.Generator."""

    Config = AssociativeRecallConfig
    length_meaning = "items in the list"

    def __init__(self, cfg: AssociativeRecallConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.input_size = cfg.bits + 2
        self.output_size = cfg.bits

    def sample(self, batch_size: int, generator: torch.Generator, max_length: Optional[int] = None,
               length: Optional[int] = None) -> Batch:
        """Item counts uniform in [min_length, max_length] (or all ``length``, at least 2).
        T = cap * (item_length + 1) + 2 * item_length + 2 for the largest count ``cap``."""
        if length is not None and length < 2:
            raise ValueError(f"associative recall needs at least 2 items, got length = {length}")
        c, dev, k = self.cfg, self.device, self.cfg.item_length
        n, cap = draw_lengths(c, batch_size, generator, dev, max_length, length)  # [B]
        items = random_bits((batch_size, cap, k, c.bits), generator, dev)  # [B, cap, k, bits]
        # The queried item: uniform in [0, n-2], so that an item follows it.
        query = (torch.rand(batch_size, generator=generator, device=dev) * (n - 1)).long()  # [B]
        T = cap * (k + 1) + 2 * k + 2
        t = torch.arange(T, device=dev)[None, :]  # [1, T]
        q_start = (n * (k + 1))[:, None]  # [B, 1] the first query delimiter
        answer_start = q_start + k + 2

        flat = items.reshape(batch_size, cap * k, c.bits)  # [B, cap*k, bits]

        def item_rows(index: torch.Tensor) -> torch.Tensor:
            """[B, T, bits]: flat[b, index[b, t]] (index clamped into range; callers mask)."""
            index = index.clamp(0, cap * k - 1).expand(batch_size, T)
            return flat.gather(1, index[..., None].expand(-1, -1, c.bits))

        in_list = t < q_start  # [B, T]
        slot, position = t // (k + 1), t % (k + 1)  # item number and step within it (0: delimiter)
        list_data = item_rows(slot * k + position - 1) * (in_list & (position > 0))[..., None]
        in_query = (t > q_start) & (t <= q_start + k)
        query_data = item_rows(query[:, None] * k + (t - q_start - 1)) * in_query[..., None]
        in_answer = (t >= answer_start) & (t < answer_start + k)
        answer_data = item_rows((query[:, None] + 1) * k + (t - answer_start)) * in_answer[..., None]

        inputs = torch.zeros(batch_size, T, c.bits + 2, device=dev)
        inputs[:, :, :c.bits] = list_data + query_data
        inputs[:, :, c.bits] = (in_list & (position == 0)).float()
        inputs[:, :, c.bits + 1] = ((t == q_start) | (t == q_start + k + 1)).float()
        return Batch(inputs, answer_data, in_answer.float(), n)
