"""torch.distributed, as calibration needs it: is a process group running, and the few collectives convert uses.

A user's own data-parallel calibration loop (``torchrun``, each rank running its share of the batches through
its own copy of the prepared model) ends in ``convert`` on every rank. Before anything is planned, every
observer's statistics are reduced across the ranks (:func:`reduce_statistics`), so every rank plans from the
same numbers and converts the same model. Everything here is torch.distributed's own collectives (``gloo`` on
CPU, ``nccl`` on CUDA: tensors go through the current CUDA device there); without a process group (or with one
rank) every helper is the identity, so the single-process path runs the same code.

Planning can be split too (:func:`split_work`): independent units of work (an alpha search, a layer's range and
mode, a trial forward) are given to the ranks by a deterministic greedy bin packing on an estimated cost
(:func:`owners`), each rank computes its own, and one exchange gives every rank every result.

Failures: a collective waits for every rank, so a rank that raises while the others wait would hang them. Local
work that may raise is therefore followed by an exchange of "ok or error" (:func:`together`,
:func:`reduce_statistics`, :func:`split_work`): a failure on one rank ends every rank with
:class:`DistributedError`. All these exchanges send the same ``(status, payload)`` pairs, so a rank that fails
before an exchange inside :func:`together` meets the others at that exchange, and an error every rank already
knows of is not exchanged again.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Mapping, Protocol, Sequence, TypeVar

import torch
import torch.distributed as dist

from tico.experimental.quantization.progress import track

__all__ = [
    "DistributedError", "Exchange", "Reducible", "active", "all_reduce_max", "all_reduce_sum", "broadcast_object",
    "gather_objects", "gather_rows_in_rank_order", "owners", "portable", "rank", "to_device", "reduce_statistics",
    "recording", "split_work", "together", "world_size",
]

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")
_TOLD = "_tico_every_rank_told"  # set on an exception every rank already knows of (see _shared)


@dataclass(frozen=True)
class Exchange:
    """One exchange of results between the ranks (in one process: the step that would be one), as this rank saw
    it: ``kind`` (``"statistics"``: :func:`reduce_statistics`; ``"planning"``: :func:`split_work`), seconds
    computing its part, seconds in the collective (transfer, and waiting for slower ranks), and for
    :func:`split_work` the units of work there were and how many this rank computed."""

    what: str
    kind: str
    compute_s: float
    exchange_s: float
    units: int = 0
    mine: int = 0


_log: ContextVar[list[Exchange] | None] = ContextVar("tico_distributed_log", default=None)


@contextmanager
def recording() -> Iterator[list[Exchange]]:
    """Every exchange (statistics reduction, split planning) run inside this block, in order: what a benchmark
    needs to tell the parallel part of convert and the collectives' cost from the rest. Nothing is recorded
    outside such a block."""
    log: list[Exchange] = []
    token = _log.set(log)
    try:
        yield log
    finally:
        _log.reset(token)


def _record(what: str, kind: str, compute_s: float, exchange_s: float, units: int = 0, mine: int = 0) -> None:
    log = _log.get()
    if log is not None:
        log.append(Exchange(what, kind, compute_s, exchange_s, units, mine))


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
    _shared(what, None, error)


def _told(exc: BaseException) -> BaseException:
    """Mark ``exc`` as known to every rank: :func:`together` re-raises it without another exchange."""
    try:
        setattr(exc, _TOLD, True)
    except AttributeError:  # an exception type without attributes: told again, harmlessly, if no rank waits
        pass
    return exc


@contextmanager
def together(what: str) -> Iterator[None]:
    """Run the block on every rank; if it raises on any rank, every rank raises (no rank waits forever).

    The block may hold exchanges of its own (:func:`split_work`): a rank that fails before one of them meets the
    others there with its error, and everyone stops. Without a process group this is a plain block.
    """
    if not active():
        yield
        return
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - re-raised by _check after telling the other ranks
        if not getattr(exc, _TOLD, False):
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


def _exchange(what: str, build: Any, kind: str = "statistics", units: int = 0, mine_units: int = 0) -> list[Any]:
    """``build()`` on every rank, gathered in rank order; every rank raises if any rank's ``build`` raised."""
    t0 = time.perf_counter()
    try:
        mine, error = build(), None
    except Exception as exc:  # noqa: BLE001 - re-raised after telling the other ranks
        mine, error = None, exc
    t1 = time.perf_counter()
    gathered = _shared(what, mine, error)
    _record(what, kind, t1 - t0, time.perf_counter() - t1, units, mine_units)
    return gathered


