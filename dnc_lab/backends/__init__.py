"""Memory-step backends: one computation, several kernels, chosen in one place (:func:`choose`).

The reference path, ``dnc_lab/memory.py`` over ``dnc_lab/addressing.py``, is the specification:
plain torch operations through autograd, every option, every device and dtype. It imports no
backend. A fast backend is one module in this package implementing the same small kernel set
(see :class:`Kernels`) for the memory step of the paper's DNC, forward and backward, plus the
LSTM cell's element-wise part; ``dnc_lab/sequence.py`` runs a whole LSTM-controlled sequence on
any of them, and ``dnc_lab/dnc.py`` calls them per step for the other controllers.

==========  ====================================  ==========================================
backend     module                                runs on
==========  ====================================  ==========================================
reference   dnc_lab/memory.py (autograd)          anything
native      backends/native.py + csrc/kernels.cpp CPU, float32/float64 (built with g++)
triton      backends/triton.py                    CUDA, float32/float64 (CPU tensors only
                                                  under TRITON_INTERPRET=1, for tests)
==========  ====================================  ==========================================

``DNC(backend="auto")`` (the default) takes the first backend of ``PREFERENCE[device type]`` that
supports the model's configuration, dtype and device, else the reference, and records why a
faster one was passed over. Adding a backend: write its module (the kernel set plus
``unsupported`` and ``available``), add its name to ``MODULES`` and, if ``auto`` should pick
it, to ``PREFERENCE``. Nothing in the DNC's recurrence changes.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from types import ModuleType
from typing import NamedTuple, Optional, Protocol

import torch

log = logging.getLogger("dnc_lab")

# The name users pass -> the module implementing it. The reference has no module here: it is
# dnc_lab.memory itself.
MODULES = {"native": "dnc_lab.backends.native", "triton": "dnc_lab.backends.triton"}
NAMES = ("auto", "reference", *MODULES)

# What ``auto`` tries, fastest first, per device type. Triton is not tried on a CPU: there it runs
# in Triton's interpreter, which is for tests and is far slower than the reference.
PREFERENCE = {"cpu": ("native",), "cuda": ("triton",)}

# Model options that change the memory step's equations (Csordás & Schmidhuber 2019). A backend
# lists the ones its kernels implement in SUPPORTED_VARIANTS; the others make it pass.
VARIANTS = ("masked_lookup", "deallocation", "link_sharpness")


class Variants(NamedTuple):
    """The variant options a fast backend's kernels receive with every call (``PLAIN``: the paper's DNC).

    The raw interface carries the variants' own fields (masks, sharpness exponents; see
    ``memory.interface_sizes``) when ``masked_lookup`` / ``link_sharpness`` are on; ``deallocation``
    and ``mask_min`` are not in the interface, so the kernels are told them here.
    """

    masked_lookup: bool = False
    mask_min: float = 0.0  # the floor of the lookup masks (masked_lookup only)
    deallocation: bool = False
    link_sharpness: bool = False

    @classmethod
    def of(cls, config) -> "Variants":
        """The variants of a ``dnc.CoreConfig`` (or anything with those attributes)."""
        masked = bool(getattr(config, "masked_lookup", False))
        return cls(masked, float(getattr(config, "mask_min", 0.0)) if masked else 0.0,
                   bool(getattr(config, "deallocation", False)), bool(getattr(config, "link_sharpness", False)))

    def names(self) -> list[str]:
        """The names (from ``VARIANTS``) of the variants switched on."""
        return [name for name in VARIANTS if getattr(self, name)]


PLAIN = Variants()


def check_variants(backend: str, supported: tuple, variants: Variants) -> None:
    """Raise a ValueError naming the variants in ``variants`` that a backend's kernels lack."""
    if not isinstance(variants, Variants):
        raise TypeError(f"{backend} kernels: variants must be a dnc_lab.backends.Variants, got {type(variants).__name__}")
    missing = [name for name in variants.names() if name not in supported]
    if missing:
        raise ValueError(f"{backend} kernels do not implement {', '.join(missing)} (they implement "
                         f"{', '.join(supported) or 'none of the variants'}): use the reference step")


class Choice(NamedTuple):
    """The backend in use and, when another one was asked for or would have been faster, why not."""

    name: str
    reason: str = ""  # empty when the requested (or fastest) backend runs

    def describe(self) -> str:
        return self.name if not self.reason else f"{self.name} ({self.reason})"


class Saved(NamedTuple):
    """What a backend's ``memory_forward`` keeps for ``memory_backward``, by name.

    The step's seven inputs (raw interface [B, S], then the previous state), three of its outputs,
    and whatever else the backend's backward needs (``extra``, private to the backend).
    ``sequence.py`` drops ``link`` (replaced by None) for steps whose incoming link matrix it
    recomputes with ``link_forward`` from ``precedence`` and ``new_write_weights``.
    """

    raw: torch.Tensor  # [B, S]
    memory: torch.Tensor  # [B, N, W]    M_{t-1}
    link: Optional[torch.Tensor]  # [B, 1, N, N] L_{t-1}
    precedence: torch.Tensor  # [B, 1, N]  p_{t-1}
    read_weights: torch.Tensor  # [B, R, N]  w^r_{t-1}
    write_weights: torch.Tensor  # [B, 1, N]  w^w_{t-1}
    usage: torch.Tensor  # [B, N]  u_{t-1}
    new_memory: torch.Tensor  # M_t
    new_read_weights: torch.Tensor  # w^r_t
    new_write_weights: torch.Tensor  # w^w_t
    extra: tuple  # backend-private tensors

    def tensors(self) -> list:
        """Flat list for ``save_for_backward`` (``from_tensors`` undoes it)."""
        return [*self[:10], *self.extra]

    @classmethod
    def from_tensors(cls, tensors) -> "Saved":
        tensors = list(tensors)
        return cls(*tensors[:10], tuple(tensors[10:]))


