"""SmoothQuant behind the prepare/convert contract: trace -> plan -> observe, then validate -> apply.

``prepare`` runs one short probe forward to discover the smoothing groups from the model's own dataflow,
decides which are exact to fold, and hooks one observer per group. ``convert`` computes every scale, checks
the whole plan (statistics present and finite, shapes, no overflow in the parameters' dtypes) and only then
changes weights, so an error leaves the model exactly as it was.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tico.experimental.quantization.algorithm.smoothquant.dataflow import trace_dataflow
from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingGroup, SmoothingPlan, build_plan
from tico.experimental.quantization.algorithm.smoothquant.observer import ChannelAbsMaxObserver
from tico.experimental.quantization.algorithm.smoothquant.producers import (
    find_producers,
    fold_into_producer,
    folded_weight,
)
from tico.experimental.quantization.algorithm.smoothquant.scales import (
    channel_absmax,
    scale_input_channels,
    smoothing_scales,
    to_columns,
    to_producer_channels,
)
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.quantizer import BaseQuantizer, QuantizationError
from tico.experimental.quantization.registry import register_quantizer

logger = logging.getLogger(__name__)

PROBE_TOKENS = 8


def observed_width(group: SmoothingGroup) -> int:
    """How many channels the tensor at the group's observation point has."""
    point = group.observe
    return len(point.channel_map) if point is not None and point.channel_map is not None else group.channels  # type: ignore[return-value]


class SmoothQuantError(QuantizationError):
    """A SmoothQuant plan or its statistics are invalid; the message names every offending module."""


