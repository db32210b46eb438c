"""Config class -> quantizer class. New algorithms register here; ``prepare``/``convert`` never change."""

from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.quantizer import BaseQuantizer

_REGISTRY: dict[type[BaseConfig], type[BaseQuantizer]] = {}

# Quantizer modules imported on first lookup, so importing the public interface stays cheap and an
# algorithm's module registers itself with the decorator below.
_BUILTIN_MODULES = (
    "tico.experimental.quantization.algorithm.smoothquant.quantizer",
    "tico.experimental.quantization.algorithm.w8a8.quantizer",
)

Q = TypeVar("Q", bound=type[BaseQuantizer])


def register_quantizer(config_cls: type[BaseConfig]) -> Callable[[Q], Q]:
    """Class decorator: make ``prepare`` use the decorated quantizer for configs of type ``config_cls``."""

    def wrap(quantizer_cls: Q) -> Q:
        _REGISTRY[config_cls] = quantizer_cls
        return quantizer_cls

    return wrap


def get_quantizer_class(config: BaseConfig) -> type[BaseQuantizer]:
    """The quantizer registered for ``type(config)`` (or its nearest registered base class)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for cls in type(config).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    known = ", ".join(sorted(c.__name__ for c in _REGISTRY)) or "none"
    raise TypeError(f"No quantizer is registered for {type(config).__name__}; registered configs: {known}")
