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

        ``max_length`` (the curriculum's) caps the task's own. T = 2 * longest + 1.
        """
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