def _shared(what: str, mine: Any, error: BaseException | None) -> list[Any]:
    """Every rank's ``("ok", mine)`` or ``("error", message)``, in rank order: the one form every exchange sends.
    Raises on every rank if any rank sent an error: the failing rank its own, the others :class:`DistributedError`
    (both marked as known to every rank)."""
    sent = ("error", f"{type(error).__name__}: {error}") if error is not None else ("ok", mine)
    gathered = gather_objects(sent)
    if error is not None:
        raise _told(error)
    failed = [(r, payload) for r, (status, payload) in enumerate(gathered) if status == "error"]
    if failed:
        r, message = failed[0]
        raise _told(DistributedError(f"{what}: rank {r} of {world_size()} failed, so this rank stops too: {message}"))
    return [payload for _, payload in gathered]


def owners(costs: Sequence[float], world: int) -> list[int]:
    """Per unit of work (its estimated ``costs``), the rank that computes it: greedy bin packing, the costliest
    unit first onto the least loaded rank (ties: the earlier unit, the lower rank). A function of the costs alone,
    so every rank computes the same assignment without an exchange."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += float(costs[i])
    return owner


def split_work(what: str, keys: Sequence[K], costs: Sequence[float], compute: Callable[[K], R],
               device: torch.device | None = None, progress: str | None = None) -> dict[K, R]:
    """``compute(key)`` for every key, each computed once on one rank; every rank returns all the results.

    Each rank computes the keys :func:`owners` gives it (``costs``: an estimate per key, the same on every rank),
    then one exchange gives every rank the others' results: pickled on the CPU, moved to ``device`` (where the
    rank's model is: nccl runs one GPU per rank), or left on the CPU without one. A rank's own results are
    returned as computed. Without a process group every key is computed here, in order: the same results.
    ``progress`` names the step this rank's share is reported under (:func:`~.progress.track`).

    Raises on every rank if ``compute`` raises on any rank (the failing rank its own error, the others
    :class:`DistributedError`), or if the ranks were not given the same keys.
    """
    keys = list(keys)
    if len(costs) != len(keys):
        raise ValueError(f"{what}: {len(keys)} keys but {len(costs)} costs")
    if not active():
        t0 = time.perf_counter()
        done = {k: compute(k) for k in (keys if progress is None else track(keys, progress))}
        _record(what, "planning", time.perf_counter() - t0, 0.0, len(keys), len(keys))
        return done
    owner, me = owners(costs, world_size()), rank()
    mine = [k for k, o in zip(keys, owner) if o == me]
    local: dict[K, R] = {}

    def build() -> tuple[list[K], dict[K, Any]]:
        memo: dict = {}
        for k in mine if progress is None else track(mine, progress):
            local[k] = compute(k)
        return keys, {k: to_device(v, torch.device("cpu"), memo) for k, v in local.items()}

    parts = _exchange(what, build, "planning", len(keys), len(mine))
    if any(part_keys != keys for part_keys, _ in parts):  # every rank sees every list: all raise, or none
        raise _told(DistributedError(f"{what}: the ranks were given different units of work: prepare the same "
                                     "model with the same config on every rank"))
    memo: dict = {}
    return {k: local[k] if o == me else (parts[o][1][k] if device is None else to_device(parts[o][1][k], device, memo))
            for k, o in zip(keys, owner)}
