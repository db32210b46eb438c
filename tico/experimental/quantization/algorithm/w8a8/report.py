"""What W8A8's convert did (:class:`W8A8Report`) and what it will do (:class:`ConversionPlan`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from tico.experimental.quantization.algorithm.smoothquant.quantizer import ScalePlan


@dataclass
class W8A8Report:
    """What convert did: the layers it swapped and those it left in float, with the reason."""

    quantized: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)  # group or layer -> alpha used
    act_ranges: dict[str, float] = field(default_factory=dict)  # layer -> static range (static only)
    act_modes: dict[str, str] = field(default_factory=dict)  # layer -> chosen activation mode and why (dynamic_fallback)
    block_choices: dict[str, str] = field(default_factory=dict)  # block -> chosen candidate and errors (block_objective)
    block_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # block -> candidate -> block-output error
    block_objective_s: float = 0.0  # seconds convert spent on block_objective (second plans + trial forwards)
    notes: dict[str, str] = field(default_factory=dict)  # layer -> a configured choice planned otherwise, and why

    def summary(self) -> str:
        lines = [f"W8A8: {len(self.quantized)} layers quantized, {len(self.kept_float)} kept in float"]
        lines += [f"  float {name}: {why}" for name, why in self.kept_float.items()]
        lines += [f"  {name}: {why}" for name, why in self.act_modes.items() if why.startswith("dynamic")]
        lines += [f"  {name}: {why}" for name, why in self.block_choices.items() if not why.startswith("searched")]
        lines += [f"  {name}: {why}" for name, why in self.notes.items()]
        return "\n".join(lines)

    @classmethod
    def merged(cls, reports: Iterable["W8A8Report"]) -> "W8A8Report":
        """One report for a model quantized in parts (the streamed pipeline's units), in the parts' order: each
        field is merged by its kind (lists joined, dicts updated, seconds added), so a new field merges too."""
        out = cls()
        for r in reports:
            for f in dataclasses.fields(out):
                mine, theirs = getattr(out, f.name), getattr(r, f.name)
                if isinstance(mine, list):
                    mine.extend(theirs)
                elif isinstance(mine, dict):
                    mine.update(theirs)
                elif isinstance(mine, (int, float)):
                    setattr(out, f.name, mine + theirs)
                else:
                    raise TypeError(f"{cls.__name__}.{f.name}: no rule to merge a {type(mine).__name__}")
        return out


@dataclass
class ConversionPlan:
    """Everything convert will change, computed and validated before anything changes.

    ``layers``: layer name -> its finished replacement (a ``W8A8Linear``, or a ``RotatedInputLinear``), built from
    the weight as smoothing will leave it. ``embedding``: ``(parent, child name, new module)`` swaps.
    ``attention``: attention module -> the static query/key/value scales. ``report``: what convert will report.
    """

    smoothing: ScalePlan | None
    layers: dict[str, nn.Module]
    embedding: list[tuple[nn.Module, str, nn.Module]]
    attention: dict[str, dict[str, float]]
    report: W8A8Report
