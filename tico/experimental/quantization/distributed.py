"""torch.distributed, as calibration needs it: is a process group running, and the few collectives convert uses.

A user's own data-parallel calibration loop (``torchrun``, each rank running its share of the batches through
its own copy of the prepared model) ends in ``convert`` on every rank. Before anything is planned, every
observer's statistics are reduced across the ranks (:func:`reduce_statistics`), so every rank plans from the
same numbers and converts the same model. Everything here is torch.distributed's own collectives (``gloo`` on
CPU, ``nccl`` on CUDA: tensors go through the current CUDA device there); without a process group (or with one
rank) every helper is the identity, so the single-process path runs the same code.

Failures: a collective waits for every rank, so a rank that raises while the others wait would hang them. Local
work that may raise is therefore followed by an exchange of "ok or error" (:func:`together`,
:func:`reduce_statistics`): a failure on one rank ends every rank with :class:`DistributedError`.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Protocol

import torch
import torch.distributed as dist

__all__ = [
    "DistributedError", "Reducible", "active", "all_reduce_max", "all_reduce_sum", "broadcast_object",
    "gather_objects", "gather_rows_in_rank_order", "portable", "rank", "to_device", "reduce_statistics", "together", "world_size",
]


class DistributedError(RuntimeError):
    """Another rank failed; the message names the rank and its error."""


def active() -> bool:
    """A process group is initialized and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def portable(x: torch.Tensor) -> torch.Tensor:
    """``x`` ready to be pickled to another rank: on the CPU under a process group, itself otherwise (no copy)."""
    return x.detach().cpu() if active() else x


def to_device(obj: Any, device: torch.device, memo: dict) -> Any:
    """``obj`` (tensors in nested tuples, lists, dicts and dataclasses) on ``device``, as new containers; a tensor
    reached twice (a mask shared by several recorded calls) is moved once (``memo``: one dict per transfer)."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        if ("to", id(obj), str(device)) not in memo:
            memo[("to", id(obj), str(device))] = obj.to(device)
        return memo[("to", id(obj), str(device))]
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: to_device(getattr(obj, f.name), device, memo) for f in dataclasses.fields(obj)})
    return obj


def _device() -> torch.device:
    """Where the backend wants tensors: the current CUDA device for ``nccl``, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(x: torch.Tensor, op: Any) -> torch.Tensor:
    if not active():
        return x.clone()
    t = x.detach().to(_device()).clone()
    dist.all_reduce(t, op=op)
    return t.to(x.device)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``x`` over the ranks (a new tensor on ``x``'s device; exact, order-free)."""
    return _reduce(x, dist.ReduceOp.MAX)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of ``x`` over the ranks: use it for counters (integers); float sums depend on the order."""
    return _reduce(x, dist.ReduceOp.SUM)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a process group).

    Tensors inside should be on the CPU: a CUDA tensor is unpickled on the device index it was saved from.
    """
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_rows_in_rank_order(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (``x[i]``; the row counts may differ), concatenated in rank order, on ``x``'s device.

    ``all_gather`` of the counts, then of ``x`` padded to the largest count; the other dimensions and the dtype
    must agree over the ranks.
    """
    if not active():
        return x.clone()
    device = _device()
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.detach().to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)


def _check(error: BaseException | None, what: str) -> None:
    """Exchange "ok or error" with every rank; raise if another rank failed (the failing one re-raises its own)."""
    sent = None if error is None else f"{type(error).__name__}: {error}"
    failed = [(r, m) for r, m in enumerate(gather_objects(sent)) if m is not None and r != rank()]
    if error is not None:
        raise error
    if failed:
        r, message = failed[0]
        raise DistributedError(f"{what}: rank {r} of {world_size()} failed, so this rank stops too: {message}")


@contextmanager
def together(what: str) -> Iterator[None]:
    """Run the block on every rank; if it raises on any rank, every rank raises (no rank waits forever).

    Without a process group this is a plain block.
    """
    if not active():
        yield
        return
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - re-raised by _check after telling the other ranks
        _check(exc, what)
        raise
    _check(None, what)


class Reducible(Protocol):
    """Statistics kept on each rank and reduced over ranks in two exchanges (see :func:`reduce_statistics`).

    ``summary``: this rank's own statistics, small and picklable (CPU tensors). ``contribution``: what this rank
    adds once every summary is known (for a row sample: the rows that made the merged selection). ``merge``:
    install the statistics of all ranks; a function of the summaries and contributions that does not depend on
    which rank runs it. ``memo`` (one dict per reduction, shared by all items) lets items that share statistics
    share the work and the result.
    """

    def summary(self) -> Any: ...

    def contribution(self, summaries: list[Any], me: int, memo: dict) -> Any: ...

    def merge(self, summaries: list[Any], contributions: list[Any], memo: dict) -> None: ...


def reduce_statistics(items: Mapping[str, Reducible]) -> None:
    """Reduce every item's statistics over the ranks: all items' summaries in one exchange, then all their
    contributions in a second, then each merges locally. Without a process group the same code runs on one
    rank's statistics, so one process and N processes reach their numbers the same way.

    Raises :class:`DistributedError` on every rank if building a summary or a contribution fails on any rank, or
    if the ranks do not hold the same statistics (different models or configs).
    """
    names = list(items)
    summaries = _exchange("reducing calibration statistics", lambda: {n: items[n].summary() for n in names})
    for r, s in enumerate(summaries):
        if list(s) != names:
            raise DistributedError(f"rank {r} holds statistics for other modules than rank {rank()}: prepare the same "
                                   "model with the same config on every rank")
    memo: dict = {}
    per_item = {n: [s[n] for s in summaries] for n in names}
    me = rank()
    contributions = _exchange("gathering sampled rows",
                              lambda: {n: items[n].contribution(per_item[n], me, memo) for n in names})
    memo.clear()
    for n in names:
        items[n].merge(per_item[n], [c[n] for c in contributions], memo)


def _exchange(what: str, build: Any) -> list[Any]:
    """``build()`` on every rank, gathered in rank order; every rank raises if any rank's ``build`` raised."""
    try:
        mine, error = build(), None
    except Exception as exc:  # noqa: BLE001 - re-raised after telling the other ranks
        mine, error = None, exc
    sent = ("error", f"{type(error).__name__}: {error}") if error is not None else ("ok", mine)
    gathered = gather_objects(sent)
    if error is not None:
        raise error
    failed = [(r, payload) for r, (status, payload) in enumerate(gathered) if status == "error"]
    if failed:
        r, message = failed[0]
        raise DistributedError(f"{what}: rank {r} of {world_size()} failed, so this rank stops too: {message}")
    return [payload for _, payload in gathered]
