"""The one module-name matcher: ignore lists, ``custom_alpha_map`` keys, targets and explicit smoothing mappings.

A *key* names modules in one of two ways:

- an exact module name, as ``model.named_modules()`` spells it (``"model.layers.3.mlp"``; ``""`` is the model);
- a pattern: ``"re:"`` followed by a Python regular expression that must match the *whole* name
  (``"re:.*\\.q_proj"``, ``"re:model\\.layers\\.[0-3]\\.mlp"``), the syntax llm-compressor uses.

A key matches a module by its own name. Where a key stands for a part of the model (ignore lists, alpha maps),
it also *covers* everything inside what it matches: ``matches(key, name, inside=True)`` is true when the key
matches ``name`` or one of its enclosing modules (``"model.layers.3"`` covers ``model.layers.3.mlp.up_proj``).
:func:`unmatched` lists the keys that matched nothing, so a typo is an error that names it, never a silent no-op.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Sequence

PATTERN_PREFIX = "re:"


def within(name: str, prefix: str) -> bool:
    """True if module ``name`` is the module named ``prefix`` or lies inside it (``a.b`` is within ``a``, not
    within ``a.bc``)."""
    return name == prefix or name.startswith(prefix + ".")


def is_pattern(key: str) -> bool:
    """Whether ``key`` is a ``re:`` pattern (otherwise it is an exact module name)."""
    return key.startswith(PATTERN_PREFIX)


@lru_cache(maxsize=256)
def _regex(key: str) -> re.Pattern[str]:
    return re.compile(key[len(PATTERN_PREFIX):])


def check_keys(keys: Iterable[object], where: str) -> None:
    """Raise a ValueError naming ``where`` and the key if a key is not a string or its pattern does not compile."""
    for key in keys:
        if not isinstance(key, str):
            raise ValueError(f"{where}: module names must be strings, got {key!r} ({type(key).__name__})")
        if is_pattern(key):
            try:
                _regex(key)
            except re.error as exc:
                raise ValueError(f"{where}: {key!r} is not a valid regular expression after 're:' ({exc})") from None


def enclosing(name: str) -> list[str]:
    """``name`` and every module that contains it, innermost first (``a.b.c``, ``a.b``, ``a``, ``""``)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:end]) for end in range(len(parts), -1, -1)]


def matches(key: str, name: str, inside: bool = False) -> bool:
    """Whether ``key`` matches module ``name`` (with ``inside``: ``name`` or a module that contains it)."""
    if is_pattern(key):
        rx = _regex(key)
        return any(rx.fullmatch(n) for n in (enclosing(name) if inside else [name]))
    return (key == "" or within(name, key)) if inside else name == key


def select(keys: Sequence[str], names: Iterable[str], inside: bool = False) -> list[str]:
    """The ``names`` that any of ``keys`` matches, in the order of ``names``."""
    return [n for n in names if any(matches(k, n, inside) for k in keys)]


def unmatched(keys: Sequence[str], names: Iterable[str], inside: bool = False) -> list[str]:
    """The ``keys`` that match none of ``names``, in the order of ``keys``: what an error should name."""
    names = list(names)
    return [k for k in keys if not any(matches(k, n, inside) for n in names)]


def most_specific(keys: Sequence[str], names: Iterable[str]) -> str | None:
    """The key that covers one of ``names`` most specifically, or None if none covers any.

    Exact names win over patterns, the longest exact name first (``model.layers.0.mlp`` over ``model.layers.0``);
    among patterns, the first one listed wins.
    """
    names = list(names)
    hits = [k for k in keys if any(matches(k, n, inside=True) for n in names)]
    exact = [k for k in hits if not is_pattern(k)]
    if exact:
        return max(exact, key=len)
    return hits[0] if hits else None
