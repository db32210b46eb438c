"""The layers of a converted model under the names they take in a checkpoint.

Two namings meet here. Inside the model, transformers 5 gives some layers internal names and layouts (Mixtral's
``block_sparse_moe`` is ``mlp``; the experts of Mixtral and Qwen-MoE are one fused 3-D ``mlp.experts.gate_up_proj``);
a checkpoint, and the loaders that read it (vLLM, transformers itself, which converts on load), use the source
checkpoint's names (``block_sparse_moe.experts.E.w1.weight``). A checkpoint is therefore written under the source
names, by the reversion ``save_pretrained`` applies (:func:`source_tensors`), and the layers its
``quantization_config`` names are named the same way (:func:`source_names`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from tico.experimental.quantization.export import transforms
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.structure.producers import linear_output_axis


def w8a8_layers(model: nn.Module) -> dict[str, W8A8Linear]:
    """Every int8 layer by its module name: the layer behind an exportable online rotation takes the rotation's
    name (``<name>.inner`` -> ``<name>``), so the checkpoint has the model's own module names."""
    online, _ = transforms.online_layers(model)
    inner = {id(m.inner): name for name, m in online.items()}
    return {inner.get(id(m), n): m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}


def float_matrix_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers that stay in float and hold a matrix a loader may build as a Linear: ``nn.Linear`` and GPT-2
    ``Conv1D`` (vLLM serves both as Linear layers), and any other module owning a 2-D or larger parameter (MoE
    routers, fused MoE experts, which become one Linear per expert under the source names). Embeddings and the
    int8 layers are not among them."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, (W8A8Linear, nn.Embedding)):
            continue
        if linear_output_axis(m) is not None or any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            layers[name] = m
    return layers


def _conversions(model: nn.Module) -> Any:
    """The key conversions between ``model``'s names and its checkpoint's: transformers' mapping for the model's
    type (without the legacy renames), or None for a model transformers has no mapping for."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    if not isinstance(model, PreTrainedModel):
        return None
    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    return conversions or None


def source_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (named as ``model``'s state dict, any part of it) under the source checkpoint's names.

    Transformers' ``revert_weight_conversion`` with the model type's own mapping, as ``save_pretrained`` reverts a
    model built from its config. The mapping is not the one a load left on the model (``_weight_conversions``):
    the streamed pipeline loads one part at a time, and each load records only the conversions that part used
    (a dense block none, so a later block or the LM head would not be reverted).
    """
    from transformers.core_model_loading import revert_weight_conversion

    conversions = _conversions(model)
    if conversions is None:
        return dict(tensors)
    kept = model.__dict__.get("_weight_conversions", None)
    model._weight_conversions = conversions
    try:
        return revert_weight_conversion(model, dict(tensors))
    finally:
        if kept is None:
            del model._weight_conversions
        else:
            model._weight_conversions = kept


def _matrices(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The matrices of ``module`` under their state-dict keys, as meta tensors (only names and shapes matter)."""
    prefix = f"{name}." if name else ""
    if isinstance(module, W8A8Linear) or linear_output_axis(module) is not None:
        return {prefix + "weight": torch.empty(module.weight.shape, device="meta")}
    return {prefix + k: torch.empty(p.shape, device="meta") for k, p in module.named_parameters(recurse=False) if p.dim() >= 2}


def source_names(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, list[str]]:
    """Each layer's module name -> the source checkpoint's names of the Linear layers it holds: one name for a
    Linear (``mlp.gate`` -> ``block_sparse_moe.gate``), one per expert and projection for fused experts. A layer
    of ``model`` or of a part of it under its full name (the streamed pipeline's units)."""
    names = {}
    for name, module in layers.items():
        reverted = source_tensors(model, _matrices(name, module))
        names[name] = sorted(k.removesuffix(".weight") for k, t in reverted.items() if t.dim() == 2 and k.endswith(".weight"))
    return names
