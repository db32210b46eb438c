"""The contract every quantization algorithm implements: observe in ``prepare``, transform in ``convert``."""

from __future__ import annotations

import abc
from typing import Any

import torch

from tico.experimental.quantization.config.base import BaseConfig


class QuantizationError(ValueError):
    """A plan or its statistics cannot be applied; the message names every offending module."""


class BaseQuantizer(abc.ABC):
    """One algorithm's lifecycle on one model.

    ``prepare`` may attach observers but must not change any weight; ``convert`` plans every change from the
    statistics, validates the whole plan, and only then applies it, so a failure leaves the model as it was.
    ``detach`` removes everything ``prepare`` attached (hooks), and ``attach`` puts it back: the public
    interface uses the pair to deep-copy a prepared model without copying observers.
    """

    def __init__(self, config: BaseConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def prepare(
        self,
        model: torch.nn.Module,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> torch.nn.Module:
        """Attach observers to ``model`` (weights untouched) and return it."""

    @abc.abstractmethod
    def convert(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply the algorithm to ``model`` using what the observers saw and return it.

        Hooks are not removed here (the public interface calls :meth:`detach`), so the same statistics can also
        convert a deep copy while the original stays prepared.
        """

    @abc.abstractmethod
    def detach(self, model: torch.nn.Module) -> None:
        """Remove this quantizer's hooks from ``model`` (statistics are kept)."""

    @abc.abstractmethod
    def attach(self, model: torch.nn.Module) -> None:
        """Re-install this quantizer's hooks on ``model`` after :meth:`detach`."""
