"""What every task shares: its config fields, the batch it returns, the length curriculum."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch


def setting(default: Any, help: str, **limits: Any) -> Any:
    """A config dataclass field with a one-line help text and optional limits (min, max, gt, lt)."""
    return field(default=default, metadata={"help": help, **limits})


@dataclass
class TaskConfig:
    """Keys every task has. ``name`` selects the task (a key of ``dnc_lab.tasks.TASKS``)."""

    name: str = setting("", "the task")
    min_length: int = setting(1, "shortest sequence (pattern) length", min=1)
    max_length: int = setting(8, "longest sequence (pattern) length", min=1)
    curriculum: bool = setting(False, "grow the longest length from curriculum_start as the task is learnt")
    curriculum_start: int = setting(2, "longest length at the start of a curriculum", min=1)
    curriculum_step: int = setting(1, "length added each time the curriculum advances", min=1)
    curriculum_threshold: float = setting(0.01, "advance when a summary's BER is at most this", min=0.0, max=1.0)

    def check(self) -> None:
        """Cross-key checks; raise ValueError with a readable message."""
        if self.min_length > self.max_length:
            raise ValueError(f"min_length = {self.min_length} is larger than max_length = {self.max_length}")
        if self.curriculum and not self.min_length <= self.curriculum_start <= self.max_length:
            raise ValueError(f"curriculum_start = {self.curriculum_start} must lie in "
                             f"[min_length, max_length] = [{self.min_length}, {self.max_length}]")


class Batch(NamedTuple):
    """One batch of sequences, padded at the end to a common length T.

    inputs  [batch, T, input_size]   float 0/1 (repeat-copy's count and priority sort's priority
                                     channels carry other values)
    targets [batch, T, output_size]  float 0/1, zero where mask is 0 (one-hot for a categorical task)
    mask    [batch, T]               1.0 at the steps where an answer is expected, else 0.0
    lengths [batch]                  each sequence's length in the task's unit (its ``length_meaning``)
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


class Curriculum:
    """The longest length to sample, grown by ``step`` whenever a summary's BER <= ``threshold``.

    Its state is one int (``state_dict()``), saved in checkpoints so a resumed run continues it.
    Without a curriculum, ``max_length`` is the task's and never changes.
    """

    def __init__(self, cfg: TaskConfig):
        self.enabled = cfg.curriculum
        self.final = cfg.max_length
        self.step = cfg.curriculum_step
        self.threshold = cfg.curriculum_threshold
        self.max_length = cfg.curriculum_start if cfg.curriculum else cfg.max_length

    @property
    def done(self) -> bool:
        return self.max_length >= self.final

    def update(self, ber: float) -> bool:
        """Advance after a summary with bit error rate ``ber``; True if the length grew."""
        if self.enabled and not self.done and ber <= self.threshold:
            self.max_length = min(self.final, self.max_length + self.step)
            return True
        return False

    def state_dict(self) -> dict[str, int]:
        return {"max_length": self.max_length}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.max_length = int(state["max_length"])


def random_lengths(batch_size: int, low: int, high: int, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """[batch] integers uniform in [low, high], drawn on ``device`` (no host round trip)."""
    return torch.randint(low, high + 1, (batch_size,), generator=generator, device=device)


def random_bits(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Fair coin flips as floats 0/1."""
    return torch.randint(0, 2, shape, generator=generator, device=device).float()


def draw_lengths(cfg: TaskConfig, batch_size: int, generator: torch.Generator, device: torch.device,
                 max_length: Optional[int] = None, length: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """(lengths [batch], cap): lengths uniform in [min_length, min(max_length, cfg.max_length)], or
    all equal to ``length`` (evaluation); ``cap`` is the longest a sequence of the batch may be,
    which fixes the padded size T."""
    if length is None:
        cap = min(max_length or cfg.max_length, cfg.max_length)
        return random_lengths(batch_size, cfg.min_length, cap, generator, device), cap
    return torch.full((batch_size,), int(length), device=device), int(length)


def random_permutations(lengths: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, cap]: row b starts with a uniformly random permutation of 0..lengths[b]-1; the
    positions from lengths[b] on hold lengths[b]..cap-1 in order (padding)."""
    scores = torch.rand(lengths.shape[0], cap, generator=generator, device=lengths.device)
    position = torch.arange(cap, device=lengths.device)[None, :]
    scores = torch.where(position < lengths[:, None], scores, 1.0 + position)  # padding sorts last, in order
    return scores.argsort(dim=1)


def to_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Integer codes [...] as float bit vectors [..., width], least significant bit first."""
    return ((codes[..., None] >> torch.arange(width, device=codes.device)) & 1).float()
