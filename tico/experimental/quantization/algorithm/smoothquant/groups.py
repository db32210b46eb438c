"""Smoothing groups: which producer feeds which consumers, and the proof that nothing else reads it.

:func:`build_plan` turns what one traced forward showed (:mod:`.dataflow`) into a :class:`SmoothingPlan`: one
:class:`SmoothingGroup` per producer whose output reaches at least one Linear-like layer, marked ``smooth`` or
``skip`` with the reason. The plan is what the user inspects (``get_quantizer(model).plan``) and what
``convert`` executes; after ``convert`` each smoothed group also carries its scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.quantizer import QuantizationError
from tico.experimental.quantization.structure import names
from tico.experimental.quantization.structure.blocks import block_of
from tico.experimental.quantization.structure.probe import ConsumerParam, Dataflow, ProducerReads
from tico.experimental.quantization.structure.producers import (
    LINEAR_KIND,
    linear_output_axis,
    probe_kind,
    probe_linear,
    producer_params,
)

Status = Literal["smooth", "skip"]


class SmoothQuantError(QuantizationError):
    """A SmoothQuant plan or its statistics are invalid; the message names every offending module."""


@dataclass(frozen=True)
class ObservationPoint:
    """Where the activation statistics of a group are taken: a module's input ``arg`` or its output."""

    module: str
    where: Literal["input", "output"]
    arg: int = 0
    channel_map: tuple[int, ...] | None = None  # producer channel of each observed channel (None: identity)


@dataclass
class SmoothingGroup:
    """A producer, the parameters that read its channels, and what ``convert`` does with them."""

    producer: str
    consumers: tuple[ConsumerParam, ...]
    block: str | None
    channels: int | None
    status: Status
    reason: str = ""
    kind: str | None = None  # producer kind, see producers.PRODUCER_KINDS
    alpha: float | None = None
    observe: ObservationPoint | None = None
    pinned: tuple[int, ...] = ()  # channels kept at scale 1 because something else reads them
    pinned_why: str = ""
    mapped: bool = False  # stated by SmoothQuantConfig.mappings, not found by the trace
    scales: torch.Tensor | None = field(default=None, repr=False)  # set by convert

    @property
    def consumer_modules(self) -> list[str]:
        return sorted({c.module for c in self.consumers})

    def describe(self) -> str:
        """One line: ``producer -> consumers`` relative to the block, with alpha or the skip reason."""
        short = _relative(self.block)
        target = ", ".join(short(m) for m in self.consumer_modules)
        head = f"{short(self.producer)} -> [{target}]"
        if self.status != "smooth":
            return f"{head}: {self.reason}"
        kept = f" ({len(self.pinned)}/{self.channels} channels kept at 1: {self.pinned_why})" if self.pinned else ""
        mapped = f" [mapped{': ' + self.reason if self.reason else ''}]" if self.mapped else ""
        return f"{head} alpha={self.alpha:g}{kept}{mapped}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "producer": self.producer,
            "kind": self.kind,
            "consumers": [
                {"param": c.name, "axis": c.axis, "channel_map": None if c.channel_map is None else list(c.channel_map)}
                for c in self.consumers
            ],
            "block": self.block,
            "channels": self.channels,
            "status": self.status,
            "reason": self.reason,
            "alpha": self.alpha,
            "pinned": list(self.pinned),
            "scales": None if self.scales is None else self.scales.tolist(),
        }


