"""W8A8 behind the prepare/convert contract, with SmoothQuant composed into the same calibration pass.

This module is the lifecycle only; each decision lives in a module named after it:

* prepare: check that every requested feature fits the model (:mod:`.targets`; ``ignore`` and
  ``rotate_in_quantizer`` names, an ``nn.Embedding`` for ``quantize_embeddings`` (:mod:`.embeddings`), an attention
  interface for ``quantize_attention`` (:mod:`.attention`)), discover smoothing groups (SmoothQuant's own
  observers, one per group), record decoder blocks for ``block_objective`` (:mod:`.block_objective`) and hook one
  sampled observer per quantized Linear input (:mod:`.observer`, :mod:`.dynamic_fallback`).
* convert: reduce the statistics over the ranks of a process group (a no-op merge in one process), then **plan** everything from the statistics (alphas, :mod:`.alphas`; smoothing scales through
  SmoothQuant's public ``plan_scales``; per layer its replacement, :mod:`.planner`; the block choices; the int8
  embedding; the attention scales), **validate** the whole plan (one error naming every offending module), then
  **apply** it in four journaled steps (:mod:`.apply`). Any error, before or during apply, leaves the model
  exactly as it was, still prepared.

Under a process group the costly parts of planning are split over the ranks, each unit computed once and the
decisions exchanged (``distributed.split_work``): the alpha search per smoothing group (:mod:`.alphas`), each
layer's decision (range, mode, in-quantizer alpha; :mod:`.planner`, the block objective's candidates included)
and the block objective's trial forwards (:mod:`.block_objective`). Every rank then applies the same plan, the
one a single process makes.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from tico.experimental.quantization.algorithm.smoothquant.groups import ObservationPoint, SmoothingGroup
from tico.experimental.quantization.algorithm.smoothquant.quantizer import ScalePlan, SmoothQuantQuantizer
from tico.experimental.quantization.algorithm.w8a8 import apply, attention, block_objective, dynamic_fallback
from tico.experimental.quantization.algorithm.w8a8.alphas import group_alphas
from tico.experimental.quantization.algorithm.w8a8.embeddings import input_embedding, plan_embeddings
from tico.experimental.quantization.algorithm.w8a8.in_quantizer_rotation import matches
from tico.experimental.quantization.algorithm.w8a8.observer import SampledChannelObserver
from tico.experimental.quantization.algorithm.w8a8.planner import LayerPlanner, needs_samples
from tico.experimental.quantization.algorithm.w8a8.ranges import SketchCache
from tico.experimental.quantization.algorithm.w8a8.report import ConversionPlan, W8A8Report
from tico.experimental.quantization.algorithm.w8a8.targets import select_targets, weight_rows
from tico.experimental.quantization import distributed
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.quantizer import BaseQuantizer
from tico.experimental.quantization.registry import register_quantizer

__all__ = ["ConversionPlan", "W8A8Quantizer", "W8A8Report"]

logger = logging.getLogger(__name__)


@register_quantizer(W8A8Config)
class W8A8Quantizer(BaseQuantizer):
    """Quantizes every Linear-like layer to int8 weights and int8 activations, smoothing first if configured."""

    config: W8A8Config
    title = "W8A8"

    def __init__(self, config: W8A8Config) -> None:
        super().__init__(config)
        self.sq = SmoothQuantQuantizer(config.smoothing) if config.smoothing is not None else None
        self.targets: list[str] = []
        self.folded_by: dict[str, tuple[SmoothingGroup, tuple[int, ...] | None]] = {}  # layer -> (group, col map)
        self.observers: dict[str, SampledChannelObserver] = {}  # quantized layer -> its input's statistics
        self.points: dict[str, ObservationPoint] = {}
        self.report = W8A8Report()
        self.attention_modules: list[str] = []
        self._attention_before: str | None = None  # the attention implementation prepare replaced
        self.switchable: dict[str, list[str]] = {}  # block_objective: block -> producers of its switchable groups
        self.recorder: block_objective.BlockRecorder | None = None

    @property
    def plan(self):
        """The smoothing plan (None without smoothing)."""
        return None if self.sq is None else self.sq.plan

    # -- prepare -------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None) -> nn.Module:
        cfg = self.config
        self.targets, kept = select_targets(model, cfg)
        if not self.targets:
            logger.warning("W8A8 found no Linear layer to quantize in %s", type(model).__name__)
        rotated = cfg.tuning.rotate_in_quantizer
        unmatched = [r for r in rotated if not any(matches(t, (r,)) for t in self.targets)]
        if unmatched:
            raise ValueError(f"W8A8Tuning.rotate_in_quantizer names that match no quantized layer: {unmatched}")
        if cfg.quantize_embeddings:
            input_embedding(model)  # raises now rather than at convert
        if self.sq is not None:
            for g in self.sq.discover(model, args, kwargs).smoothed:
                for c in g.consumers:
                    self.folded_by[c.module] = (g, c.channel_map)
        self.switchable, self.recorder = {}, None
        if cfg.block_objective and self.sq is not None:
            self.switchable, self.recorder = block_objective.find_switchable(model, self.sq, cfg.tuning.block_objective_tokens)
        self._add_observers(model)
        if cfg.tuning.quantize_attention:
            self.attention_modules, self._attention_before = attention.install(model)
        try:
            self.attach(model)
        except BaseException:
            self._uninstall_attention(model)
            raise
        self.report = W8A8Report(kept_float=kept)
        return model

    def _add_observers(self, model: nn.Module) -> None:
        """Every quantized layer's own input: its static range and search sample (and, with ``dynamic_fallback``,
        its largest rows)."""
        rows = self.config.tuning.calibration_rows if needs_samples(self.config) else 0
        observer = dynamic_fallback.MassiveRowObserver if self.config.mixed_modes else SampledChannelObserver
        for name in self.targets:
            self.observers[name] = observer(weight_rows(model.get_submodule(name)).shape[1], rows,
                                            seed=self.config.tuning.sample_seed)
            self.points[name] = ObservationPoint(name, "input", 0)

    def _uninstall_attention(self, model: nn.Module) -> None:
        if self.attention_modules:
            attention.uninstall(model, self.attention_modules, self._attention_before)  # type: ignore[arg-type]

    # -- hooks ---------------------------------------------------------------------------------------------
    def install_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        handles = [obs.attach(model, self.points[name]) for name, obs in self.observers.items()]
        if self.recorder is not None:
            handles += self.recorder.install(model)
        return handles

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        if self.sq is not None:
            try:
                self.sq.attach(model)
            except BaseException:
                super().detach(model)
                raise

    def detach(self, model: nn.Module) -> None:
        super().detach(model)
        if self.sq is not None:
            self.sq.detach(model)

    # -- convert -------------------------------------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
        """Plan, validate, then apply; an error at any point leaves ``model`` exactly as it was (still prepared).

        After convert, besides the swapped modules: with ``quantize_attention`` each attention module keeps its
        :class:`~tico.experimental.quantization.algorithm.w8a8.attention.AttentionQuantState` (fixed scales) and
        the model's attention implementation stays ``"tico_w8a8_sdpa"`` (see that module's docstring).
        """
        self.reduce_statistics(model)
        with distributed.together("W8A8 planning"):  # a rank that fails stops every rank here
            plan = self.plan_conversion(model)
        apply.apply_plan(self.sq, model, plan)
        self.report = plan.report
        logger.info("%s", self.report.summary())
        return model

    def statistics(self, model: nn.Module) -> dict[str, distributed.Reducible]:
        """Smoothing's observers, each quantized layer's input observer, the attention maxima and the block
        recorder: everything :meth:`plan_conversion` reads, reduced over ranks by :meth:`reduce_statistics`."""
        items = dict(self.sq.statistics(model)) if self.sq is not None else {}
        items.update({f"input:{name}": obs for name, obs in self.observers.items()})
        items.update({f"attention:{n}": s for n, s in attention.states(model, self.attention_modules).items()})
        if self.recorder is not None:
            items["block_recorder"] = self.recorder
        return items

    def plan_conversion(self, model: nn.Module) -> ConversionPlan:
        """Every change convert will make, validated; raises one :class:`QuantizationError` listing every problem."""
        attention_scales = self._check_statistics(model)
        sketches = SketchCache()  # range sketches of the samples, shared by searches and ranges (this convert)
        planner = LayerPlanner(model, self.config, self.sq, self.observers, self.folded_by, sketches)
        report = W8A8Report(kept_float=dict(self.report.kept_float))
        smoothing = self._plan_smoothing(model, planner, report)
        layers = planner.plan_layers(self.targets, smoothing, report, "planning int8 layers (ranges)")
        if smoothing is not None and self.recorder is not None and self.switchable:
            block_objective.choose_per_block(planner, self.recorder, self.switchable, smoothing, layers, report,
                                             attention_scales)
        report.quantized = list(layers)
        embedding = plan_embeddings(model, layers, report) if self.config.quantize_embeddings else []
        return ConversionPlan(smoothing, layers, embedding, attention_scales, report)

    def _check_statistics(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """Fail (naming every problem) unless every statistic the plan needs is valid; the attention scales."""
        observed = [(name, obs) for name, obs in self.observers.items()]
        if self.sq is not None:
            observed = self.sq.observed() + observed
        errors = self.statistics_errors(observed)
        attention_scales, unseen = attention.plan_scales(model, self.attention_modules)
        if unseen:
            errors.append(f"attention inputs never observed in {unseen}")
        if self.config.quantize_embeddings:
            try:
                input_embedding(model)
            except ValueError as exc:
                errors.append(str(exc))
        self.fail(model, errors)  # the searches and ranges need valid statistics
        return attention_scales

    def _plan_smoothing(self, model: nn.Module, planner: LayerPlanner, report: W8A8Report) -> ScalePlan | None:
        """SmoothQuant's scales (alphas searched with ``alpha="auto"``), validated; None without smoothing."""
        if self.sq is None:
            return None
        alphas = group_alphas(self.config, self.sq, model, self.observers, planner.quant, planner.sketches)
        smoothing = self.sq.plan_scales(model, alphas=alphas)
        self.fail(model, self.sq.validate(model, smoothing))
        report.alphas.update(smoothing.alphas)
        return smoothing
