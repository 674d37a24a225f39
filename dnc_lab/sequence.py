"""A whole sequence of an LSTM-controlled DNC as one autograd Function, backward written by hand.

``run`` computes what ``DNCCore._steps`` computes for one DNC layer with an LSTM controller and
a fast backend's memory step (dnc_lab/backends/: native or triton), and its backward pass is backpropagation through time written out
(``_Sequence.backward``). tests/test_native.py checks values and gradients against the reference
path in float64.

Why: stepping a DNC through autograd records ~40 graph nodes per time step besides the memory,
and on a CPU the fixed cost of each (recording it, then running its backward) is more than the
arithmetic of the small matrix products they hold. Here the forward pass runs without autograd,
and the backward pass does one matrix product per layer and time step plus one memory and one
LSTM kernel call of the backend; the weight gradients of all time steps are summed in one
large matrix product per weight at the end, and the controller's input projection of all time
steps is one product at the start.

Shapes: T time, B batch, I input width, H controller width, L LSTM layers (``num_hidden_layers``),
S interface width, R read heads, W cell width, N cells. Per time step (as in dnc.py)::

    gates_0 = W_ih0 [x_t, r_{t-1}] + b_ih0 + W_hh0 h0_{t-1} + b_hh0          (torch's LSTM)
    gates_l = W_ihl h(l-1)_t + b_ihl + W_hhl hl_{t-1} + b_hhl                  l = 1 .. L-1
    hidden  = clamp(h(L-1)_t, -clip, clip)
    ξ_t     = W_ξ hidden + b_ξ
    r_t, memory_t = memory step(memory_{t-1}, ξ_t)
    feature_t = [hidden, r_t]
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from dnc_lab.backends import Saved


class Weights(NamedTuple):
    """The parameters ``run`` uses, as the modules hold them (no copies)."""

    lstm: list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]  # per layer
    interface_weight: torch.Tensor  # [S, H]
    interface_bias: Optional[torch.Tensor]  # [S]


@torch.compiler.disable  # ctypes calls inside: a compiled caller runs this eagerly
def run(kernels, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, reads: torch.Tensor, memory: list[torch.Tensor],
        weights: Weights, clip: float, link_every: int = 1):
    """x [T, B, I], h0 and c0 [L, B, H], reads [B, R*W], memory: the six state tensors (memory.STATE_KEYS order).

    kernels: the backend module (dnc_lab.backends.Kernels) whose memory and LSTM kernels run the steps.

    Returns features [T, B, H + R*W], h_T and c_T [L, B, H], reads_T [B, R*W], the six memory tensors at T.
    link_every = k keeps the incoming link matrix of every k-th step for backward and recomputes the
    others from it: links take ~(T/k + k)·B·N² floats instead of T·B·N², for one more pass over
    each link matrix. The values do not change. (k = 1 keeps every one; ``DNC(checkpoint_steps=k)``.)
    """
    layers = len(weights.lstm)
    flat = [t for layer in weights.lstm for t in layer]
    args = (x, h0, c0, reads, *memory, *flat, weights.interface_weight, weights.interface_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        out = _Sequence.apply(kernels, layers, float(clip), max(1, int(link_every)), *args)
    else:  # no graph: keep nothing for backward (link_every 0), so memory does not grow with T
        with torch.no_grad():
            out = _Sequence.forward(None, kernels, layers, float(clip), 0, *args)
    features, h_t, c_t, reads_t, *memory_t = out
    return features, h_t, c_t, reads_t, list(memory_t)


def _linear_sum(bias_a: Optional[torch.Tensor], bias_b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if bias_a is None:
        return bias_b
    return bias_a if bias_b is None else bias_a + bias_b


def _incoming_link(kernels, kept_memory: list[Saved], t: int, every: int, segment: list[torch.Tensor]) -> torch.Tensor:
    """L_{t-1} for a step whose incoming link was not kept, from its segment's checkpoint.

    Backward visits a segment's steps last to first; at its last step (the first visited) the
    segment's links L_s .. L_{e-2} are recomputed into ``segment``, which the others then read.
    """
    start = t - t % every
    if t == min(start + every, len(kept_memory)) - 1:  # the first visit to this segment
        link = kept_memory[start].link  # L_{start-1}, the checkpoint
        for u in range(start, t):
            step = kept_memory[u]  # L_u from L_{u-1}, p_{u-1} and w^w_u
            link = kernels.link_forward(link, step.precedence, step.new_write_weights, segment[u - start])
    return segment[t - 1 - start]


class _Sequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, layers, clip, link_every, x, h0, c0, reads, *rest):
        memory = list(rest[:6])
        lstm = [rest[6 + 4 * l: 10 + 4 * l] for l in range(layers)]
        w_xi, b_xi = rest[6 + 4 * layers], rest[7 + 4 * layers]
        steps, batch, inputs = x.shape
        hidden_size = h0.shape[-1]
        read_size = reads.shape[-1]
        heads = memory[3].shape[1]

        # Per layer: the weight applied to [layer input, h_{t-1}] in one product, and the summed biases.
        # Layer 0's input is [x_t, r_{t-1}]; its x part is applied to all time steps at once below.
        w_ih0 = lstm[0][0]
        recurrent = [torch.cat([w_ih0[:, inputs:], lstm[0][1]], 1)]
        recurrent += [torch.cat([w_ih, w_hh], 1) for w_ih, w_hh, _, _ in lstm[1:]]
        biases = [_linear_sum(b_ih, b_hh) for _, _, b_ih, b_hh in lstm]
        from_x = torch.matmul(x, w_ih0[:, :inputs].t())  # [T, B, 4H]
        if biases[0] is not None:
            from_x += biases[0]

        # What backward needs, one buffer per quantity with time as the first axis.
        layer_inputs = [x.new_empty(steps, batch, (read_size if l == 0 else hidden_size) + hidden_size)
                        for l in range(layers)]
        activations = [x.new_empty(steps, batch, 4 * hidden_size) for _ in range(layers)]
        cells = [x.new_empty(steps + 1, batch, hidden_size) for _ in range(layers)]  # c_{-1} .. c_{T-1}
        cell_tanhs = [x.new_empty(steps, batch, hidden_size) for _ in range(layers)]  # tanh(c_t)
        tops = x.new_empty(steps, batch, hidden_size)  # the top layer's h, before the clip
        features = x.new_empty(steps, batch, hidden_size + read_size)
        interfaces = x.new_empty(steps, batch, w_xi.shape[0])
        kept_memory: list[Saved] = []  # per step, what kernels.memory_backward needs
        inference = link_every == 0  # called by run() without a graph: nothing is kept
        # Links that are not kept go to two buffers used in turn (step t reads one, writes the other).
        scratch_links = [torch.empty_like(memory[1]) for _ in range(2)] if link_every != 1 else None

        h = list(h0.unbind(0))
        for l in range(layers):
            cells[l][0] = c0[l]
        for t in range(steps):
            below = None
            for l in range(layers):
                layer_input = layer_inputs[l][t]
                torch.cat([reads if l == 0 else below, h[l]], 1, out=layer_input)
                base = from_x[t] if l == 0 else biases[l]
                if base is None:
                    gates = torch.mm(layer_input, recurrent[l].t())
                else:
                    gates = torch.addmm(base, layer_input, recurrent[l].t())
                h[l] = kernels.lstm_forward(gates, cells[l][t], activations[l][t], cells[l][t + 1], cell_tanhs[l][t])
                below = h[l]
            tops[t] = below
            hidden = features[t, :, :hidden_size]
            torch.clamp(below, -clip, clip, out=hidden) if clip else hidden.copy_(below)
            xi = interfaces[t]
            if b_xi is None:
                torch.mm(hidden, w_xi.t(), out=xi)
            else:
                torch.addmm(b_xi, hidden, w_xi.t(), out=xi)
            # L_t is step t+1's incoming link: kept if t+1 is a checkpoint step, and the final one.
            keep_link = t == steps - 1 or (not inference and (link_every == 1 or (t + 1) % link_every == 0))
            outputs, kept = kernels.memory_forward(xi, memory, None if keep_link else scratch_links[t % 2])
            if not inference:
                if t % link_every:
                    kept = kept._replace(link=None)  # in a scratch buffer: recomputed in backward
                kept_memory.append(kept)
            reads = outputs[0].view(batch, heads * outputs[0].shape[-1])
            features[t, :, hidden_size:] = reads
            memory = outputs[1:]

        h_t = torch.stack(h)
        c_t = torch.stack([cells[l][steps] for l in range(layers)])
        if inference:
            return (features, h_t, c_t, reads, *memory)
        ctx.kernels, ctx.layers, ctx.clip, ctx.steps, ctx.inputs, ctx.link_every = kernels, layers, clip, steps, inputs, link_every
        ctx.has_bias = (lstm[0][2] is not None, lstm[0][3] is not None, b_xi is not None)
        # Each step's memory tensors are released as soon as backward has passed that step, so they
        # are held here rather than by save_for_backward (which keeps everything to the end). The
        # last step's include this Function's outputs, which must go through save_for_backward.
        ctx.kept_memory = kept_memory
        last = kept_memory[-1]
        kept_memory[-1] = None
        ctx.save_for_backward(x, w_ih0, w_xi, tops, features, interfaces, *recurrent, *layer_inputs, *activations,
                              *cells, *cell_tanhs, *last.tensors())
        return (features, h_t, c_t, reads, *memory)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_features, grad_h_t, grad_c_t, grad_reads_t, *grad_memory_t):
        kernels, layers, clip, steps, inputs = ctx.kernels, ctx.layers, ctx.clip, ctx.steps, ctx.inputs
        link_every = ctx.link_every
        saved = ctx.saved_tensors
        x, w_ih0, w_xi, tops, features, interfaces = saved[:6]
        at = 6
        recurrent = saved[at:at + layers]
        layer_inputs = saved[at + layers:at + 2 * layers]
        activations = saved[at + 2 * layers:at + 3 * layers]
        cells = saved[at + 3 * layers:at + 4 * layers]
        cell_tanhs = saved[at + 4 * layers:at + 5 * layers]
        kept_memory = ctx.kept_memory
        kept_memory[-1] = Saved.from_tensors(saved[at + 5 * layers:])
        batch, hidden_size = tops.shape[1], tops.shape[2]
        read_size = features.shape[-1] - hidden_size

        grad_gates = [x.new_empty(steps, batch, 4 * hidden_size) for _ in range(layers)]
        grad_interfaces = torch.empty_like(interfaces)
        grad_h = list(grad_h_t.unbind(0))
        grad_c = list(grad_c_t.unbind(0))
        grad_reads = grad_reads_t  # dLoss/dr_t from later steps (here: from the final state)
        grad_memory = list(grad_memory_t)
        # The memory state's gradients of step t are read only by step t-1, and the kernel may write
        # its results over the gradients it reads: one set of buffers serves every step.
        last = kept_memory[-1]
        cells_n = last.memory.shape[1]
        link_like = last.memory.new_empty(batch, 1, cells_n, cells_n)
        spare = [torch.empty_like(last.memory), torch.empty_like(link_like)] + [torch.empty_like(t) for t in last[3:7]]
        segment = [torch.empty_like(link_like) for _ in range(link_every - 1)]
        for t in reversed(range(steps)):
            kept = kept_memory[t]
            if kept.link is None:
                kept = kept._replace(link=_incoming_link(kernels, kept_memory, t, link_every, segment))
            grad_step_reads = grad_features[t, :, hidden_size:] + grad_reads
            results = [grad_interfaces[t]] + spare
            step_reads_shape = (batch, kept.read_weights.shape[1], kept.memory.shape[-1])  # [B, R, W]
            memory_grads = kernels.memory_backward(kept, [grad_step_reads.view(step_reads_shape),
                                                         *grad_memory], results)
            grad_memory = memory_grads[1:]
            kept = kept_memory[t] = None  # this step's memory tensors are not needed any more
            grad_hidden = torch.addmm(grad_features[t, :, :hidden_size], memory_grads[0], w_xi)
            if clip:
                top = tops[t]
                grad_hidden = grad_hidden * ((top >= -clip) & (top <= clip))  # torch.clamp's gradient
            grad_below = grad_hidden
            for l in reversed(range(layers)):
                grad_h_l = grad_below + grad_h[l]
                g = grad_gates[l][t]
                grad_c[l] = kernels.lstm_backward(activations[l][t], cells[l][t], cell_tanhs[l][t], grad_h_l, grad_c[l], g)
                grad_input = torch.mm(g, recurrent[l])  # [B, in + H]: the layer input's and h_{t-1}'s gradients
                split = read_size if l == 0 else hidden_size
                grad_below = grad_input[:, :split]
                grad_h[l] = grad_input[:, split:]
            grad_reads = grad_below  # layer 0's input was [x_t, r_{t-1}]: the r part goes to step t-1

        # Weight gradients: every time step at once. dW = Σ_t dgates_tᵀ input_t.
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  [T, B, K] -> [T*B, K]
        grads_lstm = []
        has_bias_ih, has_bias_hh, has_bias_xi = ctx.has_bias
        for l in range(layers):
            g = flat(grad_gates[l])
            grad_recurrent = g.t().mm(flat(layer_inputs[l]))  # [4H, in + H]
            split = read_size if l == 0 else hidden_size
            grad_w_ih = grad_recurrent[:, :split]
            if l == 0:
                grad_w_ih = torch.cat([g.t().mm(flat(x)), grad_w_ih], 1)
            grad_w_hh = grad_recurrent[:, split:]
            grad_bias = g.sum(0)
            # Two bias vectors receive the same gradient: give each its own tensor (autograd may keep it as .grad).
            grads_lstm += [grad_w_ih, grad_w_hh, grad_bias if has_bias_ih else None,
                           grad_bias.clone() if has_bias_hh else None]
        gi = flat(grad_interfaces)
        grad_w_xi = gi.t().mm(flat(features[:, :, :hidden_size]))
        grad_b_xi = gi.sum(0) if has_bias_xi else None
        grad_x = torch.matmul(grad_gates[0], w_ih0[:, :inputs]) if ctx.needs_input_grad[4] else None
        return (None, None, None, None, grad_x, torch.stack(grad_h), torch.stack(grad_c), grad_reads, *grad_memory,
                *grads_lstm, grad_w_xi, grad_b_xi)
