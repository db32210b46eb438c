"""SmoothQuant behind the prepare/convert contract: trace -> plan -> observe, then plan scales -> validate -> apply.

``prepare`` runs one short probe forward to discover the smoothing groups from the model's own dataflow (and
those ``SmoothQuantConfig.mappings`` state, checked by a trial fold), decides which are exact to fold, and
hooks one observer per group. ``convert`` is three public steps that another quantizer (W8A8) composes with its
own: :meth:`SmoothQuantQuantizer.plan_scales` (every group's alpha and scales from the statistics),
:meth:`SmoothQuantQuantizer.validate` (statistics present and finite, shapes, no overflow in the parameters'
dtypes) and :meth:`SmoothQuantQuantizer.apply` (the folds, inside an undo journal), so an error leaves the model
exactly as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tico.experimental.quantization.algorithm.smoothquant.groups import (
    SmoothingGroup,
    SmoothingPlan,
    SmoothQuantError,
    build_plan,
    check_alpha_map,
    group_alpha,
    resolve_mappings,
)
from tico.experimental.quantization.algorithm.smoothquant.scales import (
    ChannelAbsMaxObserver,
    channel_absmax,
    fold_ops,
    smoothing_scales,
    to_columns,
    to_producer_channels,
)
from tico.experimental.quantization import distributed
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.quantizer import BaseQuantizer, Transaction
from tico.experimental.quantization.registry import register_quantizer
from tico.experimental.quantization.structure.dataflow import trace_dataflow
from tico.experimental.quantization.structure.probe import (  # noqa: F401 - PROBE_TOKENS, probe_token_ids and
    PROBE_TOKENS,  # vocab_size are also imported from here by pipeline/stream.py
    example_inputs,
    output_tensors,
    probe_token_ids,
    run_probe,
    vocab_size,
)
from tico.experimental.quantization.structure.producers import (
    ParamOp,
    ProbeOutputNotFinite,
    find_producers,
    producer_fold_ops,
)

logger = logging.getLogger(__name__)

__all__ = ["ScalePlan", "SmoothQuantError", "SmoothQuantQuantizer"]


def observed_width(group: SmoothingGroup) -> int:
    """How many channels the tensor at the group's observation point has."""
    point = group.observe
    return len(point.channel_map) if point is not None and point.channel_map is not None else group.channels  # type: ignore[return-value]


@dataclass
class ScalePlan:
    """What :meth:`SmoothQuantQuantizer.apply` will fold: per smoothed group (by producer) its alpha and fp32
    scales, and every reason found so far that the plan cannot be applied."""

    alphas: dict[str, float] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)



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
        self, model: nn.Module, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None
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
        mapped = resolve_mappings(model, self.config.mappings)
        found = find_producers(model, linear=self.config.linear_producers)
        producers = {n: m for n, m in model.named_modules() if n in found or n in mapped}

        own = args is None and kwargs is None  # the default token ids: a failure is not the caller's inputs'

        def run() -> Any:
            return run_probe(model, probe_args, probe_kwargs, own_inputs=own)

        flow = trace_dataflow(model, producers, run)
        try:
            plan = build_plan(model, flow, self.config, mapped)
        except ProbeOutputNotFinite as exc:
            name = next((n for n, m in model.named_modules() if m is exc.module), type(exc.module).__name__)
            raise SmoothQuantError(
                f"{name}: its output on the probe input is NaN/inf, so whether 1/s folds into it exactly cannot be "
                f"checked ({exc}); pass example inputs on which the model's outputs are finite "
                "(prepare(model, config, args=..., kwargs=...)), or prepare the model in float32"
            ) from exc
        check_alpha_map(model, plan, self.config)
        _check_mapped_folds(model, [g for g in plan.smoothed if g.mapped], run)
        self.plan = plan
        self.observers = {g.producer: ChannelAbsMaxObserver(observed_width(g)) for g in plan.smoothed}
        self._log_plan(model)
        return plan

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

    def statistics(self, model: nn.Module) -> dict[str, distributed.Reducible]:
        """One observer per smoothed group (reduced over ranks by :meth:`reduce_statistics`)."""
        return {f"smoothing:{g.producer}": self.observers[g.producer] for g in self.plan.smoothed}

    def observed(self) -> list[tuple[str, ChannelAbsMaxObserver]]:
        """``(where, observer)`` of every smoothed group, for :meth:`BaseQuantizer.statistics_errors`."""
        return [
            (f"{g.producer} (observed at {g.observe.where} of {g.observe.module})", self.observers[g.producer])  # type: ignore[union-attr]
            for g in self.plan.smoothed
        ]

    # -- convert -------------------------------------------------------------------------------------------
    def convert(self, model: nn.Module) -> nn.Module:
        """:meth:`reduce_statistics` (over the ranks of a process group), :meth:`plan_scales`, :meth:`validate` (one
        error listing every problem), :meth:`apply`.

        The folds run inside a :class:`Transaction`, so even an unexpected failure while folding (out of memory,
        an interrupt) restores every weight; the price is a transient copy of the smoothed parameters.
        """
        if not self.plan.smoothed:
            logger.warning("SmoothQuant: nothing to smooth in %s; the model is unchanged", type(model).__name__)
            return model
        self.reduce_statistics(model)
        with distributed.together("SmoothQuant planning"):  # a rank that fails stops every rank here
            plan = self.plan_scales(model)
            self.fail(model, self.validate(model, plan))
        with Transaction() as tx:
            self.apply(model, plan, tx)
        self._log_done()
        return model

    def alpha_for(self, module_names: list[str] | tuple[str, ...]) -> float:
        """The alpha of a group (or a layer smoothed on its own) whose modules are ``module_names``: the
        ``custom_alpha_map`` entry that covers them most specifically, else the config's alpha."""
        return group_alpha(self.config, module_names)

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
            for name, more in fold_ops(model, g, plan.scales[g.producer]).items():
                ops.setdefault(name, []).extend(more)
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
        folded = weight.detach().clone()  # type: ignore[union-attr]
        producer_fold_ops(producer, g.kind, s)["weight"](folded)  # type: ignore[arg-type]
        if not torch.isfinite(folded).all():
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


