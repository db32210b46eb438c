"""Config class -> quantizer class, and config class -> its scope. New algorithms register here;
``prepare``/``convert`` never change.

A *scope* answers, for a caller that quantizes a model one part at a time (the streamed pipeline), what the
config means for each part: the config for one block, which layers it quantizes, which matrices it leaves as
they are, whether its result can be written. The caller asks; only the algorithm reads its config's fields.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, ContextManager, Iterable, Protocol, TypeVar

from torch import nn

from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.quantizer import BaseQuantizer

_REGISTRY: dict[type[BaseConfig], type[BaseQuantizer]] = {}

# Quantizer modules imported on first lookup, so importing the public interface stays cheap and an
# algorithm's module registers itself with the decorator below.
_BUILTIN_MODULES = (
    "tico.experimental.quantization.algorithm.smoothquant.quantizer",
    "tico.experimental.quantization.algorithm.w8a8.quantizer",
    "tico.experimental.quantization.algorithm.smoothquant.scope",
    "tico.experimental.quantization.algorithm.w8a8.scope",
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


class UnitScope(Protocol):
    """What a config means for one part of a model (see the module docstring); registered with
    :func:`register_scope`, built with the config."""

    output_format: str  # "compressed-tensors" or "transformers" (a float checkpoint, as save_pretrained writes)

    def check_streamable(self, writes: bool) -> None:
        """Raise ``ValueError`` naming the options that cannot be quantized part by part (or written)."""

    def check_names(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the module names of the config that ``model`` does not have."""

    def for_unit(self, unit: nn.Module, block_path: str | None, blocks_path: str) -> BaseConfig:
        """The config for one block (``block_path``), or for the rest of the model (``block_path=None``)."""

    def quantized_layers(self, model: nn.Module) -> list[str]:
        """The Linear-like layers of ``model`` this config quantizes."""

    def leaves_vocabulary(self, model: nn.Module, blocks_path: str) -> bool:
        """Whether the rest of the model's conversion leaves the input/output embedding matrices as they are."""

    def observes(self, quantizer: Any) -> bool:
        """Whether ``quantizer`` (after ``prepare``) needs calibration forwards: anything observes activations."""

    def export_forms(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """Per quantized layer, every module it may become (on the meta device), to check the export early."""

    def merged_plan(self, outcomes: Iterable[Any]) -> Any:
        """The units' plans (objects with ``plan``/``report``) as one, or None."""

    def merged_report(self, outcomes: Iterable[Any]) -> Any:
        """The units' reports as one, or None."""

    def quiet_outside_blocks(self) -> ContextManager[None]:
        """Silence the expected "nothing to do" warnings of the rest of the model (usually nothing to change)."""


_SCOPES: dict[type[BaseConfig], Callable[[Any], UnitScope]] = {}
S = TypeVar("S")


def register_scope(config_cls: type[BaseConfig]) -> Callable[[S], S]:
    """Class decorator: the decorated class (built with the config) is the scope of ``config_cls`` configs."""

    def wrap(scope_cls: S) -> S:
        _SCOPES[config_cls] = scope_cls  # type: ignore[assignment]
        return scope_cls

    return wrap


def get_scope(config: BaseConfig) -> UnitScope:
    """The scope registered for ``type(config)`` (or its nearest registered base class), built with ``config``."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for cls in type(config).__mro__:
        if cls in _SCOPES:
            return _SCOPES[cls](config)
    known = ", ".join(sorted(c.__name__ for c in _SCOPES)) or "none"
    raise TypeError(f"{type(config).__name__} cannot be quantized block by block (no scope is registered for it); "
                    f"configs that can: {known}")
