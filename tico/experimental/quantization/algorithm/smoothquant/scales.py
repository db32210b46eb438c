"""The maths of SmoothQuant: statistics in, scales out, and the fold of ``s`` into a group's parameters.

- :class:`ChannelAbsMaxObserver`: per-channel ``max |X_j|``, gathered by one hook per smoothing group. It keeps
  one fp32 vector (never activations), reduces with ``amax``/``amin`` in the input's own dtype (exact for a
  max), and runs under ``no_grad`` so calibration inside a training loop costs no graph.
- :func:`smoothing_scales`: ``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``.
- :func:`scale_input_channels` (consumers, ``W * s``) and :func:`fold_ops` (a whole group: the producer's
  ``1/s`` from :func:`~tico.experimental.quantization.structure.producers.producer_fold_ops`, then every
  consumer's ``W * s``): the only places the fold arithmetic is written. Preview and apply both run these ops,
  so a previewed value and an applied one agree bit for bit.

Everything is computed in fp32 whatever the model's dtype, and cast back to each parameter's dtype at the end.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tico.experimental.quantization import distributed
from tico.experimental.quantization.distributed import portable
from tico.experimental.quantization.structure.producers import ParamOp, producer_fold_ops

# Below this an activation or weight channel counts as all-zero: its scale is set to 1, because the
# channel cannot influence the output and any other value would only blow up the other side.
EPS = 1e-5


@torch.no_grad()
def channel_absmax(param: torch.Tensor, axis: int) -> torch.Tensor:
    """``max |param|`` over every axis but ``axis``, in fp32 (two reductions, no full-size temporary)."""
    dims = tuple(d for d in range(param.dim()) if d != axis)
    if not dims:
        return param.detach().abs().float()
    return torch.maximum(param.amax(dim=dims), param.amin(dim=dims).neg()).float()


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``, with 1 where either side is (almost) zero.

    Args:
        act_absmax: per-channel ``max |X_j|`` over the calibration data (fp32).
        weight_absmax: per-channel ``max_k max |W_k[:, j]|`` over all consumers (fp32).
        alpha: migration strength in [0, 1].

    Returns:
        fp32 scales, finite and strictly positive.
    """
    a = act_absmax.float()
    w = weight_absmax.float().to(a.device)
    dead = (a < EPS) | (w < EPS)
    s = a.clamp_min(EPS).pow(alpha) / w.clamp_min(EPS).pow(1.0 - alpha)
    return torch.where(dead | ~torch.isfinite(s) | (s <= 0), torch.ones_like(s), s)


