"""Module-name arithmetic shared by the pipeline and the quantizers."""

from __future__ import annotations


def within(name: str, prefix: str) -> bool:
    """True if module ``name`` is the module named ``prefix`` or lies inside it (``a.b`` is within ``a``, not
    within ``a.bc``)."""
    return name == prefix or name.startswith(prefix + ".")
