"""Apply a validated :class:`ConversionPlan` in four journaled steps; each may be interrupted, and the
transaction undoes what ran (convert then leaves the model exactly as it was)."""

from __future__ import annotations

from torch import nn

from tico.experimental.quantization.algorithm.smoothquant.quantizer import SmoothQuantQuantizer
from tico.experimental.quantization.algorithm.w8a8 import attention
from tico.experimental.quantization.algorithm.w8a8.report import ConversionPlan
from tico.experimental.quantization.quantizer import Transaction


def fold_smoothing(sq: SmoothQuantQuantizer | None, model: nn.Module, plan: ConversionPlan, tx: Transaction) -> None:
    """Fold the smoothing (SmoothQuant's own ``apply``); the weights of layers about to be replaced are left as
    they are (their replacements were built from the smoothed values)."""
    if sq is None or plan.smoothing is None:
        return
    replaced = {f"{name}.{p}" for name in plan.layers for p in ("weight", "bias")}
    sq.apply(model, plan.smoothing, tx, skip=replaced)


def swap_layers(model: nn.Module, plan: ConversionPlan, tx: Transaction) -> None:
    for name, new in plan.layers.items():
        parent_name, _, child = name.rpartition(".")
        tx.setattr(model.get_submodule(parent_name), child, new)


def swap_embeddings(model: nn.Module, plan: ConversionPlan, tx: Transaction) -> None:
    for parent, child, new in plan.embedding:
        tx.setattr(parent, child, new)


def fix_attention_scales(model: nn.Module, plan: ConversionPlan, tx: Transaction) -> None:
    for name, scales in plan.attention.items():
        tx.setattr(getattr(model.get_submodule(name), attention.STATE_ATTR), "scales", scales)


def apply_plan(sq: SmoothQuantQuantizer | None, model: nn.Module, plan: ConversionPlan) -> None:
    """The four steps under one :class:`Transaction` (rolled back on any error)."""
    with Transaction() as tx:
        fold_smoothing(sq, model, plan, tx)
        swap_layers(model, plan, tx)
        swap_embeddings(model, plan, tx)
        fix_attention_scales(model, plan, tx)
