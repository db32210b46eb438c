"""Smoothing groups: which producer feeds which consumers, and the proof that nothing else reads it.

:func:`build_plan` turns what one traced forward showed (:mod:`.dataflow`) into a :class:`SmoothingPlan`: one
:class:`SmoothingGroup` per producer whose output reaches at least one Linear-like layer, marked ``smooth`` or
``skip`` with the reason. The plan is what the user inspects (``get_quantizer(model).plan``) and what
``convert`` executes; after ``convert`` each smoothed group also carries its scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from tico.experimental.quantization.structure.dataflow import ConsumerParam, Dataflow
from tico.experimental.quantization.structure.producers import (
    LINEAR_KIND,
    linear_output_axis,
    probe_kind,
    probe_linear,
    producer_params,
)
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig

Status = Literal["smooth", "skip"]


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
        return f"{head} alpha={self.alpha:g}{kept}"

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


def block_of(model: nn.Module, name: str) -> str | None:
    """The repeated block containing module ``name``: the longest prefix whose parent is an ``nn.ModuleList``."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[: end - 1])
        try:
            if isinstance(model.get_submodule(parent), nn.ModuleList):
                return ".".join(parts[:end])
        except AttributeError:
            continue
    return None


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


def _skip_reason(
    model: nn.Module,
    producer: str,
    reads,
    flow: Dataflow,
    shared: dict[str, list[str]],
    head_params: set[int],
) -> str | None:
    """Why the group of ``producer`` cannot be folded exactly, or None if it can."""
    if reads.foreign and len(reads.pinned_channels) >= (reads.channels or 0):
        return "output is also " + _foreign_text(reads)
    module = model.get_submodule(producer)
    is_linear = linear_output_axis(module) is not None
    weight = module.weight if is_linear else producer_params(module)[0]  # type: ignore[index]
    if weight is None:
        return "has no affine weight to fold 1/s into"
    for pname, _p in model.get_submodule(producer).named_parameters(recurse=False):
        full = f"{producer}.{pname}"
        if full in shared:
            return f"its parameter {full} is shared with {shared[full][0]}"
    params = dict(model.named_parameters(remove_duplicate=False))
    for c in reads.consumers.values():
        p = params[c.name]
        if id(p) in head_params:
            return f"feeds the output embedding {c.module}, which is left unsmoothed (usually tied and kept in float)"
        if c.name in shared:
            return f"consumer weight {c.name} is shared with {shared[c.name][0]}"
        expected = reads.channels if c.channel_map is None else len(c.channel_map)
        if p.shape[c.axis] != expected:
            return f"consumer {c.name} has {p.shape[c.axis]} input channels, the producer {reads.channels}"
        for use in flow.param_uses.get(c.name, []):
            if use[0] != "consumer" or use[1] != producer or use[2] != c.axis:
                other = use[1] if use[0] == "other" else f"a contraction of {use[1]}'s output"
                return f"consumer weight {c.name} is also used by {other}"
    out_channels = weight.shape[linear_output_axis(module)] if is_linear else weight.numel()  # type: ignore[index]
    if out_channels != reads.channels:
        return f"its weight has {out_channels} output channels, its output {reads.channels}"
    return None


def build_plan(model: nn.Module, flow: Dataflow, config: SmoothQuantConfig) -> SmoothingPlan:
    """Decide, for every producer whose output reaches a Linear-like layer, whether it is smoothed and how."""
    shared = _shared_names(model)
    head_params = _output_embedding_params(model)
    groups: list[SmoothingGroup] = []
    for producer, reads in flow.producers.items():
        if not reads.consumers:
            continue  # its output reaches no Linear-like layer: not a smoothing group at all
        consumers = tuple(reads.consumers.values())
        group = SmoothingGroup(
            producer=producer,
            consumers=consumers,
            block=block_of(model, producer),
            channels=reads.channels,
            status="skip",
        )
        groups.append(group)
        reason = _skip_reason(model, producer, reads, flow, shared, head_params)
        if reason is None:
            module = model.get_submodule(producer)
            if linear_output_axis(module) is not None:
                if probe_linear(module, reads.sample):
                    group.kind = LINEAR_KIND
                else:
                    reason = f"{type(module).__name__}'s output is not x @ W.T + b (its forward was probed)"
            else:
                kind = probe_kind(module, reads.sample) if reads.sample else None
                if kind is None:
                    reason = "output is not of a known per-channel affine form (see producers.PRODUCER_KINDS)"
                else:
                    group.kind = kind.name
        if reason is not None:
            group.reason = reason
            continue
        group.status = "smooth"
        if reads.foreign:
            group.pinned = tuple(sorted(reads.pinned_channels))
            group.pinned_why = _foreign_text(reads)
        group.alpha = config.alpha_for([producer, *group.consumer_modules])
        group.observe = _observation_point(producer, reads, config)
    return SmoothingPlan(groups)


def _observation_point(producer: str, reads, config: SmoothQuantConfig) -> ObservationPoint:
    """The consumer input (``acts_from='input'``) or producer output where this group's statistics are taken."""
    if config.acts_from == "input":
        for module, arg, channel_map in reads.entries:
            if module in reads.consumer_modules:
                return ObservationPoint(module, "input", arg, channel_map)
    # acts_from="output", or no consumer received the tensor as a positional input: the producer's output is
    # the same tensor for every producer form in PRODUCER_KINDS.
    return ObservationPoint(producer, "output")
