"""``W8A8Config.block_objective``: per decoder block, keep the recipe whose quantized block reproduces the float
block's output best.

Why: ``alpha="auto"`` and ``dynamic_fallback`` choose by *per-layer* proxies (each layer's output error on sampled
rows). On models with massive activations (a few tokens, e.g. the first one, through a few channels at
``down_proj`` inputs; Sun et al., 2024) smoothing moves those tokens into the weights: every layer can look fine in
isolation while the block, and the model, get worse. The block output is where the layers' errors meet (and where
the next block's norm reads them), so it is measured there:

* calibration records, per decoder block, its call arguments and float output for the first calls, until
  ``tuning.block_objective_tokens`` tokens (:class:`BlockRecorder`; the float output comes free with the
  calibration forward, so no reference forward is run);
* convert plans every candidate completely (each with its own static ranges and dynamic-fallback decisions),
  then per block runs the block once per candidate on the recorded inputs with that candidate's layers swapped in
  and its smoothing folded, inside a :class:`~tico.experimental.quantization.quantizer.Transaction` that is
  rolled back (observer hooks silenced), and measures :func:`block_output_error`;
* the candidate with the smallest error wins the block; every block's errors and choice are reported.

Candidates (:data:`CANDIDATES`): ``"searched"`` (the per-layer-searched alphas: the recipe without this option)
and ``"unsmoothed"`` (the block's smoothing groups off: scales 1), plus ``"alpha=a"`` for each
``W8A8Tuning.block_objective_alphas`` entry (the block's groups all at that fixed alpha). A group can be switched
per block only if its producer and all its consumers are inside one block; other groups keep the searched alphas.
Smoothing applied inside a layer's quantizer (``smooth_in_quantizer``) is not switched. Everything chosen exports
as the searched recipe does (a group off is a fold by 1: nothing in the format changes). A group switched off
keeps its searched alpha in the smoothing plan (with scales 1) and is dropped from ``report.alphas``.

Where it applies: in memory, the blocks are the ``nn.ModuleList`` the streaming pipeline would find (float inputs,
as the in-memory calibration sees them); streamed, each block unit is its own (inputs as propagated). With
``propagate="float"`` both make the same choices (tested). Models without such a list keep the searched recipe
(a warning says so).

Cost: one forward of each block per candidate on ``block_objective_tokens`` tokens, plus planning the switched
layers a second time (ranges and fallback decisions); ``benchmarks/massive_activations.py`` measures it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tico.experimental.quantization.algorithm.smoothquant.quantizer import ScalePlan, SmoothQuantQuantizer
from tico.experimental.quantization.algorithm.w8a8 import attention
from tico.experimental.quantization import distributed
from tico.experimental.quantization.algorithm.w8a8.report import W8A8Report
from tico.experimental.quantization.quantizer import Transaction
from tico.experimental.quantization.structure.blocks import decoder_blocks
from tico.experimental.quantization.structure.names import within

if TYPE_CHECKING:
    from tico.experimental.quantization.algorithm.w8a8.planner import LayerPlanner

logger = logging.getLogger(__name__)

# Call arguments that carry state across calls (KV caches): a trial forward must not read or grow them, and the
# recorded calls come from fresh forwards, so they are replayed without one. Known names, and any value whose
# class derives from a class named in STATE_CLASSES (transformers' ``Cache``).
STATE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")
STATE_CLASSES = ("Cache",)
# Module attributes that hold hooks: silenced during a trial forward, so observers and the recorder see nothing.
HOOK_ATTRS = ("_forward_pre_hooks", "_forward_hooks")
# The attribute a unit (the pipeline's BlockShell) names its decoder blocks with, instead of a search.
CANDIDATES = ("searched", "unsmoothed")


def _is_state(key: str, value: Any) -> bool:
    return key in STATE_KWARGS or any(t.__name__ in STATE_CLASSES for t in type(value).__mro__)



def _hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class RecordedCall:
    """One call of a block: its arguments (hidden states first, or under ``hidden_key``) and its float output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor | None = None

    def __call__(self, block: nn.Module) -> torch.Tensor:
        return _hidden_of(block(*self.args, **self.kwargs))

    @property
    def hidden(self) -> torch.Tensor:
        if self.args:
            return self.args[0]
        return self.kwargs.get("hidden_states", next(iter(self.kwargs.values())))


