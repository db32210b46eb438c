"""SmoothQuant behind the prepare/convert contract: trace -> plan -> observe, then plan scales -> validate -> apply.

``prepare`` runs one short probe forward to discover the smoothing groups from the model's own dataflow,
decides which are exact to fold, and hooks one observer per group. ``convert`` is three public steps that
another quantizer (W8A8) composes with its own: :meth:`SmoothQuantQuantizer.plan_scales` (every group's alpha
and scales from the statistics), :meth:`SmoothQuantQuantizer.validate` (statistics present and finite, shapes,
no overflow in the parameters' dtypes) and :meth:`SmoothQuantQuantizer.apply` (the folds, inside an undo
journal), so an error leaves the model exactly as it was.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tico.experimental.quantization.algorithm.smoothquant.dataflow import trace_dataflow
from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingGroup, SmoothingPlan, build_plan
from tico.experimental.quantization.algorithm.smoothquant.observer import ChannelAbsMaxObserver
from tico.experimental.quantization.algorithm.smoothquant.producers import (
    KINDS_BY_NAME,
    LINEAR_KIND,
    ProbeOutputNotFinite,
    find_producers,
    folded_weight,
    linear_output_axis,
)
from tico.experimental.quantization.algorithm.smoothquant.scales import (
    channel_absmax,
    scale_input_channels,
    smoothing_scales,
    to_columns,
    to_producer_channels,
)
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.quantizer import BaseQuantizer, QuantizationError, Transaction
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
    vocab = vocab_size(model)
    if vocab is None:
        raise ValueError(
            f"{type(model).__name__} has no config.vocab_size to build probe token ids from; pass example inputs "
            "for one forward: prepare(model, config, args=(example_input,)) or kwargs={...}"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return (), {"input_ids": probe_token_ids(vocab).to(device)}


def vocab_size(model: nn.Module) -> int | None:
    """``model.config.vocab_size`` when it is a positive int (None otherwise)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and vocab > 0 else None


def probe_token_ids(vocab: int) -> torch.Tensor:
    """``[1, PROBE_TOKENS]`` seeded token ids below ``vocab``: the default probe input."""
    return torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))


