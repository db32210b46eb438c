"""Per-channel abs-max statistics, gathered by one hook per smoothing group.

The hook keeps one fp32 vector (never activations), reduces with ``amax``/``amin`` in the input's own dtype
(exact for a max), and runs under ``no_grad`` so calibration inside a training loop costs no graph.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tico.experimental.quantization.algorithm.smoothquant.groups import ObservationPoint


def channel_absmax_of(flat: torch.Tensor) -> torch.Tensor:
    """``max_i |flat[i, j]|`` per column ``j``, fp32: ``amax`` and ``amin`` over rows (exact for a max, no ``|x|``
    temporary; on CPU 5-10x faster than ``torch.aminmax(dim=0)``, which dominated calibration-time observation)."""
    return torch.maximum(flat.amax(dim=0), flat.amin(dim=0).neg()).float()


_RECENT: dict[tuple[int, int], tuple[weakref.ref, int, torch.Tensor]] = {}
_RECENT_SIZE = 8


def tensor_channel_absmax(x: torch.Tensor, channels: int) -> torch.Tensor:
    """:func:`channel_absmax_of` ``x`` viewed as ``[-1, channels]``, computed once per tensor object and version:
    a smoothing group's observer and the quantizer's observer of the same tensor (a norm's output is also
    ``q_proj``'s input) share one reduction. The result is shared: callers must not modify it in place."""
    key = (id(x), channels)
    hit = _RECENT.get(key)
    if hit is not None and hit[0]() is x and hit[1] == x._version:
        return hit[2]
    result = channel_absmax_of(x.detach().reshape(-1, channels))
    if len(_RECENT) >= _RECENT_SIZE:
        _RECENT.pop(next(iter(_RECENT)))
    _RECENT[key] = (weakref.ref(x), x._version, result)
    return result


class ChannelAbsMaxObserver:
    """Running ``max |x_j|`` over every leading index of the observed tensor, per channel ``j`` (the last axis)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.absmax: torch.Tensor | None = None
        self.calls = 0
        self.rows = 0
        self.bad_shape: tuple[int, ...] | None = None  # first shape whose last axis was not ``channels``

    @torch.no_grad()
    def observe(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.channels:
            if self.bad_shape is None:
                self.bad_shape = tuple(x.shape) if isinstance(x, torch.Tensor) else (type(x).__name__,)  # type: ignore[assignment]
            return
        if x.numel() == 0:
            return
        current = tensor_channel_absmax(x, self.channels)  # shared: never modified in place
        if self.absmax is None:
            self.absmax = current.clone()
        else:
            torch.maximum(self.absmax, current, out=self.absmax)
        self.calls += 1
        self.rows += x.numel() // self.channels

    def attach(self, model: nn.Module, point: ObservationPoint) -> RemovableHandle:
        """Hook this observer at ``point`` of ``model``."""
        module = model.get_submodule(point.module)
        if point.where == "output":
            return module.register_forward_hook(lambda _m, _args, out: self.observe(out))
        arg = point.arg
        return module.register_forward_pre_hook(lambda _m, args: self.observe(args[arg]) if len(args) > arg else None)
