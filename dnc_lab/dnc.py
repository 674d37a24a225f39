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

import dataclasses
from typing import Any, Optional

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from dnc_lab import backends, sequence
from dnc_lab.controller import make_controller, rnn_step, rnn_weights
from dnc_lab.memory import STATE_KEYS, MemoryAccess, MemoryState, MemoryStep

RNN_TYPES = ("lstm", "gru", "rnn", "ff")
NONLINEARITIES = ("tanh", "relu")


@dataclasses.dataclass(frozen=True)
class CoreConfig:
    """What one direction of a DNC is built from (the DNC keywords that shape the recurrence)."""

    input_size: int  # I
    hidden_size: int  # C, the controller's width
    rnn_type: str  # one of RNN_TYPES
    num_layers: int  # DNC layers, each a controller with (or sharing) a memory
    num_hidden_layers: int  # layers inside each controller
    bias: bool
    dropout: float  # between a controller's hidden layers
    nr_cells: int  # N
    read_heads: int  # R
    cell_size: int  # W
    nonlinearity: str  # of 'rnn' and 'ff' controllers
    independent_linears: bool  # one linear layer per interface field
    share_memory: bool  # one memory for all layers
    clip: float  # controller outputs clipped to [-clip, clip]; 0: no clipping
    num_writes: int  # H, write heads
    # Csordás & Schmidhuber's variants (ICLR 2019); a backend lacking one is passed over (backends.VARIANTS)
    masked_lookup: bool = False  # masked content lookup, masks floored at mask_min
    mask_min: float = 0.0
    deallocation: bool = False  # the retention vector also erases memory
    link_sharpness: bool = False  # sharpened forward and backward weightings

    @property
    def read_size(self) -> int:
        return self.read_heads * self.cell_size


