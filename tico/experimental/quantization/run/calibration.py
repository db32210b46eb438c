"""The calibration loop and the in-memory prepare -> calibrate -> convert run, written once for every tool.

The command line (quantize, report, demo), the examples and the benchmarks all calibrate the same way: token
windows in batches, under ``torch.no_grad()``, each batch reported to the progress callback (see
:mod:`~tico.experimental.quantization.progress`). :func:`quantize_model` keeps the quantizer (taken before
``convert`` detaches it) so that its plan and report (chosen alphas, static ranges, layers kept in float)
can be printed and saved afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from tico.experimental.quantization.progress import stage, track
from tico.experimental.quantization.quantizer import QuantizationError

__all__ = ["calibrate", "QuantizationResult", "quantize_model"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def calibrate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, device: Any = None) -> None:
    """Run ``model`` on ``windows`` (``[n, seq_len]`` token ids), ``batch_size`` windows per forward."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if windows.dim() != 2 or windows.size(0) == 0:
        raise ValueError(f"calibration windows must be a non-empty [n, seq_len] tensor, got shape {list(windows.shape)}")
    if device is None:
        device = next(model.parameters()).device
    for batch in track(windows.split(batch_size), "calibrating"):
        model(batch.to(device))


@dataclass
class QuantizationResult:
    """A converted model with the quantizer that converted it (its ``plan`` and, for W8A8, its ``report``)."""

    model: torch.nn.Module
    quantizer: Any
    notes: str = ""  # what was done before calibration (e.g. rotations), for the summary

    @property
    def plan(self) -> Any:
        """The smoothing plan (groups, alphas, scales), or None when nothing was smoothed."""
        return getattr(self.quantizer, "plan", None)

    @property
    def report(self) -> Any:
        """The W8A8 report (quantized layers, kept in float, alphas, static ranges), or None for smoothing only."""
        return getattr(self.quantizer, "report", None)

    def alphas(self) -> dict[str, float]:
        """The alpha used per smoothing group (and per in-quantizer smoothed layer)."""
        report = self.report
        if report is not None and getattr(report, "alphas", None):
            return dict(report.alphas)
        plan = self.plan
        return {} if plan is None else {g.producer: float(g.alpha) for g in plan.smoothed}

    def summary(self) -> str:
        """What changed, in a few lines: groups smoothed/skipped, the alphas chosen, static ranges, float layers."""
        lines = []
        plan = self.plan
        if plan is not None:
            # the block objective may leave whole blocks unsmoothed after the plan was made: count what was applied
            off = {b for b, why in getattr(self.report, "block_choices", {}).items() if why.startswith("unsmoothed")}
            undone = [g for g in plan.smoothed if g.block in off]
            lines.append(f"smoothing: {len(plan.smoothed) - len(undone)} groups smoothed, {len(plan.skipped)} skipped"
                         + (f", {len(undone)} left unsmoothed by the block objective" if undone else ""))
        alphas = self.alphas()
        if alphas:
            values = sorted(alphas.values())
            lines.append(f"alphas: min {values[0]:g}, median {values[len(values) // 2]:g}, max {values[-1]:g}")
            lines += _per_block(alphas)
        report = self.report
        if report is not None:
            lines.append(f"W8A8: {len(report.quantized)} layers quantized, {len(report.kept_float)} kept in float")
            ranges = getattr(report, "act_ranges", {})
            if ranges:
                r = sorted(ranges.values())
                lines.append(f"static activation ranges (max |x| mapped to 127): min {r[0]:.4g}, median "
                             f"{r[len(r) // 2]:.4g}, max {r[-1]:.4g} over {len(r)} layers")
            lines += [f"  float {name}: {why}" for name, why in report.kept_float.items()]
            modes = getattr(report, "act_modes", {})
            lines += [f"  {name}: {why}" for name, why in modes.items() if why.startswith("dynamic")]
            choices = getattr(report, "block_choices", {})
            if choices:
                off = [b for b, why in choices.items() if why.startswith("unsmoothed")]
                lines.append(f"block objective: {len(off)} of {len(choices)} blocks unsmoothed {off}")
        return "\n".join(lines)


def quantize_model(
    model: torch.nn.Module,
    config: Any,
    windows: torch.Tensor,
    batch_size: int = 4,
    device: Any = None,
) -> QuantizationResult:
    """prepare -> calibrate on ``windows`` -> convert; errors of any stage become one :class:`QuantizationError`.

    The model is converted in place. On failure the message names the stage, and (convert being transactional)
    the model's weights are unchanged.
    """
    from tico.experimental.quantization import convert, get_quantizer, prepare

    stage_name = "prepare"
    try:
        with stage("preparing (tracing the dataflow)"):
            model = prepare(model, config)
        quantizer = get_quantizer(model)  # convert detaches it: keep it for its plan and report
        stage_name = "calibration"
        calibrate(model, windows, batch_size, device)
        stage_name = "convert"
        with stage("converting (alphas, ranges, int8 weights)"):
            model = convert(model)
    except QuantizationError:
        raise
    except (ValueError, RuntimeError, TypeError) as exc:
        raise QuantizationError(f"{stage_name} failed: {type(exc).__name__}: {exc}") from exc
    return QuantizationResult(model, quantizer)


def _per_block(alphas: dict[str, float]) -> list[str]:
    """``  model.layers.0: input_layernorm 0.5, self_attn.v_proj 0.85``: one line per block, in model order."""
    blocks: dict[str, list[str]] = {}
    for name, alpha in alphas.items():
        parts = name.split(".")
        cut = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
        blocks.setdefault(".".join(parts[:cut]), []).append(f"{'.'.join(parts[cut:]) or name} {alpha:g}")
    return [f"  {block}: {', '.join(items)}" for block, items in blocks.items()]
