"""Calibration statistics for W8A8: per-channel abs-max over all data plus a bounded uniform row sample.

The abs-max gives smoothing scales and abs-max static ranges exactly (``max_j max|X_j| / s_j``); the sample
lets convert choose error-minimising ranges and score alphas *after* smoothing, from the same single pass.

Memory and time. Layers that read the same tensor (``q/k/v_proj`` after one norm, ``gate/up_proj``) each
have an observer, but their statistics are identical, so observers with the same settings that see the *same
tensor object* in the same state share the work and the storage: the first one computes, the others adopt
its results (the same tensors, not copies). The sample is kept in the input's own dtype (bf16 stays bf16).
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch

from tico.experimental.quantization.algorithm.smoothquant.scales import ChannelAbsMaxObserver, tensor_channel_absmax
from tico.experimental.quantization.distributed import portable


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

    Sampling without replacement over everything seen: each row gets a pseudo-random 62-bit key and the rows
    with the largest keys are kept (a one-pass reservoir); only rows whose key beats the current smallest kept
    key are ever copied. A row's key is a function of its batch alone (:func:`row_keys`: the batch's per-channel
    abs-max bits, its row count, the row's index, ``seed``), not of the order batches arrive in or of which rank
    sees them, so ranks that split the same batches between them keep, once merged, exactly the rows one process
    would. The merged sample is ordered by key (largest first), the same on every rank and in one process.
    """

    _recent: dict[tuple[int, int, int, int], _Step] = {}  # (id(tensor), channels, max_rows, seed) -> last step

    def __init__(self, channels: int, max_rows: int, seed: int = 0) -> None:
        super().__init__(channels)
        self.max_rows = max_rows
        self.seed = seed
        self.rows_sample: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None  # int64 keys of the sampled rows (CPU)
        self._state: object = ("initial", seed)  # equal for observers whose statistics are equal

    _LOCAL = ChannelAbsMaxObserver._LOCAL + ("rows_sample", "_keys", "_state")

    @torch.no_grad()
    def observe(self, x: Any) -> None:
        self._restore_local()
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
            self._sample(flat, row_keys(current, flat.shape[0], self.seed))
        self._state = object()
        self._remember(key, x, before)

    def _sample(self, flat: torch.Tensor, keys: torch.Tensor) -> None:
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
        after = (self.absmax, self.calls, self.rows, self.rows_sample, self._keys, self._state)

        def forget(_ref: weakref.ref) -> None:  # the tensor is freed: drop the entry (and what it holds)
            if recent.get(key) is step:
                del recent[key]

        step = _Step(x, before, after, forget)
        recent[key] = step

    def _adopt(self, step: _Step) -> None:
        absmax, self.calls, self.rows, self.rows_sample, self._keys, self._state = step.after
        self.absmax = absmax.clone()  # the running max may be updated in place elsewhere: keep our own (small)

    # -- reduction over ranks --------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The abs-max summary plus the keys of this rank's sampled rows (the rows themselves come later)."""
        out = super().summary()
        out["keys"] = self._keys
        return out

    def contribution(self, summaries: list[dict[str, Any]], me: int, memo: dict) -> Any:
        """This rank's rows among the merged sample's, in the merged order (once for observers sharing a sample)."""
        chosen = _selection(summaries, self.max_rows, memo)
        if chosen is None or self.rows_sample is None:
            return None
        key = ("contribution", id(self.rows_sample), id(chosen))
        if key not in memo:
            mine = chosen[2][chosen[1] == me].to(self.rows_sample.device)
            memo[key] = portable(self.rows_sample[mine])
        return memo[key]

    def merge(self, summaries: list[dict[str, Any]], contributions: list[Any], memo: dict) -> None:
        """Install every rank's abs-max and the merged sample: the ``max_rows`` rows with the largest keys of all
        ranks' samples, largest key first (observers that shared a sample share the merged one)."""
        device = self.rows_sample.device if self.rows_sample is not None else None
        super().merge(summaries, contributions, memo)
        chosen = _selection(summaries, self.max_rows, memo)
        rows = None
        if chosen is not None:
            key = ("merged", id(chosen), tuple(id(c) for c in contributions))
            if key not in memo:
                memo[key] = _assemble(chosen[1], contributions, device or self._device())
            rows = memo[key]
        self.rows_sample, self._keys = rows, None if chosen is None else chosen[0]
        self._state = ("merged", id(rows))

    def _device(self) -> torch.device:
        return self.absmax.device if self.absmax is not None else torch.device("cpu")


def row_keys(absmax: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """The sampling keys of a batch's ``rows`` rows: 62-bit pseudo-random integers from a generator seeded with
    a hash of the batch's per-channel abs-max bits (``absmax``, fp32), its row count and ``seed``.

    A function of the batch alone, so the keys do not depend on the order of the batches or on the rank that
    sees them; distinct batches get unrelated keys (a repeated batch repeats its keys and its rows).
    """
    digest = hashlib.blake2b(absmax.detach().float().cpu().numpy().tobytes(), digest_size=8)
    digest.update(f"{rows}/{seed}".encode())
    gen = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
    return torch.randint(0, 1 << 62, (rows,), generator=gen, dtype=torch.int64)


def _selection(summaries: list[dict[str, Any]], max_rows: int, memo: dict):
    """``(keys, owner rank, index in the owner's sample)`` of the merged sample's rows, largest key first; None
    when no rank sampled anything. Cached per set of key tensors, so observers sharing a sample share it."""
    keys = [s.get("keys") for s in summaries]
    key = ("selection", max_rows, tuple(id(k) for k in keys))
    if key not in memo:
        present = [(r, k) for r, k in enumerate(keys) if k is not None and k.numel()]
        if not present or max_rows <= 0:
            memo[key] = None
        else:
            all_keys = torch.cat([k for _, k in present])
            owner = torch.cat([torch.full((k.numel(),), r, dtype=torch.long) for r, k in present])
            index = torch.cat([torch.arange(k.numel()) for _, k in present])
            top, idx = torch.topk(all_keys, min(max_rows, all_keys.numel()))
            memo[key] = (top, owner[idx], index[idx])
    return memo[key]


def _assemble(owner: torch.Tensor, contributions: list[Any], device: torch.device) -> torch.Tensor:
    """The merged sample from the ranks' contributions (each in the merged order), on ``device``."""
    parts = {r: c for r, c in enumerate(contributions) if c is not None}
    first = next(iter(parts.values()))
    rows = torch.empty((owner.numel(), first.shape[1]), dtype=first.dtype, device=device)
    for r, part in parts.items():
        rows[(owner == r).to(device)] = part.to(device)
    return rows