class ProbeError(RuntimeError):
    """The probe forward raised ``cause``; the message says whose inputs it ran on."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause


def _run_probe(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], own_inputs: bool = False):
    """A forward in eval mode without gradients; the caller's training flags are restored afterwards.

    A KV cache is turned off where the model has one: the cache stores values that only the same attention
    reads back (so a smoothed model stays consistent), but the trace would count its concatenation as a read.
    ``own_inputs``: the inputs are the default probe token ids, not the caller's, so a failure is not blamed on
    the caller's inputs.
    """
    if "use_cache" in inspect.signature(model.forward).parameters or hasattr(getattr(model, "config", None), "use_cache"):
        kwargs = {"use_cache": False, **kwargs}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as exc:
        where = f"SmoothQuant's probe forward of {type(model).__name__}"
        if own_inputs:
            raise ProbeError(
                f"{where} failed on its default probe inputs ({PROBE_TOKENS} token ids below config.vocab_size) "
                f"({type(exc).__name__}: {exc}); if the model needs other inputs than token ids, pass them: "
                "prepare(model, config, args=..., kwargs=...)", exc
            ) from exc
        raise ProbeError(
            f"{where} failed on the given inputs ({type(exc).__name__}: {exc}); pass inputs the model accepts: "
            "prepare(model, config, args=..., kwargs=...)", exc
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training


@dataclass
class ScalePlan:
    """What :meth:`SmoothQuantQuantizer.apply` will fold: per smoothed group (by producer) its alpha and fp32
    scales, and every reason found so far that the plan cannot be applied."""

    alphas: dict[str, float] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


# An in-place change of one parameter tensor (computed in fp32, cast back to the tensor's dtype).
ParamOp = Callable[[torch.Tensor], None]


@register_quantizer(SmoothQuantConfig)
class SmoothQuantQuantizer(BaseQuantizer):
    """Discovers smoothing groups, observes their activations, and folds the smoothing scales.

    Standalone (``prepare(model, SmoothQuantConfig(...))``) the alphas come from the config. A quantizer that
    scores alphas (W8A8 with ``alpha="auto"``) uses the public steps instead: :meth:`discover` and
    :meth:`attach` in its prepare, then :meth:`scales_for` to score, ``plan_scales(model, alphas=...)``,
    :meth:`validate` and :meth:`apply` in its convert.
    """

    config: SmoothQuantConfig
    error_class = SmoothQuantError
    title = "SmoothQuant"

    def __init__(self, config: SmoothQuantConfig) -> None:
        super().__init__(config)
        self.plan = SmoothingPlan([])
        self.observers: dict[str, ChannelAbsMaxObserver] = {}

    # -- prepare -------------------------------------------------------------------------------------------
    def prepare(
        self,
        model: nn.Module,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> nn.Module:
        if self.config.alpha_is_auto:  # standalone convert has nothing to score alphas with
            raise ValueError(
                'SmoothQuantConfig(alpha="auto") needs a quantizer to score alphas against: use '
                'W8A8Config(smoothing=SmoothQuantConfig(alpha="auto")), or give a number in [0, 1]'
            )
        self.discover(model, args, kwargs)
        self.attach(model)
        return model

    def discover(
        self,
        model: nn.Module,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> SmoothingPlan:
        """Trace one probe forward, build the plan and one (unhooked) observer per smoothed group.

        No hooks are left and no weight changes; :meth:`attach` hooks the observers.
        """
        probe_args, probe_kwargs = example_inputs(model, args, kwargs)
        producers = find_producers(model, linear=self.config.linear_producers)
        own = args is None and kwargs is None
        flow = trace_dataflow(model, producers, lambda: _run_probe(model, probe_args, probe_kwargs, own))
        try:
            plan = build_plan(model, flow, self.config)
        except ProbeOutputNotFinite as exc:
            name = next((n for n, m in model.named_modules() if m is exc.module), type(exc.module).__name__)
            raise SmoothQuantError(
                f"{name}: its output on the probe input is NaN/inf, so whether 1/s folds into it exactly cannot be "
                f"checked ({exc}); pass example inputs on which the model's outputs are finite "
                "(prepare(model, config, args=..., kwargs=...)), or prepare the model in float32"
            ) from exc
        self._check_alpha_map(model, plan)
        self.plan = plan
        self.observers = {g.producer: ChannelAbsMaxObserver(observed_width(g)) for g in plan.smoothed}
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
    def install_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        return [self.observers[g.producer].attach(model, g.observe) for g in self.plan.smoothed]  # type: ignore[arg-type]

    def observed(self) -> list[tuple[str, ChannelAbsMaxObserver]]:
        """``(where, observer)`` of every smoothed group, for :meth:`BaseQuantizer.statistics_errors`."""
        return [
            (f"{g.producer} (observed at {g.observe.where} of {g.observe.module})", self.observers[g.producer])  # type: ignore[union-attr]
            for g in self.plan.smoothed
        ]

    # -- convert -------------------------------------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
        """:meth:`plan_scales`, :meth:`validate` (one error listing every problem), :meth:`apply`.

        The folds run inside a :class:`Transaction`, so even an unexpected failure while folding (out of memory,
        an interrupt) restores every weight; the price is a transient copy of the smoothed parameters.
        """
        if not self.plan.smoothed:
            logger.warning("SmoothQuant: nothing to smooth in %s; the model is unchanged", type(model).__name__)
            return model
        plan = self.plan_scales(model)
        self.fail(model, self.validate(model, plan))
        with Transaction() as tx:
            self.apply(model, plan, tx)
        self._log_done()
        return model

    def scales_for(self, model: nn.Module, g: SmoothingGroup) -> Callable[[float], torch.Tensor]:
        """``alpha -> scales`` of group ``g`` from its statistics and its consumers' weights (as the model is now).

        Exactly the scales :meth:`plan_scales` computes for that alpha; a scoring quantizer searches with it.
        Needs valid statistics (see :meth:`observed`).
        """
        return self._scale_function(g, dict(model.named_parameters(remove_duplicate=False)))[0]

    def plan_scales(self, model: nn.Module, alphas: Mapping[str, float] | None = None) -> ScalePlan:
        """Every smoothed group's alpha and scales; nothing changes. Problems go to ``ScalePlan.errors``.

        Args:
            model: the prepared, calibrated model.
            alphas: ``{producer: alpha}`` chosen by a scoring quantizer; they replace the config's alphas for
                those groups. With ``alpha="auto"`` every smoothed group needs one.
        """
        plan = ScalePlan()
        groups = self.plan.smoothed
        plan.errors += self.statistics_errors(self.observed())
        alphas = dict(alphas or {})
        foreign = sorted(set(alphas) - {g.producer for g in groups})
        if foreign:
            plan.errors.append(f"alphas given for producers that are not smoothed groups: {foreign}")
        for producer, a in alphas.items():
            if not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0):
                plan.errors.append(f"{producer}: alpha must be in [0, 1], got {a!r}")
        if self.config.alpha_is_auto:
            missing = [g.producer for g in groups if g.producer not in alphas]
            if missing:
                plan.errors.append(f'alpha="auto" but no alpha was chosen for {missing}')
        if plan.errors:
            return plan
        params = dict(model.named_parameters(remove_duplicate=False))
        for g in groups:
            alpha = float(alphas.get(g.producer, g.alpha))  # type: ignore[arg-type]
            plan.alphas[g.producer] = alpha
            plan.scales[g.producer] = self._scale_function(g, params)[0](alpha)
        return plan

    def validate(self, model: nn.Module, plan: ScalePlan) -> list[str]:
        """Every reason ``plan`` cannot be applied: its own errors, and parameters that would overflow their dtype."""
        errors = list(plan.errors)
        if errors:
            return errors
        params = dict(model.named_parameters(remove_duplicate=False))
        for g in self.plan.smoothed:
            w_cols = self._scale_function(g, params)[1]
            errors += self._overflow(model, g, plan.scales[g.producer], plan.alphas[g.producer], w_cols, params)
        return errors

    def apply(
        self, model: nn.Module, plan: ScalePlan, tx: Transaction, skip: Collection[str] = ()
    ) -> None:
        """Fold a validated ``plan`` into ``model`` (every change journaled in ``tx``) and record it in the groups.

        Args:
            skip: parameter names left unchanged because the caller replaces their modules with ones built
                from :meth:`smoothed_parameter` (W8A8 builds int8 layers from the smoothed values directly).
        """
        params = dict(model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, ops in self._param_ops(model, plan).items():
                if name in skip:
                    continue
                tx.save(params[name])
                for op in ops:
                    op(params[name])
        for g in self.plan.smoothed:
            tx.setattr(g, "alpha", plan.alphas[g.producer])
            tx.setattr(g, "scales", plan.scales[g.producer].cpu())

    @torch.no_grad()
    def smoothed_parameter(self, model: nn.Module, plan: ScalePlan, name: str) -> torch.Tensor:
        """The value parameter ``name`` will have after :meth:`apply`, bit for bit, without changing it."""
        value = model.get_parameter(name).detach().clone()
        for op in self._param_ops(model, plan).get(name, []):
            op(value)
        return value

    def _param_ops(self, model: nn.Module, plan: ScalePlan) -> dict[str, list[ParamOp]]:
        """Per parameter, the in-place ops of the fold, in the order apply runs them (groups in model order, each
        producer before its consumers); a parameter both consumer and producer (``v_proj``) gets both."""
        ops: dict[str, list[ParamOp]] = {}
        for g in self.plan.smoothed:
            s = plan.scales[g.producer]
            module = model.get_submodule(g.producer)
            if g.kind == LINEAR_KIND:
                shape = [1, 1]
                shape[linear_output_axis(module)] = -1  # type: ignore[index]
                ops.setdefault(f"{g.producer}.weight", []).append(_divide_rows(s, shape))
            else:
                ops.setdefault(f"{g.producer}.weight", []).append(_fold_norm_weight(s, g.kind))  # type: ignore[arg-type]
            if dict(module.named_parameters(recurse=False)).get("bias") is not None:
                ops.setdefault(f"{g.producer}.bias", []).append(_divide_rows(s, [-1]))
            for c in g.consumers:
                ops.setdefault(c.name, []).append(_scale_columns(to_columns(s, c.channel_map), c.axis))
        return ops

    def _scale_function(self, g: SmoothingGroup, params: dict[str, nn.Parameter]):
        """``(alpha -> scales, per-consumer column maxima)`` of group ``g``."""
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
        model: nn.Module,
        g: SmoothingGroup,
        s: torch.Tensor,
        alpha: float,
        w_cols: list[torch.Tensor],
        params: dict[str, nn.Parameter],
    ) -> list[str]:
        """Parameters that would leave their dtype's finite range after scaling."""
        errors = []
        for c, col in zip(g.consumers, w_cols):
            limit = torch.finfo(params[c.name].dtype).max
            if float((col * to_columns(s, c.channel_map)).max()) > limit:
                errors.append(f"{c.name}: scaling by s would overflow {params[c.name].dtype} (alpha={alpha})")
        producer = model.get_submodule(g.producer)
        weight = producer.weight  # type: ignore[union-attr]
        if not torch.isfinite(folded_weight(producer, g.kind, s).to(weight.dtype)).all():  # type: ignore[arg-type]
            errors.append(f"{g.producer}.weight: dividing by s would overflow {weight.dtype} (alpha={alpha})")
        return errors

    def _log_done(self) -> None:
        by_block: dict[str, list[str]] = {}
        for g in self.plan.groups:
            by_block.setdefault(g.block or "(outside blocks)", []).append(
                ("smoothed " if g.status == "smooth" else "skipped ") + g.describe()
            )
        for block, lines in by_block.items():
            logger.info("%s: %s", block, "; ".join(lines))
        logger.info("SmoothQuant smoothed %d groups, skipped %d", len(self.plan.smoothed), len(self.plan.skipped))


# The fold as per-tensor in-place ops: the same arithmetic as producers.fold_into_producer and
# scales.scale_input_channels (fp32, then cast back), so previewed and applied values agree bit for bit.
def _divide_rows(s: torch.Tensor, shape: list[int]) -> ParamOp:
    def op(t: torch.Tensor) -> None:
        t.copy_((t.float() / s.to(t.device).view(shape)).to(t.dtype))

    return op


def _fold_norm_weight(s: torch.Tensor, kind: str) -> ParamOp:
    fold = KINDS_BY_NAME[kind].fold_weight

    def op(t: torch.Tensor) -> None:
        t.copy_(fold(t.float(), s.to(t.device)).to(t.dtype))

    return op


def _scale_columns(columns: torch.Tensor, axis: int) -> ParamOp:
    def op(t: torch.Tensor) -> None:
        scale_input_channels(t, axis, columns)

    return op
