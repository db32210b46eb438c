"""The per-layer planner: each quantized layer's finished replacement, built from statistics and a smoothing plan.

A layer is planned in five small steps, each named after what it decides:

1. **divisor** (:meth:`LayerPlanner.layer_input`): what its input is divided by: the smoothing scale its producer
   folds, or (``tuning.smooth_in_quantizer``) a scale applied inside its own quantizer; the input's statistics
   are divided alike (``max_j max|X_j| / s_j``: no second calibration pass);
2. **rotation** (``tuning.rotate_in_quantizer``): a rotated layer is finished by :mod:`.in_quantizer_rotation`;
3. **range** (:meth:`LayerPlanner.static_range`): a static range by the configured :class:`~.ranges.RangeMethod`;
4. **mode** (:meth:`LayerPlanner.dynamic`): static or dynamic per-token (``dynamic_fallback`` decides per layer);
5. the int8 layer itself (:meth:`W8A8Linear.from_linear`).

:meth:`LayerPlanner.plan_layers` plans a set of layers, then gives layers that read one tensor one activation
quantization (:mod:`.shared_inputs`). Steps 1-4 are the layer's :class:`LayerDecision` (its searches: the costly
part); step 5 builds the layer from it (:meth:`LayerPlanner.build`). Under a process group the layers' decisions
are split over the ranks and exchanged, and every rank builds every layer from them: the layers one process plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingGroup
from tico.experimental.quantization.algorithm.smoothquant.quantizer import ScalePlan, SmoothQuantQuantizer
from tico.experimental.quantization.algorithm.smoothquant.scales import to_columns
from tico.experimental.quantization.algorithm.w8a8 import dynamic_fallback, in_quantizer_rotation, shared_inputs
from tico.experimental.quantization.algorithm.w8a8.alphas import in_quantizer_alpha_scales, in_quantizer_scales
from tico.experimental.quantization.algorithm.w8a8.observer import SampledChannelObserver
from tico.experimental.quantization.algorithm.w8a8.ranges import RangeMethod, SketchCache, range_method
from tico.experimental.quantization.algorithm.w8a8.report import W8A8Report
from tico.experimental.quantization.algorithm.w8a8.search import DeployedQuant
from tico.experimental.quantization.algorithm.w8a8.targets import smoothed_linear
from tico.experimental.quantization import distributed
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.nn.qscheme import range_to_scale
from tico.experimental.quantization.structure.producers import linear_output_axis


def needs_samples(config: W8A8Config) -> bool:
    """Whether calibration keeps a row sample per quantized input (error-minimising ranges, the alpha search,
    ``dynamic_fallback`` and in-quantizer rotations score one)."""
    ranged = config.activations == "static" and (range_method(config.act_range).needs_sample or config.mixed_modes)
    return config.alpha_search or bool(config.tuning.rotate_in_quantizer) or ranged


def deployed_quant(config: W8A8Config) -> DeployedQuant:
    """The quantizer as it will be deployed, which searches and ranges score."""
    return DeployedQuant(config.weights, config.activations, config.act_range, config.tuning.percentile)


@dataclass
class LayerInput:
    """A layer's input as its activation quantizer will see it (smoothing applied to the statistics)."""

    absmax: torch.Tensor  # per channel, over all calibration data
    sample: torch.Tensor | None  # sampled rows (fp32 once divided)
    divisor: torch.Tensor | None  # what the input is divided by (folded or in-quantizer smoothing)
    smooth: torch.Tensor | None  # the in-quantizer smoothing scale (None: none, or folded by the producer)


@dataclass
class LayerDecision:
    """What planning one layer decided, and the report entries that say so: small and picklable, so a layer
    planned on one rank is built, identically, on every rank (:meth:`LayerPlanner.build`)."""

    dynamic: bool  # per-token activations
    act_range: float | None  # the static range (None: dynamic)
    alpha: float | None = None  # the in-quantizer smoothing alpha (``tuning.smooth_in_quantizer``; None: none)
    report: W8A8Report = field(default_factory=W8A8Report)  # this layer's alphas, act_ranges, act_modes, notes


def add_entries(report: W8A8Report, part: W8A8Report) -> None:
    """``part``'s per-layer entries added to ``report`` (in order: as if planned into ``report`` directly)."""
    for mine, theirs in ((report.alphas, part.alphas), (report.act_ranges, part.act_ranges),
                         (report.act_modes, part.act_modes), (report.notes, part.notes)):
        mine.update(theirs)


