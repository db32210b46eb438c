"""Smoothing recipes: the groups, alphas and scales of a convert, saved as JSON and re-applied later.

A recipe lets the same smoothing be applied to the same model again without calibration data (for example on
another machine, or to the original checkpoint before a different quantization). Applying validates every
group against the model first (parameters exist, shapes and producer kinds match, scales finite and positive)
and only then changes weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingPlan
from tico.experimental.quantization.structure.producers import fold_into_producer
from tico.experimental.quantization.algorithm.smoothquant.scales import scale_input_channels, to_columns

FORMAT = "tico-smoothquant-recipe/1"


def save_recipe(plan: SmoothingPlan, path: str | Path) -> None:
    """Write the smoothed groups of a converted ``plan`` (with their scales) to ``path`` as JSON."""
    groups = [g.to_dict() for g in plan.smoothed]
    missing = [g["producer"] for g in groups if g["scales"] is None]
    if missing:
        raise ValueError(f"the plan has no scales for {missing[:3]}: save a recipe after convert()")
    Path(path).write_text(json.dumps({"format": FORMAT, "groups": groups}, indent=1))


def load_recipe(path: str | Path) -> list[dict[str, Any]]:
    """The groups of a recipe file (raises ValueError naming the file if it is not one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read smoothing recipe {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a smoothing recipe (expected format {FORMAT!r})")
    return data["groups"]


@torch.no_grad()
def apply_recipe(model: nn.Module, recipe: str | Path | list[dict[str, Any]]) -> nn.Module:
    """Fold a saved recipe's scales into ``model``; every group is checked before any weight changes."""
    groups = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    errors: list[str] = []
    for g in groups:
        scales = g["scales"]
        if g["producer"] not in modules:
            errors.append(f"{g['producer']}: no such module")
        if not scales or any(not math.isfinite(v) or v <= 0 for v in scales):
            errors.append(f"{g['producer']}: scales must be finite and positive")
        for c in g["consumers"]:
            p = params.get(c["param"])
            width = len(c["channel_map"]) if c["channel_map"] else len(scales or [])
            if p is None:
                errors.append(f"{c['param']}: no such parameter")
            elif c["axis"] >= p.dim() or p.shape[c["axis"]] != width:
                errors.append(f"{c['param']}: expected {width} channels on axis {c['axis']}, has shape {list(p.shape)}")
    if errors:
        raise ValueError(f"recipe does not fit {type(model).__name__}; nothing was changed:\n  - " + "\n  - ".join(errors))
    for g in groups:
        s = torch.tensor(g["scales"], dtype=torch.float32)
        fold_into_producer(modules[g["producer"]], g["kind"], s)
        for c in g["consumers"]:
            cmap = tuple(c["channel_map"]) if c["channel_map"] else None
            scale_input_channels(params[c["param"]], c["axis"], to_columns(s, cmap))
    return model