class DNCCore(nn.Module):
    """One direction of a DNC: the controller stack and its memory (or memories), no output layer.

    ``forward`` maps time-major input [T, B, I] to features [T, B, C + R*W] (the top layer's
    controller output and read vectors, from which the output layer reads), the final state,
    and optionally per-step views for debugging. The memory step runs on the reference path
    (``kernels`` None) or on a fast backend's kernels (dnc_lab/backends/), which the DNC chooses.
    """

    def __init__(self, config: CoreConfig):
        super().__init__()
        self.config = config
        self.variants = backends.Variants.of(config)  # what a fast backend's kernels are told at each call
        # torch's RNNs apply dropout between their hidden layers only
        self.dropout = config.dropout if config.num_hidden_layers > 1 else 0.0
        self.controllers = nn.ModuleList(
            make_controller(config.rnn_type, (config.input_size if layer == 0 else config.hidden_size)
                            + config.read_size, config.hidden_size, config.num_hidden_layers, config.bias,
                            config.nonlinearity, config.dropout)
            for layer in range(config.num_layers)
        )
        self.memories = nn.ModuleList(
            MemoryAccess(config.hidden_size, config.nr_cells, config.cell_size, config.read_heads, config.num_writes,
                         config.independent_linears, masked_lookup=config.masked_lookup, mask_min=config.mask_min,
                         deallocation=config.deallocation, link_sharpness=config.link_sharpness)
            for _ in range(1 if config.share_memory else config.num_layers)
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
            memories = [memory] if self.config.share_memory else list(memory)
            for given, empty in zip(memories, fresh):
                _check_state(given, empty)
        if read_vectors is None:
            read_vectors = like.new_zeros(batch_size, self.config.read_size)
        else:
            _check_tensor("read_vectors", read_vectors, (batch_size, self.config.read_size), like)
        return controller_hidden, memories, read_vectors

    def forward(self, x: torch.Tensor, hx: Any, reset_experience: bool, pass_through_memory: bool,
                want_views: bool, checkpoint_steps: int = 0, kernels=None):
        """x [T, B, I] -> features [T, B, C + R*W], (controller_hidden, memory, read_vectors), views or None.

        kernels: a fast backend's module (dnc_lab.backends.Kernels), or None for the reference step.
        checkpoint_steps = k > 0 keeps the recurrent state for the backward pass only every k steps
        and recomputes the rest; the numbers do not change. On the whole-sequence path only the
        link matrices (the B·N² part) need recomputing; elsewhere whole chunks of k steps are
        recomputed: memory drops from O(T·B·N²) to O((T/k + k)·B·N²).
        """
        steps, batch = x.shape[0], x.shape[1]
        controller_hidden, memories, reads = self.initial_state(hx, batch, x, reset_experience)
        if kernels is not None and self._whole_sequence_applies(pass_through_memory, want_views):
            features, controller_hidden, memories, reads = self._whole_sequence(
                kernels, x, list(controller_hidden), list(memories), reads, checkpoint_steps or 1)
            memory_out = memories[0] if self.config.share_memory else memories
            return features, (controller_hidden, memory_out, reads), None
        chunk = checkpoint_steps if checkpoint_steps and torch.is_grad_enabled() and not want_views else steps
        features, views = [], []
        for start in range(0, steps, chunk):
            args = (x[start:start + chunk], controller_hidden, memories, reads, pass_through_memory, want_views, kernels)
            if chunk < steps:
                result = torch.utils.checkpoint.checkpoint(self._steps, *args, use_reentrant=False)
            else:
                result = self._steps(*args)
            chunk_features, controller_hidden, memories, reads, chunk_views = result
            features.append(chunk_features)
            views.extend(chunk_views)
        memory_out = memories[0] if self.config.share_memory else memories
        state = (controller_hidden, memory_out, reads if pass_through_memory else None)
        return torch.cat(features), state, (views if want_views else None)

    def _steps(self, x: torch.Tensor, controller_hidden: list, memories: list, reads: torch.Tensor,
               pass_through_memory: bool, want_views: bool, kernels=None):
        """The recurrence over x [t, B, I], from the given state. Returns features [t, B, C + R*W],
        the state after the last step, and per-step views (empty unless asked for)."""
        controller_hidden, memories = list(controller_hidden), list(memories)
        weights = None if self.config.rnn_type == "ff" else [rnn_weights(c) for c in self.controllers]
        features, views = [], []
        for x_t in x:
            feature, controller_hidden, memories, reads, step = self._time_step(
                x_t, weights, controller_hidden, memories, reads, pass_through_memory, kernels
            )
            features.append(feature)
            if want_views and pass_through_memory:
                views.append(_view_of_first_sample(step.state, step.interface))
        return torch.stack(features), controller_hidden, memories, reads, views

    def _whole_sequence_applies(self, pass_through_memory: bool, want_views: bool) -> bool:
        """Whether ``_whole_sequence`` computes this call: one DNC layer with an LSTM controller, no
        dropout in training, no views. (Otherwise the backend's kernels run step by step.)"""
        return (self.config.rnn_type == "lstm" and len(self.controllers) == 1 and pass_through_memory
                and not want_views and not (self.training and self.dropout))

    def _whole_sequence(self, kernels, x: torch.Tensor, controller_hidden: list, memories: list,
                        reads: torch.Tensor, link_every: int):
        """The recurrence for ``_whole_sequence_applies``, in dnc_lab.sequence (same values): features
        [T, B, C + R*W], then the state after the last step (controller hidden, memories, reads)."""
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
        features, h_t, c_t, reads, state = sequence.run(kernels, x, h0, c0, reads, state, weights, self.config.clip,
                                                        link_every, self.variants)
        return features, [(h_t, c_t)], [MemoryState(zip(STATE_KEYS, state))], reads

    def _time_step(self, x_t: torch.Tensor, weights: Optional[list], controller_hidden: list, memories: list,
                   reads: torch.Tensor, pass_through_memory: bool, kernels=None):
        """One time step through every layer: x_t [B, I] -> feature [B, C + R*W], new state, last memory step.

        weights: per layer, the recurrent controller's (W_ih, W_hh, b_ih, b_hh) per hidden layer
        (``controller.rnn_weights``), or None for feed-forward controllers.
        """
        controller_hidden, memories = list(controller_hidden), list(memories)
        layer_input = torch.cat([x_t, reads], dim=-1)
        step = None
        dropout = self.dropout if self.training else 0.0
        clip = self.config.clip
        for layer in range(len(controller_hidden)):
            if weights is None:
                hidden, controller_hidden[layer] = self.controllers[layer](layer_input)
            else:
                hidden, controller_hidden[layer] = rnn_step(self.config.rnn_type, weights[layer], layer_input,
                                                            controller_hidden[layer], dropout, self.config.nonlinearity)
            if clip:
                # pytorch-dnc's `clip`: bound the controller output that feeds the interface.
                hidden = hidden.clamp(-clip, clip)
            if pass_through_memory:
                slot = 0 if self.config.share_memory else layer
                step = self._memory_step(slot, hidden, memories[slot], kernels)
                memories[slot] = step.state
                reads = step.read_vectors.flatten(1)  # [B, R*W]
            layer_input = torch.cat([hidden, reads], dim=-1)
        return layer_input, controller_hidden, memories, reads, step

    def _memory_step(self, slot: int, hidden: torch.Tensor, state: MemoryState, kernels) -> MemoryStep:
        """Memory ``slot``'s step on the reference path, or on the backend's kernels (no interface returned)."""
        access = self.memories[slot]
        if kernels is None:
            return access(hidden, state)
        reads, new_state = kernels.memory_step(access.raw_interface(hidden), [state[key] for key in STATE_KEYS],
                                               self.variants)
        return MemoryStep(reads, MemoryState(zip(STATE_KEYS, new_state)), None)


def _check_tensor(name: str, given: Any, shape: tuple[int, ...], like: torch.Tensor) -> None:
    """A state tensor passed in must match the input's device and dtype and the model's shape."""
    if not isinstance(given, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(given).__name__}")
    if tuple(given.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(given.shape)}, expected {tuple(shape)}")
    if given.dtype != like.dtype or given.device != like.device:
        raise ValueError(f"{name} is {given.dtype} on {given.device}, but the input is {like.dtype} on {like.device}: "
                         f"pass the state with the input's dtype and device")


def _check_state(given: Any, expected: MemoryState) -> None:
    if not isinstance(given, dict) or set(given) != set(STATE_KEYS):
        keys = sorted(given) if isinstance(given, dict) else type(given).__name__
        raise ValueError(f"memory state must be a dict with keys {list(STATE_KEYS)}, got {keys}")
    for key in STATE_KEYS:
        _check_tensor(f"memory state '{key}'", given[key], tuple(expected[key].shape), expected[key])


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
        backend: str = "auto",
        native: Optional[bool] = None,
        masked_lookup: bool = False,
        mask_min: float = 0.0,
        deallocation: bool = False,
        link_sharpness: bool = False,
    ):
        super().__init__()
        rnn_type = rnn_type.lower() if isinstance(rnn_type, str) else rnn_type
        backend = _backend_from(backend, native)
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
        self.requested_backend = backend
        self._choices: dict[tuple, backends.Choice] = {}  # (device, dtype) -> backend choice, made once each
        self.masked_lookup = masked_lookup
        self.mask_min = mask_min
        self.deallocation = deallocation
        self.link_sharpness = link_sharpness

        self.core_config = CoreConfig(
            input_size=input_size, hidden_size=hidden_size, rnn_type=rnn_type, num_layers=num_layers,
            num_hidden_layers=num_hidden_layers, bias=bias, dropout=dropout, nr_cells=nr_cells, read_heads=read_heads,
            cell_size=cell_size, nonlinearity=nonlinearity, independent_linears=independent_linears,
            share_memory=share_memory, clip=clip, num_writes=num_writes, masked_lookup=masked_lookup,
            mask_min=mask_min, deallocation=deallocation, link_sharpness=link_sharpness)
        directions = 2 if bidirectional else 1
        self.cores = nn.ModuleList(DNCCore(self.core_config) for _ in range(directions))
        self.output = nn.Linear(directions * (hidden_size + read_heads * cell_size), self.output_size)
        # As pytorch-dnc does: measured to learn faster (README, "Measured learning").
        nn.init.orthogonal_(self.output.weight)
        self.to(_resolve_device(gpu_id, device))

    @property
    def backend(self) -> str:
        """The name of the backend the memory step runs on for this model's device and dtype
        ("reference", "native", "triton"; see dnc_lab/backends/)."""
        return self.backend_choice().name

    def backend_choice(self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
                       ) -> backends.Choice:
        """The backend for ``dtype`` tensors on ``device`` (default: the parameters'), and why a faster
        or requested one was passed over. Decided once per device and dtype, in ``backends.choose``."""
        parameter = next(self.parameters())
        key = (device or parameter.device, dtype or parameter.dtype, bool(self.debug))
        if key not in self._choices:
            self._choices[key] = backends.choose(self.requested_backend, self.core_config, *key)
        return self._choices[key]

    def _kernels(self):
        """The kernel module of the backend in use, or None for the reference step."""
        name = self.backend
        return None if name == "reference" else backends.load(name)

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
        parameter = next(self.parameters())
        if input.dtype != parameter.dtype or input.device != parameter.device:
            raise ValueError(f"input is {input.dtype} on {input.device}, but the model's parameters are "
                             f"{parameter.dtype} on {parameter.device}: convert one to the other (e.g. model.to(input))")
        x = input.transpose(0, 1) if self.batch_first else input  # [T, B, I]
        # Views show the parsed interface, which only the reference step returns.
        kernels = None if want_views else self._kernels()
        if self.bidirectional:
            parts = [[None, None] if part is None else part for part in (hx or (None, None, None))]
            hx_directions = list(zip(*parts))
            forward = self.cores[0](x, hx_directions[0], reset_experience, pass_through_memory, want_views,
                                    self.checkpoint_steps, kernels)
            backward = self.cores[1](x.flip(0), hx_directions[1], reset_experience, pass_through_memory, False,
                                     self.checkpoint_steps, kernels)
            features = torch.cat([forward[0], backward[0].flip(0)], dim=-1)
            state = tuple([f, b] for f, b in zip(forward[1], backward[1]))
            views = forward[2]
        else:
            features, state, views = self.cores[0](x, hx, reset_experience, pass_through_memory, want_views,
                                                   self.checkpoint_steps, kernels)
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
    value = args["checkpoint_steps"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"checkpoint_steps={value!r}: expected an integer >= 0 (0: off)")
    for name in backends.VARIANTS:
        if not isinstance(args[name], bool):
            raise ValueError(f"{name}={args[name]!r}: expected True or False")
    mask_min = args["mask_min"]
    if isinstance(mask_min, bool) or not isinstance(mask_min, (int, float)) or not 0 <= mask_min < 1:
        raise ValueError(f"mask_min={mask_min!r}: expected a number in [0, 1) (the floor of the lookup masks)")
    if mask_min and not args["masked_lookup"]:
        raise ValueError(f"mask_min={mask_min!r} has no effect without masked_lookup=True")
    if args["clip"] < 0:
        raise ValueError(f"clip={args['clip']!r}: expected >= 0 (0 disables clipping)")


def _backend_from(backend: Any, native: Optional[bool]) -> str:
    """``native=True`` / ``False`` (the keyword of earlier versions) as ``backend="native"`` / ``"reference"``."""
    if backend not in backends.NAMES:
        raise ValueError(f"backend={backend!r}: expected one of {list(backends.NAMES)}")
    if native is None:
        return backend
    if not isinstance(native, bool):
        raise ValueError(f"native={native!r}: expected True, False or None (prefer backend=...)")
    alias = "native" if native else "reference"
    if backend not in ("auto", alias):
        raise ValueError(f"native={native} means backend={alias!r}, but backend={backend!r} was passed: give one of them")
    return alias
