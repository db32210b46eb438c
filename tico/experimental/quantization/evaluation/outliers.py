"""Activation outlier statistics per smoothing group, before and after what convert did, with paper-style plots.

``before`` is the per-channel abs-max of the input of a group's consumers; ``after`` is ``before / s`` with the
scales convert applied (smoothing is exact, so the smoothed input is exactly ``x / s``), or ``before`` again for a
group convert left unsmoothed. The decisions (alpha, unsmoothed by the block objective, consumers the dynamic
fallback runs per token) are read from the plan and the W8A8 report of the convert that ran, never decided again
here: ``tico-sq report`` runs ``quantize``'s own path (see :mod:`~tico.experimental.quantization.run.report`).
The plots show the *consumers'* input; title and file name both name the consumers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingGroup, SmoothingPlan
from tico.experimental.quantization.algorithm.smoothquant.scales import to_producer_channels


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
    """:func:`outlier_report` for an in-memory converted SmoothQuant quantizer, or the smoothing inside a W8A8
    quantizer (its own observers' statistics and its own decisions)."""
    sq = getattr(quantizer, "sq", None) or quantizer
    if getattr(sq, "plan", None) is None:
        raise ValueError("the quantizer did no smoothing (W8A8Config(smoothing=None)): there is nothing to report")
    return outlier_report(sq.plan, producer_absmax(sq.plan, sq.observers), getattr(quantizer, "report", None), top)


def producer_absmax(plan: SmoothingPlan, observers: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per smoothed group of ``plan``: the abs-max of its consumers' input per producer channel."""
    return {g.producer: to_producer_channels(observers[g.producer].absmax, g.observe.channel_map, g.channels).float()
            for g in plan.smoothed if g.producer in observers}


def decision(group: SmoothingGroup, report: Any = None) -> tuple[float | None, str]:
    """(alpha applied or None, why) for one group of the plan that convert executed.

    ``report``: the W8A8 report of that convert, whose ``alphas`` hold only the groups finally smoothed (the block
    objective removes the groups of a block it leaves unsmoothed, and says why in ``block_choices``). Without a
    report (smoothing alone) the plan's own alpha is the one applied."""
    if group.status != "smooth":
        return None, f"skipped: {group.reason}"
    if report is None:
        return group.alpha, f"smoothed, alpha={group.alpha:g}"
    if group.producer in report.alphas:
        alpha = float(report.alphas[group.producer])
        return alpha, f"smoothed, alpha={alpha:g}"
    chosen = (getattr(report, "block_choices", {}) or {}).get(group.block or "", "").split(" (")[0]
    if chosen in ("", "unsmoothed"):
        return None, f"unsmoothed: the block objective chose no smoothing for {group.block}"
    return None, f"unsmoothed by the block objective ({chosen} chosen for {group.block})"


def dynamic_consumers(group: SmoothingGroup, report: Any = None) -> list[str]:
    """The group's consumers that the dynamic fallback runs with per-token activations."""
    modes = getattr(report, "act_modes", {}) or {}
    return [c for c in group.consumer_modules if modes.get(c, "").startswith("dynamic")]


def outlier_report(plan: SmoothingPlan, absmax: dict[str, torch.Tensor], report: Any = None, top: int = 5) -> list[dict[str, Any]]:
    """Per group that convert could smooth: abs-max statistics of its consumers' input before and after what convert
    did (``after`` equals ``before`` for a group left unsmoothed), with the decision and its reason.

    ``plan``: the plan convert executed (scales set); ``absmax``: producer -> per-channel abs-max of the consumers'
    input (:func:`producer_absmax`); ``report``: that convert's W8A8 report, None for smoothing alone."""
    rows = []
    for g in plan.smoothed:
        if g.producer not in absmax:
            raise ValueError(f"no activation statistics for the smoothing group of {g.producer}")
        before = absmax[g.producer]
        alpha, why = decision(g, report)
        scales = g.scales if alpha is not None and g.scales is not None else torch.ones_like(before)
        after = before / scales.to(before.device).float()
        rows.append({
            "producer": g.producer, "block": g.block, "consumers": g.consumer_modules, "alpha": alpha,
            "decision": why, "dynamic": dynamic_consumers(g, report),
            "before": _stats(before, top), "after": _stats(after, top),
            "absmax_before": before.tolist(), "absmax_after": after.tolist(),
        })
    return rows


def decisions_summary(plan: SmoothingPlan | None, report: Any = None) -> str:
    """Per block, what convert did with each smoothing group (alpha, unsmoothed and why, skipped and why) and which
    consumers run dynamic: the decisions as executed, for printing after convert."""
    if plan is None:
        return "smoothing: none"
    smoothed = sum(decision(g, report)[0] is not None for g in plan.groups)
    lines = [f"smoothing as applied: {smoothed} groups smoothed, {len(plan.groups) - smoothed} not"]
    for block, groups in plan.by_block().items():
        lines.append(f"  {block}:")
        for g in groups:
            dyn = dynamic_consumers(g, report)
            extra = f"; dynamic: {', '.join(c.rsplit('.', 1)[-1] for c in dyn)}" if dyn else ""
            lines.append(f"    {consumers_label(g.consumer_modules)} (from {g.producer.rsplit('.', 1)[-1]}): "
                         f"{decision(g, report)[1]}{extra}")
    return "\n".join(lines)


def consumers_label(consumers: list[str]) -> str:
    """``model.layers.0.self_attn: q_proj, k_proj`` (the common parent once), or the names joined."""
    common = consumers[0].rsplit(".", 1)[0] if consumers else ""
    if common and all(c.rsplit(".", 1)[0] == common for c in consumers):
        return f"{common}: " + ", ".join(c.rsplit(".", 1)[-1] for c in consumers)
    return ", ".join(consumers)


def write_report(rows: list[dict[str, Any]], output: Path, plots: int = 4, decisions: str = "") -> str:
    """Write ``outliers.json``, ``summary.txt`` (``decisions`` first, when given) and up to ``plots`` PNGs (the groups
    with the largest ratio before, each file named after the consumers its title names); returns the summary text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    (output / "outliers.json").write_text(json.dumps(rows, indent=1))
    lines = [decisions] if decisions else []
    lines.append(f"{'input of (consumers)':56s} {'alpha':>6s} {'max/median before':>18s} {'after':>8s}  top channels before")
    for r in rows:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:.2f}"
        lines.append(f"{consumers_label(r['consumers'])[:56]:56s} {alpha:>6s} {r['before']['max_over_median']:18.2f} "
                     f"{r['after']['max_over_median']:8.2f}  {r['before']['top_channels']}")
    if rows:
        worst = max(rows, key=lambda r: r["before"]["max_over_median"])
        lines.append(f"largest outlier ratio: input of {consumers_label(worst['consumers'])} "
                     f"({worst['before']['max_over_median']:.1f}x median before, {worst['after']['max_over_median']:.1f}x "
                     f"after; {worst['decision']})")
    summary = "\n".join(lines)
    (output / "summary.txt").write_text(summary + "\n")
    chosen = sorted(rows, key=lambda r: -r["before"]["max_over_median"])[:plots]
    for i, r in enumerate(chosen):
        _plot_group(plt, r, output / plot_file(i, r))
    return summary


def plot_file(index: int, r: dict[str, Any]) -> str:
    """``outliers_00_model.layers.0.self_attn.q_proj-k_proj-v_proj.png``: the consumers the plot's title names."""
    name = consumers_label(r["consumers"]).replace(": ", ".").replace(", ", "-")
    return f"outliers_{index:02d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.png"


def plot_title(r: dict[str, Any]) -> str:
    """``input of <block>: q_proj, k_proj, v_proj  max/median 41.3x -> 2.5x  (from input_layernorm, alpha=0.85)``.

    The bars show the consumers' input, so the title names the consumers (the producer only says where the
    tensor comes from), with the ratio before and after and the alpha that smoothing used (or that the group was
    left unsmoothed)."""
    used = f"alpha={r['alpha']:g}" if r.get("alpha") is not None else "unsmoothed"
    return (f"input of {consumers_label(r['consumers'])}  max/median {r['before']['max_over_median']:.1f}x -> "
            f"{r['after']['max_over_median']:.1f}x  (from {r['producer'].rsplit('.', 1)[-1]}, {used})")


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
