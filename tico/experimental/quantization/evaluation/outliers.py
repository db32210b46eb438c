"""Activation outlier statistics per smoothing group, before and after smoothing, with paper-style plots.

The statistics come from the SmoothQuant observers of one calibration pass: ``before`` is the per-channel
abs-max of the input of a group's consumers, ``after`` is ``before / s`` (smoothing is exact, so the smoothed
input is exactly ``x / s``).
"""

from __future__ import annotations

import json
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
    lines = [f"{'group':60s} {'max/median before':>18s} {'after':>8s}  top channels before"]
    for r in rows:
        lines.append(f"{r['producer'][:60]:60s} {r['before']['max_over_median']:18.2f} "
                     f"{r['after']['max_over_median']:8.2f}  {r['before']['top_channels']}")
    if rows:
        worst = max(rows, key=lambda r: r["before"]["max_over_median"])
        lines.append(f"largest outlier ratio: {worst['producer']} ({worst['before']['max_over_median']:.1f}x median "
                     f"before, {worst['after']['max_over_median']:.1f}x after smoothing)")
    summary = "\n".join(lines)
    (output / "summary.txt").write_text(summary + "\n")
    chosen = sorted(rows, key=lambda r: -r["before"]["max_over_median"])[:plots]
    for i, r in enumerate(chosen):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
        for ax, key, title in ((axes[0], "absmax_before", "before smoothing"), (axes[1], "absmax_after", "after smoothing")):
            ax.bar(range(len(r[key])), r[key], width=1.0, color="#c0392b" if key.endswith("before") else "#2471a3")
            ax.set_title(title)
            ax.set_xlabel("channel")
        axes[0].set_ylabel("max |activation|")
        fig.suptitle(f"{r['producer']} (alpha={r['alpha']:g})")
        fig.tight_layout()
        fig.savefig(output / f"outliers_{i:02d}.png", dpi=90)
        plt.close(fig)
    return summary