class BlockRecorder:
    """Records, per block, the first calls (arguments and float output) until ``tokens`` tokens.

    Memory: about ``2 * tokens * hidden`` values per block (input and output), plus references to the call's
    other arguments (masks, rotary tables), which the model shares between blocks. Kept, like the observers'
    samples, as long as the quantizer (so ``convert(model, inplace=False)`` can be repeated); an in-place
    ``convert`` drops the quantizer from the model.
    """

    def __init__(self, blocks: list[str], tokens: int) -> None:
        self.tokens = tokens
        self.calls: dict[str, list[RecordedCall]] = {b: [] for b in blocks}
        self._seen: dict[str, int] = {b: 0 for b in blocks}
        self._pending: dict[str, RecordedCall | None] = {b: None for b in blocks}
        self._local: dict[str, list[RecordedCall]] | None = None  # this rank's own calls while merged ones are installed

    # -- reduction over ranks: the first calls of rank 0, then rank 1's, ... until ``tokens`` (distributed.Reducible)
    def summary(self) -> dict[str, list[int]]:
        """Per block, the token count of each call this rank recorded."""
        if self._local is not None:
            self.calls, self._local = self._local, None
        return {b: [c.hidden.numel() // max(c.hidden.shape[-1], 1) for c in calls] for b, calls in self.calls.items()}

    def contribution(self, summaries: list[dict[str, list[int]]], me: int, memo: dict) -> dict[str, list[RecordedCall]]:
        """This rank's calls that the merged recording keeps (on the CPU under a process group)."""
        out = {}
        for block, calls in self.calls.items():
            kept = calls[: self._kept([s[block] for s in summaries])[me]]
            out[block] = [distributed.to_device(c, torch.device("cpu"), memo) for c in kept] if distributed.active() else kept
        return out

    def merge(self, summaries: list[Any], contributions: list[dict[str, list[RecordedCall]]], memo: dict) -> None:
        """Install the calls of rank 0, then of rank 1, ... as one process would have recorded them from the
        batches in that order (the first calls until ``tokens`` tokens), on this rank's device."""
        local, merged = self.calls, {}
        for block, calls in local.items():
            device = calls[0].hidden.device if calls else torch.device("cpu")
            merged[block] = [distributed.to_device(c, device, memo) for part in contributions for c in part[block]]
        self.calls, self._local = merged, local if distributed.active() else None

    def _kept(self, counts: list[list[int]]) -> list[int]:
        """Per rank, how many of its first calls a recorder that saw every rank's calls in rank order keeps."""
        seen, kept = 0, []
        for per_rank in counts:
            n = 0
            while n < len(per_rank) and seen < self.tokens:
                seen += per_rank[n]
                n += 1
            kept.append(n)
        return kept

    def install(self, model: nn.Module) -> list[RemovableHandle]:
        handles = []
        for name in self.calls:
            block = model.get_submodule(name)
            handles.append(block.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            handles.append(block.register_forward_hook(self._post(name), with_kwargs=True))
        return handles

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._local is not None:  # calibrating again after a reduction: back to this rank's own calls
                self.calls, self._local = self._local, None
            if self._seen[name] >= self.tokens:
                return
            kept = {k: (None if _is_state(k, v) else v) for k, v in kwargs.items()}
            if "use_cache" in kept:
                kept["use_cache"] = False
            args = tuple(None if _is_state("", a) else a.detach() if isinstance(a, torch.Tensor) else a
                         for a in args)  # a cache passed positionally (GPT-2's blocks) is dropped too
            call = RecordedCall(args, kept)
            self._pending[name] = call
            hidden = call.hidden
            self._seen[name] += hidden.numel() // max(hidden.shape[-1], 1)

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            call = self._pending[name]
            if call is not None:
                call.output = _hidden_of(output).detach()
                self.calls[name].append(call)
                self._pending[name] = None

        return hook


def block_output_error(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over tokens of ``||out_i - ref_i||^2 / ||ref_i - x_i||^2``: each token's error relative to what the
    block *adds* to its residual stream.

    Relative to the block's update, not to its output: the residual stream carries the input through unchanged,
    and the massive tokens' residual is hundreds of times an ordinary token's, so a ratio to the output would
    call any error on them negligible. Per token and averaged: every token counts once, by its own error (a
    pooled ratio would be decided by the few tokens with the largest updates).
    """
    out, ref, x = out.float().reshape(-1, out.shape[-1]), ref.float().reshape(-1, ref.shape[-1]), x.float().reshape(-1, x.shape[-1])
    err = (out - ref).pow(2).sum(dim=1)
    update = (ref - x).pow(2).sum(dim=1).clamp_min(1e-30)
    return float((err / update).mean())


@dataclass
class Candidate:
    """One recipe for every switchable block: its smoothing fold (parameter -> value) and its layers."""

    name: str
    folded: dict[str, torch.Tensor]  # producer parameter (not replaced) -> its smoothed value
    layers: dict[str, nn.Module]  # layer -> replacement


@dataclass
class BlockChoice:
    """The candidate kept for one block and every candidate's measured block-output error."""

    block: str
    chosen: str
    errors: dict[str, float] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)  # the producers of the block's switched groups
    tokens: int = 0

    def describe(self) -> str:
        errs = ", ".join(f"{k} {v:.3e}" for k, v in self.errors.items())
        return (f"{self.chosen} (block-output error per token, relative to the block's update, on {self.tokens} "
                f"tokens: {errs}; groups {self.groups})")


@torch.no_grad()
def trial_error(
    model: nn.Module, block: str, candidate: Candidate, calls: list[RecordedCall],
    attention: dict[str, dict[str, float]] | None = None, attention_attr: str | None = None,
) -> float:
    """The block-output error of ``block`` with ``candidate`` applied (layers swapped, producers folded, attention
    scales fixed), over the recorded calls; ``model`` is left exactly as it was (transaction rolled back)."""
    tx = Transaction()
    try:
        module = model.get_submodule(block)
        for m in module.modules():
            for attr in HOOK_ATTRS:
                tx.setattr(m, attr, OrderedDict())
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, value in candidate.folded.items():
            if within(name, block):
                tx.save(params[name])
                params[name].copy_(value)
        for name, new in candidate.layers.items():
            if within(name, block):
                parent, _, child = name.rpartition(".")
                tx.setattr(model.get_submodule(parent), child, new)
        for name, scales in (attention or {}).items():
            if within(name, block) and attention_attr is not None:
                tx.setattr(getattr(model.get_submodule(name), attention_attr), "scales", scales)
        errors, weights = [], []
        for call in calls:
            out = call(module)
            errors.append(block_output_error(out, call.output, call.hidden))  # type: ignore[arg-type]
            weights.append(call.hidden.numel() // call.hidden.shape[-1])
    finally:
        tx.rollback()
    total = sum(weights)
    return sum(e * w for e, w in zip(errors, weights)) / total if total else math.nan


def choose(
    model: nn.Module, blocks: dict[str, list[str]], candidates: list[Candidate], recorder: BlockRecorder,
    attention: dict[str, dict[str, float]] | None = None, attention_attr: str | None = None,
) -> dict[str, BlockChoice]:
    """Per block (``block -> the producers of its switchable groups``), the candidate with the smallest
    block-output error on the recorded calls (the first candidate on ties or when nothing was recorded).

    Each trial (a block, a candidate) is a unit of work: under a process group the trials are split over the ranks
    (cost: the block's parameters x its recorded tokens) and their errors exchanged."""
    calls = {b: recorder.calls.get(b, []) for b in blocks}
    tokens = {b: sum(c.hidden.numel() // c.hidden.shape[-1] for c in calls[b]) for b in blocks}
    trials = [(b, i) for b in blocks if calls[b] for i in range(len(candidates))]
    size = {b: sum(p.numel() for p in model.get_submodule(b).parameters()) for b in blocks}
    errors = distributed.split_work(
        "block objective trials", trials, [float(size[b] * tokens[b]) for b, _ in trials],
        lambda t: trial_error(model, t[0], candidates[t[1]], calls[t[0]], attention, attention_attr))
    choices = {}
    for block, groups in blocks.items():
        if not calls[block]:
            choices[block] = BlockChoice(block, candidates[0].name, {}, groups, 0)
            continue
        measured = {c.name: errors[(block, i)] for i, c in enumerate(candidates)}

        def rank(i: int) -> tuple[float, int]:  # NaN (a diverged trial) never wins
            e = measured[candidates[i].name]
            return (math.inf if math.isnan(e) else e, i)

        best = candidates[min(range(len(candidates)), key=rank)].name
        choices[block] = BlockChoice(block, best, measured, groups, tokens[block])
    return choices


def find_switchable(model: nn.Module, sq: SmoothQuantQuantizer, tokens: int) -> tuple[dict[str, list[str]], BlockRecorder]:
    """The smoothed groups that lie inside one decoder block (producer and consumers), per block, and a recorder
    of those blocks' first calibration calls (``tokens`` tokens each)."""
    blocks = decoder_blocks(model)
    switchable: dict[str, list[str]] = {}
    for g in sq.plan.smoothed:
        for b in blocks:
            if within(g.producer, b) and all(within(c.module, b) for c in g.consumers):
                switchable.setdefault(b, []).append(g.producer)
                break
    if not blocks:
        logger.warning("W8A8Config.block_objective: no decoder blocks found in %s; the searched smoothing is kept",
                       type(model).__name__)
    return switchable, BlockRecorder(list(switchable), tokens)


def choose_per_block(
    planner: "LayerPlanner", recorder: BlockRecorder, switchable: dict[str, list[str]], smoothing: ScalePlan,
    layers: dict[str, nn.Module], report: W8A8Report, attention_scales: dict[str, dict[str, float]],
) -> None:
    """Per block, the searched smoothing, none, or one of ``block_objective_alphas`` for the block's groups,
    whichever quantized block reproduces the float block's recorded output best; ``smoothing``, ``layers`` and
    ``report`` are updated in place."""
    start = time.perf_counter()
    model, sq, folded_by = planner.model, planner.sq, planner.folded_by
    assert sq is not None
    switched = {p for producers in switchable.values() for p in producers}
    touched = [n for n in layers if n in switched or (n in folded_by and folded_by[n][0].producer in switched)]
    others = _plan_candidates(planner, smoothing, layers, switched, touched)
    candidates = [Candidate("searched", _folded(model, sq, smoothing, switched, layers), layers)]
    candidates += [Candidate(n, _folded(model, sq, plan, switched, layers) if n != "unsmoothed" else {}, lc)
                   for n, (plan, lc, _) in others.items()]
    choices = choose(model, switchable, candidates, recorder, attention_scales, attention.STATE_ATTR)
    for block, choice in choices.items():
        report.block_choices[block] = choice.describe()
        report.block_errors[block] = dict(choice.errors)
        if choice.chosen != "searched":
            _adopt(block, choice, others[choice.chosen], smoothing, layers, touched, report)
            logger.info("%s: %s", block, choice.describe())
    report.block_objective_s = time.perf_counter() - start


def _folded(model: nn.Module, sq: SmoothQuantQuantizer, plan: ScalePlan, switched: set[str],
            layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The switched producers' own parameters the fold changes (norm weights, biases), as ``plan`` leaves them
    (SmoothQuant's own arithmetic); a Linear producer is replaced by its planned layer instead."""
    folded = {}
    for p in switched:
        if p in layers:
            continue
        for pname, _ in model.get_submodule(p).named_parameters(recurse=False):
            folded[f"{p}.{pname}"] = sq.smoothed_parameter(model, plan, f"{p}.{pname}")
    return folded


def _plan_candidates(
    planner: "LayerPlanner", smoothing: ScalePlan, layers: dict[str, nn.Module], switched: set[str], touched: list[str],
) -> dict[str, tuple[ScalePlan, dict[str, nn.Module], W8A8Report]]:
    """Every candidate but ``"searched"`` (the plan as it is): name -> (its smoothing plan, its layers, its
    report); a candidate whose smoothing fails SmoothQuant's validation is dropped with a warning."""
    model, sq = planner.model, planner.sq
    assert sq is not None
    groups = {g.producer: g for g in sq.plan.smoothed if g.producer in switched}
    variants: list[tuple[str, float | None]] = [("unsmoothed", None)]
    variants += [(f"alpha={a:g}", float(a)) for a in planner.config.tuning.block_objective_alphas]
    others = {}
    for cname, a in variants:
        if a is None:
            scales = {p: torch.ones_like(s) if p in switched else s for p, s in smoothing.scales.items()}
            alphas = dict(smoothing.alphas)
        else:
            scales = {p: sq.scales_for(model, groups[p])(a) if p in switched else s for p, s in smoothing.scales.items()}
            alphas = {p: a if p in switched else v for p, v in smoothing.alphas.items()}
        plan = ScalePlan(alphas=alphas, scales=scales)
        problems = sq.validate(model, plan)
        if problems:
            logger.warning("block_objective: candidate %s dropped: %s", cname, problems[:3])
            continue
        report_c = W8A8Report()
        layers_c = dict(layers)
        layers_c.update(planner.plan_layers(touched, plan, report_c, f"planning {cname} candidates (block objective)"))
        others[cname] = (plan, layers_c, report_c)
    return others


def _adopt(
    block: str, choice: BlockChoice, candidate: tuple[ScalePlan, dict[str, nn.Module], W8A8Report],
    smoothing: ScalePlan, layers: dict[str, nn.Module], touched: list[str], report: W8A8Report,
) -> None:
    """Take ``candidate``'s smoothing, layers, ranges and modes for ``block``'s switched groups and layers."""
    plan, layers_c, report_c = candidate
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
