"""A learned input embedding in front of a DNC, for tasks whose inputs are one-hot words (bAbI).

The DNC paper fed bAbI's words to the controller as one-hot vectors; a learned embedding (as
Csordás & Schmidhuber used) is the same as multiplying the one-hot vector by a trained matrix, so it
is a bias-free linear layer here: a word's embedding is its column, and a blank step (an all-zero
input) stays zero. Chosen with ``task.embedding_size`` (see ``dnc_lab.training.build_model``).
"""

from __future__ import annotations

import torch
from torch import nn

from dnc_lab.dnc import DNC


class Embedded(nn.Module):
    """A DNC fed a learned embedding of one-hot inputs: ``embed`` is a bias-free linear layer
    [vocabulary -> embedding_size], i.e. a lookup table (a blank, all-zero step stays zero).
    ``forward``, ``trace`` and the backend report are the DNC's."""

    def __init__(self, vocabulary: int, dnc: DNC):
        super().__init__()
        self.embed = nn.Linear(vocabulary, dnc.input_size, bias=False)
        self.dnc = dnc

    def forward(self, input: torch.Tensor, *args, **kwargs):
        return self.dnc(self.embed(input), *args, **kwargs)

    def trace(self, input: torch.Tensor, *args, **kwargs):
        return self.dnc.trace(self.embed(input), *args, **kwargs)

    def backend_choice(self, *args, **kwargs):
        """The DNC's memory-step backend and why (see ``DNC.backend_choice``)."""
        return self.dnc.backend_choice(*args, **kwargs)
