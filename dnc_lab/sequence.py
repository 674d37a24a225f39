"""A whole sequence of an LSTM-controlled DNC as one registered operator, backward written by hand.

``run`` computes what ``DNCCore._steps`` computes for one DNC layer with an LSTM controller and
a fast backend's memory step (dnc_lab/backends/: native or triton), and its backward pass is
backpropagation through time written out (``_backward``). tests/test_native.py checks values and
gradients against the reference path in float64, and runs ``torch.library.opcheck`` on the
operators.

Why: stepping a DNC through autograd records ~40 graph nodes per time step besides the memory,
and on a CPU the fixed cost of each (recording it, then running its backward) is more than the
arithmetic of the small matrix products they hold. Here the forward pass runs without autograd,
and the backward pass does one matrix product per layer and time step plus one memory and one
LSTM kernel call of the backend; the weight gradients of all time steps are summed in one
large matrix product per weight at the end, and the controller's input projection of all time
steps is one product at the start.

The sequence is two operators, ``dnc_lab::lstm_dnc_sequence`` and its backward, registered with
``torch.library.custom_op``: fake (meta) implementations give their output shapes without running
a kernel, so the sequence can be traced (``torch.compile``, the meta device) like any torch op.
Everything the backward needs is an output of the forward operator, one buffer per quantity with
time as the first axis (:class:`_Saved`), so autograd holds it, and nothing hides in Python state.

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

import math
from typing import NamedTuple, Optional

import torch

from dnc_lab import backends
from dnc_lab.backends import PLAIN, Saved, Variants

PUBLIC = 10  # the forward operator's outputs that run() returns: features, h_T, c_T, reads_T, 6 memory tensors


class Weights(NamedTuple):
    """The parameters ``run`` uses, as the modules hold them (no copies)."""

    lstm: list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]  # per layer
    interface_weight: torch.Tensor  # [S, H]
    interface_bias: Optional[torch.Tensor]  # [S]


def run(kernels, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, reads: torch.Tensor, memory: list[torch.Tensor],
        weights: Weights, clip: float, link_every: int = 1, variants: Variants = PLAIN):
    """x [T, B, I], h0 and c0 [L, B, H], reads [B, R*W], memory: the six state tensors (memory.STATE_KEYS order).

    kernels: the backend module (dnc_lab.backends.Kernels) whose memory and LSTM kernels run the steps;
    variants: the ICLR 2019 variants its memory kernels compute (dnc_lab.backends.Variants).

    Returns features [T, B, H + R*W], h_T and c_T [L, B, H], reads_T [B, R*W], the six memory tensors at T.
    link_every = k keeps the incoming link matrix of every k-th step for backward and recomputes the
    others from it: links take ~(T/k + k)·B·N² floats instead of T·B·N², for one more pass over
    each link matrix. The values do not change. (k = 1 keeps every one; ``DNC(checkpoint_steps=k)``.)
    Without a graph to record (no_grad, or nothing requires grad) nothing is kept for backward, so
    memory does not grow with T.
    """
    lstm = [t for layer in weights.lstm for t in layer]
    args = (x, h0, c0, reads, *memory, *lstm, weights.interface_weight, weights.interface_bias)
    lstm = [x.new_empty(0) if t is None else t for t in lstm]  # the operator takes a missing bias as empty
    check_inputs(x, h0, c0, reads, memory, weights)
    graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    out = _sequence_op(kernels.NAME, x, h0, c0, reads, list(memory), lstm, weights.interface_weight,
                       weights.interface_bias, float(clip), max(1, int(link_every)) if graph else 0, *variants)
    features, h_t, c_t, reads_t, *memory_t = out[:PUBLIC]
    return features, h_t, c_t, reads_t, list(memory_t)


def check_inputs(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, reads: torch.Tensor, memory: list[torch.Tensor],
                 weights: Weights) -> None:
    """One device and one dtype for the input, the state and the parameters, and consistent shapes
    (the memory step's own shapes are checked by its backend), else a ValueError saying which."""
    named = [("x", x), ("h0", h0), ("c0", c0), ("reads", reads), *(("memory state", t) for t in memory),
             ("interface weight", weights.interface_weight)]
    named += [(f"LSTM layer {l} weight", t) for l, layer in enumerate(weights.lstm) for t in layer if t is not None]
    for name, tensor in named:
        if tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(f"{name} is {tensor.dtype} on {tensor.device}, but the input is {x.dtype} on {x.device}: "
                             f"the sequence needs one dtype and device throughout")
    if x.dim() != 3:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [T, B, I]")
    steps, batch, inputs = x.shape
    layers, hidden = len(weights.lstm), h0.shape[-1]
    if steps < 1:
        raise ValueError("x has no time steps")
    for name, state in (("h0", h0), ("c0", c0)):
        if tuple(state.shape) != (layers, batch, hidden):
            raise ValueError(f"{name} has shape {tuple(state.shape)}, expected [{layers}, {batch}, {hidden}]")
    read_size = reads.shape[-1]
    if tuple(reads.shape) != (batch, read_size) or read_size != memory[3].shape[1] * memory[0].shape[-1]:
        raise ValueError(f"reads has shape {tuple(reads.shape)}, expected [{batch}, R*W] = "
                         f"[{batch}, {memory[3].shape[1] * memory[0].shape[-1]}]")
    w_ih0 = weights.lstm[0][0]
    if tuple(w_ih0.shape) != (4 * hidden, inputs + read_size):
        raise ValueError(f"LSTM layer 0 input weight has shape {tuple(w_ih0.shape)}, expected "
                         f"[{4 * hidden}, {inputs + read_size}] (4H, I + R*W)")
    if weights.interface_weight.shape[1] != hidden:
        raise ValueError(f"interface weight has shape {tuple(weights.interface_weight.shape)}, expected [S, {hidden}]")


class _Saved(NamedTuple):
    """The forward operator's outputs after the public ones: what backward needs, time first.

    ``memory``, ``precedence``, ``read_weights``, ``write_weights``, ``usage`` hold the state at
    every step boundary (index t is the state before step t, so T+1 entries); ``links`` the incoming
    link matrix of every ``link_every``-th step (index j: step j·k's); ``extra`` the backend's
    private per-step tensors (Saved.extra), each [T, ...]; per LSTM layer, its input [x-free part,
    h_{t-1}], the gate activations, the cell states c_{-1} .. c_{T-1} and tanh(c_t).
    """

    tops: torch.Tensor  # [T, B, H] the top LSTM layer's h, before the clip
    interfaces: torch.Tensor  # [T, B, S] ξ_t
    memory: torch.Tensor  # [T+1, B, N, W]
    precedence: torch.Tensor  # [T+1, B, 1, N]
    read_weights: torch.Tensor  # [T+1, B, R, N]
    write_weights: torch.Tensor  # [T+1, B, 1, N]
    usage: torch.Tensor  # [T+1, B, N]
    links: list  # ceil(T/k) tensors [B, 1, N, N] (separate: one block of T/k·B·N² floats would be
    # fresh pages from the OS at every training step, while blocks of B·N² are reused by the allocator)
    extra: list  # the backend's, each [T, ...]
    layer_inputs: list  # per layer [T, B, in + H]
    activations: list  # per layer [T, B, 4H]
    cells: list  # per layer [T+1, B, H]
    cell_tanhs: list  # per layer [T, B, H]

    def flat(self) -> list[torch.Tensor]:
        return [*self[:7], *self.links, *self.extra, *self.layer_inputs, *self.activations, *self.cells,
                *self.cell_tanhs]

    @classmethod
    def unflat(cls, tensors: list[torch.Tensor], layers: int, link_every: int) -> "_Saved":
        kept = math.ceil(tensors[0].shape[0] / link_every)
        extras = len(tensors) - 7 - kept - 4 * layers
        rest = tensors[7 + kept + extras:]
        return cls(*tensors[:7], list(tensors[7:7 + kept]), list(tensors[7 + kept:7 + kept + extras]),
                   *(list(rest[i * layers:(i + 1) * layers]) for i in range(4)))

    def step(self, t: int, link_every: int) -> Saved:
        """What ``memory_backward`` needs for step t; link None where it must be recomputed."""
        link = self.links[t // link_every] if t % link_every == 0 else None
        return Saved(self.interfaces[t], self.memory[t], link, self.precedence[t], self.read_weights[t],
                     self.write_weights[t], self.usage[t], self.memory[t + 1], self.read_weights[t + 1],
                     self.write_weights[t + 1], tuple(e[t] for e in self.extra))


def _linear_sum(bias_a: Optional[torch.Tensor], bias_b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if bias_a is None:
        return bias_b
    return bias_a if bias_b is None else bias_a + bias_b


def _layers(lstm: list) -> list[tuple]:
    """The flat (w_ih, w_hh, b_ih, b_hh, w_ih, ...) list -> one tuple per layer (an empty bias: None)."""
    lstm = [None if t.numel() == 0 else t for t in lstm]
    return [tuple(lstm[4 * l:4 * l + 4]) for l in range(len(lstm) // 4)]


def _recurrent(lstm: list, inputs: int) -> list[torch.Tensor]:
    """Per layer: the weight applied to [layer input, h_{t-1}] in one product (layer 0's x part apart)."""
    layers = _layers(lstm)
    recurrent = [torch.cat([layers[0][0][:, inputs:], layers[0][1]], 1)]
    return recurrent + [torch.cat([w_ih, w_hh], 1) for w_ih, w_hh, _, _ in layers[1:]]


# ---- Forward ---------------------------------------------------------------------------------------


@torch.library.custom_op("dnc_lab::lstm_dnc_sequence", mutates_args=())
def _sequence_op(backend: str, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, reads: torch.Tensor,
                 memory: list[torch.Tensor], lstm: list[torch.Tensor], w_xi: torch.Tensor,
                 b_xi: Optional[torch.Tensor], clip: float, link_every: int, masked_lookup: bool, mask_min: float,
                 deallocation: bool, link_sharpness: bool) -> list[torch.Tensor]:
    """[features, h_T, c_T, reads_T, six memory tensors at T] + (link_every > 0) _Saved.flat().
    The last four arguments are the fields of the Variants the memory kernels compute."""
    variants = Variants(masked_lookup, mask_min, deallocation, link_sharpness)
    return _forward(backends.load(backend), x, h0, c0, reads, memory, lstm, w_xi, b_xi, clip, link_every, variants)


def _forward(kernels, x, h0, c0, reads, memory, lstm, w_xi, b_xi, clip, link_every, variants):
    layers = _layers(lstm)
    steps, batch, inputs = x.shape
    hidden_size = h0.shape[-1]
    read_size = reads.shape[-1]
    heads, cells = memory[3].shape[1], memory[0].shape[1]
    keep = link_every > 0  # else: inference, nothing kept for backward

    recurrent = _recurrent(lstm, inputs)
    biases = [_linear_sum(b_ih, b_hh) for _, _, b_ih, b_hh in layers]
    from_x = torch.matmul(x, layers[0][0][:, :inputs].t())  # [T, B, 4H]: layer 0's x part, all steps at once
    if biases[0] is not None:
        from_x += biases[0]

    new = x.new_empty
    n_layers = len(layers)
    layer_inputs = [new(steps, batch, (read_size if l == 0 else hidden_size) + hidden_size) for l in range(n_layers)]
    activations = [new(steps, batch, 4 * hidden_size) for _ in range(n_layers)]
    cell_states = [new(steps + 1, batch, hidden_size) for _ in range(n_layers)]  # c_{-1} .. c_{T-1}
    cell_tanhs = [new(steps, batch, hidden_size) for _ in range(n_layers)]
    tops = new(steps, batch, hidden_size)
    features = new(steps, batch, hidden_size + read_size)
    interfaces = new(steps, batch, w_xi.shape[0])
    final_link = torch.empty_like(memory[1])
    if keep:
        # The state at every step boundary; links only every link_every-th (the rest go to two
        # scratch buffers used in turn: step t reads one and writes the other).
        boundary = [new(steps + 1, *memory[i].shape) for i in (0, 2, 3, 4, 5)]
        for buffer, initial in zip(boundary, (memory[0], *memory[2:])):
            buffer[0] = initial
        links = [memory[1].clone()] + [torch.empty_like(memory[1]) for _ in range(1, math.ceil(steps / link_every))]
        b, n, w = memory[0].shape
        extra = [new(steps, *shape, dtype=dtype)
                 for shape, dtype in kernels.extra_shapes(b, n, w, heads, x.dtype, variants)]
    scratch = [torch.empty_like(memory[1]) for _ in range(2)] if not keep or link_every > 1 else None

    h = list(h0.unbind(0))
    for l in range(n_layers):
        cell_states[l][0] = c0[l]
    state = [memory[0], links[0] if keep else memory[1], *memory[2:]]
    for t in range(steps):
        below = None
        for l in range(n_layers):
            layer_input = layer_inputs[l][t]
            torch.cat([reads if l == 0 else below, h[l]], 1, out=layer_input)
            base = from_x[t] if l == 0 else biases[l]
            gates = torch.mm(layer_input, recurrent[l].t()) if base is None else \
                torch.addmm(base, layer_input, recurrent[l].t())
            h[l] = kernels.lstm_forward(gates, cell_states[l][t], activations[l][t], cell_states[l][t + 1],
                                        cell_tanhs[l][t], trusted=t > 0)
            below = h[l]
        tops[t] = below
        hidden = features[t, :, :hidden_size]
        torch.clamp(below, -clip, clip, out=hidden) if clip else hidden.copy_(below)
        xi = interfaces[t]
        torch.mm(hidden, w_xi.t(), out=xi) if b_xi is None else torch.addmm(b_xi, hidden, w_xi.t(), out=xi)
        # Where L_t goes: the final output, a kept slot (step t+1 is a checkpoint step), or scratch.
        if t == steps - 1:
            link_out = final_link
        elif keep and (t + 1) % link_every == 0:
            link_out = links[(t + 1) // link_every]
        else:
            link_out = scratch[t % 2]
        # The kernels write the new state straight into the time-major buffers backward reads.
        out = [None, boundary[0][t + 1], link_out, *(buffer[t + 1] for buffer in boundary[1:]),
               *(e[t] for e in extra)] if keep else [None, None, link_out]
        # The first step is checked at the kernels' boundary; later ones read and write only the
        # buffers made here from it (the checks would cost as much as the kernel at small sizes).
        outputs, _ = kernels.memory_forward(xi, state, out, trusted=t > 0, variants=variants)
        reads = outputs[0].view(batch, heads * outputs[0].shape[-1])
        features[t, :, hidden_size:] = reads
        state = outputs[1:]

    h_t = torch.stack(h)
    c_t = torch.stack([cell_states[l][steps] for l in range(n_layers)])
    # Outputs may not alias one another: the final state is its own copy, not a view of the buffers.
    final = [state[0].clone(), final_link, *(s.clone() for s in state[2:])] if keep else [state[0], final_link, *state[2:]]
    public = [features, h_t, c_t, reads, *final]
    if not keep:
        return public
    return public + _Saved(tops, interfaces, *boundary[:1], *boundary[1:], links, extra, layer_inputs, activations,
                           cell_states, cell_tanhs).flat()


@_sequence_op.register_fake
def _sequence_fake(backend, x, h0, c0, reads, memory, lstm, w_xi, b_xi, clip, link_every, *variants):
    steps, batch, _ = x.shape
    hidden_size, read_size = h0.shape[-1], reads.shape[-1]
    public = [x.new_empty(steps, batch, hidden_size + read_size), torch.empty_like(h0), torch.empty_like(c0),
              torch.empty_like(reads), *(torch.empty_like(m) for m in memory)]
    if link_every == 0:
        return public
    kernels = backends.load(backend)
    b, n, w = memory[0].shape
    r = memory[3].shape[1]
    new = x.new_empty
    layers = _layers(lstm)
    extra = [new(steps, *shape, dtype=dtype) for shape, dtype in kernels.extra_shapes(b, n, w, r, x.dtype,
                                                                                     Variants(*variants))]
    saved = _Saved(
        new(steps, batch, hidden_size), new(steps, batch, w_xi.shape[0]),
        *(new(steps + 1, *memory[i].shape) for i in (0, 2, 3, 4, 5)),
        [torch.empty_like(memory[1]) for _ in range(math.ceil(steps / link_every))], extra,
        [new(steps, batch, (read_size if l == 0 else hidden_size) + hidden_size) for l in range(len(layers))],
        [new(steps, batch, 4 * hidden_size) for _ in layers],
        [new(steps + 1, batch, hidden_size) for _ in layers],
        [new(steps, batch, hidden_size) for _ in layers])
    return public + saved.flat()


# ---- Backward --------------------------------------------------------------------------------------


@torch.library.custom_op("dnc_lab::lstm_dnc_sequence_backward", mutates_args=())
def _sequence_backward_op(backend: str, x: torch.Tensor, lstm: list[torch.Tensor], w_xi: torch.Tensor,
                          features: torch.Tensor, saved: list[torch.Tensor], grads: list[torch.Tensor],
                          clip: float, link_every: int, masked_lookup: bool, mask_min: float, deallocation: bool,
                          link_sharpness: bool) -> list[torch.Tensor]:
    """Gradients of [x, h0, c0, reads, six memory tensors, each LSTM weight and bias, w_xi, b_xi]
    from those of the ten public outputs. A missing bias's gradient is an empty tensor."""
    variants = Variants(masked_lookup, mask_min, deallocation, link_sharpness)
    return _backward(backends.load(backend), x, lstm, w_xi, features, saved, grads, clip, link_every, variants)


def _backward(kernels, x, lstm, w_xi, features, saved, grads, clip, link_every, variants):
    layers = _layers(lstm)
    n_layers = len(layers)
    s = _Saved.unflat(list(saved), n_layers, link_every)
    grad_features, grad_h_t, grad_c_t, grad_reads_t, *grad_memory_t = grads
    steps, batch, inputs = x.shape
    hidden_size = s.tops.shape[2]
    read_size = features.shape[-1] - hidden_size
    recurrent = _recurrent(lstm, inputs)

    grad_gates = [x.new_empty(steps, batch, 4 * hidden_size) for _ in range(n_layers)]
    grad_interfaces = torch.empty_like(s.interfaces)
    grad_h = list(grad_h_t.unbind(0))
    grad_c = list(grad_c_t.unbind(0))
    grad_reads = grad_reads_t  # dLoss/dr_t from later steps (here: from the final state)
    # The memory state's gradients of step t are read only by step t-1, and the kernel may write
    # its results over the gradients it reads: one set of buffers serves every step.
    grad_memory = list(grad_memory_t)  # only read: the results go to `spare`
    spare = [torch.empty_like(g) for g in grad_memory]
    segment = [torch.empty_like(s.links[0]) for _ in range(link_every - 1)]
    heads, width = s.read_weights.shape[2], s.memory.shape[-1]
    # Where the clip let the controller output through, for every step at once (not 4 ops a step).
    passed = ((s.tops >= -clip) & (s.tops <= clip)).to(s.tops.dtype) if clip else None
    for t in reversed(range(steps)):
        kept = s.step(t, link_every)
        if kept.link is None:
            kept = kept._replace(link=_incoming_link(kernels, s, t, link_every, segment))
        grad_step_reads = (grad_features[t, :, hidden_size:] + grad_reads).view(batch, heads, width)
        memory_grads = kernels.memory_backward(kept, [grad_step_reads, *grad_memory], [grad_interfaces[t]] + spare,
                                               trusted=t < steps - 1,  # the first visited: autograd's grads
                                               variants=variants)
        grad_memory = memory_grads[1:]  # the `spare` tensors, read (and written) by step t-1
        grad_hidden = torch.addmm(grad_features[t, :, :hidden_size], memory_grads[0], w_xi)
        if clip:
            grad_hidden.mul_(passed[t])  # torch.clamp's gradient
        grad_below = grad_hidden
        for l in reversed(range(n_layers)):
            grad_h_l = grad_below + grad_h[l]
            g = grad_gates[l][t]
            grad_c[l] = kernels.lstm_backward(s.activations[l][t], s.cells[l][t], s.cell_tanhs[l][t], grad_h_l,
                                              grad_c[l], g, trusted=t < steps - 1)
            grad_input = torch.mm(g, recurrent[l])  # [B, in + H]: the layer input's and h_{t-1}'s gradients
            split = read_size if l == 0 else hidden_size
            grad_below = grad_input[:, :split]
            grad_h[l] = grad_input[:, split:]
        grad_reads = grad_below  # layer 0's input was [x_t, r_{t-1}]: the r part goes to step t-1

    # Weight gradients: every time step at once. dW = Σ_t dgates_tᵀ input_t.
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  [T, B, K] -> [T*B, K]
    grads_lstm = []
    for l, (_, _, b_ih, b_hh) in enumerate(layers):
        g = flat(grad_gates[l])
        grad_recurrent = g.t().mm(flat(s.layer_inputs[l]))  # [4H, in + H]
        split = read_size if l == 0 else hidden_size
        grad_w_ih = grad_recurrent[:, :split]
        if l == 0:
            grad_w_ih = torch.cat([g.t().mm(flat(x)), grad_w_ih], 1)
        grad_bias = g.sum(0)
        # Outputs of an operator may not share storage: each gradient is its own tensor.
        grads_lstm += [grad_w_ih.contiguous(), grad_recurrent[:, split:].contiguous(),
                       grad_bias if b_ih is not None else x.new_empty(0),
                       grad_bias.clone() if b_hh is not None else x.new_empty(0)]
    gi = flat(grad_interfaces)
    grad_w_xi = gi.t().mm(flat(features[:, :, :hidden_size]))
    grad_b_xi = gi.sum(0)
    grad_x = torch.matmul(grad_gates[0], layers[0][0][:, :inputs])
    return [grad_x, torch.stack(grad_h), torch.stack(grad_c), grad_reads.contiguous(), *grad_memory, *grads_lstm,
            grad_w_xi, grad_b_xi]


@_sequence_backward_op.register_fake
def _sequence_backward_fake(backend, x, lstm, w_xi, features, saved, grads, clip, link_every, *variants):
    grad_features, grad_h_t, grad_c_t, grad_reads_t, *grad_memory_t = grads
    return [torch.empty_like(x), torch.empty_like(grad_h_t), torch.empty_like(grad_c_t), torch.empty_like(grad_reads_t),
            *(torch.empty_like(g) for g in grad_memory_t),
            *(torch.empty_like(t) for t in lstm), torch.empty_like(w_xi),
            w_xi.new_empty(w_xi.shape[0])]


def _incoming_link(kernels, s: _Saved, t: int, every: int, segment: list[torch.Tensor]) -> torch.Tensor:
    """L_{t-1} for a step whose incoming link was not kept, from its segment's checkpoint.

    Backward visits a segment's steps last to first; at its last step (the first visited) the
    segment's links L_s .. L_{e-2} are recomputed into ``segment``, which the others then read.
    """
    start = t - t % every
    steps = s.interfaces.shape[0]
    if t == min(start + every, steps) - 1:  # the first visit to this segment
        link = s.links[start // every]  # L_{start-1}, the checkpoint
        for u in range(start, t):  # L_u from L_{u-1}, p_{u-1} and w^w_u
            link = kernels.link_forward(link, s.precedence[u], s.write_weights[u + 1], segment[u - start], trusted=True)
    return segment[t - 1 - start]


# ---- Autograd: the backward operator is the forward's gradient ---------------------------------------


def _setup_context(ctx, inputs, output):
    backend, x, h0, c0, reads, memory, lstm, w_xi, b_xi, clip, link_every, *variants = inputs
    ctx.backend, ctx.clip, ctx.link_every, ctx.lstm_len = backend, clip, link_every, len(lstm)
    ctx.variants = variants
    ctx.present = [t.numel() > 0 for t in lstm] + [b_xi is not None]  # biases may be missing
    ctx.mark_non_differentiable(*output[PUBLIC:])
    # Else autograd hands backward a zero gradient for every saved buffer: a second copy of them all.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w_xi, *lstm, *output[:PUBLIC], *output[PUBLIC:])


def _gradient(ctx, grads):
    saved = list(ctx.saved_tensors)
    x, w_xi = saved[:2]
    n = ctx.lstm_len
    lstm = saved[2:2 + n]
    public = saved[2 + n:2 + n + PUBLIC]
    rest = saved[2 + n + PUBLIC:]
    # An output that did not reach the loss has no gradient: zeros of its shape.
    grads = [g if g is not None else torch.zeros_like(o) for g, o in zip(list(grads)[:PUBLIC], public)]
    out = _sequence_backward_op(ctx.backend, x, lstm, w_xi, public[0], rest, grads, ctx.clip, ctx.link_every,
                                *ctx.variants)
    grad_x, grad_h0, grad_c0, grad_reads, *rest_grads = out
    grad_memory, grad_lstm = rest_grads[:6], rest_grads[6:6 + ctx.lstm_len]
    grad_w_xi, grad_b_xi = rest_grads[6 + ctx.lstm_len:]
    grad_lstm = [g if present else None for g, present in zip(grad_lstm, ctx.present[:-1])]
    return (None, grad_x, grad_h0, grad_c0, grad_reads, grad_memory, grad_lstm, grad_w_xi,
            grad_b_xi if ctx.present[-1] else None, None, None, None, None, None, None)


_sequence_op.register_autograd(_gradient, setup_context=_setup_context)