class LayerPlanner:
    """Plans W8A8 replacements of layers from the observers of one calibration and a smoothing plan."""

    def __init__(
        self, model: nn.Module, config: W8A8Config, sq: SmoothQuantQuantizer | None,
        observers: dict[str, SampledChannelObserver],
        folded_by: dict[str, tuple[SmoothingGroup, tuple[int, ...] | None]], sketches: SketchCache,
    ) -> None:
        self.model, self.config, self.sq = model, config, sq
        self.observers, self.folded_by, self.sketches = observers, folded_by, sketches
        self.quant = deployed_quant(config)
        self.method = self.quant.method

    def plan_layers(
        self, names: list[str], smoothing: ScalePlan | None, report: W8A8Report, label: str
    ) -> dict[str, nn.Module]:
        """Plan ``names``, then give the layers that read one tensor one activation quantization. Each layer's
        decision is a unit of work split over the ranks of a process group (:func:`~...distributed.split_work`);
        a rank builds the layers it did not decide from the exchanged decisions."""
        built: dict[str, nn.Module] = {}

        def decide(name: str) -> LayerDecision:
            decision, built[name] = self.decide(name, smoothing)
            return decision

        decisions = distributed.split_work(label, names, [self.cost(n) for n in names], decide, progress=label)
        layers = {}
        for name in names:
            layers[name] = built.pop(name) if name in built else self.build(name, smoothing, decisions[name])
            add_entries(report, decisions[name].report)
        groups = shared_inputs.shared_input_groups(self.config, names, self.observers, self.folded_by, smoothing)
        shared_inputs.unify(layers, groups, lambda n, **imposed: self.plan(n, smoothing, report, **imposed), report)
        for name, layer in layers.items():  # GPT-2's Conv1D: exported in its checkpoints' [in, out] layout
            if isinstance(layer, W8A8Linear) and linear_output_axis(self.model.get_submodule(name)) == 1:
                layer.weight_stored_transposed = True
        return layers

    def cost(self, name: str) -> float:
        """An estimate of deciding layer ``name``: its searches score sampled (and, with ``dynamic_fallback``, the
        largest) rows through its weight, rows x in x out; what the split over ranks balances."""
        obs = self.observers[name]
        rows = 1 if obs.rows_sample is None else obs.rows_sample.shape[0]
        massive = getattr(obs, "massive_rows", None)
        rows += 0 if massive is None else massive.shape[0]
        return float(rows * self.model.get_submodule(name).weight.numel())

    def plan(
        self, name: str, smoothing: ScalePlan | None, report: W8A8Report,
        dynamic: bool | None = None, act_range: float | None = None,
    ) -> nn.Module:
        """The finished replacement of layer ``name``, its report entries added to ``report``. ``dynamic``/
        ``act_range`` impose the mode or the static range (a set of layers reading one tensor)."""
        decision, layer = self.decide(name, smoothing, dynamic, act_range)
        add_entries(report, decision.report)
        return layer

    def decide(
        self, name: str, smoothing: ScalePlan | None, dynamic: bool | None = None, act_range: float | None = None,
    ) -> tuple[LayerDecision, nn.Module]:
        """Steps 1-4 for layer ``name`` (its searches), and the layer built on the way (step 5)."""
        cfg = self.config
        part = W8A8Report()
        linear = smoothed_linear(self.sq, self.model, name, smoothing)
        inp = self.layer_input(name, linear, smoothing, part)
        alpha = part.alphas.get(name)
        if in_quantizer_rotation.matches(name, cfg.tuning.rotate_in_quantizer):
            layer, r = self.rotated(name, linear, inp, part)
            return LayerDecision(r is None, r, alpha, part), layer
        r = act_range
        if r is None and cfg.activations == "static" and not dynamic:
            r = self.static_range(name, linear, inp)
        if r is not None:
            part.act_ranges[name] = r
        if dynamic is None and act_range is None:
            dynamic = self.dynamic(name, linear, inp, r, part)
        decision = LayerDecision(bool(dynamic), None if dynamic else r, alpha, part)
        return decision, self._int8(linear, decision, inp.smooth)

    def build(self, name: str, smoothing: ScalePlan | None, decision: LayerDecision) -> nn.Module:
        """Step 5 alone: layer ``name`` from a decision made here or on another rank (no search runs)."""
        linear = smoothed_linear(self.sq, self.model, name, smoothing)
        smooth = None if decision.alpha is None else in_quantizer_scales(linear, self.observers[name])(decision.alpha)
        if in_quantizer_rotation.matches(name, self.config.tuning.rotate_in_quantizer):
            method = self._rotated_method()[0]
            return in_quantizer_rotation.rotated_layer(
                name, linear, None, smooth, None if decision.dynamic else method, self.config.weights,
                self.config.tuning.backend, self.quant.quantize_weight, act_range=decision.act_range)[0]
        return self._int8(linear, decision, smooth)

    def _int8(self, linear: nn.Linear, decision: LayerDecision, smooth: torch.Tensor | None) -> W8A8Linear:
        r = decision.act_range
        return W8A8Linear.from_linear(
            linear, weight_granularity=self.config.weights,
            act_granularity="per_token" if decision.dynamic else "per_tensor",
            act_scale=None if decision.dynamic or r is None else range_to_scale(r), smooth_scale=smooth,
            backend=self.config.tuning.backend,
        )

    def layer_input(self, name: str, linear: nn.Linear, smoothing: ScalePlan | None, report: W8A8Report) -> LayerInput:
        """Step 1, the divisor: the producer's folded scale, or in-quantizer smoothing, or none."""
        obs = self.observers[name]
        smooth = divisor = None
        if name in self.folded_by:  # its producer will emit x / s
            group, col_map = self.folded_by[name]
            divisor = to_columns(smoothing.scales[group.producer].cpu(), col_map)  # type: ignore[union-attr]
        elif self.config.tuning.smooth_in_quantizer and self.sq is not None:
            alpha, smooth = in_quantizer_alpha_scales(self.config, self.sq, name, linear, obs, self.quant, self.sketches)
            report.alphas[name] = alpha
            divisor = smooth
        if divisor is None:
            return LayerInput(obs.absmax, obs.rows_sample, None, None)
        divisor = divisor.to(obs.absmax.device)
        sample = None if obs.rows_sample is None else obs.rows_sample.float() / divisor.to(obs.rows_sample.device)
        return LayerInput(obs.absmax / divisor, sample, divisor, smooth)

    def static_range(self, name: str, linear: nn.Linear, inp: LayerInput) -> float:
        """Step 3, the range: the configured method on the divided input (its sketch shared with the search)."""
        weight = weight_q = sketch = None
        if self.method.per_weight:
            weight = linear.weight.detach().float() * (1.0 if inp.smooth is None else inp.smooth.to(linear.weight.device))
            weight_q = self.quant.quantize_weight(weight)
        rows = self.observers[name].rows_sample
        if self.method.sketched and rows is not None:  # the sketch the alpha search scored
            sketch = self.sketches.of(rows)
            sketch = sketch if inp.divisor is None else sketch.scaled(inp.divisor)
        return self.method.choose(inp.sample, float(inp.absmax.max()), weight=weight, weight_q=weight_q, sketch=sketch)

    def dynamic(self, name: str, linear: nn.Linear, inp: LayerInput, r: float | None, report: W8A8Report) -> bool:
        """Step 4, the mode: the configured one, or per layer by measured error (``dynamic_fallback``)."""
        if not self.config.mixed_modes:
            return self.config.activations == "dynamic"
        obs = self.observers[name]
        mode = dynamic_fallback.choose_layer_mode(name, linear, obs, inp.divisor, inp.smooth, inp.sample, r,
                                                  self.config.dynamic_fallback, self.config.weights, report)
        return mode == "dynamic"

    def rotated(self, name: str, linear: nn.Linear, inp: LayerInput, report: W8A8Report) -> tuple[nn.Module, float | None]:
        """Step 2, the rotation: the layer finished by :mod:`.in_quantizer_rotation` (its own range rule), and its
        static range (None: dynamic)."""
        method, note = self._rotated_method()
        if note is not None:
            report.notes[name] = note
        layer, r = in_quantizer_rotation.rotated_layer(name, linear, inp.sample, inp.smooth, method, self.config.weights,
                                                      self.config.tuning.backend, self.quant.quantize_weight)
        if r is not None:
            report.act_ranges[name] = r
        return layer, r

    def _rotated_method(self) -> tuple[RangeMethod | None, str | None]:
        """The range method of a rotated input and the note that says why it differs (None, None: dynamic)."""
        cfg = self.config
        if cfg.activations != "static":
            return None, None
        return in_quantizer_rotation.rotated_range_method(cfg.act_range, cfg.tuning.percentile)
