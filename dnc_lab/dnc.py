"""The Differentiable Neural Computer: controller(s), memory, output. pytorch-dnc 1.1.0's API.

Shapes: B batch, T time steps, I input width, O output width, N cells, W cell width,
R read heads, H write heads, C controller width (``hidden_size``).

One time step, for a stack of ``num_layers`` controller layers (the paper has one)::

    layer 0 input  = [x_t, r_{t-1}]                 r_{t-1}: the top layer's reads at t-1, [B, R*W]
    layer l        : h = clip(controller_l(input)); r^l = memory_l(h)   (memory_0 if shared)
    layer l+1 input = [h, r^l]
    output y_t     = W_y [h, r]  of the top layer

Differences from pytorch-dnc 1.1.0, all deliberate (see README):
  * the controller sees the previous step's read vectors (pytorch-dnc feeds it zeros);
  * initial states are zeros, so a call is deterministic (pytorch-dnc redraws them each call);
  * ``bidirectional=True`` runs a second DNC over the reversed sequence (pytorch-dnc ignores it);
  * ``rnn_type='ff'`` gives a feed-forward controller; ``num_writes`` gives several write heads;
  * the link matrix and the ``debug`` views have one row per write head / per time step.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from dnc_lab import native, sequence
from dnc_lab.controller import make_controller, rnn_step, rnn_weights
from dnc_lab.memory import STATE_KEYS, MemoryAccess, MemoryState

RNN_TYPES = ("lstm", "gru", "rnn", "ff")
VARIANT_FLAGS = ("masked_lookup", "deallocation", "link_sharpness")  # Csordás & Schmidhuber (ICLR 2019)
NONLINEARITIES = ("tanh", "relu")
_NATIVE_WARNED: set[str] = set()  # why native=True fell back, said once per process


class DNCCore(nn.Module):
    """One direction of a DNC: the controller stack and its memory (or memories), no output layer.

    ``forward`` maps time-major input [T, B, I] to features [T, B, C + R*W] (the top layer's
    controller output and read vectors, from which the output layer reads), the final state,
    and optionally per-step views for debugging.
    """

    def __init__(self, input_size: int, hidden_size: int, rnn_type: str, num_layers: int, num_hidden_layers: int,
                 bias: bool, dropout: float, nr_cells: int, read_heads: int, cell_size: int, nonlinearity: str,
                 independent_linears: bool, share_memory: bool, clip: float, num_writes: int, fused_link: int,
                 compile_step: bool = False, native: bool = False, variants: Optional[dict[str, Any]] = None):
        super().__init__()
        variants = dict(variants or {})
        self.native = native
        # Csordás & Schmidhuber's variants that are on: the native step implements none of them.
        self.variants_on = [name for name in VARIANT_FLAGS if variants.get(name)]
        self.rnn_type = rnn_type
        self.nonlinearity = nonlinearity
        self.compile_step = compile_step
        self._compiled: dict = {}  # the compiled time step, made on first use (not a parameter or state)
        self.share_memory = share_memory
        self.clip = clip
        # torch's RNNs apply dropout between their hidden layers only
        self.dropout = dropout if num_hidden_layers > 1 else 0.0
        self.read_size = read_heads * cell_size
        self.controllers = nn.ModuleList(
            make_controller(rnn_type, (input_size if layer == 0 else hidden_size) + self.read_size, hidden_size,
                            num_hidden_layers, bias, nonlinearity, dropout)
            for layer in range(num_layers)
        )
        self.memories = nn.ModuleList(
            MemoryAccess(hidden_size, nr_cells, cell_size, read_heads, num_writes, independent_linears, fused_link,
                         native and not self.variants_on, **variants)
            for _ in range(1 if share_memory else num_layers)
        )

    def initial_state(self, hx: Any, batch_size: int, like: torch.Tensor, reset_experience: bool):
        """Fill the parts of ``hx`` that are None with zeros; zero the memory if ``reset_experience``."""
        controller_hidden, memory, read_vectors = (None, None, None) if hx is None else hx
        if controller_hidden is None:
            controller_hidden = [None] * len(self.controllers)  # torch RNNs start from zeros
        else:
            controller_hidden = list(controller_hidden)
        fresh = [m.initial_state(batch_size, like.dtype, like.device) for m in self.memories]
        if memory is None or reset_experience:
            memories = fresh
        else:
            memories = [memory] if self.share_memory else list(memory)
            for given, empty in zip(memories, fresh):
                _check_state(given, empty)
        if read_vectors is None:
            read_vectors = like.new_zeros(batch_size, self.read_size)
        return controller_hidden, memories, read_vectors

    def forward(self, x: torch.Tensor, hx: Any, reset_experience: bool, pass_through_memory: bool,
                want_views: bool, checkpoint_steps: int = 0):
        """x [T, B, I] -> features [T, B, C + R*W], (controller_hidden, memory, read_vectors), views or None.

        checkpoint_steps > 0 keeps only the state at every that many steps for the backward pass and
        recomputes the steps in between: memory drops from O(T·B·N²) to O((T/k + k)·B·N²) for about
        one more forward pass of compute. The numbers do not change.
        """
        steps, batch = x.shape[0], x.shape[1]
        controller_hidden, memories, reads = self.initial_state(hx, batch, x, reset_experience)
        if self._sequence_applies(x, pass_through_memory, want_views):
            # Its backward recomputes only link matrices, from every checkpoint_steps-th one.
            features, controller_hidden, memories, reads = self._native_sequence(
                x, list(controller_hidden), list(memories), reads, checkpoint_steps or 1)
            memory_out = memories[0] if self.share_memory else memories
            return features, (controller_hidden, memory_out, reads), None
        chunk = checkpoint_steps if checkpoint_steps and torch.is_grad_enabled() and not want_views else steps
        features, views = [], []
        for start in range(0, steps, chunk):
            args = (x[start:start + chunk], controller_hidden, memories, reads, pass_through_memory, want_views)
            if chunk < steps:
                result = torch.utils.checkpoint.checkpoint(self._steps, *args, use_reentrant=False)
            else:
                result = self._steps(*args)
            chunk_features, controller_hidden, memories, reads, chunk_views = result
            features.append(chunk_features)
            views.extend(chunk_views)
        memory_out = memories[0] if self.share_memory else memories
        state = (controller_hidden, memory_out, reads if pass_through_memory else None)
        return torch.cat(features), state, (views if want_views else None)

    def _steps(self, x: torch.Tensor, controller_hidden: list, memories: list, reads: torch.Tensor,
               pass_through_memory: bool, want_views: bool):
        """The recurrence over x [t, B, I], from the given state. Returns features [t, B, C + R*W],
        the state after the last step, and per-step views (empty unless asked for)."""
        controller_hidden, memories = list(controller_hidden), list(memories)
        time_step = self._time_step
        if self.compile_step and not want_views:  # views are for one-off summaries: not worth a compilation
            if "step" not in self._compiled:
                # Static shapes: one graph per batch size and dtype, reused at every time step and for
                # any sequence length. Compiling takes tens of seconds on a CPU.
                self._compiled["step"] = torch.compile(self._time_step, dynamic=False)
            time_step = self._compiled["step"]
        # Read once per sequence, and outside the compiled step (Dynamo does not touch RNN modules).
        weights = None if self.rnn_type == "ff" else [rnn_weights(c) for c in self.controllers]
        # The views show the parsed interface, which only the reference memory step returns.
        reference = want_views or not self._native_here(x)
        features, views = [], []
        for x_t in x:
            feature, controller_hidden, memories, reads, step = time_step(
                x_t, weights, controller_hidden, memories, reads, pass_through_memory, reference
            )
            features.append(feature)
            if want_views and pass_through_memory:
                views.append(_view_of_first_sample(step.state, step.interface))
        return torch.stack(features), controller_hidden, memories, reads, views

    def _sequence_applies(self, x: torch.Tensor, pass_through_memory: bool, want_views: bool) -> bool:
        """Whether ``_native_sequence`` computes this call: one DNC layer with an LSTM controller, no
        dropout, not compiled, no views, and the native memory step available."""
        return (self.rnn_type == "lstm" and len(self.controllers) == 1 and pass_through_memory and not want_views
                and not self.compile_step and not (self.training and self.dropout) and self._native_here(x))

    def _native_sequence(self, x: torch.Tensor, controller_hidden: list, memories: list, reads: torch.Tensor,
                         link_every: int):
        """The recurrence for ``_sequence_applies``, in dnc_lab.sequence (same values): features [T, B, C + R*W],
        then the state after the last step (controller hidden, memories, reads)."""
        rnn = self.controllers[0]
        if controller_hidden[0] is None:
            zeros = x.new_zeros(rnn.num_layers, x.shape[1], rnn.hidden_size)
            controller_hidden[0] = (zeros, zeros)
        h0, c0 = controller_hidden[0]
        access = self.memories[0]
        if access.independent_linears:
            fields = list(access.fields.values())
            interface = (torch.cat([f.weight for f in fields]), torch.cat([f.bias for f in fields]))
        else:
            interface = (access.interface.weight, access.interface.bias)
        weights = sequence.Weights(rnn_weights(rnn), *interface)
        state = [memories[0][key] for key in STATE_KEYS]
        features, h_t, c_t, reads, state = sequence.run(x, h0, c0, reads, state, weights, self.clip, link_every)
        return features, [(h_t, c_t)], [MemoryState(zip(STATE_KEYS, state))], reads

    def _native_here(self, x: torch.Tensor) -> bool:
        """Whether the native memory step can run on x's device and dtype; warns once when it cannot."""
        if not self.native:
            return False
        reason = None
        if self.variants_on:
            reason = f"it does not implement the DNC variants ({', '.join(self.variants_on)})"
        elif self.memories[0].num_writes != 1:
            reason = f"it supports one write head, not num_writes={self.memories[0].num_writes}"
        elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            reason = f"it runs on CPU float32/float64 tensors, not {x.device.type} {x.dtype}"
        else:
            ok, why = native.available()
            reason = None if ok else why
        if reason is not None and reason not in _NATIVE_WARNED:
            _NATIVE_WARNED.add(reason)
            warnings.warn(f"native=True: using the reference memory step, because {reason}", stacklevel=4)
        return reason is None

    def _time_step(self, x_t: torch.Tensor, weights: Optional[list], controller_hidden: list, memories: list,
                   reads: torch.Tensor, pass_through_memory: bool, reference: bool = True):
        """One time step through every layer: x_t [B, I] -> feature [B, C + R*W], new state, last memory step.

        weights: per layer, the recurrent controller's (W_ih, W_hh, b_ih, b_hh) per hidden layer
        (``controller.rnn_weights``), or None for feed-forward controllers.
        """
        controller_hidden, memories = list(controller_hidden), list(memories)
        layer_input = torch.cat([x_t, reads], dim=-1)
        step = None
        dropout = self.dropout if self.training else 0.0
        for layer in range(len(controller_hidden)):
            if weights is None:
                hidden, controller_hidden[layer] = self.controllers[layer](layer_input)
            else:
                hidden, controller_hidden[layer] = rnn_step(self.rnn_type, weights[layer], layer_input,
                                                            controller_hidden[layer], dropout, self.nonlinearity)
            if self.clip:
                # pytorch-dnc's `clip`: bound the controller output that feeds the interface.
                hidden = hidden.clamp(-self.clip, self.clip)
            if pass_through_memory:
                slot = 0 if self.share_memory else layer
                step = self.memories[slot](hidden, memories[slot], reference)
                memories[slot] = step.state
                reads = step.read_vectors.flatten(1)  # [B, R*W]
            layer_input = torch.cat([hidden, reads], dim=-1)
        return layer_input, controller_hidden, memories, reads, step


