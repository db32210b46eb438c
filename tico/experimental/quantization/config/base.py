"""The base every quantization config derives from.

Configs are small frozen dataclasses validated when constructed (the torchao style): a bad value fails at the
line the user wrote, not deep inside ``convert``. ``prepare`` dispatches on the config's type through
:mod:`tico.experimental.quantization.registry`.
"""

from __future__ import annotations

import abc


class BaseConfig(abc.ABC):
    """A quantization algorithm's settings. Subclasses are frozen dataclasses."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short, stable name of the algorithm (used in logs and saved recipes)."""
