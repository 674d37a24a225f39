"""Key-value retrieval and its 2-way variant (Csordás & Schmidhuber 2019, "Improving Differentiable
Neural Computers Through Memory Masking, De-allocation, and Link Distribution Sharpness Control",
ICLR 2019).

``bits`` is split into a key half and a value half (each bits/2 wide). The model sees L pairs
(key, value) with distinct keys, a delimiter, then the L keys again in a random order: at each of
those steps it must answer with that key's value. The content lookup of a key needs only part of
each memory row (the key half), which is what the paper's masked content addressing is for.
The natural length (``min_length``..``max_length``, ``dnclab eval --lengths``) is L, the number
of pairs; L cannot exceed 2^(bits/2), the number of distinct keys.

One-way (``two_way: false``): input width bits + 1 (key, value, delimiter), output width bits/2,
T = 2L + 2. Example with bits=4 (keys and values 2 bits), L=2 pairs (k1, v1), (k2, v2), asked in
the order k2, k1:

    t:                    0   1   2   3   4   5
    input  key   ch0-1:   k1  k2  .   k2  k1  .
           value ch2-3:   v1  v2  .   .   .   .
           delim ch4:     .   .   1   .   .   1
    target       ch0-1:   .   .   .   v2  v1  .
    mask:                 0   0   0   1   1   0

Two-way (``two_way: true``): after the key queries and a second delimiter, the L values come in
another random order and the model must answer with their keys. Input width bits + 2 (key, value,
delimiter 1, delimiter 2; the last step raises both), output width bits/2, T = 3L + 3:

    t:                    0   1   2   3   4   5   6   7   8
    input  key    ch0-1:  k1  k2  .   k2  k1  .   .   .   .
           value  ch2-3:  v1  v2  .   .   .   .   v1  v2  .
           delim1 ch4:    .   .   1   .   .   .   .   .   1
           delim2 ch5:    .   .   .   .   .   1   .   .   1
    target        ch0-1:  .   .   .   v2  v1  .   k1  k2  .
    mask:                 0   0   0   1   1   0   1   1   0

Departure from the paper's generator: in the 2-way task values are distinct too (the paper's are
independent random bits), so that "the key of this value" always has one answer; this also caps
L at 2^(bits/2). A batch is padded with zero steps at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from dnc_lab.tasks.base import Batch, TaskConfig, draw_lengths, random_permutations, setting, to_bits


@dataclass
class KeyValueConfig(TaskConfig):
    name: Literal["key_value"] = setting("key_value", "the key-value retrieval task")
    max_length: int = setting(8, "most key-value pairs", min=1)
    bits: int = setting(8, "key bits + value bits (even): keys and values are bits/2 wide", min=2)
    two_way: bool = setting(False, "also ask for the key of each value (the paper's 2-way variant)")

    def check(self) -> None:
        super().check()
        if self.bits % 2:
            raise ValueError(f"bits = {self.bits} must be even: keys and values are bits/2 wide each")
        if self.max_length > 2 ** (self.bits // 2):
            raise ValueError(f"max_length = {self.max_length} pairs need as many distinct keys, but "
                             f"bits/2 = {self.bits // 2} key bits give only {2 ** (self.bits // 2)}")


def distinct_codes(batch_size: int, cap: int, width: int, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """[batch, cap, width] bit vectors, distinct within each sequence (a random draw without
    replacement from the 2^width codes)."""
    scores = torch.rand(batch_size, 2 ** width, generator=generator, device=device)
    return to_bits(scores.argsort(dim=1)[:, :cap], width)


class KeyValueTask:
    """Generates key-value retrieval batches on ``device`` from a caller's torch.Generator."""

    Config = KeyValueConfig
    length_meaning = "key-value pairs"

    def __init__(self, cfg: KeyValueConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.half = cfg.bits // 2
        self.input_size = cfg.bits + (2 if cfg.two_way else 1)
        self.output_size = self.half

    def sample(self, batch_size: int, generator: torch.Generator, max_length: Optional[int] = None,
               length: Optional[int] = None) -> Batch:
        """L uniform in [min_length, max_length] (or all ``length``, at most 2^(bits/2))."""
        c, dev, h = self.cfg, self.device, self.half
        if length is not None and not 1 <= length <= 2 ** h:
            raise ValueError(f"length = {length} pairs: expected 1 to 2^(bits/2) = {2 ** h} (distinct keys)")
        L, cap = draw_lengths(c, batch_size, generator, dev, max_length, length)  # [B]
        keys = distinct_codes(batch_size, cap, h, generator, dev)  # [B, cap, h]
        values = distinct_codes(batch_size, cap, h, generator, dev) if c.two_way \
            else torch.randint(0, 2, (batch_size, cap, h), generator=generator, device=dev).float()
        T = 3 * cap + 3 if c.two_way else 2 * cap + 2
        t = torch.arange(T, device=dev)[None, :]  # [1, T]
        n = L[:, None]  # [B, 1]

        def pick(table: torch.Tensor, order: torch.Tensor, first: torch.Tensor, active: torch.Tensor):
            """[B, T, h]: table[b, order[b, t - first]] where ``active``, else 0."""
            index = order.gather(1, (t - first).clamp(0, cap - 1).expand(batch_size, T))
            return table.gather(1, index[..., None].expand(-1, -1, h)) * active[..., None]

        pairs = t < n  # [B, T]
        in_order = torch.arange(cap, device=dev).expand(batch_size, cap)
        ask_values = (t > n) & (t <= 2 * n)  # key queries: answer with values
        order = random_permutations(L, cap, generator)
        inputs = torch.zeros(batch_size, T, self.input_size, device=dev)
        inputs[:, :, :h] = pick(keys, in_order, 0, pairs) + pick(keys, order, n + 1, ask_values)
        inputs[:, :, h:2 * h] = pick(values, in_order, 0, pairs)
        targets = pick(values, order, n + 1, ask_values)
        mask = ask_values
        if not c.two_way:
            inputs[:, :, c.bits] = ((t == n) | (t == 2 * n + 1)).float()
        else:
            ask_keys = (t > 2 * n + 1) & (t <= 3 * n + 1)  # value queries: answer with keys
            reverse = random_permutations(L, cap, generator)
            inputs[:, :, h:2 * h] += pick(values, reverse, 2 * n + 2, ask_keys)
            targets = targets + pick(keys, reverse, 2 * n + 2, ask_keys)
            inputs[:, :, c.bits] = ((t == n) | (t == 3 * n + 2)).float()
            inputs[:, :, c.bits + 1] = ((t == 2 * n + 1) | (t == 3 * n + 2)).float()
            mask = ask_values | ask_keys
        return Batch(inputs, targets, mask.float(), L)
