"""Optimisers and the non-finite guard: a step that a bad loss or gradient leaves without effect.

A step is *non-finite* when its loss or its gradient norm is NaN or infinite. ``guarded_step`` then
changes nothing at all: no parameter, no optimiser state (moments, step counters). It does so in
one of two ways:

- On the CPU reading the flag costs nothing, so a bad step is skipped on the host.
- On a GPU the host must not wait for the device to decide (that would serialise every step), so
  the flag stays on the device. The optimisers built for it (``build_optimizer(...,
  device_guard=True)``) read a 0-dim tensor ``optimizer.found_inf`` (1.0: cancel this step) inside
  their own update, as torch's fused Adam and SGD do for ``torch.amp.GradScaler``; dnc_lab's RMSprop
  below does the same with ``torch.where`` and scalar factors. Nothing is copied: a cancelled
  update is a step that multiplies the state by 1 and adds 0.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from dnc_lab.config import TrainConfig


class RMSprop(torch.optim.Optimizer):
    """RMSProp, as ``torch.optim.RMSprop`` (not centered) or as TensorFlow 1's (``tf_style``).

    torch (tf_style False), mean square ``ms`` starting at 0:
        ms  <- alpha * ms + (1 - alpha) * g^2
        mom <- momentum * mom + g / (sqrt(ms) + eps)
        p   <- p - lr * mom
    TensorFlow 1's RMSPropOptimizer (tf_style True, used by deepmind/dnc): ``ms`` starts at 1, which
    damps the first steps, and eps sits inside the square root:
        ms  <- alpha * ms + (1 - alpha) * g^2
        mom <- momentum * mom + lr * g / sqrt(ms + eps)
        p   <- p - mom
    (g includes ``weight_decay * p``.) State is created at construction so that it can be guarded
    and checkpointed like any tensor.

    When ``self.found_inf`` (a 0-dim float tensor on the parameters' device) is set, the step reads
    it on the device: 1.0 leaves every tensor exactly as it was (decays become 1, the update 0, a
    NaN gradient is replaced by 0 before it can reach the state), 0.0 is a normal step.
    """

    # What torch's fused optimisers declare: step() honours ``found_inf`` (read by guarded_step).
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 momentum: float = 0.0, weight_decay: float = 0.0, tf_style: bool = False):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay,
                                      tf_style=tf_style))
        for group in self.param_groups:
            for p in group["params"]:
                start = torch.ones_like if tf_style else torch.zeros_like
                self.state[p]["ms"] = start(p, memory_format=torch.preserve_format)
                self.state[p]["mom"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf.bool()
        for group in self.param_groups:
            alpha, momentum, lr, eps = group["alpha"], group["momentum"], group["lr"], group["eps"]
            if found_inf is None:
                take, ms_decay, mom_decay = 1.0, alpha, momentum
            else:  # 0-dim tensors: a cancelled step multiplies by 1 and adds 0
                take = 1.0 - found_inf
                ms_decay = alpha * take + found_inf
                mom_decay = momentum * take + found_inf
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if not group["weight_decay"] else p.grad.add(p, alpha=group["weight_decay"])
                if skip is not None:
                    g = torch.where(skip, torch.zeros_like(g), g)
                ms, mom = self.state[p]["ms"], self.state[p]["mom"]
                ms.mul_(ms_decay).addcmul_(g, g, value=1 - alpha)
                if group["tf_style"]:
                    mom.mul_(mom_decay).add_(g / (ms + eps).sqrt(), alpha=lr)
                    p.sub_(mom * take)
                else:
                    mom.mul_(mom_decay).add_(g / (ms.sqrt() + eps))
                    p.sub_(mom * (lr * take))


class TFRMSprop(RMSprop):
    """RMSprop(tf_style=True) with TensorFlow 1's defaults (decay 0.9, eps 1e-10)."""

    def __init__(self, params: Iterable, lr: float = 1e-4, alpha: float = 0.9, eps: float = 1e-10,
                 momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay,
                         tf_style=True)


def build_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig, device: torch.device,
                    device_guard: Optional[bool] = None) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.optimizer``.

    device_guard (default: on CUDA) builds one whose step ``guarded_step`` can cancel on the device:
    torch's fused Adam/SGD (which read ``found_inf``) or dnc_lab's RMSprop. On CUDA its step counters
    also live on the device (``capturable``), so a step can be captured in a CUDA graph. Without it
    (the CPU default) Adam and SGD are torch's default (foreach) implementations.
    """
    on_cuda = device.type == "cuda"
    guard = on_cuda if device_guard is None else device_guard
    fused = {"fused": True} if guard else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps or 1e-8, weight_decay=cfg.weight_decay,
                                capturable=on_cuda, **fused)
    if cfg.optimizer == "rmsprop":
        if cfg.tf_style:
            return TFRMSprop(params, lr=cfg.lr, alpha=cfg.rmsprop_alpha or 0.9, eps=cfg.eps or 1e-10,
                             momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return RMSprop(params, lr=cfg.lr, alpha=cfg.rmsprop_alpha or 0.99, eps=cfg.eps or 1e-8,
                       momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    warnings.warn("train.optimizer = 'sgd': DNCs tend to diverge with plain SGD; adam or rmsprop is safer",
                  stacklevel=2)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)


def guarded_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor, on_device: Optional[bool] = None) -> None:
    """``optimizer.step()`` where ``ok`` (a 0-dim bool tensor) is True; where it is False, nothing changes.

    on_device (default: when ``ok`` is not on the CPU): decide on the device, never reading ``ok``
    on the host. The optimiser must then honour ``found_inf`` (see ``build_optimizer``); the flag is
    written in place into one tensor kept on the optimiser, so a CUDA graph of the step sees it.
    """
    if on_device is None:
        on_device = ok.device.type != "cpu"
    if not on_device:
        if bool(ok):
            optimizer.step()
        return
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise TypeError(f"{type(optimizer).__name__} cannot cancel a non-finite step on the device; build it with "
                        f"build_optimizer(..., device_guard=True) (fused Adam/SGD or dnc_lab.optim.RMSprop)")
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None or found_inf.device != ok.device:
        found_inf = optimizer.found_inf = torch.zeros((), dtype=torch.float32, device=ok.device)
    found_inf.copy_(~ok)
    optimizer.step()
