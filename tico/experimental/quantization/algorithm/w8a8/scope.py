"""What a :class:`W8A8Config` means for one part of a model, for the streamed pipeline (see
:class:`~tico.experimental.quantization.registry.UnitScope`): the pipeline asks, this module reads the config.

The rules are the quantizer's own (``W8A8Quantizer.prepare``'s targets, ``ignore`` and ``rotate`` matching),
restated per unit: a block's config keeps the ``ignore`` names and ``rotate`` patterns that concern it (the
quantizer refuses names that match nothing), and the smoothing part is scoped by SmoothQuant's scope.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable

from torch import nn

from tico.experimental.quantization.algorithm.smoothquant.scope import (
    SmoothQuantScope,
    merge_plans,
    output_embedding,
    quiet,
)
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.registry import register_scope
from tico.experimental.quantization.structure.names import within
from tico.experimental.quantization.structure.producers import LINEAR_OUTPUT_AXIS

_LOGGERS = ("tico.experimental.quantization.algorithm.w8a8.quantizer",
            "tico.experimental.quantization.algorithm.smoothquant.quantizer")


def rotates(name: str, pattern: str) -> bool:
    """Whether a ``W8A8Config.rotate`` pattern names layer ``name`` (``"all"``, the name, or a name suffix)."""
    return pattern == "all" or name == pattern or name.endswith("." + pattern)


@register_scope(W8A8Config)
class W8A8Scope:
    """A W8A8 config (with its smoothing, if any), unit by unit."""

    output_format = "compressed-tensors"

    def __init__(self, config: W8A8Config) -> None:
        self.config = config
        self.smoothing = SmoothQuantScope(config.smoothing) if config.smoothing is not None else None

    def check_streamable(self, writes: bool) -> None:
        """Writing needs options compressed-tensors can hold; measuring (nothing written) takes any config."""
        cfg = self.config
        refused = [f for f, on in (("rotate", bool(cfg.rotate)), ("smooth_in_quantizer", cfg.smooth_in_quantizer),
                                   ("quantize_embeddings", cfg.quantize_embeddings)) if on]
        if writes and refused:
            raise ValueError(
                f"W8A8Config({', '.join(refused)}) cannot be written as compressed-tensors (the format has no place for "
                "it); drop these options, or pass output_dir=None to measure without writing"
            )

    def check_names(self, model: nn.Module) -> None:
        modules = {n for n, _ in model.named_modules()}
        unknown = [n for n in self.config.ignore if n not in modules]
        if unknown:
            raise ValueError(f"W8A8Config.ignore names that are not modules of {type(model).__name__}: {unknown}")
        if self.smoothing is not None:
            self.smoothing.check_names(model)
        targets = self.quantized_layers(model)
        unmatched = [p for p in self.config.rotate if not any(rotates(t, p) for t in targets)]
        if unmatched:
            raise ValueError(f"W8A8Config.rotate names that match no quantized layer of {type(model).__name__}: {unmatched}")

    def for_unit(self, unit: nn.Module, block_path: str | None, blocks_path: str) -> W8A8Config:
        """The config with the names that concern ``unit`` (a block, or the rest with ``block_path=None``)."""
        modules = {n for n, _ in unit.named_modules()}
        if block_path is not None:
            ignore = tuple(n for n in self.config.ignore if n in modules
                           and (within(n, block_path) or block_path.startswith(n + ".")))
        else:
            ignore = tuple(n for n in self.config.ignore if n in modules and not within(n, blocks_path))
        smoothing = None if self.smoothing is None else self.smoothing.for_unit(unit, block_path, blocks_path)
        targets = self._targets(unit, ignore)
        rotate = tuple(p for p in self.config.rotate if any(rotates(t, p) for t in targets))
        return dataclasses.replace(self.config, smoothing=smoothing, ignore=ignore, rotate=rotate)

    def quantized_layers(self, model: nn.Module) -> list[str]:
        return self._targets(model, self.config.ignore)

    def _targets(self, unit: nn.Module, ignore: tuple[str, ...]) -> list[str]:
        """Linear-like layers of ``unit`` that W8A8 quantizes: not ignored, not a float LM head."""
        head = None if self.config.quantize_lm_head else output_embedding(unit)
        return [n for n, m in unit.named_modules()
                if isinstance(m, tuple(LINEAR_OUTPUT_AXIS)) and m is not head and not any(within(n, p) for p in ignore)]

    def leaves_vocabulary(self, model: nn.Module, blocks_path: str) -> bool:
        """Neither matrix quantized (``quantize_embeddings``/``quantize_lm_head`` off), nor smoothed into."""
        if self.config.quantize_embeddings or self.config.quantize_lm_head:
            return False
        return SmoothQuantScope.leaves_vocabulary(self, model, blocks_path)  # type: ignore[arg-type]

    def observes(self, quantizer: Any) -> bool:
        """Its layers' observers or attention quantization (the smoothing observes only what its layers read)."""
        return bool(quantizer.observers) or bool(quantizer.attention_modules)

    def export_forms(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """Per quantized layer, the int8 layer ``convert`` builds for it in each activation mode the config allows
        (static layers may turn dynamic with ``dynamic_fallback``), on the meta device, through the quantizer's
        own construction (``as_linear`` then ``W8A8Linear.from_linear``)."""
        from tico.experimental.quantization.algorithm.w8a8.quantizer import as_linear

        cfg = self.config
        dynamic = [cfg.activations == "dynamic"] + ([True] if cfg.activations == "static" and cfg.dynamic_fallback else [])
        forms: dict[str, list[nn.Module]] = {}
        for name in self.quantized_layers(model):
            linear = as_linear(model.get_submodule(name))
            forms[name] = [
                W8A8Linear.from_linear(linear, weight_granularity=cfg.weights,
                                       act_granularity="per_token" if d else "per_tensor",
                                       act_scale=None if d else 1.0, backend=cfg.backend)
                for d in dynamic
            ]
        return forms

    def merged_plan(self, outcomes: Iterable[Any]) -> Any:
        return merge_plans(outcomes)

    def merged_report(self, outcomes: Iterable[Any]) -> Any:
        return merge_reports([o.report for o in outcomes if getattr(o, "report", None) is not None])

    def quiet_outside_blocks(self) -> contextlib.AbstractContextManager[None]:
        return quiet(*_LOGGERS)


def merge_reports(reports: list[Any]) -> Any:
    """The units' W8A8 reports as one, in the units' order (None for none): each field of the report dataclass is
    merged by its kind (lists concatenated, dicts updated, seconds added), so a new report field merges too."""
    if not reports:
        return None
    merged = type(reports[0])()
    for report in reports:
        for f in dataclasses.fields(merged):
            mine, theirs = getattr(merged, f.name), getattr(report, f.name)
            if isinstance(mine, list):
                mine.extend(theirs)
            elif isinstance(mine, dict):
                mine.update(theirs)
            elif isinstance(mine, (int, float)):
                setattr(merged, f.name, mine + theirs)
            else:
                raise TypeError(f"{type(merged).__name__}.{f.name}: no rule to merge a {type(mine).__name__}")
    return merged
