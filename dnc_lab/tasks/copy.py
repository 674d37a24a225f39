"""The copy task, in the seed project's (pytorch-dnc's) layout.

Input width is ``bits``: channels 0..bits-2 carry data, the last channel is the end marker. A
sequence of length L is L random bit vectors, the marker, then L blank steps during which the
model must write the L vectors back, in order. Example with bits=4, L=3 (padded to T=9 because
another sequence in the batch has length 4; rows are channels, columns time steps):

              t: 0 1 2 3 4 5 6 7 8
    input   ch0: 1 0 1 . . . . . .
            ch1: 0 0 1 . . . . . .
            ch2: 1 1 0 . . . . . .
     marker ch3: . . . 1 . . . . .
    target  ch0: . . . . 1 0 1 . .
            ch1: . . . . 0 0 1 . .
            ch2: . . . . 1 1 0 . .
            ch3: . . . . . . . . .      (the marker channel's target is always 0)
    mask       : 0 0 0 0 1 1 1 0 0

Output width equals input width (as in the seed project); the loss and the bit error rate count
every output channel at the masked steps.

A series (``max_sequences`` > 1): K copy problems, K uniform in [min_sequences, max_sequences],
each with its own length, shown one after another, each answered before the next begins; the
sequence ends after the last answer (padding to T at the end). This is Csordás & Schmidhuber's
"repeated copy" (ICLR 2019, their concatenated copy problems) and the Nature paper's test of memory
allocation (Extended Data Fig. 1): once the series is longer than the memory, cells must be freed
after their answer and reused. Example, bits=3, K=2, lengths 2 and 1:

              t: 0 1 2 3 4 5 6 7
    input   ch0: 1 0 . . . 1 . .
            ch1: 1 1 . . . 0 . .
     marker ch2: . . 1 . . . 1 .
    target  ch0: . . . 1 0 . . 1
            ch1: . . . 1 1 . . 0
    mask       : 0 0 0 1 1 0 0 1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from dnc_lab.tasks.base import Batch, TaskConfig, random_bits, random_lengths, setting


@dataclass
class CopyConfig(TaskConfig):
    name: Literal["copy"] = setting("copy", "the copy task")
    bits: int = setting(8, "input width: bits-1 data channels plus the end marker", min=2)
    min_sequences: int = setting(1, "fewest copy problems shown one after another (a series)", min=1)
    max_sequences: int = setting(1, "most copy problems in a series (1: the plain copy task)", min=1)

    def check(self) -> None:
        super().check()
        if self.min_sequences > self.max_sequences:
            raise ValueError(f"min_sequences = {self.min_sequences} is larger than max_sequences = {self.max_sequences}")


class CopyTask:
    """Generates copy batches on ``device`` from a caller's torch.Generator."""

    Config = CopyConfig
    length_meaning = "vectors to copy"

    def __init__(self, cfg: CopyConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.input_size = cfg.bits
        self.output_size = cfg.bits

    def sample(self, batch_size: int, generator: torch.Generator, max_length: Optional[int] = None,
               length: Optional[int] = None) -> Batch:
        """A batch with lengths uniform in [min_length, max_length], or all equal to ``length``.

        ``max_length`` (the curriculum's) caps the task's own. T = 2 * longest + 1 (a series: the
        longest series' Σ (2 L_k + 1)).
        """
        if self.cfg.max_sequences > 1:
            return self._series(batch_size, generator, max_length, length)
        dev, data_bits = self.device, self.cfg.bits - 1
        if length is None:
            cap = min(max_length or self.cfg.max_length, self.cfg.max_length)
            lengths = random_lengths(batch_size, self.cfg.min_length, cap, generator, dev)  # [B]
        else:
            cap = length
            lengths = torch.full((batch_size,), length, device=dev)
        T = 2 * cap + 1
        data = random_bits((batch_size, cap, data_bits), generator, dev)  # [B, cap, bits-1]
        t = torch.arange(T, device=dev)[None, :]  # [1, T]
        L = lengths[:, None]  # [B, 1]

        inputs = torch.zeros(batch_size, T, self.cfg.bits, device=dev)
        inputs[:, :cap, :data_bits] = data * (t[:, :cap] < L)[..., None]
        inputs[:, :, data_bits] = (t == L).float()

        mask = ((t > L) & (t <= 2 * L)).float()  # [B, T]
        source = (t - L - 1).clamp(0, cap - 1)  # which input step each output step copies
        copied = data.gather(1, source[..., None].expand(-1, -1, data_bits))  # [B, T, bits-1]
        targets = torch.zeros(batch_size, T, self.cfg.bits, device=dev)
        targets[:, :, :data_bits] = copied * mask[..., None]
        return Batch(inputs, targets, mask, lengths)

    def _series(self, batch_size: int, generator: torch.Generator, max_length: Optional[int],
                length: Optional[int]) -> Batch:
        """K copy problems one after another (see the module docstring); ``lengths`` is each series'
        longest problem. ``length`` fixes every problem's length (the count K stays random)."""
        dev, data_bits, most = self.device, self.cfg.bits - 1, self.cfg.max_sequences
        counts = random_lengths(batch_size, self.cfg.min_sequences, most, generator, dev)  # K per series [B]
        if length is None:
            cap = min(max_length or self.cfg.max_length, self.cfg.max_length)
            lengths = torch.randint(self.cfg.min_length, cap + 1, (batch_size, most), generator=generator, device=dev)
        else:
            cap = length
            lengths = torch.full((batch_size, most), length, device=dev)
        lengths = lengths * (torch.arange(most, device=dev)[None, :] < counts[:, None])  # absent problems: 0
        data = random_bits((batch_size, most, cap, data_bits), generator, dev)  # [B, K, cap, bits-1]
        spans = torch.where(lengths > 0, 2 * lengths + 1, 0)  # [B, K] steps each problem takes
        ends = spans.cumsum(1)
        starts = ends - spans
        T = int(ends[:, -1].max())
        t = torch.arange(T, device=dev)[None, :]  # [1, T]
        # The problem each step belongs to: how many problems end at or before it (clamped for padding).
        k = (ends[:, None, :] <= t[..., None]).sum(-1).clamp(max=most - 1)  # [B, T]
        local = t - starts.gather(1, k)  # the step's position within its problem
        L = lengths.gather(1, k)  # [B, T] its problem's length
        inside = t < ends[:, -1:]  # not padding

        def vectors(position: torch.Tensor) -> torch.Tensor:  # data[b, k, position] -> [B, T, bits-1]
            flat = data.view(batch_size, most * cap, data_bits)
            index = (k * cap + position.clamp(0, cap - 1))[..., None].expand(-1, -1, data_bits)
            return flat.gather(1, index)

        shown = (local < L) & inside
        mask = ((local > L) & (local <= 2 * L) & inside).float()
        inputs = torch.zeros(batch_size, T, self.cfg.bits, device=dev)
        inputs[:, :, :data_bits] = vectors(local) * shown[..., None]
        inputs[:, :, data_bits] = ((local == L) & inside).float()
        targets = torch.zeros(batch_size, T, self.cfg.bits, device=dev)
        targets[:, :, :data_bits] = vectors(local - L - 1) * mask[..., None]
        return Batch(inputs, targets, mask, lengths.max(1).values)
