"""Which layers W8A8 quantizes, and each one as the ``nn.Linear`` smoothing will leave it."""

from __future__ import annotations

import torch
from torch import nn

from tico.experimental.quantization.algorithm.smoothquant.quantizer import ScalePlan, SmoothQuantQuantizer
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.structure.names import matches, unmatched
from tico.experimental.quantization.structure.producers import LINEAR_OUTPUT_AXIS, linear_output_axis

LINEAR_TYPES = tuple(LINEAR_OUTPUT_AXIS)  # nn.Linear and GPT-2's Conv1D, as for smoothing producers


def select_targets(model: nn.Module, config: W8A8Config) -> tuple[list[str], dict[str, str]]:
    """The Linear-like layers to quantize, and those kept in float with the reason (``ignore``, the LM head,
    fused expert tensors). ``ignore`` keys are names or ``re:`` patterns (:mod:`...structure.names`), each
    covering what is inside what it matches; raises if a key matches no module of ``model``."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    targets, kept = [], {}
    for name, module in model.named_modules():
        if any(matches(p, name, inside=True) for p in config.ignore):
            if isinstance(module, LINEAR_TYPES):
                kept[name] = "in W8A8Config.ignore"
            continue
        if isinstance(module, LINEAR_TYPES):
            if module is head and not config.quantize_lm_head:
                kept[name] = "output embedding (LM head) is kept in float; set quantize_lm_head=True to quantize it"
            elif module.weight.shape[linear_output_axis(module)] == 1:
                kept[name] = ("one output (a scalar gate, e.g. Qwen2-MoE's shared_expert_gate): int8 saves nothing "
                              "there, and vLLM builds such a layer unquantized")
            else:
                targets.append(name)
        elif any(p.dim() == 3 for p in module.parameters(recurse=False)):
            kept[name] = "fused expert tensors are not quantized yet (only Linear-like layers are)"
    unknown = unmatched(config.ignore, (n for n, _ in model.named_modules()))
    if unknown:
        raise ValueError(f"W8A8Config.ignore names that are not modules of {type(model).__name__}: {unknown}")
    return targets, kept


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear`` (GPT-2 ``Conv1D`` is transposed into one; its parameters are not shared)."""
    if isinstance(module, nn.Linear):
        return module
    weight = module.weight.detach().t()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def linear_from(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight``/``bias`` (``module``'s layout) without copying an ``nn.Linear``'s
    tensors; GPT-2 ``Conv1D`` weights are transposed into a contiguous ``[out, in]`` copy, as :func:`as_linear`."""
    if not isinstance(module, nn.Linear):
        weight = weight.t().contiguous()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def weight_rows(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` fp32 (a view for ``nn.Linear``)."""
    w = module.weight.detach()
    return (w if isinstance(module, nn.Linear) else w.t()).float()


def smoothed_linear(
    sq: SmoothQuantQuantizer | None, model: nn.Module, name: str, smoothing: ScalePlan | None
) -> nn.Linear:
    """Layer ``name`` as an ``nn.Linear`` with the weight and bias ``smoothing`` will leave it with (the model is
    unchanged): SmoothQuant's own fold arithmetic, through ``smoothed_parameter``."""
    module = model.get_submodule(name)
    if smoothing is None or sq is None:
        return as_linear(module)
    weight = sq.smoothed_parameter(model, smoothing, f"{name}.weight")
    bias = None if module.bias is None else sq.smoothed_parameter(model, smoothing, f"{name}.bias")
    return linear_from(module, weight, bias)