class Kernels(Protocol):
    """The kernel set of a fast backend (module-level functions; shapes as in dnc_lab.memory).

    Every memory kernel takes ``variants`` (a :class:`Variants`, default ``PLAIN``) and refuses, with
    a ValueError, variants not in its module's ``SUPPORTED_VARIANTS``.

    - ``memory_forward(raw, state, out=None, variants=PLAIN) -> (outputs, Saved)``: raw interface [B, S]
      (fields in ``memory.interface_sizes`` order, before their nonlinearities), state: the six
      tensors of ``memory.STATE_KEYS`` (link [B, 1, N, N]); outputs: reads [B, R, W] and the six
      new state tensors. ``out`` (optional, entries may be None) gives contiguous tensors to write
      the seven outputs and then the extra tensors into, so a caller can keep them in its own
      buffers without a copy. No autograd.
    - ``memory_backward(saved, grads, results=None, variants=PLAIN) -> 7 tensors``: gradients of raw and the six
      state tensors from those of the seven outputs. The six state gradients may be written over
      the very tensors passed in ``grads``.
    - ``link_forward(prev_link, prev_precedence, write_weights, out) -> out``: L_t alone, bit-equal
      to the one ``memory_forward`` computes.
    - ``lstm_forward(gates, c_prev, act, c, tanh_c) -> h`` and ``lstm_backward(act, c_prev, tanh_c,
      grad_h, grad_c, grad_gates) -> grad_c_prev``: the LSTM cell after its matrix products.
    - ``memory_step(raw, state, variants=PLAIN) -> (reads, new_state)``: the step with autograd.
    - ``extra_shapes(batch, cells, width, reads, dtype, variants=PLAIN) -> [(shape, dtype), ...]``: the shapes of
      ``Saved.extra`` for one step (the sequence operator's fake implementation needs them).
    - ``unsupported(config, device, dtype) -> str | None`` and ``available() -> (bool, reason)``.
    - ``NAME`` (its key in ``MODULES``) and ``SUPPORTED_VARIANTS`` (names from ``VARIANTS``).
    """

    NAME: str
    SUPPORTED_VARIANTS: tuple


def load(name: str) -> ModuleType:
    """The module of backend ``name`` (imported on first use: Triton is heavy and optional)."""
    return importlib.import_module(MODULES[name])


_said: set[tuple[str, str, str]] = set()


def choose(requested: str, config, device: torch.device, dtype: torch.dtype, debug: bool = False) -> Choice:
    """The backend a DNC of ``config`` (a ``dnc.CoreConfig``) uses for ``dtype`` tensors on ``device``.

    requested: "auto" (the fastest backend that supports this configuration, else the reference),
    "reference", or a backend's name (used if it can run here, else the reference, with the reason).
    ``debug`` views show the parsed interface, which only the reference step returns.
    The decision and its reason are logged once per process (warned, when a requested backend
    cannot run).
    """
    if requested not in NAMES:
        raise ValueError(f"backend={requested!r}: expected one of {list(NAMES)}")
    if requested == "reference":
        return Choice("reference")
    candidates = PREFERENCE.get(device.type, ()) if requested == "auto" else (requested,)
    reasons = []
    for name in candidates:
        why = _why_not(name, config, device, dtype, debug)
        if why is None:
            return _tell(Choice(name), requested)
        reasons.append(f"{name} passed over: {why}")
    if requested == "auto" and not candidates:
        reasons.append(f"no fast backend for {device.type} tensors")
    return _tell(Choice("reference", "; ".join(reasons)), requested)


def _why_not(name: str, config, device: torch.device, dtype: torch.dtype, debug: bool) -> Optional[str]:
    if debug:
        return "debug=True views show the parsed interface, which only the reference step returns"
    try:
        module = load(name)
    except ImportError as error:
        return f"it cannot be imported ({error})"
    variants = [v for v in Variants.of(config).names() if v not in module.SUPPORTED_VARIANTS]
    if variants:
        return f"its kernels do not implement {', '.join(variants)}"
    why = module.unsupported(config, device, dtype)
    if why is None:
        ok, why = module.available()
        why = None if ok else why
    return why


def _tell(choice: Choice, requested: str) -> Choice:
    key = (requested, *choice)
    if key not in _said:
        _said.add(key)
        if requested not in ("auto", choice.name):
            warnings.warn(f"backend={requested!r}: using the reference memory step, because {choice.reason}",
                          stacklevel=4)
        else:
            log.info("dnc_lab backend: %s", choice.describe())
    return choice