def _check_mapped_folds(model: nn.Module, groups: list[SmoothingGroup], run: Callable[[], Any]) -> None:
    """Refuse mapped groups whose fold changes the model's outputs: fold random scales, run the probe, restore.

    All groups are tried at once; if the outputs change, each alone, so the error names the inexact ones. Every
    parameter is put back bit for bit whatever happens.
    """
    if not groups:
        return
    reference = [t.detach().clone() for t in output_tensors(run())]
    if _trial_fold_change(model, groups, run, reference) is None:
        return
    changes = {g.producer: _trial_fold_change(model, [g], run, reference) for g in groups}
    bad = {p: c for p, c in changes.items() if c is not None} or {g.producer: float("nan") for g in groups}
    lines = [
        f"{p}: folding random scales into this mapped group changes the model's outputs on the probe input "
        f"(max relative change {c:.1e}), so it is not exact; fix or remove its mapping"
        + "".join(f" ({g.reason})" for g in groups if g.producer == p and g.reason)
        for p, c in bad.items()
    ]
    raise SmoothQuantError(
        f"SmoothQuantConfig.mappings cannot be smoothed exactly in {type(model).__name__}; nothing was changed:\n  - "
        + "\n  - ".join(lines)
    )


def _trial_fold_change(
    model: nn.Module, groups: list[SmoothingGroup], run: Callable[[], Any], reference: list[torch.Tensor]
) -> float | None:
    """The max relative change of the outputs with random scales folded into ``groups`` (None: within tolerance)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    gen = torch.Generator().manual_seed(0)
    tx = Transaction()
    try:
        with torch.no_grad():
            for g in groups:
                s = 0.5 + 1.5 * torch.rand(g.channels, generator=gen)  # type: ignore[arg-type]
                for name, ops in fold_ops(model, g, s).items():
                    tx.save(params[name])
                    for op in ops:
                        op(params[name])
        got = output_tensors(run())
    finally:
        tx.rollback()
    low = any(p.dtype in (torch.float16, torch.bfloat16) for p in params.values())
    tol = 5e-2 if low else 1e-4
    worst = 0.0 if len(reference) == len(got) else float("inf")
    for r, t in zip(reference, got):
        if r.shape != t.shape or (not r.is_floating_point() and not torch.equal(r, t)):
            return float("inf")
        if r.is_floating_point():
            worst = max(worst, float((t.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30)))
    return None if worst <= tol else worst