def example_inputs(
    model: nn.Module, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs of the probe forward: the caller's, or a few token ids for a model with ``config.vocab_size``."""
    if args is not None or kwargs is not None:
        return tuple(args or ()), dict(kwargs or {})
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(
            f"{type(model).__name__} has no config.vocab_size to build probe token ids from; pass example inputs "
            "for one forward: prepare(model, config, args=(example_input,)) or kwargs={...}"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    return (), {"input_ids": ids.to(device)}


def _run_probe(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
    """A forward in eval mode without gradients; the caller's training flags are restored afterwards.

    A KV cache is turned off where the model has one: the cache stores values that only the same attention
    reads back (so a smoothed model stays consistent), but the trace would count its concatenation as a read.
    """
    if "use_cache" in inspect.signature(model.forward).parameters or hasattr(getattr(model, "config", None), "use_cache"):
        kwargs = {"use_cache": False, **kwargs}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as exc:
        raise RuntimeError(
            f"SmoothQuant's probe forward of {type(model).__name__} failed ({type(exc).__name__}: {exc}); "
            "pass inputs the model accepts: prepare(model, config, args=..., kwargs=...)"
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training


@register_quantizer(SmoothQuantConfig)
class SmoothQuantQuantizer(BaseQuantizer):
    """Discovers smoothing groups, observes their activations, and folds the smoothing scales."""

    config: SmoothQuantConfig

    def __init__(self, config: SmoothQuantConfig, scored_by: str | None = None) -> None:
        """``scored_by`` names the quantizer that picks alphas when ``config.alpha == "auto"`` (it must set
        every smoothed group's ``alpha`` before :meth:`convert`); plain SmoothQuant has nothing to score with."""
        super().__init__(config)
        if config.alpha_is_auto and scored_by is None:
            raise ValueError(
                'SmoothQuantConfig(alpha="auto") needs a quantizer to score alphas against: use '
                'W8A8Config(smoothing=SmoothQuantConfig(alpha="auto")), or give a number in [0, 1]'
            )
        self.plan = SmoothingPlan([])
        self.observers: dict[str, ChannelAbsMaxObserver] = {}
        self._handles: list[RemovableHandle] = []

    # -- prepare -------------------------------------------------------------------------------------------
    def prepare(
        self,
        model: nn.Module,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> nn.Module:
        self.discover(model, args, kwargs)
        self.observers = {g.producer: ChannelAbsMaxObserver(observed_width(g)) for g in self.plan.smoothed}
        self.attach(model)
        return model

    def discover(
        self,
        model: nn.Module,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> SmoothingPlan:
        """Trace one probe forward and build the plan (no hooks are left, no weight changes)."""
        probe_args, probe_kwargs = example_inputs(model, args, kwargs)
        producers = find_producers(model, linear=self.config.linear_producers)
        flow = trace_dataflow(model, producers, lambda: _run_probe(model, probe_args, probe_kwargs))
        plan = build_plan(model, flow, self.config)
        self._check_alpha_map(model, plan)
        self.plan = plan
        self._log_plan(model)
        return plan

    def _check_alpha_map(self, model: nn.Module, plan: SmoothingPlan) -> None:
        names = list(self.config.custom_alpha_map or {})
        if not names:
            return
        modules = {n for n, _ in model.named_modules()}
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise SmoothQuantError(
                f"custom_alpha_map names that are not modules of {type(model).__name__}: {unknown}; "
                "use names from model.named_modules(), e.g. 'model.layers.0' or 'model.layers.0.mlp'"
            )
        reached = set()
        for g in plan.smoothed:
            members = [g.producer, *g.consumer_modules]
            reached |= {n for n in names if any(m == n or m.startswith(n + ".") for m in members)}
        unused = [n for n in names if n not in reached]
        if unused:
            raise SmoothQuantError(
                f"custom_alpha_map names that contain no smoothed group's producer or consumer: {unused}; "
                "see get_quantizer(model).plan.summary() for the groups"
            )

    def _log_plan(self, model: nn.Module) -> None:
        if not self.plan.smoothed:
            why = "; ".join(f"{g.producer}: {g.reason}" for g in self.plan.skipped[:3]) or "no norm feeds a Linear layer"
            logger.warning(
                "SmoothQuant found nothing to smooth in %s: convert() will leave it unchanged (%s)",
                type(model).__name__,
                why,
            )
        logger.info("%s", self.plan.summary())

    # -- hooks ---------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self.detach(model)
        for g in self.plan.smoothed:
            self._handles.append(self.observers[g.producer].attach(model, g.observe))  # type: ignore[arg-type]

    def detach(self, model: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- convert -------------------------------------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
        groups = self.plan.smoothed
        if not groups:
            logger.warning("SmoothQuant: nothing to smooth in %s; the model is unchanged", type(model).__name__)
            return model
        params = dict(model.named_parameters(remove_duplicate=False))
        scales, errors = self._compute_scales(model, groups, params)
        if errors:
            raise SmoothQuantError(
                f"SmoothQuant cannot convert {type(model).__name__}; nothing was changed:\n  - " + "\n  - ".join(errors)
            )
        for g in groups:  # validated above: from here on nothing can fail for a reason of the plan
            fold_into_producer(model.get_submodule(g.producer), g.kind, scales[g.producer])  # type: ignore[arg-type]
            for c in g.consumers:
                scale_input_channels(params[c.name], c.axis, to_columns(scales[g.producer], c.channel_map))
            g.scales = scales[g.producer].cpu()
        self._log_done(groups)
        return model

    def _compute_scales(
        self, model: nn.Module, groups: list[SmoothingGroup], params: dict[str, nn.Parameter]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Scales of every group, and every reason the plan cannot be applied (checked before any change)."""
        errors: list[str] = []
        unobserved = []
        scales: dict[str, torch.Tensor] = {}
        for g in groups:
            obs = self.observers[g.producer]
            where = f"{g.producer} (observed at {g.observe.where} of {g.observe.module})"  # type: ignore[union-attr]
            if obs.bad_shape is not None:
                errors.append(f"{where}: saw a tensor of shape {list(obs.bad_shape)}, expected {g.channels} channels last")
                continue
            if obs.absmax is None:
                unobserved.append(g.producer)
                continue
            bad = (~torch.isfinite(obs.absmax)).nonzero().flatten().tolist()
            if bad:
                errors.append(f"{where}: activation statistics are NaN/inf in channels {bad[:8]}")
                continue
            scale_fn, w_cols = self.scale_function(g, params)
            s = scale_fn(g.alpha)  # type: ignore[arg-type]
            errors += self._overflow(model, g, s, w_cols, params)
            scales[g.producer] = s
        if unobserved:
            if len(unobserved) == len(groups):
                errors.insert(0, "no calibration forward was run after prepare(): run the model on calibration data first")
            else:
                errors.append(f"no activations were observed for {unobserved} (did the calibration data reach them?)")
        return scales, errors

    def scale_function(self, g: SmoothingGroup, params: dict[str, nn.Parameter]):
        """``alpha -> scales`` for group ``g`` from its statistics and consumer weights (and the column maxima).

        Used by :meth:`convert` with the group's alpha, and by a scoring quantizer to search alphas.
        """
        obs = self.observers[g.producer]
        act = to_producer_channels(obs.absmax, g.observe.channel_map, g.channels)  # type: ignore[union-attr,arg-type]
        w_cols = [channel_absmax(params[c.name], c.axis).to(act.device) for c in g.consumers]
        w_absmax = torch.stack(
            [to_producer_channels(col, c.channel_map, g.channels) for c, col in zip(g.consumers, w_cols)]  # type: ignore[arg-type]
        ).amax(dim=0)
        pinned = torch.tensor(g.pinned, dtype=torch.long, device=act.device)

        def scales(alpha: float) -> torch.Tensor:
            s = smoothing_scales(act, w_absmax, alpha)
            if g.pinned:
                s[pinned] = 1.0
            return s

        return scales, w_cols

    @staticmethod
    def _overflow(
        model: nn.Module, g: SmoothingGroup, s: torch.Tensor, w_cols: list[torch.Tensor], params: dict[str, nn.Parameter]
    ) -> list[str]:
        """Parameters that would leave their dtype's finite range after scaling."""
        errors = []
        for c, col in zip(g.consumers, w_cols):
            limit = torch.finfo(params[c.name].dtype).max
            if float((col * to_columns(s, c.channel_map)).max()) > limit:
                errors.append(f"{c.name}: scaling by s would overflow {params[c.name].dtype} (alpha={g.alpha})")
        producer = model.get_submodule(g.producer)
        weight = producer.weight  # type: ignore[union-attr]
        if not torch.isfinite(folded_weight(producer, g.kind, s).to(weight.dtype)).all():  # type: ignore[arg-type]
            errors.append(f"{g.producer}.weight: dividing by s would overflow {weight.dtype} (alpha={g.alpha})")
        return errors

    def _log_done(self, groups: list[SmoothingGroup]) -> None:
        by_block: dict[str, list[str]] = {}
        for g in self.plan.groups:
            by_block.setdefault(g.block or "(outside blocks)", []).append(
                ("smoothed " if g.status == "smooth" else "skipped ") + g.describe()
            )
        for block, lines in by_block.items():
            logger.info("%s: %s", block, "; ".join(lines))
        logger.info("SmoothQuant smoothed %d groups, skipped %d", len(groups), len(self.plan.skipped))
