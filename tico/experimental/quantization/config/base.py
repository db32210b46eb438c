"""The base every quantization config derives from, and its round trip to plain data.

Configs are small frozen dataclasses validated when constructed (the torchao style): a bad value fails at the
line the user wrote, not deep inside ``convert``. ``prepare`` dispatches on the config's type through
:mod:`tico.experimental.quantization.registry`.

:meth:`BaseConfig.to_dict` and :meth:`BaseConfig.from_dict` turn any config into JSON-ready data and back, so a
recorded recipe (``tico_recipe.json``) can be read into the same config: nested configs become dicts, tuples
become lists (and lists become tuples again where the field's type says so), and a key that is not a field is
refused with its name, so a misspelt recipe cannot be read as the defaults.
"""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar, Union

C = TypeVar("C", bound="BaseConfig")


class BaseConfig(abc.ABC):
    """A quantization algorithm's settings. Subclasses are frozen dataclasses."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short, stable name of the algorithm (used in logs and saved recipes)."""

    def to_dict(self) -> dict[str, Any]:
        """Every constructor field as plain data (dicts, lists, strings, numbers, None), ready for ``json.dumps``."""
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """The config that :meth:`to_dict` recorded as ``data``; its fields are validated as when constructed.

        A ``"type"`` key naming the class (as recipe files write it) is accepted at every level.

        Raises:
            ValueError: ``data`` is not a mapping, names another class, or has a key that is not a field (named).
        """
        return _build(cls, data)


def _build(cls: type, data: Any) -> Any:
    """Dataclass ``cls`` from plain ``data``: nested configs and dataclasses from dicts, tuples from lists."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}.from_dict needs a mapping of field names, got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("type", cls.__name__)
    if kind != cls.__name__:
        raise ValueError(f"{cls.__name__}.from_dict: the data describes a {kind}, not a {cls.__name__}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown key {unknown[0]!r}; the fields are {sorted(known)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _decode(v, hints.get(k, Any), f"{cls.__name__}.{k}") for k, v in data.items()})


def _encode(value: Any) -> Any:
    if isinstance(value, BaseConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any, hint: Any, where: str) -> Any:
    """``value`` (plain data) shaped as the type ``hint`` says: configs from dicts, tuples from lists."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        for arg in typing.get_args(hint):
            if (isinstance(value, Mapping) and (_is_config(arg) or dataclasses.is_dataclass(arg))) or (
                isinstance(value, list) and typing.get_origin(arg) in (tuple, list)
            ):
                return _decode(value, arg, where)
        return value
    if _is_config(hint) and isinstance(value, Mapping):
        return hint.from_dict(value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return _build(hint, value)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(v, args[0], where) for v in value)
        if len(args) == len(value):
            return tuple(_decode(v, a, where) for v, a in zip(value, args))
        return tuple(value)  # the config's own check reports a wrong length
    if origin in (dict, Mapping, typing.get_origin(Mapping[str, Any])) and isinstance(value, Mapping):
        args = typing.get_args(hint)
        return {k: _decode(v, args[1] if len(args) == 2 else Any, where) for k, v in value.items()}
    return value


def _is_config(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, BaseConfig)
