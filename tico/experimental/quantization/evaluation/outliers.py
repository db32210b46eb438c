"""Activation outlier statistics per smoothing group, before and after smoothing, with paper-style plots.

The statistics come from the SmoothQuant observers of one calibration pass: ``before`` is the per-channel
abs-max of the input of a group's consumers, ``after`` is ``before / s`` (smoothing is exact, so the smoothed
input is exactly ``x / s``). The plots therefore show the *consumers'* input (named in the title), with the
alpha that smoothing used: with a W8A8 quantizer and ``alpha="auto"`` that is the searched alpha, exactly
what ``tico-sq quantize`` would apply.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingPlan
from tico.experimental.quantization.algorithm.smoothquant.scales import to_columns, to_producer_channels


def _stats(absmax: torch.Tensor, top: int) -> dict[str, Any]:
    median = float(absmax.median()) or 1e-12
    values, channels = torch.topk(absmax, min(top, absmax.numel()))
    return {
        "max": float(absmax.max()),
        "median": float(absmax.median()),
        "max_over_median": float(absmax.max()) / median,
        "top_channels": [int(c) for c in channels],
        "top_values": [float(v) for v in values],
    }


def quantizer_report(quantizer: Any, top: int = 5) -> list[dict[str, Any]]:
    """:func:`outlier_report` for a converted SmoothQuant quantizer, or the smoothing inside a W8A8 quantizer."""
    sq = getattr(quantizer, "sq", None) or quantizer
    if getattr(sq, "plan", None) is None:
        raise ValueError("the quantizer did no smoothing (W8A8Config(smoothing=None)): there is nothing to report")
    return outlier_report(sq.plan, sq.observers, top)


def outlier_report(plan: SmoothingPlan, observers: dict[str, Any], top: int = 5) -> list[dict[str, Any]]:
    """Per smoothed group (after convert): abs-max statistics of its input before and after smoothing."""
    rows = []
    for g in plan.smoothed:
        obs = observers[g.producer]
        before = to_producer_channels(obs.absmax, g.observe.channel_map, g.channels).float()
        after = before / g.scales.to(before.device)
        rows.append({
            "producer": g.producer, "block": g.block, "consumers": g.consumer_modules, "alpha": g.alpha,
            "before": _stats(before, top), "after": _stats(after, top),
            "absmax_before": before.tolist(), "absmax_after": after.tolist(),
        })
    return rows


def write_report(rows: list[dict[str, Any]], output: Path, plots: int = 4) -> str:
    """Write ``outliers.json``, ``summary.txt`` and up to ``plots`` PNGs; returns the summary text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    (output / "outliers.json").write_text(json.dumps(rows, indent=1))
    lines = [f"{'group (producer of the consumers input)':50s} {'alpha':>6s} {'max/median before':>18s} {'after':>8s}  "
             "top channels before"]
    for r in rows:
        lines.append(f"{r['producer'][:50]:50s} {r['alpha']:6.2f} {r['before']['max_over_median']:18.2f} "
                     f"{r['after']['max_over_median']:8.2f}  {r['before']['top_channels']}")
    if rows:
        worst = max(rows, key=lambda r: r["before"]["max_over_median"])
        lines.append(f"largest outlier ratio: {worst['producer']} ({worst['before']['max_over_median']:.1f}x median "
                     f"before, {worst['after']['max_over_median']:.1f}x after smoothing)")
    summary = "\n".join(lines)
    (output / "summary.txt").write_text(summary + "\n")
    chosen = sorted(rows, key=lambda r: -r["before"]["max_over_median"])[:plots]
    for i, r in enumerate(chosen):
        _plot_group(plt, r, output / f"outliers_{i:02d}_{_file_part(r['producer'])}.png")
    return summary


def _file_part(name: str) -> str:
    """A module name as a safe file-name part (``model.layers.0.input_layernorm`` stays readable)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def plot_title(r: dict[str, Any]) -> str:
    """``input of <block>: q_proj, k_proj, v_proj  max/median 41.3x -> 2.5x  (from input_layernorm, alpha=0.85)``.

    The bars show the consumers' input, so the title names the consumers (the producer only says where the
    tensor comes from), with the ratio before and after and the alpha that smoothing used.
    """
    consumers = r["consumers"]
    common = consumers[0].rsplit(".", 1)[0] if consumers else ""
    if common and all(c.rsplit(".", 1)[0] == common for c in consumers):
        names = f"{common}: " + ", ".join(c.rsplit(".", 1)[-1] for c in consumers)
    else:
        names = ", ".join(consumers)
    return (f"input of {names}  max/median {r['before']['max_over_median']:.1f}x -> "
            f"{r['after']['max_over_median']:.1f}x  (from {r['producer'].rsplit('.', 1)[-1]}, alpha={r['alpha']:g})")


def _plot_group(plt: Any, r: dict[str, Any], path: Path) -> None:
    """Before/after bars of one group's consumer input, each on its own y scale (a shared one hides the after)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=False)
    for ax, key, when, color in ((axes[0], "before", "before smoothing", "#c0392b"), (axes[1], "after", "after smoothing", "#2471a3")):
        values = r[f"absmax_{key}"]
        ax.bar(range(len(values)), values, width=1.0, color=color)
        ax.axhline(r[key]["median"], color="black", linewidth=0.8, linestyle="--", label="median")
        ax.set_title(f"{when}: max/median {r[key]['max_over_median']:.1f}x (own y scale)", fontsize=9)
        ax.set_xlabel("input channel")
        ax.legend(loc="upper right", fontsize=7)
    axes[0].set_ylabel("max |activation|")
    fig.suptitle(plot_title(r), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
