"""The controllers stepped one time step at a time equal torch's own modules run over the sequence."""

import pytest
import torch
from torch import nn

from dnc_lab.controller import make_controller, rnn_step, rnn_weights


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("num_layers,bias", [(1, True), (2, False), (3, True)])
def test_stepping_equals_the_torch_module(rnn_type, num_layers, bias):
    torch.manual_seed(0)
    rnn = make_controller(rnn_type, 5, 7, num_layers, bias, "relu", dropout=0.3).double().eval()
    x = torch.randn(6, 4, 5, dtype=torch.float64)  # [T, B, in]
    start = torch.randn(num_layers, 4, 7, dtype=torch.float64)
    hidden = (start, start.flip(0)) if rnn_type == "lstm" else start
    expected, expected_hidden = rnn(x, hidden)
    outputs = []
    for x_t in x:
        output, hidden = rnn_step(rnn_type, rnn_weights(rnn), x_t, hidden, nonlinearity="relu")
        outputs.append(output)
    assert torch.allclose(torch.stack(outputs), expected, atol=1e-12)
    for got, want in zip(torch.utils._pytree.tree_leaves(hidden), torch.utils._pytree.tree_leaves(expected_hidden)):
        assert torch.allclose(got, want, atol=1e-12)


def test_no_hidden_state_means_zeros_and_dropout_applies_between_layers():
    torch.manual_seed(1)
    lstm = make_controller("lstm", 3, 4, 2, True, "tanh", dropout=0.5)
    assert isinstance(lstm, nn.LSTM)
    weights, x = rnn_weights(lstm), torch.randn(2, 3)
    zeros = torch.zeros(2, 2, 4)
    assert torch.equal(rnn_step("lstm", weights, x, None)[0], rnn_step("lstm", weights, x, (zeros, zeros))[0])
    torch.manual_seed(2)
    a = rnn_step("lstm", weights, x, None, dropout=0.5)[0]
    torch.manual_seed(3)
    b = rnn_step("lstm", weights, x, None, dropout=0.5)[0]
    assert not torch.equal(a, b)  # different dropout masks between the two layers


def test_feed_forward_controller_has_no_state():
    ff = make_controller("ff", 3, 4, 2, True, "relu", dropout=0.0)
    output, hidden = ff(torch.randn(2, 3))
    assert output.shape == (2, 4) and hidden is None and (output >= 0).all()
