"""The repeat-copy task with deepmind/dnc's semantics (``dnc/repeat_copy.py``).

A pattern of L random vectors of ``num_bits`` bits is shown between a start flag and a repeat
count R (given as R / norm_max on its own channel); the model must then write the pattern R times
and finally raise an end flag. Input width num_bits + 2, output width num_bits + 1. Example with
num_bits=2, L=2, R=2, norm_max=10 (rows are channels, columns time steps; T=9 here, longer
sequences in the batch would pad it further with zeros):

                 t: 0 1 2  3  4 5 6 7 8
    input      ch0: . 1 0  .  . . . . .
               ch1: . 1 1  .  . . . . .
    start flag ch2: 1 . .  .  . . . . .
    count      ch3: . . . 0.2 . . . . .
    target     ch0: . . .  .  1 0 1 0 .
               ch1: . . .  .  1 1 1 1 .
    end flag   ch2: . . .  .  . . . . 1
    mask          : 0 0 0  0  1 1 1 1 1

The target starts right after the count; the mask covers the L*R answer steps and the end flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from dnc_lab.tasks.base import Batch, TaskConfig, random_bits, random_lengths, setting


@dataclass
class RepeatCopyConfig(TaskConfig):
    name: Literal["repeat_copy"] = setting("repeat_copy", "the repeat-copy task")
    min_length: int = setting(1, "shortest pattern", min=1)
    max_length: int = setting(2, "longest pattern", min=1)
    num_bits: int = setting(4, "bits per pattern vector", min=1)
    min_repeats: int = setting(1, "fewest repeats", min=1)
    max_repeats: int = setting(2, "most repeats", min=1)
    norm_max: float = setting(10.0, "the count channel carries repeats / norm_max", gt=0.0)

    def check(self) -> None:
        super().check()
        if self.min_repeats > self.max_repeats:
            raise ValueError(f"min_repeats = {self.min_repeats} is larger than max_repeats = {self.max_repeats}")


class RepeatCopyTask:
    """Generates repeat-copy batches on ``device`` from a caller's torch.Generator."""

    Config = RepeatCopyConfig
    length_meaning = "vectors in the pattern"

    def __init__(self, cfg: RepeatCopyConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.input_size = cfg.num_bits + 2
        self.output_size = cfg.num_bits + 1

    def sample(self, batch_size: int, generator: torch.Generator, max_length: Optional[int] = None,
               length: Optional[int] = None) -> Batch:
        """Pattern lengths uniform in [min_length, max_length] (or all ``length``), repeats uniform
        in [min_repeats, max_repeats]. T = (longest + 2) + (longest * max_repeats + 1)."""
        c, dev, nb = self.cfg, self.device, self.cfg.num_bits
        if length is None:
            cap = min(max_length or c.max_length, c.max_length)
            lengths = random_lengths(batch_size, c.min_length, cap, generator, dev)  # [B]
        else:
            cap = length
            lengths = torch.full((batch_size,), length, device=dev)
        repeats = random_lengths(batch_size, c.min_repeats, c.max_repeats, generator, dev)  # [B]
        T = (cap + 2) + (cap * c.max_repeats + 1)
        pattern = random_bits((batch_size, cap, nb), generator, dev)  # [B, cap, num_bits]
        t = torch.arange(T, device=dev)[None, :]  # [1, T]
        L, R = lengths[:, None], repeats[:, None]  # [B, 1]
        start = L + 2  # first answer step
        end = start + L * R  # the end-flag step

        inputs = torch.zeros(batch_size, T, nb + 2, device=dev)
        inputs[:, 0, nb] = 1.0  # start flag
        inputs[:, 1:cap + 1, :nb] = pattern * (t[:, :cap] < L)[..., None]
        inputs[:, :, nb + 1] = (t == L + 1).float() * (R.float() / c.norm_max)

        answer = (t >= start) & (t < end)  # [B, T]
        source = torch.remainder(t - start, L).clamp(0, cap - 1)  # pattern step each answer copies
        copied = pattern.gather(1, source[..., None].expand(-1, -1, nb))  # [B, T, num_bits]
        targets = torch.zeros(batch_size, T, nb + 1, device=dev)
        targets[:, :, :nb] = copied * answer[..., None]
        targets[:, :, nb] = (t == end).float()
        mask = ((t >= start) & (t <= end)).float()
        return Batch(inputs, targets, mask, lengths)