def _check_state(given: Any, expected: MemoryState) -> None:
    if not isinstance(given, dict) or set(given) != set(STATE_KEYS):
        keys = sorted(given) if isinstance(given, dict) else type(given).__name__
        raise ValueError(f"memory state must be a dict with keys {list(STATE_KEYS)}, got {keys}")
    for key in STATE_KEYS:
        if tuple(given[key].shape) != tuple(expected[key].shape):
            raise ValueError(
                f"memory state '{key}' has shape {tuple(given[key].shape)}, expected {tuple(expected[key].shape)}"
            )


def _view_of_first_sample(state: MemoryState, interface) -> dict[str, torch.Tensor]:
    """Batch element 0 of the state and gates after one step, each flattened to one row."""
    view = {key: state[key][0].detach().flatten() for key in STATE_KEYS}
    view.update(
        write_gate=interface.write_gates[0].detach(),
        allocation_gate=interface.allocation_gates[0].detach(),
        free_gates=interface.free_gates[0].detach(),
        read_modes=interface.read_modes[0].detach().flatten(),
    )
    # The variants' quantities, when the model has them.
    for key in ("read_masks", "write_masks", "forward_sharpness", "backward_sharpness"):
        value = getattr(interface, key)
        if value is not None:
            view[key] = value[0].detach().flatten()
    return view


