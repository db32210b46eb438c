"""Layers a serving engine fuses into one GEMM must share one activation scheme.

vLLM loads ``q_proj``/``k_proj``/``v_proj`` as one ``qkv_proj`` and ``gate_proj``/``up_proj`` as one
``gate_up_proj`` (its ``packed_modules_mapping``), with **one** input quantization: the compressed-tensors scheme
of the first member that matches a target (so with q dynamic and v static, v runs dynamic; with q static and
k dynamic, k's missing ``input_scale`` slot is used as a static scale), and for static members the **largest**
of their ``input_scale`` values. A checkpoint whose fused members differ (``W8A8Config.dynamic_fallback``
decides per layer) is therefore not served as ``load_compressed`` runs it.

The W8A8 quantizer already gives layers that read one tensor one activation quantization when it plans them
(``W8A8Quantizer._plan_layers``), so its models have no mixed group; this module checks what is exported and
repairs models quantized otherwise. :func:`mixed_fused_groups` finds such groups; :func:`unify_fused_activations`
makes each one servable as measured:
a group with any dynamic member becomes all dynamic (per-token scales are never coarser than a per-tensor one),
and an all-static group takes the largest scale (what vLLM uses). Run it after ``convert`` and before evaluating
and ``save_compressed``; ``save_compressed`` warns when a group is mixed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tico.experimental.quantization.export.layers import w8a8_layers
from tico.experimental.quantization.nn.linear import W8A8Linear

logger = logging.getLogger(__name__)

# vLLM's packed_modules_mapping for Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma, Granite, ...)
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def fused_groups(layers: dict[str, W8A8Linear]) -> list[list[str]]:
    """Names of the int8 layers vLLM fuses, per fused module (only groups with two or more present members)."""
    groups = []
    parents = sorted({name.rpartition(".")[0] for name in layers})
    for parent in parents:
        for members in FUSED_MODULES.values():
            present = [f"{parent}.{m}" if parent else m for m in members]
            present = [n for n in present if n in layers]
            if len(present) > 1:
                groups.append(present)
    return groups


def _scheme(layer: W8A8Linear) -> tuple[bool, float | None]:
    state = layer.quantization_state()
    scale = state["input_scale"]
    return bool(state["dynamic"]), None if scale is None else float(scale.reshape(()))


def mixed_fused_groups(layers: dict[str, W8A8Linear]) -> list[list[str]]:
    """Fused groups whose members differ in activation mode (static/dynamic) or in static scale."""
    return [g for g in fused_groups(layers) if len({_scheme(layers[n]) for n in g}) > 1]


def _make_dynamic(layer: W8A8Linear) -> None:
    layer.act_granularity = "per_token"
    layer.act_scale = None
    layer._rt = None  # cached kernel state


@torch.no_grad()
def unify_fused_activations(model: nn.Module) -> dict[str, str]:
    """Give every vLLM-fused group of ``model``'s int8 layers one activation scheme, in place.

    Returns ``{layer name: what changed}`` (empty when every group already agrees).
    """

    layers = w8a8_layers(model)
    changed: dict[str, str] = {}
    for group in mixed_fused_groups(layers):
        schemes = {n: _scheme(layers[n]) for n in group}
        if any(dynamic for dynamic, _ in schemes.values()):
            for name, (dynamic, _) in schemes.items():
                if not dynamic:
                    _make_dynamic(layers[name])
                    changed[name] = "static -> dynamic (a fused sibling is dynamic)"
        else:
            top = max(scale for _, scale in schemes.values())
            for name, (_, scale) in schemes.items():
                if scale != top:
                    layers[name].act_scale.fill_(top)
                    layers[name]._rt = None
                    changed[name] = f"static scale {scale:.6g} -> {top:.6g} (the fused group's largest)"
    if changed:
        logger.info("unified the activation scheme of %d layers in vLLM-fused groups", len(changed))
    return changed
