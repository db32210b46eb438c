"""W8A8 behind the prepare/convert contract, with SmoothQuant composed into the same calibration pass.

prepare: discover smoothing groups (if smoothing is configured), then hook one sampled observer per distinct
Linear input: one per smoothing group (all its consumers read the same tensor) and one per other Linear.
convert: choose alphas (fixed or searched), check every statistic, fold the smoothing, then swap every
Linear-like layer for a :class:`W8A8Linear` whose static range is derived from the same statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tico.experimental.quantization.algorithm.smoothquant.groups import ObservationPoint, SmoothingGroup
from tico.experimental.quantization.algorithm.smoothquant.observer import ChannelAbsMaxObserver
from tico.experimental.quantization.algorithm.smoothquant.producers import LINEAR_OUTPUT_AXIS
from tico.experimental.quantization.algorithm.smoothquant.quantizer import SmoothQuantQuantizer, observed_width
from tico.experimental.quantization.algorithm.smoothquant.scales import channel_absmax, smoothing_scales, to_columns
from tico.experimental.quantization.algorithm.w8a8 import attention, massive
from tico.experimental.quantization.algorithm.w8a8.observer import SampledChannelObserver
from tico.experimental.quantization.algorithm.w8a8.ranges import static_range
from tico.experimental.quantization.algorithm.w8a8.rotation import RotatedInputLinear, random_rotation, rotate
from tico.experimental.quantization.algorithm.w8a8.search import DeployedQuant, Term, search_alpha
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.quantizer import BaseQuantizer, QuantizationError
from tico.experimental.quantization.registry import register_quantizer
from tico.experimental.quantization.nn.embedding import Int8Embedding, Int8TiedHead
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.nn.qscheme import range_to_scale

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

    def summary(self) -> str:
        lines = [f"W8A8: {len(self.quantized)} layers quantized, {len(self.kept_float)} kept in float"]
        lines += [f"  float {name}: {why}" for name, why in self.kept_float.items()]
        lines += [f"  {name}: {why}" for name, why in self.act_modes.items() if why.startswith("dynamic")]
        return "\n".join(lines)


@register_quantizer(W8A8Config)
class W8A8Quantizer(BaseQuantizer):
    """Quantizes every Linear-like layer to int8 weights and int8 activations, smoothing first if configured."""

    config: W8A8Config

    def __init__(self, config: W8A8Config) -> None:
        super().__init__(config)
        self.sq = SmoothQuantQuantizer(config.smoothing, scored_by="w8a8") if config.smoothing is not None else None
        self.targets: list[str] = []
        self.folded_by: dict[str, tuple[SmoothingGroup, tuple[int, ...] | None]] = {}  # layer -> (group, col map)
        self.observers: dict[str, ChannelAbsMaxObserver] = {}
        self.points: dict[str, ObservationPoint] = {}
        self.report = W8A8Report()
        self.attention_modules: list[str] = []
        self._handles: list[RemovableHandle] = []

    @property
    def plan(self):
        """The smoothing plan (None without smoothing)."""
        return None if self.sq is None else self.sq.plan

    # -- prepare -------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None) -> nn.Module:
        self.targets, self.report.kept_float = self._select_targets(model)
        if not self.targets:
            logger.warning("W8A8 found no Linear layer to quantize in %s", type(model).__name__)
        rows = self.config.calibration_rows if self.config.needs_samples else 0
        if self.sq is not None:
            for g in self.sq.discover(model, args, kwargs).smoothed:
                self.sq.observers[g.producer] = ChannelAbsMaxObserver(observed_width(g))
                key = f"group:{g.producer}"
                self.observers[key] = self.sq.observers[g.producer]  # type: ignore[assignment]
                self.points[key] = g.observe  # type: ignore[assignment]
                for c in g.consumers:
                    self.folded_by[c.module] = (g, c.channel_map)
        observer = massive.MassiveRowObserver if self._mixed_modes else SampledChannelObserver  # [massive hook 1/2]
        for name in self.targets:  # every quantized layer's own input: its static range and search sample
            self.observers[name] = observer(_weight_rows(model.get_submodule(name)).shape[1], rows)
            self.points[name] = ObservationPoint(name, "input", 0)
        if self.config.quantize_attention:
            self.attention_modules = attention.install(model)
        unmatched = [r for r in self.config.rotate if not any(self._rotated(t, (r,)) for t in self.targets)]
        if unmatched:
            self.detach(model)
            raise ValueError(f"W8A8Config.rotate names that match no quantized layer: {unmatched}")
        self.attach(model)
        return model

    @property
    def _mixed_modes(self) -> bool:
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

    # -- hooks ---------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self.detach(model)
        for key, obs in self.observers.items():
            self._handles.append(obs.attach(model, self.points[key]))

    def detach(self, model: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- convert -------------------------------------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        self._check_statistics()
        unseen = attention.freeze(model, self.attention_modules)
        if unseen:
            raise QuantizationError(f"W8A8 cannot convert; nothing was changed: attention inputs never observed in {unseen}")
        quant = DeployedQuant(cfg.weights, cfg.activations, cfg.act_range, cfg.percentile)
        if self.sq is not None:
            if self.sq.config.alpha_is_auto:
                self._search_group_alphas(model, quant)
            self.sq.convert(model)  # validates every group before folding anything
            self.report.alphas.update({g.producer: g.alpha for g in self.sq.plan.smoothed})  # type: ignore[misc]
        replacements: dict[str, nn.Module] = {}
        for name in self.targets:
            obs = self.observers[name]
            module = model.get_submodule(name)
            act_absmax, sample = obs.absmax, obs.rows_sample  # of the unsmoothed input
            smooth = None
            divisor = None
            if name in self.folded_by:  # its producer now emits x / s
                group, col_map = self.folded_by[name]
                divisor = to_columns(group.scales, col_map)  # type: ignore[arg-type]
            elif cfg.smooth_in_quantizer and self.sq is not None:
                smooth = divisor = self._in_quantizer_scales(name, module, obs, quant)
            if divisor is not None:
                divisor = divisor.to(act_absmax.device)
                act_absmax = act_absmax / divisor
                sample = None if sample is None else sample.float() / divisor.to(sample.device)
            if self._rotated(name, cfg.rotate):
                replacements[name] = self._rotated_layer(name, module, sample, smooth if smooth is not None else None, quant)
                continue
            act_scale = None
            if cfg.activations == "static":
                weight = weight_q = None
                if cfg.act_range == "output_mse":
                    weight = _weight_rows(module) * (1.0 if smooth is None else smooth.to(module.weight.device))
                    weight_q = quant.quantize_weight(weight)
                r = static_range(cfg.act_range, sample, float(act_absmax.max()), cfg.percentile, weight, weight_q)
                self.report.act_ranges[name] = r
                act_scale = range_to_scale(r)
            dynamic = cfg.activations == "dynamic"
            if self._mixed_modes:  # [massive hook 2/2] static or dynamic for this layer, by measured error
                dynamic = self._choose_mode(name, module, obs, divisor, smooth, sample, r, quant) == "dynamic"
                act_scale = None if dynamic else act_scale
            replacements[name] = W8A8Linear.from_linear(
                as_linear(module),
                weight_granularity=cfg.weights,
                act_granularity="per_token" if dynamic else "per_tensor",
                act_scale=act_scale,
                smooth_scale=smooth,
                backend=cfg.backend,
            )
        for name, new in replacements.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
        self.report.quantized = list(replacements)
        if cfg.quantize_embeddings:
            self._quantize_embeddings(model)
        logger.info("%s", self.report.summary())
        return model

    def _choose_mode(self, name, module, obs, divisor, smooth, sample, static_r, quant) -> str:
        """``dynamic_fallback``: keep ``name`` static unless its measured output error (ordinary and massive rows)
        exceeds the budget; the choice and its numbers go to ``report.act_modes``."""
        rows = obs.massive_rows.float()
        if divisor is not None:
            rows = rows / divisor.to(rows.device)
        weight = _weight_rows(module) * (1.0 if smooth is None else smooth.to(module.weight.device))
        choice = massive.choose_activation_mode(sample, rows, obs.massive_positions, static_r, weight,
                                                quant.quantize_weight(weight), self.config.dynamic_fallback)
        self.report.act_modes[name] = choice.describe()
        if choice.mode == "dynamic":
            self.report.act_ranges.pop(name, None)
            logger.info("%s: %s", name, choice.describe())
        return choice.mode

    def _quantize_embeddings(self, model: nn.Module) -> None:
        """int8 rows for the input embedding; a head tied to it reads the same int8 rows."""
        get_in = getattr(model, "get_input_embeddings", None)
        embedding = get_in() if callable(get_in) else None
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"W8A8Config.quantize_embeddings: {type(model).__name__} has no nn.Embedding input embedding")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = isinstance(head, nn.Linear) and head.weight is embedding.weight
        q = Int8Embedding(embedding)
        for name, module in model.named_modules():
            for child_name, child in module.named_children():
                if child is embedding:
                    setattr(module, child_name, q)
                elif tied and child is head:
                    setattr(module, child_name, Int8TiedHead(q, head.bias))
                    self.report.kept_float.pop(f"{name}.{child_name}".lstrip("."), None)
        self.report.quantized.append("input embedding (int8 rows, weight-only)" + (" + tied LM head" if tied else ""))

    def _rotated_layer(self, name, module, sample, smooth, quant) -> nn.Module:
        """A layer whose (smoothed) input is rotated inside the quantizer; static ranges come from the sample
        (the full-data abs-max of a rotated input is not known from per-channel statistics)."""
        cfg = self.config
        linear = as_linear(module)
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
            self.report.act_ranges[name] = r
            act_scale = range_to_scale(r)
        inner = W8A8Linear.from_linear(
            rotated, weight_granularity=cfg.weights,
            act_granularity="per_token" if cfg.activations == "dynamic" else "per_tensor",
            act_scale=act_scale, backend=cfg.backend,
        )
        return RotatedInputLinear(inner, blocks, smooth)

    def _search_group_alphas(self, model: nn.Module, quant: DeployedQuant) -> None:
        """alpha="auto": per group, score every alpha of the grid on the consumers that will be quantized."""
        assert self.sq is not None
        params = dict(model.named_parameters(remove_duplicate=False))
        for g in self.sq.plan.smoothed:
            terms = []
            for c in g.consumers:
                obs = self.observers.get(c.module)
                if obs is None or obs.rows_sample is None or not isinstance(model.get_submodule(c.module), LINEAR_TYPES):
                    continue  # kept in float (or fused experts): its quantization error is zero
                terms.append(Term(obs.rows_sample, obs.absmax, _weight_rows(model.get_submodule(c.module)), c.channel_map))
            if terms:
                scales_for, _ = self.sq.scale_function(g, params)
                g.alpha, _ = search_alpha(terms, scales_for, self.config.alpha_grid, quant)

    def _in_quantizer_scales(self, name: str, module: nn.Module, obs: SampledChannelObserver, quant: DeployedQuant) -> torch.Tensor:
        """Smoothing scales applied inside the activation quantizer of a layer whose input no producer absorbs."""
        assert self.sq is not None
        weight = _weight_rows(module)
        alpha = self.sq.config.alpha_for([name])
        w_absmax = channel_absmax(weight, 1).to(obs.absmax.device)

        def scales_for(a: float) -> torch.Tensor:
            return smoothing_scales(obs.absmax, w_absmax, a)

        if self.sq.config.alpha_is_auto and obs.rows_sample is not None:
            alpha, _ = search_alpha([Term(obs.rows_sample, obs.absmax, weight)], scales_for, self.config.alpha_grid, quant)
        self.report.alphas[name] = alpha
        return scales_for(alpha)

    def _check_statistics(self) -> None:
        """Every observer saw data of the right shape, all finite; else one error listing the layers."""
        errors, unseen = [], []
        for key, obs in self.observers.items():
            where = self.points[key].module
            if obs.bad_shape is not None:
                errors.append(f"{where}: saw a tensor of shape {list(obs.bad_shape)}, expected {obs.channels} channels last")
            elif obs.absmax is None:
                unseen.append(where)
            elif not torch.isfinite(obs.absmax).all():
                errors.append(f"{where}: activation statistics contain NaN/inf")
        if unseen:
            if len(unseen) == len(self.observers):
                errors.insert(0, "no calibration forward was run after prepare(): run the model on calibration data first")
            else:
                errors.append(f"no activations were observed at {unseen}")
        if errors:
            raise QuantizationError("W8A8 cannot convert; nothing was changed:\n  - " + "\n  - ".join(errors))