@dataclass
class SmoothingPlan:
    """Every smoothing group found in a model, smoothed or skipped, in model order."""

    groups: list[SmoothingGroup]

    @property
    def smoothed(self) -> list[SmoothingGroup]:
        return [g for g in self.groups if g.status == "smooth"]

    @property
    def skipped(self) -> list[SmoothingGroup]:
        return [g for g in self.groups if g.status == "skip"]

    def by_block(self) -> dict[str, list[SmoothingGroup]]:
        out: dict[str, list[SmoothingGroup]] = {}
        for g in self.groups:
            out.setdefault(g.block or "(outside blocks)", []).append(g)
        return out

    def summary(self) -> str:
        """A readable report: per block, the smoothed and the skipped groups."""
        lines = [f"SmoothQuant plan: {len(self.smoothed)} groups smoothed, {len(self.skipped)} skipped"]
        for block, groups in self.by_block().items():
            lines.append(f"  {block}:")
            for g in groups:
                lines.append(f"    {'smooth' if g.status == 'smooth' else 'skip  '} {g.describe()}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups]}


def _foreign_text(reads) -> str:
    more = f" (+{len(reads.foreign) - 2} more)" if len(reads.foreign) > 2 else ""
    return "; ".join(reads.foreign[:2]) + more


def _relative(block: str | None):
    def short(name: str) -> str:
        return name[len(block) + 1 :] if block and name.startswith(block + ".") else name

    return short


def _shared_names(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names of the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: [m for m in names if m != n] for names in by_id.values() for n in names if len(names) > 1}


def _output_embedding_params(model: nn.Module) -> set[int]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()


def _fold_reason(
    model: nn.Module,
    producer: str,
    reads: ProducerReads,
    consumers: Sequence[ConsumerParam],
    flow: Dataflow,
    mapped: bool,
) -> str | None:
    """Why ``1/s`` cannot be folded into ``producer`` and ``s`` into ``consumers`` exactly, or None if it can.

    Foreign reads of the output are the caller's business (a mapping overrides them); so, for a mapped group, are
    other uses of a consumer's weight (the trace cannot follow its input): the trial fold checks both.
    """
    module = model.get_submodule(producer)
    is_linear = linear_output_axis(module) is not None
    weight = module.weight if is_linear else (producer_params(module) or (None,))[0]  # type: ignore[index]
    if weight is None:
        return "has no affine weight to fold 1/s into"
    shared, head_params = _shared_names(model), _output_embedding_params(model)
    for pname, _p in module.named_parameters(recurse=False):
        full = f"{producer}.{pname}"
        if full in shared:
            return f"its parameter {full} is shared with {shared[full][0]}"
    params = dict(model.named_parameters(remove_duplicate=False))
    for c in consumers:
        p = params[c.name]
        if id(p) in head_params:
            return f"feeds the output embedding {c.module}, which is left unsmoothed (usually tied and kept in float)"
        if c.name in shared:
            return f"consumer weight {c.name} is shared with {shared[c.name][0]}"
        expected = reads.channels if c.channel_map is None else len(c.channel_map)
        if p.shape[c.axis] != expected:
            return f"consumer {c.name} has {p.shape[c.axis]} input channels, the producer {reads.channels}"
        for use in [] if mapped else flow.param_uses.get(c.name, []):
            if use[0] != "consumer" or use[1] != producer or use[2] != c.axis:
                other = use[1] if use[0] == "other" else f"a contraction of {use[1]}'s output"
                return f"consumer weight {c.name} is also used by {other}"
    out_channels = weight.shape[linear_output_axis(module)] if is_linear else weight.numel()  # type: ignore[index]
    if out_channels != reads.channels:
        return f"its weight has {out_channels} output channels, its output {reads.channels}"
    return None


def _producer_kind(model: nn.Module, producer: str, reads: ProducerReads) -> tuple[str | None, str]:
    """``(kind, "")`` if the probe proves ``1/s`` folds into the producer exactly, else ``(None, reason)``."""
    module = model.get_submodule(producer)
    if linear_output_axis(module) is not None:
        if probe_linear(module, reads.sample):
            return LINEAR_KIND, ""
        return None, f"{type(module).__name__}'s output is not x @ W.T + b (its forward was probed)"
    kind = probe_kind(module, reads.sample) if reads.sample else None
    if kind is None:
        return None, "output is not of a known per-channel affine form (see producers.PRODUCER_KINDS)"
    return kind.name, ""


def build_plan(
    model: nn.Module, flow: Dataflow, config: SmoothQuantConfig, mapped: Mapping[str, Sequence[str]] | None = None
) -> SmoothingPlan:
    """Decide, for every producer whose output reaches a Linear-like layer, whether it is smoothed and how.

    Producers in ``mapped`` (from :func:`resolve_mappings`: producer -> consumer modules) are planned from the
    mapping instead; anything that makes one of them inexact is an error, not a skip.
    """
    mapped = dict(mapped or {})
    groups: list[SmoothingGroup] = []
    errors: list[str] = []
    for producer, reads in flow.producers.items():
        if producer in mapped:
            group, error = _mapped_group(model, producer, mapped[producer], reads, flow)
            errors += [f"{producer}: {error}"] if error else []
        elif not reads.consumers:
            continue  # its output reaches no Linear-like layer: not a smoothing group at all
        else:
            group = _traced_group(model, producer, reads, flow)
        groups.append(group)
        if group.status == "smooth":
            group.alpha = group_alpha(config, [producer, *group.consumer_modules])
            group.observe = _observation_point(group, reads, config)
    errors += _shared_consumers(groups)
    if errors:
        raise SmoothQuantError(
            f"SmoothQuantConfig.mappings cannot be smoothed exactly in {type(model).__name__}; nothing was changed:"
            "\n  - " + "\n  - ".join(errors)
        )
    return SmoothingPlan(groups)


def _traced_group(model: nn.Module, producer: str, reads: ProducerReads, flow: Dataflow) -> SmoothingGroup:
    consumers = tuple(reads.consumers.values())
    group = SmoothingGroup(producer, consumers, block_of(model, producer), reads.channels, "skip")
    if reads.foreign and len(reads.pinned_channels) >= (reads.channels or 0):
        group.reason = "output is also " + _foreign_text(reads)
        return group
    reason = _fold_reason(model, producer, reads, consumers, flow, mapped=False)
    if reason is None:
        group.kind, reason = _producer_kind(model, producer, reads)
    if reason:
        group.reason = reason
        return group
    group.status = "smooth"
    if reads.foreign:
        group.pinned = tuple(sorted(reads.pinned_channels))
        group.pinned_why = _foreign_text(reads)
    return group


def _mapped_group(
    model: nn.Module, producer: str, modules: Sequence[str], reads: ProducerReads, flow: Dataflow
) -> tuple[SmoothingGroup, str | None]:
    """The group a mapping states, with the error that makes it inexact (None if there is none)."""
    traced = {c.module: c for c in reads.consumers.values()}
    consumers = []
    for m in modules:  # the trace's view of a consumer it saw (with its channel map), else the identity
        axis = 1 - linear_output_axis(model.get_submodule(m))  # type: ignore[operator]
        consumers.append(traced.get(m, ConsumerParam(f"{m}.weight", m, axis)))
    group = SmoothingGroup(producer, tuple(consumers), block_of(model, producer), reads.channels, "skip", mapped=True)
    if reads.channels is None:
        return group, "did not output one tensor in the probe forward (" + (_foreign_text(reads) or "never ran") + ")"
    unlisted = sorted(set(traced) - set(modules))
    if unlisted:
        return group, f"the trace shows its output also read by {unlisted}, which the mapping does not list"
    reason = _fold_reason(model, producer, reads, consumers, flow, mapped=True)
    if reason is None:
        group.kind, reason = _producer_kind(model, producer, reads)
    if reason:
        return group, reason
    group.status = "smooth"
    group.reason = f"the trace also saw it {_foreign_text(reads)}" if reads.foreign else ""
    return group, None


def _shared_consumers(groups: list[SmoothingGroup]) -> list[str]:
    """Consumer parameters two smoothed groups would both scale (only a mapping can cause it)."""
    owner: dict[str, str] = {}
    errors = []
    for g in groups:
        for c in g.consumers if g.status == "smooth" else ():
            if c.name in owner:
                errors.append(f"{c.name} would be scaled by both {owner[c.name]} and {g.producer}")
            owner.setdefault(c.name, g.producer)
    return errors


def _observation_point(group: SmoothingGroup, reads: ProducerReads, config: SmoothQuantConfig) -> ObservationPoint:
    """The consumer input (``acts_from='input'``) or producer output where this group's statistics are taken."""
    if config.acts_from == "input":
        for module, arg, channel_map in reads.entries:
            if module in group.consumer_modules:
                return ObservationPoint(module, "input", arg, channel_map)
        if group.mapped and not reads.consumers:  # the trace lost the tensor before the consumers: their own input
            return ObservationPoint(group.consumers[0].module, "input", 0, group.consumers[0].channel_map)
    # acts_from="output", or no consumer received the tensor as a positional input: the producer's output is
    # the same tensor for every producer form in PRODUCER_KINDS.
    return ObservationPoint(group.producer, "output")


def group_alpha(config: SmoothQuantConfig, module_names: Sequence[str]) -> float:
    """The alpha of a group whose producer and consumers have ``module_names``: the ``custom_alpha_map`` value of
    the most specific key covering one of them (see :func:`~...structure.names.most_specific`), else the default."""
    key = names.most_specific(list(config.custom_alpha_map or {}), module_names)
    default = 0.5 if config.alpha_is_auto else float(config.alpha)  # auto: the search's starting point
    return default if key is None else config.custom_alpha_map[key]  # type: ignore[index]


def check_alpha_map(model: nn.Module, plan: SmoothingPlan, config: SmoothQuantConfig) -> None:
    """Refuse ``custom_alpha_map`` keys that match no module, or cover no smoothed group, naming them."""
    keys = list(config.custom_alpha_map or {})
    if not keys:
        return
    try:
        names.check_keys(keys, "SmoothQuantConfig.custom_alpha_map")
    except ValueError as exc:
        raise SmoothQuantError(str(exc)) from None
    unknown = names.unmatched(keys, [n for n, _ in model.named_modules()], inside=True)
    if unknown:
        raise SmoothQuantError(
            f"custom_alpha_map names that are not modules of {type(model).__name__}: {unknown}; "
            "use names from model.named_modules(), e.g. 'model.layers.0' or 'model.layers.0.mlp', or 're:' patterns"
        )
    members = [n for g in plan.smoothed for n in (g.producer, *g.consumer_modules)]
    unused = names.unmatched(keys, members, inside=True)
    if unused:
        raise SmoothQuantError(
            f"custom_alpha_map names that contain no smoothed group's producer or consumer: {unused}; "
            "see get_quantizer(model).plan.summary() for the groups"
        )


def resolve_mappings(model: nn.Module, mappings: Sequence[tuple[str, Sequence[str]]] | None) -> dict[str, list[str]]:
    """``SmoothQuantConfig.mappings`` as ``{producer: [consumer modules]}``, in model order.

    Each module the producer key matches pairs with the modules the consumer keys match inside the producer's
    parent module. A key matching nothing, a producer that cannot absorb ``1/s`` or a consumer that is not
    Linear-like is refused (one :class:`SmoothQuantError` naming every problem).
    """
    if not mappings:
        return {}
    modules = dict(model.named_modules())
    out: dict[str, list[str]] = {}
    errors: list[str] = []
    for i, (pkey, ckeys) in enumerate(mappings):
        where = f"mappings[{i}]"
        try:
            names.check_keys([pkey, *ckeys], f"SmoothQuantConfig.{where}")
        except ValueError as exc:
            errors.append(str(exc))
            continue
        producers = names.select([pkey], modules)
        if not producers:
            errors.append(f"{where}: producer {pkey!r} matches no module of {type(model).__name__}")
        for p in producers:
            module, parent = modules[p], p.rpartition(".")[0]
            if linear_output_axis(module) is None and (producer_params(module) or (None,))[0] is None:
                errors.append(f"{where}: producer {p} ({type(module).__name__}) cannot absorb 1/s: it is neither a "
                              "Linear layer nor a norm with a 1-D weight")
            if p in out:
                errors.append(f"{where}: producer {p} is already mapped by an earlier entry")
            inside = [n for n in modules if n not in (p, parent) and names.within(n, parent or n)]
            for key in names.unmatched(ckeys, inside):
                errors.append(f"{where}: consumer {key!r} matches no module inside {parent or 'the model'} "
                              f"(the parent of producer {p})")
            consumers = names.select(ckeys, inside)
            for c in consumers:
                if linear_output_axis(modules[c]) is None:
                    errors.append(f"{where}: consumer {c} is a {type(modules[c]).__name__}, not Linear-like "
                                  "(nn.Linear or Conv1D): only a Linear weight can take s into its input columns")
            out.setdefault(p, consumers)
    if errors:
        raise SmoothQuantError(
            f"SmoothQuantConfig.mappings do not fit {type(model).__name__}; nothing was changed:\n  - "
            + "\n  - ".join(errors)
        )
    return {p: out[p] for p in modules if p in out}
