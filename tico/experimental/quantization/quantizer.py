"""The contract every quantization algorithm implements: observe in ``prepare``, transform in ``convert``.

Besides the abstract lifecycle, the base class owns what every algorithm would otherwise write again:

- hook bookkeeping (:meth:`BaseQuantizer.attach`/:meth:`BaseQuantizer.detach` over a list of handles),
- the reduction of the statistics over the ranks of a process group, before anything is planned
  (:meth:`BaseQuantizer.reduce_statistics`, over what :meth:`BaseQuantizer.statistics` names),
- the statistics check that runs before any plan is made (:meth:`BaseQuantizer.statistics_errors`: bad shape,
  never observed, non-finite, one message listing every module),
- one way to fail (:meth:`BaseQuantizer.fail`), and
- :class:`Transaction`, the undo journal that makes the apply step of ``convert`` all-or-nothing.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tico.experimental.quantization import distributed
from tico.experimental.quantization.config.base import BaseConfig

logger = logging.getLogger(__name__)

_ABSENT = object()


class QuantizationError(ValueError):
    """A plan or its statistics cannot be applied; the message names every offending module."""


class Observer(Protocol):
    """What the statistics check reads from an observer (see ``algorithm/smoothquant/scales.py``)."""

    channels: int
    absmax: torch.Tensor | None
    bad_shape: tuple[int, ...] | None


class Transaction:
    """An undo journal: every change made through it is reverted, in reverse order, by :meth:`rollback`.

    ``convert`` plans and validates everything first, then applies the plan inside ``with Transaction() as tx``;
    if any apply step raises (a bug, an out-of-memory, an interrupt), the model is put back bit for bit, still
    prepared, and the error propagates. Tensors changed in place are cloned once before their first change,
    so the journal costs a transient copy of what it changes in place (released when the block exits).
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._saved: set[int] = set()

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        self._undo.clear()
        self._saved.clear()
        return False

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, undone by restoring the previous value (or deleting a new attribute).

        For an ``nn.Module`` child the previous module object itself is put back.
        """
        old = obj.__dict__.get(name, _ABSENT) if not isinstance(obj, nn.Module) else _module_attr(obj, name)

        def undo() -> None:
            if old is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        setattr(obj, name, value)
        self._undo.append(undo)

    def save(self, tensor: torch.Tensor) -> None:
        """Clone ``tensor`` before it is changed in place; rollback copies the clone back (once per tensor)."""
        if id(tensor) in self._saved:
            return
        self._saved.add(id(tensor))
        original = tensor.detach().clone()

        def undo() -> None:
            with torch.no_grad():
                tensor.copy_(original)

        self._undo.append(undo)

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Register a custom undo action."""
        self._undo.append(undo)

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


def _module_attr(module: nn.Module, name: str) -> Any:
    for store in (module._modules, module._parameters, module._buffers, module.__dict__):
        if name in store:
            return store[name]
    return _ABSENT


class BaseQuantizer(abc.ABC):
    """One algorithm's lifecycle on one model.

    ``prepare`` may attach observers but must not change any weight; ``convert`` plans every change from the
    statistics, validates the whole plan, and only then applies it (inside a :class:`Transaction`), so a failure
    leaves the model as it was, still prepared. ``detach`` removes everything ``prepare`` hooked, and ``attach``
    puts it back: the public interface uses the pair to deep-copy a prepared model without copying observers.
    """

    error_class: type[QuantizationError] = QuantizationError
    title = "quantization"  # the algorithm's name in error messages

    def __init__(self, config: BaseConfig) -> None:
        self.config = config
        self._handles: list[RemovableHandle] = []

    @abc.abstractmethod
    def prepare(
        self,
        model: nn.Module,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> nn.Module:
        """Attach observers to ``model`` (weights untouched) and return it."""

    @abc.abstractmethod
    def convert(self, model: nn.Module) -> nn.Module:
        """Apply the algorithm to ``model`` using what the observers saw and return it.

        Hooks are not removed here (the public interface calls :meth:`detach`), so the same statistics can also
        convert a deep copy while the original stays prepared.
        """

    # -- hooks ---------------------------------------------------------------------------------------------
    def install_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        """Hook this quantizer's observers into ``model``; :meth:`attach` keeps the handles. Default: none."""
        return []

    def attach(self, model: nn.Module) -> None:
        """(Re-)install this quantizer's hooks on ``model`` (after :meth:`detach`; never twice)."""
        self.detach(model)
        try:
            self._handles.extend(self.install_hooks(model))
        except BaseException:
            self.detach(model)
            raise

    def detach(self, model: nn.Module) -> None:
        """Remove this quantizer's hooks from ``model`` (statistics are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- statistics over ranks ---------------------------------------------------------------------------------
    def statistics(self, model: nn.Module) -> dict[str, distributed.Reducible]:
        """Every statistic convert plans from, by a name that is the same on every rank. Default: none."""
        return {}

    def reduce_statistics(self, model: nn.Module) -> None:
        """Replace each rank's statistics by those of all ranks (a user's data-parallel calibration under
        ``torch.distributed``), before anything is planned; the first step of every ``convert``.

        Without a process group the same merge runs on this process's statistics alone, so one process and N
        ranks that split the same batches plan from the same numbers (see :mod:`..distributed`).
        """
        distributed.reduce_statistics(self.statistics(model))

    # -- checks --------------------------------------------------------------------------------------------
    @staticmethod
    def statistics_errors(observed: Iterable[tuple[str, Observer]]) -> list[str]:
        """Every reason the statistics of ``(where, observer)`` pairs cannot be used, as one list of lines.

        A tensor of the wrong shape, statistics that are NaN/inf (with the channels), and observers that saw
        nothing (all of them: no calibration was run; some: the data did not reach them) are all reported.
        """
        errors: list[str] = []
        unseen: list[str] = []
        count = 0
        for where, obs in observed:
            count += 1
            if obs.bad_shape is not None:
                errors.append(f"{where}: saw a tensor of shape {list(obs.bad_shape)}, expected {obs.channels} channels last")
            elif obs.absmax is None:
                unseen.append(where)
            else:
                bad = (~torch.isfinite(obs.absmax)).nonzero().flatten().tolist()
                if bad:
                    errors.append(f"{where}: activation statistics are NaN/inf in channels {bad[:8]}")
        if unseen:
            if len(unseen) == count:
                errors.insert(0, "no calibration forward was run after prepare(): run the model on calibration data first")
            else:
                errors.append(f"no activations were observed at {unseen} (did the calibration data reach them?)")
        return errors

    def fail(self, model: nn.Module, errors: list[str]) -> None:
        """Raise :attr:`error_class` listing ``errors`` (if any): the one way ``convert`` refuses a plan."""
        if errors:
            raise self.error_class(
                f"{self.title} cannot convert {type(model).__name__}; nothing was changed:\n  - "
                + "\n  - ".join(errors)
            )
