"""The DNC's controllers, stepped one time step at a time.

The recurrent controllers are torch's own modules (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``), so the
parameters, the ``state_dict`` and the hidden-state format are exactly torch's. But a DNC must
step them one time step at a time (each step's input holds the previous step's reads), and
calling a torch RNN on a one-step sequence costs far more than the step itself; ``torch.compile``
cannot trace into it either. ``rnn_step`` therefore computes one step from the module's weights
(``rnn_weights``) with the same equations (PyTorch's documentation of each module), which
tests/test_controller.py checks against the module itself.

Shapes: B batch, L = ``num_layers`` of the torch module (the DNC's ``num_hidden_layers``), H hidden.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

Hidden = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], None]


class FeedForwardController(nn.Module):
    """``num_layers`` linear layers, each followed by the nonlinearity. Stateless (hidden is None)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, bias: bool, nonlinearity: str,
                 dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(input_size if i == 0 else hidden_size, hidden_size, bias=bias))
            layers.append(nn.Tanh() if nonlinearity == "tanh" else nn.ReLU())
            if dropout and i < num_layers - 1:
                layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, hidden: None = None) -> tuple[torch.Tensor, None]:
        return self.net(x), None


def make_controller(rnn_type: str, input_size: int, hidden_size: int, num_layers: int, bias: bool,
                    nonlinearity: str, dropout: float) -> nn.Module:
    """The module holding a controller's parameters: a feed-forward one is called on one step;
    a recurrent one is stepped with :func:`rnn_step` from :func:`rnn_weights`."""
    if rnn_type == "ff":
        return FeedForwardController(input_size, hidden_size, num_layers, bias, nonlinearity, dropout)
    kwargs = dict(num_layers=num_layers, bias=bias, dropout=dropout if num_layers > 1 else 0.0)
    if rnn_type == "lstm":
        return nn.LSTM(input_size, hidden_size, **kwargs)
    if rnn_type == "gru":
        return nn.GRU(input_size, hidden_size, **kwargs)
    return nn.RNN(input_size, hidden_size, nonlinearity=nonlinearity, **kwargs)


def rnn_weights(rnn: nn.RNNBase) -> list[tuple[torch.Tensor, ...]]:
    """(W_ih, W_hh, b_ih, b_hh) per layer of a torch RNN module (biases None when ``bias=False``).

    Taken outside a compiled region and passed in: Dynamo refuses to touch an RNN module at all.
    """
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return [tuple(getattr(rnn, f"{name}_l{layer}", None) for name in names) for layer in range(rnn.num_layers)]


def rnn_step(kind: str, weights: list[tuple[torch.Tensor, ...]], x: torch.Tensor, hidden: Hidden,
             dropout: float = 0.0, nonlinearity: str = "tanh") -> tuple[torch.Tensor, Hidden]:
    """One time step of a multi-layer LSTM / GRU / RNN (``kind``) from its weights (:func:`rnn_weights`).

    x [B, in]; hidden: (h, c) each [L, B, H] for an LSTM, h [L, B, H] otherwise, or None (zeros).
    Returns the top layer's output [B, H] and the new hidden state in the same format. ``dropout``
    applies between layers, as in the torch modules in training mode (pass 0 in eval mode).
    """
    layers, hidden_size = len(weights), weights[0][1].shape[1]
    if hidden is None:
        zeros = x.new_zeros(layers, x.shape[0], hidden_size)
        hidden = (zeros, zeros) if kind == "lstm" else zeros
    hs, cs = [], []
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
        if kind == "lstm":
            h, c = _lstm_cell(x, hidden[0][layer], hidden[1][layer], w_ih, w_hh, b_ih, b_hh)
            cs.append(c)
        elif kind == "gru":
            h = _gru_cell(x, hidden[layer], w_ih, w_hh, b_ih, b_hh)
        else:
            h = _rnn_cell(x, hidden[layer], w_ih, w_hh, b_ih, b_hh, nonlinearity)
        hs.append(h)
        x = h
        if dropout and layer < layers - 1:
            x = F.dropout(x, dropout, training=True)
    new_hidden = (torch.stack(hs), torch.stack(cs)) if kind == "lstm" else torch.stack(hs)
    return h, new_hidden


def _lstm_cell(x, h, c, w_ih, w_hh, b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor]):
    """i, f, g, o = σ, σ, tanh, σ of (W_ih x + b_ih + W_hh h + b_hh);  c' = f c + i g;  h' = o tanh(c')."""
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(x, h, w_ih, w_hh, b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor]):
    """r, z = σ(W_i x + b_i + W_h h + b_h);  n = tanh(W_in x + b_in + r (W_hn h + b_hn));  h' = (1 - z) n + z h."""
    x_r, x_z, x_n = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def _rnn_cell(x, h, w_ih, w_hh, b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor], nonlinearity: str):
    """h' = tanh or relu of (W_ih x + b_ih + W_hh h + b_hh)."""
    pre = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)
