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
quantization (:mod:`.shared_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingGroup
from tico.experimental.quantization.algorithm.smoothquant.quantizer import ScalePlan, SmoothQuantQuantizer
from tico.experimental.quantization.algorithm.smoothquant.scales import to_columns
from tico.experimental.quantization.algorithm.w8a8 import dynamic_fallback, in_quantizer_rotation, shared_inputs
from tico.experimental.quantization.algorithm.w8a8.alphas import in_quantizer_alpha_scales
from tico.experimental.quantization.algorithm.w8a8.observer import SampledChannelObserver
from tico.experimental.quantization.algorithm.w8a8.ranges import SketchCache, range_method
from tico.experimental.quantization.algorithm.w8a8.report import W8A8Report
from tico.experimental.quantization.algorithm.w8a8.search import DeployedQuant
from tico.experimental.quantization.algorithm.w8a8.targets import smoothed_linear
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.nn.qscheme import range_to_scale
from tico.experimental.quantization.progress import track
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
        """Plan ``names``, then give the layers that read one tensor one activation quantization."""
        layers = {name: self.plan(name, smoothing, report) for name in track(names, label)}
        groups = shared_inputs.shared_input_groups(self.config, names, self.observers, self.folded_by, smoothing)
        shared_inputs.unify(layers, groups, lambda n, **imposed: self.plan(n, smoothing, report, **imposed), report)
        for name, layer in layers.items():  # GPT-2's Conv1D: exported in its checkpoints' [in, out] layout
            if isinstance(layer, W8A8Linear) and linear_output_axis(self.model.get_submodule(name)) == 1:
                layer.weight_stored_transposed = True
        return layers

    def plan(
        self, name: str, smoothing: ScalePlan | None, report: W8A8Report,
        dynamic: bool | None = None, act_range: float | None = None,
    ) -> nn.Module:
        """The finished replacement of layer ``name``. ``dynamic``/``act_range`` impose the mode or the static
        range (a set of layers reading one tensor)."""
        cfg = self.config
        linear = smoothed_linear(self.sq, self.model, name, smoothing)
        inp = self.layer_input(name, linear, smoothing, report)
        if in_quantizer_rotation.matches(name, cfg.tuning.rotate_in_quantizer):
            return self.rotated(name, linear, inp, report)
        r = act_range
        if r is None and cfg.activations == "static" and not dynamic:
            r = self.static_range(name, linear, inp)
        if r is not None:
            report.act_ranges[name] = r
        if dynamic is None and act_range is None:
            dynamic = self.dynamic(name, linear, inp, r, report)
        return W8A8Linear.from_linear(
            linear, weight_granularity=cfg.weights, act_granularity="per_token" if dynamic else "per_tensor",
            act_scale=None if dynamic or r is None else range_to_scale(r), smooth_scale=inp.smooth,
            backend=cfg.tuning.backend,
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

    def rotated(self, name: str, linear: nn.Linear, inp: LayerInput, report: W8A8Report) -> nn.Module:
        """Step 2, the rotation: the layer finished by :mod:`.in_quantizer_rotation` (its own range rule)."""
        cfg = self.config
        method, note = None, None
        if cfg.activations == "static":
            method, note = in_quantizer_rotation.rotated_range_method(cfg.act_range, cfg.tuning.percentile)
        if note is not None:
            report.notes[name] = note
        layer, r = in_quantizer_rotation.rotated_layer(name, linear, inp.sample, inp.smooth, method, cfg.weights,
                                                      cfg.tuning.backend, self.quant.quantize_weight)
        if r is not None:
            report.act_ranges[name] = r
        return layer
