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
from tico.experimental.quantization.algorithm.w8a8.in_quantizer_rotation import matches
from tico.experimental.quantization.algorithm.w8a8.report import W8A8Report
from tico.experimental.quantization.algorithm.w8a8.targets import as_linear
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.registry import register_scope
from tico.experimental.quantization.structure import names
from tico.experimental.quantization.structure.names import within
from tico.experimental.quantization.structure.producers import LINEAR_OUTPUT_AXIS, linear_output_axis

_LOGGERS = ("tico.experimental.quantization.algorithm.w8a8.quantizer",
            "tico.experimental.quantization.algorithm.smoothquant.quantizer")


@register_scope(W8A8Config)
class W8A8Scope:
    """A W8A8 config (with its smoothing, if any), unit by unit."""

    output_format = "compressed-tensors"

    def __init__(self, config: W8A8Config) -> None:
        self.config = config
        self.smoothing = SmoothQuantScope(config.smoothing) if config.smoothing is not None else None

    def check_streamable(self, writes: bool) -> None:
        """Writing needs options compressed-tensors can hold; measuring (nothing written) takes any config."""
        refused = self.config.unexportable_options()
        if writes and refused:
            raise ValueError(
                f"W8A8Config({', '.join(refused)}) cannot be written as compressed-tensors (the format has no place for "
                "it); drop these options, or pass output_dir=None to measure without writing"
            )

    def check_names(self, model: nn.Module) -> None:
        modules = {n for n, _ in model.named_modules()}
        unknown = names.unmatched(self.config.ignore, modules)
        if unknown:
            raise ValueError(f"W8A8Config.ignore names that are not modules of {type(model).__name__}: {unknown}")
        if self.smoothing is not None:
            self.smoothing.check_names(model)
        targets = self.quantized_layers(model)
        unmatched = [p for p in self.config.tuning.rotate_in_quantizer if not any(matches(t, (p,)) for t in targets)]
        if unmatched:
            raise ValueError(f"W8A8Tuning.rotate_in_quantizer names that match no quantized layer of "
                             f"{type(model).__name__}: {unmatched}")

    def for_unit(self, unit: nn.Module, block_path: str | None, blocks_path: str) -> W8A8Config:
        """The config with the names that concern ``unit`` (a block, or the rest with ``block_path=None``)."""
        modules = {n for n, _ in unit.named_modules()}
        mine = [m for m in modules if (within(m, block_path) if block_path is not None else not within(m, blocks_path))]
        ignore = tuple(k for k in self.config.ignore if any(names.matches(k, m, inside=True) for m in mine))
        smoothing = None if self.smoothing is None else self.smoothing.for_unit(unit, block_path, blocks_path)
        targets = self._targets(unit, ignore)
        rotate = tuple(p for p in self.config.tuning.rotate_in_quantizer if any(matches(t, (p,)) for t in targets))
        scoped = dataclasses.replace(self.config, smoothing=smoothing, ignore=ignore)
        return scoped.with_tuning(rotate_in_quantizer=rotate)

    def quantized_layers(self, model: nn.Module) -> list[str]:
        return self._targets(model, self.config.ignore)

    def _targets(self, unit: nn.Module, ignore: tuple[str, ...]) -> list[str]:
        """Linear-like layers of ``unit`` that W8A8 quantizes: not ignored, not a float LM head."""
        head = None if self.config.quantize_lm_head else output_embedding(unit)
        return [n for n, m in unit.named_modules()
                if isinstance(m, tuple(LINEAR_OUTPUT_AXIS)) and m is not head
                and not any(names.matches(p, n, inside=True) for p in ignore)]

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
        cfg = self.config
        dynamic = [cfg.activations == "dynamic"] + ([True] if cfg.activations == "static" and cfg.dynamic_fallback else [])
        forms: dict[str, list[nn.Module]] = {}
        for name in self.quantized_layers(model):
            module = model.get_submodule(name)
            forms[name] = [
                W8A8Linear.from_linear(as_linear(module), weight_granularity=cfg.weights,
                                       act_granularity="per_token" if d else "per_tensor",
                                       act_scale=None if d else 1.0, backend=cfg.tuning.backend)
                for d in dynamic
            ]
            for layer in forms[name]:  # as the planner marks it: GPT-2's Conv1D keeps its [in, out] layout
                layer.weight_stored_transposed = linear_output_axis(module) == 1
        return forms

    def merged_plan(self, outcomes: Iterable[Any]) -> Any:
        return merge_plans(outcomes)

    def merged_report(self, outcomes: Iterable[Any]) -> Any:
        reports = [o.report for o in outcomes if getattr(o, "report", None) is not None]
        return W8A8Report.merged(reports) if reports else None

    def quiet_outside_blocks(self) -> contextlib.AbstractContextManager[None]:
        return quiet(*_LOGGERS)
