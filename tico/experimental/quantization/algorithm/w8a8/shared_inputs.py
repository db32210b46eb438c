"""One activation quantization per input tensor: layers that read one tensor get one mode and one range.

``q/k/v_proj`` (after one norm) and ``gate/up_proj`` read the same input, and serving engines run each set as one
fused GEMM with one input quantization (vLLM's ``qkv_proj``/``gate_up_proj``: the largest static scale of the
set, and one static/dynamic mode). Choices made per layer (``dynamic_fallback``'s mode, a weight-dependent range
such as ``output_mse``'s) can differ inside a set; they are made common here, so the model we measure is the one
that is served: dynamic when any member needs dynamic (per-token scales are never coarser), else the largest
static range (nothing clipped that a member kept).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingGroup
from tico.experimental.quantization.algorithm.smoothquant.quantizer import ScalePlan
from tico.experimental.quantization.algorithm.w8a8.observer import SampledChannelObserver
from tico.experimental.quantization.algorithm.w8a8.report import W8A8Report
from tico.experimental.quantization.config.w8a8 import W8A8Config


def shared_input_groups(
    config: W8A8Config, names: list[str], observers: dict[str, SampledChannelObserver],
    folded_by: dict[str, tuple[SmoothingGroup, tuple[int, ...] | None]], smoothing: ScalePlan | None,
) -> list[list[str]]:
    """Sets of two or more layers that quantize the same tensor: their observers saw the same input objects
    (so they share one row sample, see ``observer``) and they divide it by the same smoothing scales."""
    t = config.tuning
    if config.activations != "static" or t.smooth_in_quantizer or t.rotate_in_quantizer:
        return []  # dynamic: per-token, identical anyway; per-layer divisors/rotations: different inputs
    sets: dict[tuple[int, str | None], list[str]] = {}
    for name in names:
        sample = observers[name].rows_sample
        if sample is None:
            continue  # abs-max ranges of one tensor are equal anyway
        folded = folded_by.get(name)
        producer = folded[0].producer if folded is not None and smoothing is not None else None
        sets.setdefault((id(sample), producer), []).append(name)
    return [group for group in sets.values() if len(group) > 1]


def unify(
    layers: dict[str, nn.Module], groups: list[list[str]], replan: Callable[..., nn.Module], report: W8A8Report
) -> None:
    """Give each group of ``layers`` one mode and one range, re-planning members with ``replan(name,
    dynamic=True)`` or ``replan(name, act_range=r)``; ``layers`` and ``report`` are updated in place."""
    for group in groups:
        dynamic = [n for n in group if getattr(layers[n], "act_scale", 1.0) is None]
        if dynamic and len(dynamic) < len(group):
            for n in group:
                if n not in dynamic:
                    layers[n] = replan(n, dynamic=True)
                    report.act_modes[n] = f"dynamic: shares its input with {dynamic[0]}, which needs dynamic"
                    report.act_ranges.pop(n, None)
        elif not dynamic:
            ranges = {n: report.act_ranges[n] for n in group if n in report.act_ranges}
            top = max(ranges.values(), default=None)
            for n, r in ranges.items():
                if r != top:
                    layers[n] = replan(n, act_range=top)
