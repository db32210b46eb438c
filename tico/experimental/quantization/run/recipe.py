"""Read back the ``tico_recipe.json`` a run wrote, to run it again (``tico-sq quantize --recipe``).

The file holds the config as a dict (``config_to_dict``), the run's options (model, scheme, rotation,
streaming, batch size, dtype, device) and its calibration (text source, windows, seq-len, which windows, their
token ranges). :func:`read_recipe` turns it back into a config object and the command line's option values, so a run
is repeated from one file; options given on the command line then override the recorded ones.

:func:`config_from_dict` picks the config class the recorded ``"type"`` names; the config's own
``from_dict`` builds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig  # noqa: F401 - known to the reader
from tico.experimental.quantization.config.w8a8 import W8A8Config  # noqa: F401 - known to the reader
from tico.experimental.quantization.export.publish import RECIPE_FILE

__all__ = ["Recipe", "RecipeError", "read_recipe", "config_from_dict", "RUN_OPTIONS"]

# The command-line options a recipe records, as (option dest, where in the recipe, key there). Not
# trust_remote_code: a file must not be able to allow a model's own code to run; the user passes it.
RUN_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("model", "options", "model"),
    ("scheme", "options", "scheme"),
    ("rotate", "options", "rotate"),
    ("streaming", "options", "streamed"),
    ("batch_size", "options", "batch_size"),
    ("dtype", "options", "dtype"),
    ("device", "options", "device"),
    ("dataset", "calibration", "dataset"),
    ("dataset_config", "calibration", "dataset_config"),
    ("split", "calibration", "split"),
    ("text_column", "calibration", "text_column"),
    ("samples", "calibration", "windows"),
    ("seq_len", "calibration", "seq_len"),
)


class RecipeError(ValueError):
    """A recipe file that cannot be read or does not describe a run; the message names the file."""


@dataclass
class Recipe:
    """A recorded run: its config, the option values that repeat it, and the file they came from."""

    path: Path
    config: BaseConfig
    options: dict[str, Any] = field(default_factory=dict)  # option dest -> recorded value
    raw: dict[str, Any] = field(default_factory=dict)  # the whole file


def read_recipe(path: str | Path) -> Recipe:
    """The recipe in ``path`` (a ``tico_recipe.json``, or a folder holding one)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / RECIPE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecipeError(f"recipe {path} cannot be read: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise RecipeError(f"recipe {path} has no 'config': it is not a {RECIPE_FILE} written by tico-sq quantize")
    try:
        config = config_from_dict(raw["config"])
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"recipe {path}: its config cannot be rebuilt: {exc}") from None
    options: dict[str, Any] = {}
    for dest, section, key in RUN_OPTIONS:
        value = (raw.get(section) or {}).get(key)
        if value is not None:
            options[dest] = value
    selection = _selection((raw.get("calibration") or {}).get("selection"))
    if selection is not None:
        options["calibration_selection"] = selection
    return Recipe(path, config, options, raw)


def _selection(recorded: Any) -> str | None:
    """Which windows the recorded run calibrated on (``evaluation.data.SELECTIONS``), so a replay takes the same ones;
    recipes written before windows were spread say so in a sentence (``"the first windows of ..."``)."""
    from tico.experimental.quantization.evaluation.data import SELECTIONS

    if recorded in SELECTIONS:
        return str(recorded)
    if isinstance(recorded, str) and recorded.startswith("the first windows"):
        return "first"
    return None


def _config_classes() -> dict[str, type]:
    found: dict[str, type] = {}
    todo = [BaseConfig]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found[sub.__name__] = sub
            todo.append(sub)
    return found


def config_from_dict(data: dict[str, Any]) -> BaseConfig:
    """The config that ``config_to_dict`` wrote as ``data`` (``{"type": class name, field: value, ...}``)."""
    type_name = data.get("type")
    cls = _config_classes().get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ValueError(f"unknown config type {type_name!r} (known: {sorted(_config_classes())})")
    return cls.from_dict(data)  # BaseConfig.from_dict: nested configs, tuples, and "type" keys checked
