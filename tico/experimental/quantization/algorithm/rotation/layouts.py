"""Where each architecture's residual stream is written, as data: one :class:`ResidualLayout` per ``model_type``.

Rotating the residual stream by ``Q`` needs every tensor that *writes* into it to be rotated on its output
side (``Q^T W``) and every tensor that *reads* it on its input side (``W Q``). The readers are proven from the
model itself: in a pre-norm model the stream is read only through norms, and the dataflow trace of
:mod:`~tico.experimental.quantization.structure.dataflow` finds every parameter that contracts
each norm's output (q/k/v, gate/up, MoE routers and fused experts, the LM head). The writers (embeddings,
attention and MLP output projections) feed a residual addition, which a trace cannot attribute to a channel
map, so they are listed here, with the parameter axis that indexes the residual channels.

A missing entry cannot go unnoticed: :func:`~tico.experimental.quantization.algorithm.rotation.fuse.fuse_rotations`
compares the model's logits before and after and restores the model if they differ.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ResidualLayout", "LAYOUTS", "REFUSED"]


@dataclass(frozen=True)
class ResidualLayout:
    """Names of one pre-norm decoder family (relative to the block unless said otherwise)."""

    writers: tuple[tuple[str, int], ...]  # (parameter, axis of residual channels); ".bias" entries are optional
    embeddings: tuple[str, ...] = ("model.embed_tokens",)  # modules (full names) whose weight rows are written in
    blocks: str = "model.layers"  # the nn.ModuleList of decoder blocks (full name)
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")  # norms reading the stream
    final_norm: str = "model.norm"  # full name
    values: tuple[str, str] | None = ("self_attn.v_proj", "self_attn.o_proj")  # per-head rotation pair, if any


_ATTN_OUT = (("self_attn.o_proj.weight", 0), ("self_attn.o_proj.bias", 0))
_MLP_OUT = (("mlp.down_proj.weight", 0), ("mlp.down_proj.bias", 0))
_EXPERTS_OUT = (("mlp.experts.down_proj", 1),)  # fused experts: [experts, hidden, intermediate]

_DENSE = ResidualLayout(writers=_ATTN_OUT + _MLP_OUT)
_MOE = ResidualLayout(writers=_ATTN_OUT + _EXPERTS_OUT)

LAYOUTS: dict[str, ResidualLayout] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "granite": _DENSE,  # embedding/residual multipliers and logits scaling are scalars: they commute with Q
    "gemma": _DENSE,  # x * (1 + w) norms; the sqrt(hidden) embedding scale is a scalar
    "mixtral": _MOE,
    "qwen3_moe": _MOE,
    "qwen2_moe": ResidualLayout(writers=_ATTN_OUT + _EXPERTS_OUT + (("mlp.shared_expert.down_proj.weight", 0),)),
    "phi3": ResidualLayout(writers=_ATTN_OUT + _MLP_OUT, values=None),  # fused qkv_proj: no per-head pair
}

# Families known not to admit an exact residual rotation, with the reason (others get a generic refusal).
_LAYERNORM = "LayerNorm subtracts the mean over channels, which does not commute with a rotation"
REFUSED: dict[str, str] = {
    "gemma2": "post_attention_layernorm / post_feedforward_layernorm normalise sublayer outputs with a per-channel "
    "weight before the residual add; that weight cannot be absorbed anywhere",
    "gemma3_text": "post_attention_layernorm / post_feedforward_layernorm normalise sublayer outputs with a "
    "per-channel weight before the residual add; that weight cannot be absorbed anywhere",
    "cohere": _LAYERNORM,
    "opt": _LAYERNORM,
    "bloom": _LAYERNORM,
    "falcon": _LAYERNORM,
    "gpt2": _LAYERNORM,
    "gpt_neox": _LAYERNORM,
    "gptj": _LAYERNORM,
    "starcoder2": _LAYERNORM,
    "stablelm": _LAYERNORM,
    "phi": _LAYERNORM,
    "olmo": _LAYERNORM + " (OLMo's LayerNorm has no weight, but still subtracts the mean)",
    "bert": "post-LN encoder: " + _LAYERNORM,
}
