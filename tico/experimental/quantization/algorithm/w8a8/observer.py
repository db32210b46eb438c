"""Calibration statistics for W8A8: per-channel abs-max over all data plus a bounded uniform row sample.

The abs-max gives smoothing scales and abs-max static ranges exactly (``max_j max|X_j| / s_j``); the sample
lets convert choose error-minimising ranges and score alphas *after* smoothing, from the same single pass.

Memory and time. Layers that read the same tensor (``q/k/v_proj`` after one norm, ``gate/up_proj``) each
have an observer, but their statistics are identical, so observers with the same settings that see the *same
tensor object* in the same state share the work and the storage: the first one computes, the others adopt
its results (the same tensors, not copies). The sample is kept in the input's own dtype (bf16 stays bf16).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from tico.experimental.quantization.algorithm.smoothquant.scales import ChannelAbsMaxObserver, tensor_channel_absmax


class _Step:
    """What one observer computed from one input tensor: its state before (``before``) and after."""

    __slots__ = ("tensor", "version", "before", "after")

    def __init__(self, tensor: torch.Tensor, before: object, after: tuple, on_free) -> None:
        self.tensor = weakref.ref(tensor, on_free)
        self.version = tensor._version
        self.before = before
        self.after = after


class SampledChannelObserver(ChannelAbsMaxObserver):
    """:class:`ChannelAbsMaxObserver` that also keeps a uniform sample of at most ``max_rows`` rows.

    Sampling without replacement over everything seen: each row gets a uniform random key and the rows with
    the largest keys are kept (a one-pass reservoir), so the sample does not depend on how data is batched.
    Only rows whose key beats the current smallest kept key are ever copied.
    """

    _recent: dict[tuple[int, int, int, int], _Step] = {}  # (id(tensor), channels, max_rows, seed) -> last step

    def __init__(self, channels: int, max_rows: int, seed: int = 0) -> None:
        super().__init__(channels)
        self.max_rows = max_rows
        self.seed = seed
        self.rows_sample: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)
        self._state: object = ("initial", seed)  # equal for observers whose statistics are equal

    @torch.no_grad()
    def observe(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.channels:
            super().observe(x)  # records the bad shape
            return
        key = (id(x), self.channels, self.max_rows, self.seed)
        step = self._recent.get(key)
        if step is not None and step.tensor() is x and step.version == x._version and step.before == self._state:
            self._adopt(step)  # another reader of this very tensor, in our state, already did the work
            return
        before = self._state
        flat = x.detach().reshape(-1, self.channels)
        if flat.shape[0] == 0:
            return
        current = tensor_channel_absmax(x, self.channels)  # shared with a smoothing observer of this tensor
        self.absmax = current.clone() if self.absmax is None else torch.maximum(self.absmax, current)
        self.calls += 1
        self.rows += flat.shape[0]
        if self.max_rows > 0:
            self._sample(flat)
        self._state = object()
        self._remember(key, x, before)

    def _sample(self, flat: torch.Tensor) -> None:
        keys = torch.rand(flat.shape[0], generator=self._gen)
        if self.rows_sample is None or self._keys is None:
            if keys.numel() > self.max_rows:
                keys, idx = torch.topk(keys, self.max_rows)
                self._keys, self.rows_sample = keys, flat[idx.to(flat.device)]
            else:
                self._keys, self.rows_sample = keys, flat.clone()
            return
        if self._keys.numel() < self.max_rows:  # not full yet: append, then trim
            keys = torch.cat([self._keys, keys])
            rows = torch.cat([self.rows_sample, flat.to(self.rows_sample.device)])
            if keys.numel() > self.max_rows:
                keys, idx = torch.topk(keys, self.max_rows)
                rows = rows[idx.to(rows.device)]
            self._keys, self.rows_sample = keys, rows
            return
        floor = self._keys.min()
        new = (keys > floor).nonzero().flatten()
        if new.numel() == 0:
            return
        keys = torch.cat([self._keys, keys[new]])
        kept, idx = torch.topk(keys, self.max_rows)
        old = self._keys.numel()
        from_old, from_new = idx[idx < old], idx[idx >= old] - old
        sample = self.rows_sample
        rows = torch.empty_like(sample)  # the kept old rows, then the new ones: gathered in place (no cat)
        n_old = from_old.numel()
        torch.index_select(sample, 0, from_old.to(sample.device), out=rows[:n_old])
        picked = new[from_new].to(flat.device)
        if flat.device == sample.device and flat.dtype == sample.dtype:
            torch.index_select(flat, 0, picked, out=rows[n_old:])
        else:
            rows[n_old:] = flat[picked]
        self._keys = torch.cat([keys[from_old], keys[old + from_new]])
        self.rows_sample = rows

    def _remember(self, key: tuple[int, int, int, int], x: torch.Tensor, before: object) -> None:
        recent = SampledChannelObserver._recent
        after = (self.absmax, self.calls, self.rows, self.rows_sample, self._keys, self._gen.get_state(), self._state)

        def forget(_ref: weakref.ref) -> None:  # the tensor is freed: drop the entry (and what it holds)
            if recent.get(key) is step:
                del recent[key]

        step = _Step(x, before, after, forget)
        recent[key] = step

    def _adopt(self, step: _Step) -> None:
        absmax, self.calls, self.rows, self.rows_sample, self._keys, gen_state, self._state = step.after
        self.absmax = absmax.clone()  # the running max may be updated in place elsewhere: keep our own (small)
        self._gen.set_state(gen_state)
