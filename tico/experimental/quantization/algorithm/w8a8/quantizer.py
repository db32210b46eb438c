"""W8A8 behind the prepare/convert contract, with SmoothQuant composed into the same calibration pass.

prepare: check that every requested feature fits the model (ignore/rotate names, an ``nn.Embedding`` for
``quantize_embeddings``, an attention interface for ``quantize_attention``), discover smoothing groups (if
smoothing is configured; SmoothQuant's own observers, one per group) and hook one sampled observer per
quantized Linear input.
convert: **plan** everything from the statistics (alphas, smoothing scales through SmoothQuant's public
``plan_scales``, per layer its divisor, in-quantizer smoothing, rotation, static range and the finished int8
module built from the smoothed weight; the int8 embedding; the attention scales), **validate** the whole plan
(one error naming every offending module), then **apply** it in four journaled steps (fold the smoothing,
swap the layers, swap the embedding, fix the attention scales). Any error, before or during apply, leaves
the model exactly as it was, still prepared.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tico.experimental.quantization.algorithm.smoothquant.groups import ObservationPoint, SmoothingGroup
from tico.experimental.quantization.structure.producers import LINEAR_OUTPUT_AXIS, linear_output_axis
from tico.experimental.quantization.algorithm.smoothquant.quantizer import ScalePlan, SmoothQuantQuantizer
from tico.experimental.quantization.algorithm.smoothquant.scales import channel_absmax, smoothing_scales, to_columns
from tico.experimental.quantization.algorithm.w8a8 import attention, block_objective, dynamic_fallback
from tico.experimental.quantization.algorithm.w8a8.observer import SampledChannelObserver
from tico.experimental.quantization.algorithm.w8a8.ranges import SketchCache, static_range
from tico.experimental.quantization.algorithm.w8a8.rotation import RotatedInputLinear, random_rotation, rotate
from tico.experimental.quantization.algorithm.w8a8.search import DeployedQuant, Term, search_alpha
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.quantizer import BaseQuantizer, Transaction
from tico.experimental.quantization.registry import register_quantizer
from tico.experimental.quantization.nn.embedding import Int8Embedding, Int8TiedHead
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.nn.qscheme import range_to_scale
from tico.experimental.quantization.progress import track
from tico.experimental.quantization.structure.blocks import decoder_blocks
from tico.experimental.quantization.structure.names import within

logger = logging.getLogger(__name__)

LINEAR_TYPES = tuple(LINEAR_OUTPUT_AXIS)  # nn.Linear and GPT-2's Conv1D, as for smoothing producers


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear`` (GPT-2 ``Conv1D`` is transposed into one; its parameters are not shared)."""
    if isinstance(module, nn.Linear):
        return module
    weight = module.weight.detach().t()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def _linear_from(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight``/``bias`` (``module``'s layout) without copying an ``nn.Linear``'s
    tensors; GPT-2 ``Conv1D`` weights are transposed into a contiguous ``[out, in]`` copy, as :func:`as_linear`."""
    if not isinstance(module, nn.Linear):
        weight = weight.t().contiguous()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _weight_rows(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` fp32 (a view for ``nn.Linear``)."""
    w = module.weight.detach()
    return (w if isinstance(module, nn.Linear) else w.t()).float()


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

    def summary(self) -> str:
        lines = [f"W8A8: {len(self.quantized)} layers quantized, {len(self.kept_float)} kept in float"]
        lines += [f"  float {name}: {why}" for name, why in self.kept_float.items()]
        lines += [f"  {name}: {why}" for name, why in self.act_modes.items() if why.startswith("dynamic")]
        lines += [f"  {name}: {why}" for name, why in self.block_choices.items() if not why.startswith("searched")]
        return "\n".join(lines)


@dataclass
class ConversionPlan:
    """Everything convert will change, computed and validated before anything changes.

    ``layers``: layer name -> its finished replacement (a :class:`W8A8Linear`, or a :class:`RotatedInputLinear`),
    built from the weight as smoothing will leave it. ``embedding``: ``(parent, child name, new module)`` swaps.
    ``attention``: attention module -> the static query/key/value scales. ``report``: what convert will report.
    """

    smoothing: ScalePlan | None
    layers: dict[str, nn.Module]
    embedding: list[tuple[nn.Module, str, nn.Module]]
    attention: dict[str, dict[str, float]]
    report: W8A8Report


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
        self._sketches = SketchCache()  # range sketches of the samples, shared by searches and ranges (one convert)
        self.switchable: dict[str, list[str]] = {}  # block_objective: block -> producers of its switchable groups
        self.recorder: block_objective.BlockRecorder | None = None

    @property
    def plan(self):
        """The smoothing plan (None without smoothing)."""
        return None if self.sq is None else self.sq.plan

    # -- prepare -------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None) -> nn.Module:
        cfg = self.config
        self.targets, kept = self._select_targets(model)
        if not self.targets:
            logger.warning("W8A8 found no Linear layer to quantize in %s", type(model).__name__)
        unmatched = [r for r in cfg.rotate if not any(self._rotated(t, (r,)) for t in self.targets)]
        if unmatched:
            raise ValueError(f"W8A8Config.rotate names that match no quantized layer: {unmatched}")
        if cfg.quantize_embeddings:
            self._input_embedding(model)  # raises now rather than at convert
        if self.sq is not None:
            for g in self.sq.discover(model, args, kwargs).smoothed:
                for c in g.consumers:
                    self.folded_by[c.module] = (g, c.channel_map)
        self.switchable, self.recorder = {}, None
        if cfg.block_objective and self.sq is not None:
            self._find_switchable(model)
        rows = cfg.calibration_rows if cfg.needs_samples else 0
        observer = dynamic_fallback.MassiveRowObserver if self._mixed_modes else SampledChannelObserver
        for name in self.targets:  # every quantized layer's own input: its static range and search sample
            self.observers[name] = observer(_weight_rows(model.get_submodule(name)).shape[1], rows)
            self.points[name] = ObservationPoint(name, "input", 0)
        if cfg.quantize_attention:
            self.attention_modules, self._attention_before = attention.install(model)
        try:
            self.attach(model)
        except BaseException:
            self._uninstall_attention(model)
            raise
        self.report = W8A8Report(kept_float=kept)
        return model

    def _find_switchable(self, model: nn.Module) -> None:
        """``block_objective``: the smoothed groups that lie inside one decoder block (producer and consumers),
        per block, and a recorder of those blocks' calibration calls."""
        assert self.sq is not None
        blocks = decoder_blocks(model)
        for g in self.sq.plan.smoothed:
            for b in blocks:
                if within(g.producer, b) and all(within(c.module, b) for c in g.consumers):
                    self.switchable.setdefault(b, []).append(g.producer)
                    break
        if not blocks:
            logger.warning("W8A8Config.block_objective: no decoder blocks found in %s; the searched smoothing is kept",
                           type(model).__name__)
        self.recorder = block_objective.BlockRecorder(list(self.switchable), self.config.block_objective_tokens)

    def _uninstall_attention(self, model: nn.Module) -> None:
        if self.attention_modules:
            attention.uninstall(model, self.attention_modules, self._attention_before)  # type: ignore[arg-type]

    @property
    def _mixed_modes(self) -> bool:
        """``dynamic_fallback``: static layers may each turn dynamic per-token, by measured error."""
        return self.config.activations == "static" and self.config.dynamic_fallback is not None

    @staticmethod
    def _rotated(name: str, patterns: tuple[str, ...]) -> bool:
        return any(p == "all" or name == p or name.endswith("." + p) for p in patterns)

    def _select_targets(self, model: nn.Module) -> tuple[list[str], dict[str, str]]:
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        targets, kept = [], {}
        for name, module in model.named_modules():
            if any(name == p or name.startswith(p + ".") for p in self.config.ignore):
                if isinstance(module, LINEAR_TYPES):
                    kept[name] = "in W8A8Config.ignore"
                continue
            if isinstance(module, LINEAR_TYPES):
                if module is head and not self.config.quantize_lm_head:
                    kept[name] = "output embedding (LM head) is kept in float; set quantize_lm_head=True to quantize it"
                else:
                    targets.append(name)
            elif any(p.dim() == 3 for p in module.parameters(recurse=False)):
                kept[name] = "fused expert tensors are not quantized yet (only Linear-like layers are)"
        unknown = [p for p in self.config.ignore if p not in dict(model.named_modules())]
        if unknown:
            raise ValueError(f"W8A8Config.ignore names that are not modules of {type(model).__name__}: {unknown}")
        return targets, kept

    @staticmethod
    def _input_embedding(model: nn.Module) -> nn.Embedding:
        get_in = getattr(model, "get_input_embeddings", None)
        try:
            embedding = get_in() if callable(get_in) else None
        except (NotImplementedError, AttributeError):  # transformers' default for models without one
            embedding = None
        if not isinstance(embedding, nn.Embedding):
            what = "none (no get_input_embeddings())" if embedding is None else f"{type(embedding).__name__}"
            raise ValueError(
                f"W8A8Config.quantize_embeddings: {type(model).__name__}'s input embedding is {what}, "
                "not an nn.Embedding; leave quantize_embeddings off"
            )
        return embedding

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
        plan = self.plan_conversion(model)
        with Transaction() as tx:
            self._apply_smoothing(model, plan, tx)
            self._apply_layers(model, plan, tx)
            self._apply_embeddings(model, plan, tx)
            self._apply_attention(model, plan, tx)
        self.report = plan.report
        logger.info("%s", self.report.summary())
        return model

    def plan_conversion(self, model: nn.Module) -> ConversionPlan:
        """Every change convert will make, validated; raises one :class:`QuantizationError` listing every problem."""
        cfg = self.config
        observed = [(name, obs) for name, obs in self.observers.items()]
        if self.sq is not None:
            observed = self.sq.observed() + observed
        errors = self.statistics_errors(observed)
        attention_scales, unseen = attention.plan_scales(model, self.attention_modules)
        if unseen:
            errors.append(f"attention inputs never observed in {unseen}")
        if cfg.quantize_embeddings:
            try:
                self._input_embedding(model)
            except ValueError as exc:
                errors.append(str(exc))
        self.fail(model, errors)  # the searches and ranges below need valid statistics
        quant = DeployedQuant(cfg.weights, cfg.activations, cfg.act_range, cfg.percentile, cfg.alpha_objective)
        self._sketches = SketchCache()
        report = W8A8Report(kept_float=dict(self.report.kept_float))
        smoothing = None
        if self.sq is not None:
            alphas = self._search_group_alphas(model, quant) if self.sq.config.alpha_is_auto else None
            smoothing = self.sq.plan_scales(model, alphas=alphas)
            self.fail(model, self.sq.validate(model, smoothing))
            report.alphas.update(smoothing.alphas)
        layers = self._plan_layers(model, self.targets, smoothing, quant, report, "planning int8 layers (ranges)")
        if smoothing is not None and self.recorder is not None and self.switchable:
            self._choose_per_block(model, smoothing, layers, quant, report, attention_scales)
        report.quantized = list(layers)
        embedding = self._plan_embeddings(model, layers, report) if cfg.quantize_embeddings else []
        self._sketches = SketchCache()  # frees the sketches
        return ConversionPlan(smoothing, layers, embedding, attention_scales, report)

    def _plan_layers(
        self, model: nn.Module, names: list[str], smoothing: ScalePlan | None, quant: DeployedQuant,
        report: W8A8Report, label: str,
    ) -> dict[str, nn.Module]:
        """Plan ``names``, then give the layers that read one tensor one activation quantization.

        ``q/k/v_proj`` (after one norm) and ``gate/up_proj`` read the same input, and serving engines run each set
        as one fused GEMM with one input quantization (vLLM's ``qkv_proj``/``gate_up_proj``: the largest static
        scale of the set, and one static/dynamic mode). Choices made per layer (``dynamic_fallback``'s mode,
        ``output_mse``'s weight-dependent range) can differ inside a set; they are made common here, so the model
        we measure is the one that is served: dynamic when any member needs dynamic (per-token scales are never
        coarser), else the largest static range (nothing clipped that a member kept).
        """
        layers = {name: self._plan_layer(model, name, smoothing, quant, report) for name in track(names, label)}
        for group in self._shared_input_groups(names, smoothing):
            dynamic = [n for n in group if getattr(layers[n], "act_scale", 1.0) is None]
            if dynamic and len(dynamic) < len(group):
                for n in group:
                    if n not in dynamic:
                        layers[n] = self._plan_layer(model, n, smoothing, quant, report, dynamic=True)
                        report.act_modes[n] = f"dynamic: shares its input with {dynamic[0]}, which needs dynamic"
                        report.act_ranges.pop(n, None)
            elif not dynamic:
                ranges = {n: report.act_ranges[n] for n in group if n in report.act_ranges}
                top = max(ranges.values(), default=None)
                for n, r in ranges.items():
                    if r != top:
                        layers[n] = self._plan_layer(model, n, smoothing, quant, report, act_range=top)
        for name, layer in layers.items():  # GPT-2's Conv1D: exported in its checkpoints' [in, out] layout
            if isinstance(layer, W8A8Linear) and linear_output_axis(model.get_submodule(name)) == 1:
                layer.weight_stored_transposed = True
        return layers

    def _shared_input_groups(self, names: list[str], smoothing: ScalePlan | None) -> list[list[str]]:
        """Sets of two or more layers that quantize the same tensor: their observers saw the same input objects
        (so they share one row sample, see ``observer``) and they divide it by the same smoothing scales."""
        cfg = self.config
        if cfg.activations != "static" or cfg.smooth_in_quantizer or cfg.rotate:
            return []  # dynamic: per-token, identical anyway; per-layer divisors/rotations: different inputs
        sets: dict[tuple[int, str | None], list[str]] = {}
        for name in names:
            sample = self.observers[name].rows_sample
            if sample is None:
                continue  # abs-max ranges of one tensor are equal anyway
            folded = self.folded_by.get(name)
            producer = folded[0].producer if folded is not None and smoothing is not None else None
            sets.setdefault((id(sample), producer), []).append(name)
        return [group for group in sets.values() if len(group) > 1]

    def _plan_layer(
        self, model: nn.Module, name: str, smoothing: ScalePlan | None, quant: DeployedQuant, report: W8A8Report,
        dynamic: bool | None = None, act_range: float | None = None,
    ) -> nn.Module:
        """The finished replacement of layer ``name``: divisor, in-quantizer smoothing, rotation, static range.

        ``dynamic``/``act_range`` impose the mode or the static range (a set of layers reading one tensor)."""
        cfg = self.config
        obs = self.observers[name]
        module = model.get_submodule(name)
        linear = self._smoothed_linear(model, name, module, smoothing)
        act_absmax, sample = obs.absmax, obs.rows_sample  # of the unsmoothed input
        smooth = None
        divisor = None
        if name in self.folded_by:  # its producer will emit x / s
            group, col_map = self.folded_by[name]
            divisor = to_columns(smoothing.scales[group.producer].cpu(), col_map)  # type: ignore[union-attr]
        elif cfg.smooth_in_quantizer and self.sq is not None:
            smooth = divisor = self._in_quantizer_scales(name, linear, obs, quant, report)
        if divisor is not None:
            divisor = divisor.to(act_absmax.device)
            act_absmax = act_absmax / divisor
            sample = None if sample is None else sample.float() / divisor.to(sample.device)
        if self._rotated(name, cfg.rotate):
            return self._rotated_layer(name, linear, sample, smooth, quant, report)
        act_scale = None
        if act_range is not None:
            report.act_ranges[name] = act_range
            act_scale = range_to_scale(act_range)
        elif cfg.activations == "static" and not dynamic:
            weight = weight_q = None
            if cfg.act_range == "output_mse":
                weight = linear.weight.detach().float() * (1.0 if smooth is None else smooth.to(linear.weight.device))
                weight_q = quant.quantize_weight(weight)
            sketch = None
            if cfg.act_range == "mse" and obs.rows_sample is not None:  # the sketch the alpha search scored
                sketch = self._sketches.of(obs.rows_sample)
                sketch = sketch if divisor is None else sketch.scaled(divisor)
            r = static_range(cfg.act_range, sample, float(act_absmax.max()), cfg.percentile, weight, weight_q, sketch)
            report.act_ranges[name] = r
            act_scale = range_to_scale(r)
        if dynamic is None and act_range is None:
            dynamic = cfg.activations == "dynamic"
            if self._mixed_modes:  # static or dynamic for this layer, by measured error
                dynamic = self._choose_mode(name, linear, obs, divisor, smooth, sample, r, quant, report) == "dynamic"
        act_scale = None if dynamic else act_scale
        return W8A8Linear.from_linear(
            linear,
            weight_granularity=cfg.weights,
            act_granularity="per_token" if dynamic else "per_tensor",
            act_scale=act_scale,
            smooth_scale=smooth,
            backend=cfg.backend,
        )

    def _choose_per_block(
        self, model: nn.Module, smoothing: ScalePlan, layers: dict[str, nn.Module], quant: DeployedQuant,
        report: W8A8Report, attention_scales: dict[str, dict[str, float]],
    ) -> None:
        """``block_objective``: per block, the searched smoothing, none, or one of ``block_objective_alphas`` for
        the block's groups, whichever quantized block reproduces the float block's recorded output best;
        ``smoothing``, ``layers`` and ``report`` are updated in place."""
        assert self.sq is not None and self.recorder is not None
        start = time.perf_counter()
        switched = {p for producers in self.switchable.values() for p in producers}
        touched = [n for n in layers if n in switched or (n in self.folded_by and self.folded_by[n][0].producer in switched)]
        groups = {g.producer: g for g in self.sq.plan.smoothed if g.producer in switched}

        def folded_of(plan: ScalePlan) -> dict[str, torch.Tensor]:
            folded = {}  # the producers' own parameters the fold changes (norm weights, biases)
            for p in switched:
                if p in layers:
                    continue  # a Linear producer is replaced by its planned layer
                for pname, _ in model.get_submodule(p).named_parameters(recurse=False):
                    folded[f"{p}.{pname}"] = self.sq.smoothed_parameter(model, plan, f"{p}.{pname}")  # type: ignore[union-attr]
            return folded

        # name -> (plan, its layers, its report); "searched" is the plan as it is
        others: dict[str, tuple[ScalePlan, dict[str, nn.Module], W8A8Report]] = {}
        variants: list[tuple[str, float | None]] = [("unsmoothed", None)]
        variants += [(f"alpha={a:g}", float(a)) for a in self.config.block_objective_alphas]
        for cname, a in variants:
            if a is None:
                scales = {p: torch.ones_like(s) if p in switched else s for p, s in smoothing.scales.items()}
                alphas = dict(smoothing.alphas)
            else:
                scales = {p: self.sq.scales_for(model, groups[p])(a) if p in switched else s
                          for p, s in smoothing.scales.items()}
                alphas = {p: a if p in switched else v for p, v in smoothing.alphas.items()}
            plan = ScalePlan(alphas=alphas, scales=scales)
            problems = self.sq.validate(model, plan)
            if problems:
                logger.warning("block_objective: candidate %s dropped: %s", cname, problems[:3])
                continue
            report_c = W8A8Report()
            layers_c = dict(layers)
            layers_c.update(self._plan_layers(model, touched, plan, quant, report_c,
                                              f"planning {cname} candidates (block objective)"))
            others[cname] = (plan, layers_c, report_c)
        candidates = [block_objective.Candidate("searched", folded_of(smoothing), layers)]
        candidates += [block_objective.Candidate(n, folded_of(plan) if n != "unsmoothed" else {}, lc)
                       for n, (plan, lc, _) in others.items()]
        choices = block_objective.choose(model, self.switchable, candidates, self.recorder, attention_scales,
                                      attention.STATE_ATTR)
        for block, choice in choices.items():
            report.block_choices[block] = choice.describe()
            report.block_errors[block] = dict(choice.errors)
            if choice.chosen == "searched":
                continue
            plan, layers_c, report_c = others[choice.chosen]
            for p in choice.groups:
                smoothing.scales[p] = plan.scales[p]
                smoothing.alphas[p] = plan.alphas[p]
                if choice.chosen == "unsmoothed":
                    report.alphas.pop(p, None)
                else:
                    report.alphas[p] = plan.alphas[p]
            for name in touched:
                if within(name, block):
                    layers[name] = layers_c[name]
                    for mine, theirs in ((report.act_ranges, report_c.act_ranges), (report.act_modes, report_c.act_modes)):
                        mine.pop(name, None)
                        if name in theirs:
                            mine[name] = theirs[name]
            logger.info("%s: %s", block, choice.describe())
        report.block_objective_s = time.perf_counter() - start

    def _choose_mode(
        self, name: str, linear: nn.Linear, obs: Any, divisor: torch.Tensor | None, smooth: torch.Tensor | None,
        sample: torch.Tensor | None, static_r: float, quant: DeployedQuant, report: W8A8Report,
    ) -> str:
        """``dynamic_fallback``: keep ``name`` static unless its measured output error (ordinary and massive rows)
        exceeds the budget; the choice and its numbers go to ``report.act_modes``."""
        rows = obs.massive_rows.float()
        if divisor is not None:
            rows = rows / divisor.to(rows.device)
        weight = linear.weight.detach().float() * (1.0 if smooth is None else smooth.to(linear.weight.device))
        choice = dynamic_fallback.choose_activation_mode(sample, rows, obs.massive_positions, static_r, weight,
                                                self.config.dynamic_fallback, quant.weights)
        report.act_modes[name] = choice.describe()
        if choice.mode == "dynamic":
            report.act_ranges.pop(name, None)
            logger.info("%s: %s", name, choice.describe())
        return choice.mode

    def _smoothed_linear(self, model: nn.Module, name: str, module: nn.Module, smoothing: ScalePlan | None) -> nn.Linear:
        """``module`` as an ``nn.Linear`` with the weight and bias smoothing will leave it with (module unchanged)."""
        if smoothing is None or self.sq is None:
            return as_linear(module)
        weight = self.sq.smoothed_parameter(model, smoothing, f"{name}.weight")
        bias = None if module.bias is None else self.sq.smoothed_parameter(model, smoothing, f"{name}.bias")
        return _linear_from(module, weight, bias)

    def _plan_embeddings(
        self, model: nn.Module, layers: dict[str, nn.Module], report: W8A8Report
    ) -> list[tuple[nn.Module, str, nn.Module]]:
        """int8 rows for the input embedding; a head tied to it (and not quantized as a layer) reads the same rows."""
        embedding = self._input_embedding(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = isinstance(head, nn.Linear) and head.weight is embedding.weight
        q = Int8Embedding(embedding)
        swaps: list[tuple[nn.Module, str, nn.Module]] = []
        for name, module in model.named_modules():
            for child_name, child in module.named_children():
                full = f"{name}.{child_name}".lstrip(".")
                if child is embedding:
                    swaps.append((module, child_name, q))
                elif tied and child is head and full not in layers:
                    swaps.append((module, child_name, Int8TiedHead(q, head.bias)))  # type: ignore[union-attr]
                    report.kept_float.pop(full, None)
        tied = tied and any(isinstance(new, Int8TiedHead) for _, _, new in swaps)
        report.quantized.append("input embedding (int8 rows, weight-only)" + (" + tied LM head" if tied else ""))
        return swaps

    # -- apply: four journaled steps (each may be interrupted; the transaction undoes what ran) ---------------
    def _apply_smoothing(self, model: nn.Module, plan: ConversionPlan, tx: Transaction) -> None:
        """Fold the smoothing; the weights of layers about to be replaced are left as they are (their
        replacements were built from the smoothed values)."""
        if self.sq is None or plan.smoothing is None:
            return
        replaced = {f"{name}.{p}" for name in plan.layers for p in ("weight", "bias")}
        self.sq.apply(model, plan.smoothing, tx, skip=replaced)

    def _apply_layers(self, model: nn.Module, plan: ConversionPlan, tx: Transaction) -> None:
        for name, new in plan.layers.items():
            parent_name, _, child = name.rpartition(".")
            tx.setattr(model.get_submodule(parent_name), child, new)

    def _apply_embeddings(self, model: nn.Module, plan: ConversionPlan, tx: Transaction) -> None:
        for parent, child, new in plan.embedding:
            tx.setattr(parent, child, new)

    def _apply_attention(self, model: nn.Module, plan: ConversionPlan, tx: Transaction) -> None:
        for name, scales in plan.attention.items():
            tx.setattr(getattr(model.get_submodule(name), attention.STATE_ATTR), "scales", scales)

    def _rotated_layer(self, name, linear, sample, smooth, quant, report) -> nn.Module:
        """A layer whose (smoothed) input is rotated inside the quantizer; static ranges come from the sample
        (the full-data abs-max of a rotated input is not known from per-channel statistics)."""
        cfg = self.config
        blocks = random_rotation(linear.in_features, name).to(linear.weight.device)
        weight = linear.weight.detach().float() * (1.0 if smooth is None else smooth.to(linear.weight.device))
        rotated = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            rotated.weight.copy_(rotate(weight, blocks).to(linear.weight.dtype))
            if linear.bias is not None:
                rotated.bias.copy_(linear.bias)
        act_scale = None
        if cfg.activations == "static":
            x = rotate(sample.float(), blocks.to(sample.device))
            wq = quant.quantize_weight(rotated.weight.float()) if cfg.act_range == "output_mse" else None
            method = "mse" if cfg.act_range == "absmax" else cfg.act_range
            r = static_range(method, x, float(x.abs().max()), cfg.percentile, rotated.weight.float(), wq)
            report.act_ranges[name] = r
            act_scale = range_to_scale(r)
        inner = W8A8Linear.from_linear(
            rotated, weight_granularity=cfg.weights,
            act_granularity="per_token" if cfg.activations == "dynamic" else "per_tensor",
            act_scale=act_scale, backend=cfg.backend,
        )
        return RotatedInputLinear(inner, blocks, smooth)

    def _search_group_alphas(self, model: nn.Module, quant: DeployedQuant) -> dict[str, float]:
        """alpha="auto": per group, the alpha of the grid whose deployed quantization of the consumers that will be
        quantized reproduces their outputs best (a group with none of them keeps its default alpha)."""
        assert self.sq is not None
        alphas = {}
        for g in track(self.sq.plan.smoothed, "choosing alphas (per group)"):
            terms = []
            for c in g.consumers:
                obs = self.observers.get(c.module)
                if obs is None or obs.rows_sample is None or not isinstance(model.get_submodule(c.module), LINEAR_TYPES):
                    continue  # kept in float (or fused experts): its quantization error is zero
                terms.append(Term(obs.rows_sample, obs.absmax, _weight_rows(model.get_submodule(c.module)), c.channel_map))
            alphas[g.producer] = (
                search_alpha(terms, self.sq.scales_for(model, g), self.config.alpha_grid, quant, sketches=self._sketches)[0]
                if terms else g.alpha
            )
        return alphas  # type: ignore[return-value]

    def _in_quantizer_scales(
        self, name: str, linear: nn.Linear, obs: SampledChannelObserver, quant: DeployedQuant, report: W8A8Report
    ) -> torch.Tensor:
        """Smoothing scales applied inside the activation quantizer of a layer whose input no producer absorbs."""
        assert self.sq is not None
        weight = linear.weight.detach().float()
        alpha = self.sq.alpha_for([name])
        w_absmax = channel_absmax(weight, 1).to(obs.absmax.device)

        def scales_for(a: float) -> torch.Tensor:
            return smoothing_scales(obs.absmax, w_absmax, a)

        if self.sq.config.alpha_is_auto and obs.rows_sample is not None:
            alpha, _ = search_alpha([Term(obs.rows_sample, obs.absmax, weight)], scales_for, self.config.alpha_grid, quant,
                                    sketches=self._sketches)
        report.alphas[name] = alpha
        return scales_for(alpha)