def _stack_views(views: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """A list of per-step rows -> one [T, width] numpy array per key (copied to the host once, at the end)."""
    if not views:
        return {}
    return {key: torch.stack([v[key] for v in views]).float().cpu().numpy() for key in views[0]}


class DNC(nn.Module):
    """A Differentiable Neural Computer with pytorch-dnc 1.1.0's constructor and ``forward``.

    ``from dnc_lab import DNC`` replaces ``from dnc import DNC``; see the README's parameter table.

    Input [B, T, input_size] when ``batch_first`` (else [T, B, input_size]); output of the same
    layout with width ``output_size`` (default ``input_size``, as in pytorch-dnc).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        rnn_type: str = "lstm",
        num_layers: int = 1,
        num_hidden_layers: int = 2,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0,
        bidirectional: bool = False,
        nr_cells: int = 5,
        read_heads: int = 2,
        cell_size: int = 10,
        nonlinearity: str = "tanh",
        gpu_id: int = -1,
        independent_linears: bool = False,
        share_memory: bool = True,
        debug: bool = False,
        clip: float = 20,
        num_writes: int = 1,
        output_size: Optional[int] = None,
        device: Optional[torch.device | str] = None,
        checkpoint_steps: int = 0,
        fused_link: int = 0,
        compile_step: bool = False,
        native: bool = False,
        masked_lookup: bool = False,
        mask_min: float = 0.0,
        deallocation: bool = False,
        link_sharpness: bool = False,
    ):
        super().__init__()
        rnn_type = rnn_type.lower() if isinstance(rnn_type, str) else rnn_type
        _validate(locals())
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.rnn_type = rnn_type
        self.num_layers = num_layers
        self.num_hidden_layers = num_hidden_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = dropout
        self.bidirectional = bidirectional
        self.nr_cells = nr_cells
        self.read_heads = read_heads
        self.cell_size = cell_size
        self.nonlinearity = nonlinearity
        self.gpu_id = gpu_id
        self.independent_linears = independent_linears
        self.share_memory = share_memory
        self.debug = debug
        self.clip = clip
        self.num_writes = num_writes
        self.output_size = output_size or input_size
        self.checkpoint_steps = checkpoint_steps
        self.fused_link = fused_link
        self.compile_step = compile_step
        self.native = native
        self.masked_lookup = masked_lookup
        self.mask_min = mask_min
        self.deallocation = deallocation
        self.link_sharpness = link_sharpness
        variants = dict(masked_lookup=masked_lookup, mask_min=mask_min, deallocation=deallocation,
                        link_sharpness=link_sharpness)

        core_args = (input_size, hidden_size, rnn_type, num_layers, num_hidden_layers, bias, dropout, nr_cells,
                     read_heads, cell_size, nonlinearity, independent_linears, share_memory, clip, num_writes, fused_link)
        directions = 2 if bidirectional else 1
        self.cores = nn.ModuleList(DNCCore(*core_args, compile_step=compile_step, native=native,
                                            variants=variants) for _ in range(directions))
        self.output = nn.Linear(directions * (hidden_size + read_heads * cell_size), self.output_size)
        self.to(_resolve_device(gpu_id, device))

    def forward(self, input: torch.Tensor, hx: Any = None, reset_experience: bool = False,
                pass_through_memory: bool = True):
        """Run the DNC over a sequence.

        input: [B, T, I] (batch_first) or [T, B, I].
        hx: None, or (controller_hidden, memory, read_vectors), any of them None:
            controller_hidden  per layer, what that layer's torch RNN returns (None for 'ff');
            memory             a state dict (see dnc_lab.memory), a list of them per layer when
                               share_memory=False;
            read_vectors       [B, R*W], the top layer's reads of the previous step.
            With bidirectional=True each of the three is a list: [forward direction, backward].
        reset_experience: start from an empty memory even when ``hx`` carries one.
        Returns output [B, T, O] (or [T, B, O]), the new hx, and with ``debug`` a dict of views.
        """
        output, state, views = self._run(input, hx, reset_experience, pass_through_memory, self.debug)
        if self.debug:
            return output, state, views
        return output, state

    def trace(self, input: torch.Tensor, hx: Any = None, reset_experience: bool = False):
        """Like ``forward`` with ``debug=True``: returns (output, hx, views) whatever ``self.debug`` is.

        views: numpy arrays for batch element 0, one row per time step, taken after the top
        layer's memory step (forward direction): memory [T, N*W], link_matrix [T, H*N*N],
        precedence [T, H*N], read_weights [T, R*N], write_weights [T, H*N], usage_vector [T, N],
        write_gate [T, H], allocation_gate [T, H], free_gates [T, R], read_modes [T, R*(2H+1)];
        with ``masked_lookup`` also read_masks [T, R*W] and write_masks [T, H*W], with
        ``link_sharpness`` forward_sharpness [T, R] and backward_sharpness [T, R].
        """
        return self._run(input, hx, reset_experience, True, True)

    def _run(self, input, hx, reset_experience, pass_through_memory, want_views):
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError("PackedSequence input is not supported: pad the batch and mask the loss instead")
        if input.dim() != 3 or input.shape[-1] != self.input_size:
            layout = "[batch, time, input_size]" if self.batch_first else "[time, batch, input_size]"
            raise ValueError(
                f"input has shape {tuple(input.shape)}, expected {layout} with input_size={self.input_size}"
            )
        x = input.transpose(0, 1) if self.batch_first else input  # [T, B, I]
        if self.bidirectional:
            parts = [[None, None] if part is None else part for part in (hx or (None, None, None))]
            hx_directions = list(zip(*parts))
            forward = self.cores[0](x, hx_directions[0], reset_experience, pass_through_memory, want_views,
                                    self.checkpoint_steps)
            backward = self.cores[1](x.flip(0), hx_directions[1], reset_experience, pass_through_memory, False,
                                     self.checkpoint_steps)
            features = torch.cat([forward[0], backward[0].flip(0)], dim=-1)
            state = tuple([f, b] for f, b in zip(forward[1], backward[1]))
            views = forward[2]
        else:
            features, state, views = self.cores[0](x, hx, reset_experience, pass_through_memory, want_views,
                                                   self.checkpoint_steps)
        output = self.output(features)  # [T, B, O]
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, state, (_stack_views(views) if want_views else None)


def _resolve_device(gpu_id: int, device: Optional[torch.device | str]) -> torch.device:
    if device is not None:
        device = torch.device(device)
    elif gpu_id is not None and gpu_id >= 0:
        device = torch.device("cuda", gpu_id)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} was asked for (gpu_id={gpu_id}), but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device} was asked for, but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def _validate(args: dict[str, Any]) -> None:
    """Reject impossible hyper-parameters with a message naming the value and what is allowed."""

    def positive_int(name: str) -> None:
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")

    for name in ("input_size", "hidden_size", "num_layers", "num_hidden_layers", "nr_cells", "read_heads",
                 "cell_size", "num_writes"):
        positive_int(name)
    if args["output_size"] is not None:
        positive_int("output_size")
    if args["rnn_type"] not in RNN_TYPES:
        raise ValueError(f"rnn_type={args['rnn_type']!r}: expected one of {list(RNN_TYPES)}")
    if args["nonlinearity"] not in NONLINEARITIES:
        raise ValueError(f"nonlinearity={args['nonlinearity']!r}: expected one of {list(NONLINEARITIES)}")
    if not 0 <= args["dropout"] < 1:
        raise ValueError(f"dropout={args['dropout']!r}: expected a probability in [0, 1)")
    for name in ("checkpoint_steps", "fused_link"):
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: expected an integer >= 0 (0: off)")
    if args["native"] and args["fused_link"]:
        raise ValueError(f"native=True replaces fused_link={args['fused_link']}: set native=False to use fused_link")
    for name in VARIANT_FLAGS:
        if not isinstance(args[name], bool):
            raise ValueError(f"{name}={args[name]!r}: expected True or False")
    mask_min = args["mask_min"]
    if isinstance(mask_min, bool) or not isinstance(mask_min, (int, float)) or not 0 <= mask_min < 1:
        raise ValueError(f"mask_min={mask_min!r}: expected a number in [0, 1) (the floor of the lookup masks)")
    if mask_min and not args["masked_lookup"]:
        raise ValueError(f"mask_min={mask_min!r} has no effect without masked_lookup=True")
    if args["clip"] < 0:
        raise ValueError(f"clip={args['clip']!r}: expected >= 0 (0 disables clipping)")