@torch.no_grad()
def scale_input_channels(
    param: torch.Tensor,
    axis: int,
    scales: torch.Tensor,
    chunk_elems: int = 1 << 24,
    compute_dtype: torch.dtype = torch.float32,
) -> None:
    """Multiply ``param`` by ``scales`` along ``axis`` in place, computing in ``compute_dtype`` (fp32).

    A parameter already in ``compute_dtype`` is scaled with one in-place multiply; others are processed in slices
    of ``chunk_elems`` elements so the temporary stays small for large (e.g. fused expert) tensors.
    """
    shape = [1] * param.dim()
    shape[axis] = -1
    s = scales.to(device=param.device, dtype=compute_dtype).view(shape)
    if param.dtype == compute_dtype:
        param.mul_(s)
        return
    rows = max(1, chunk_elems // max(1, param[0].numel())) if param.dim() > 1 else param.shape[0]
    for start in range(0, param.shape[0], rows):
        piece = param[start : start + rows]
        s_piece = s if axis != 0 else s[start : start + rows]
        piece.copy_((piece.to(compute_dtype) * s_piece).to(param.dtype))


def fold_ops(model: nn.Module, group: Any, scales: torch.Tensor) -> dict[str, list[ParamOp]]:
    """Per parameter name, the in-place ops that fold ``scales`` into a smoothing ``group``: ``1/s`` into the
    producer's weight (and bias), then ``s`` into every consumer's input columns (through its channel map)."""
    module = model.get_submodule(group.producer)
    ops = {f"{group.producer}.{name}": [op] for name, op in producer_fold_ops(module, group.kind, scales).items()}
    for c in group.consumers:
        ops.setdefault(c.name, []).append(_scale_columns(to_columns(scales, c.channel_map), c.axis))
    return ops


def _scale_columns(columns: torch.Tensor, axis: int) -> ParamOp:
    def op(t: torch.Tensor) -> None:
        scale_input_channels(t, axis, columns)

    return op


def to_producer_channels(values: torch.Tensor, channel_map: tuple[int, ...] | None, channels: int) -> torch.Tensor:
    """Per-column maxima (``values[j]`` for column ``j``) as per-producer-channel maxima, via ``channel_map``.

    Several columns may read one channel (a key/value head shared by several query heads); a channel no
    column reads gets 0, which :func:`smoothing_scales` turns into a scale of 1.
    """
    if channel_map is None:
        return values
    index = torch.tensor(channel_map, device=values.device)
    return torch.zeros(channels, dtype=values.dtype, device=values.device).scatter_reduce(0, index, values, "amax")


def to_columns(scales: torch.Tensor, channel_map: tuple[int, ...] | None) -> torch.Tensor:
    """The scale each column sees: ``scales[channel_map[j]]`` (``scales`` itself for the identity)."""
    return scales if channel_map is None else scales[torch.tensor(channel_map, device=scales.device)]


# -- statistics ------------------------------------------------------------------------------------------
def channel_absmax_of(flat: torch.Tensor) -> torch.Tensor:
    """``max_i |flat[i, j]|`` per column ``j``, fp32: ``amax`` and ``amin`` over rows (exact for a max, with no ``|x|``
    temporary, and cheaper than ``torch.aminmax(dim=0)`` on CPU)."""
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
    """Running ``max |x_j|`` over every leading index of the observed tensor, per channel ``j`` (the last axis).

    Under a process group, convert reduces the statistics over the ranks (:meth:`merge`: MAX of the maxima, SUM
    of the counters; see :func:`~tico.experimental.quantization.distributed.reduce_statistics`). The reduced
    values replace this rank's own until the next :meth:`observe` or :meth:`summary`, which go back to this
    rank's own (kept aside in ``_local``), so reducing again, or calibrating more, never counts another rank's
    data twice. In one process the merge is the process's own statistics (put in the merged order) and stays.
    """

    _LOCAL: tuple[str, ...] = ("absmax", "calls", "rows", "bad_shape")  # what merge replaces and observe restores

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.absmax: torch.Tensor | None = None
        self.calls = 0
        self.rows = 0
        self.bad_shape: tuple[int, ...] | None = None  # first shape whose last axis was not ``channels``
        self._local: dict[str, Any] | None = None  # this rank's own statistics while the reduced ones are installed

    @torch.no_grad()
    def observe(self, x: Any) -> None:
        self._restore_local()
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

    # -- reduction over ranks (distributed.Reducible) ----------------------------------------------------------
    def _restore_local(self) -> None:
        if self._local is not None:
            for name, value in self._local.items():
                setattr(self, name, value)
            self._local = None

    def summary(self) -> dict[str, Any]:
        """This rank's own statistics (maxima on the CPU under a process group)."""
        self._restore_local()
        absmax = None if self.absmax is None else portable(self.absmax)
        return {"absmax": absmax, "calls": self.calls, "rows": self.rows, "bad_shape": self.bad_shape}

    def contribution(self, summaries: list[dict[str, Any]], me: int, memo: dict) -> Any:
        return None

    def merge(self, summaries: list[dict[str, Any]], contributions: list[Any], memo: dict) -> None:
        """Install the statistics of every rank: the maximum of the maxima (exact), the sums of the counters, the
        first bad shape in rank order."""
        local = {name: getattr(self, name) for name in self._LOCAL}
        device = self.absmax.device if self.absmax is not None else torch.device("cpu")
        maxima = [s["absmax"] for s in summaries if s["absmax"] is not None]
        self.absmax = torch.stack([m.to(device) for m in maxima]).amax(dim=0) if maxima else None
        self.calls = sum(s["calls"] for s in summaries)
        self.rows = sum(s["rows"] for s in summaries)
        self.bad_shape = next((s["bad_shape"] for s in summaries if s["bad_shape"] is not None), None)
        self._local = local if distributed.active() else None  # one process: the merge is its own statistics

    def attach(self, model: nn.Module, point: Any) -> RemovableHandle:
        """Hook this observer at ``point`` (a :class:`~.groups.ObservationPoint`) of ``model``."""
        module = model.get_submodule(point.module)
        if point.where == "output":
            return module.register_forward_hook(lambda _m, _args, out: self.observe(out))
        arg = point.arg
        return module.register_forward_pre_hook(lambda _m, args: self.observe(args[arg]) if len(args) > arg else None)
