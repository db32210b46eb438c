"""Int8 fake quantization of the attention matmul inputs (query, key, value), static per tensor.

The paper's W8A8 settings also quantize the inputs of the two attention matmuls. In Hugging Face models the
query (after RoPE), key and value reach one attention function chosen by ``config._attn_implementation``;
we register a wrapper around SDPA under :data:`ATTN_NAME` that, per attention module, observes abs-max
during calibration and quantize-dequantizes with the fixed scales after convert. The state lives in a plain
attribute of each attention module (not a buffer), so ``state_dict`` is unchanged.

What stays on a converted model (it is the quantization, so it cannot be removed): each attention module's
``_tico_attention_quant`` attribute (an :class:`AttentionQuantState` holding three scales) and the model's
``config._attn_implementation == "tico_w8a8_sdpa"``. The wrapper is registered in transformers' process-wide
``AttentionInterface`` under that name (registering is idempotent and changes no other model); a module
without the state attribute runs plain SDPA through it. :func:`uninstall` undoes :func:`install`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tico.experimental.quantization import distributed
from tico.experimental.quantization.nn.qscheme import fake_quant_activation, range_to_scale

ATTN_NAME = "tico_w8a8_sdpa"
STATE_ATTR = "_tico_attention_quant"
ROLES = ("query", "key", "value")


@dataclass
class AttentionQuantState:
    """Per attention module: running abs-max while calibrating, then the static int8 scales.

    Under a process group convert installs the maximum over the ranks (:meth:`merge`); the next calibration call
    goes back to this rank's own maxima (``local``), as the observers do.
    """

    absmax: dict[str, float] = field(default_factory=dict)
    scales: dict[str, float] | None = None
    local: dict[str, float] | None = None  # this rank's own maxima while the reduced ones are installed

    def __call__(self, role: str, x: torch.Tensor) -> torch.Tensor:
        if self.scales is None:
            if self.local is not None:
                self.absmax, self.local = self.local, None
            self.absmax[role] = max(self.absmax.get(role, 0.0), float(x.detach().abs().amax()))
            return x
        return fake_quant_activation(x, "per_tensor", scale=self.scales[role]).to(x.dtype)

    def summary(self) -> dict[str, float]:
        if self.local is not None:
            self.absmax, self.local = self.local, None
        return dict(self.absmax)

    def contribution(self, summaries: list[dict[str, float]], me: int, memo: dict) -> None:
        return None

    def merge(self, summaries: list[dict[str, float]], contributions: list[None], memo: dict) -> None:
        """Each role's maximum over the ranks that saw it (exact)."""
        merged: dict[str, float] = {}
        for s in summaries:
            for role, value in s.items():
                merged[role] = max(merged.get(role, value), value)
        self.absmax, self.local = merged, self.absmax if distributed.active() else None

    def frozen_scales(self) -> dict[str, float]:
        """The static scales convert will fix (``absmax / 127`` per role); needs every role observed."""
        return {r: range_to_scale(self.absmax[r]) for r in ROLES}


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    state = getattr(module, STATE_ATTR, None)
    if state is not None:
        query, key, value = state("query", query), state("key", key), state("value", value)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def install(model: nn.Module) -> tuple[list[str], str]:
    """Route every attention module of a Hugging Face model through the quantizing wrapper (observing).

    Returns the names of the attention modules and the attention implementation the model had (for
    :func:`uninstall`); raises ValueError, with the model as it was, if attention cannot be reached.
    """
    from transformers import AttentionInterface

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise ValueError(
            f"W8A8Config(quantize_attention=True) needs a Hugging Face model with an attention interface; "
            f"{type(model).__name__} has none"
        )
    AttentionInterface.register(ATTN_NAME, _attention)
    previous = config._attn_implementation
    names = []
    for name, module in model.named_modules():
        if module is not model and _is_attention(module):
            setattr(module, STATE_ATTR, AttentionQuantState())
            names.append(name)
    if not names:
        raise ValueError(f"W8A8Config(quantize_attention=True): no attention module found in {type(model).__name__}")
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:  # noqa: BLE001 - reported below, with the model restored
        pass
    if config._attn_implementation != ATTN_NAME:
        uninstall(model, names, previous)
        raise ValueError(
            f"W8A8Config(quantize_attention=True): {type(model).__name__} does not dispatch attention through "
            "transformers' AttentionInterface, so its query/key/value cannot be reached; leave quantize_attention off"
        )
    return names, previous


def uninstall(model: nn.Module, names: list[str], previous: str) -> None:
    """Undo :func:`install`: remove the per-module state and restore the attention implementation ``previous``."""
    for name in names:
        module = model.get_submodule(name)
        if STATE_ATTR in module.__dict__:
            delattr(module, STATE_ATTR)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) != previous:
        try:
            model.set_attn_implementation(previous)
        except Exception:  # noqa: BLE001 - fall back to the config field the dispatch reads
            config._attn_implementation = previous


def _is_attention(module: nn.Module) -> bool:
    """An innermost module whose class is named ``*Attention*`` (the one that calls the attention interface;
    whether it really does is checked after calibration: every module must have seen query, key and value)."""
    def named(m: nn.Module) -> bool:
        return "Attention" in type(m).__name__

    return named(module) and not any(named(m) for m in module.modules() if m is not module)


def plan_scales(model: nn.Module, names: list[str]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The static scales each attention module will fix, and the modules that never saw query, key and value.

    Nothing changes: convert applies the scales (``state.scales``) only after the whole plan is validated.
    """
    scales: dict[str, dict[str, float]] = {}
    unseen = []
    for name in names:
        state = getattr(model.get_submodule(name), STATE_ATTR, None)
        if state is None or set(state.absmax) != set(ROLES):
            unseen.append(name)
        else:
            scales[name] = state.frozen_scales()
    return scales, unseen


def states(model: nn.Module, names: list[str]) -> dict[str, AttentionQuantState]:
    """The calibration state of each attention module in ``names`` that has one, by module name."""
    found = {name: getattr(model.get_submodule(name), STATE_ATTR, None) for name in names}
    return {name: state for name, state in found.items() if state is not None}
