"""A zoo of tiny random-weight Hugging Face models, one per architecture, for SmoothQuant tests.

Every entry of :data:`ARCHITECTURES` is an :class:`ArchSpec`: the transformers config/model classes, tiny
config kwargs, the dotted path of the decoder-block ``nn.ModuleList`` and the *smoothing groups* of a block.

A smoothing group maps a producer norm (name relative to a block) to the sorted consumer modules (names
relative to the block) whose input is *exactly* that norm's output.  Only norms whose output is read
solely by Linear-like layers (``nn.Linear``, GPT-2 ``Conv1D``, MoE routers, fused MoE experts) are listed,
so the per-channel smoothing scale can be folded into the norm and multiplied into every consumer.
Norms whose output also feeds a residual add (Gemma2/3 ``post_*_layernorm``), per-head q/k norms, the
final norm (→ lm_head) and post-LN blocks are deliberately absent.

The groups were written from the ``modeling_<arch>.py`` sources of transformers 5.x and are checked
against the real dataflow by ``tests/test_zoo.py``.

:func:`build_model` builds a model in eval mode and gives every norm non-trivial parameters (weights in
roughly [0.5, 1.5] with a few outlier channels x5..x10, random biases), so a wrong fold cannot hide
behind all-ones/zeros norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import transformers as T
from torch import nn

__all__ = ["ArchSpec", "ARCHITECTURES", "build_model", "input_ids", "get_spec", "norm_modules"]

VOCAB = 128
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
INTER = 64
LAYERS = 2
MAX_POS = 64
HEAD_DIM = HIDDEN // HEADS

# Token ids inside the tiny vocabulary (the defaults of many configs are far outside it).
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# The common shape of a Llama-like config.
_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=MAX_POS,
    **_TOKENS,
)

_QKV = ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
_GATE_UP = ["mlp.gate_proj", "mlp.up_proj"]
_LLAMA_GROUPS = {"input_layernorm": _QKV, "post_attention_layernorm": _GATE_UP}
_MOE = ["mlp.experts", "mlp.gate"]  # router (TopKRouter, 2-D weight) + fused experts (3-D gate_up_proj)


@dataclass(frozen=True)
class ArchSpec:
    key: str
    config_cls: type
    model_cls: type
    config_kwargs: Mapping[str, Any]
    blocks: str  # dotted path of the nn.ModuleList of decoder blocks
    groups: Mapping[str, list[str]]  # producer norm -> sorted consumers (names relative to a block)
    unit_offset_norm: bool = False  # norm computes x_hat * (1 + w) (Gemma family)
    why_none: str = ""  # why ``groups`` is empty
    notes: str = ""  # dataflow remarks


def _spec(key, config_cls, model_cls, config_kwargs, blocks, groups, **kw) -> ArchSpec:
    groups = {norm: sorted(consumers) for norm, consumers in groups.items()}
    return ArchSpec(key, config_cls, model_cls, dict(config_kwargs), blocks, groups, **kw)


_SPECS = [
    _spec("llama", T.LlamaConfig, T.LlamaForCausalLM, _LLAMA_LIKE, "model.layers", _LLAMA_GROUPS),
    _spec("mistral", T.MistralConfig, T.MistralForCausalLM, _LLAMA_LIKE, "model.layers", _LLAMA_GROUPS),
    _spec(
        "mixtral",
        T.MixtralConfig,
        T.MixtralForCausalLM,
        dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
        "model.layers",
        {"input_layernorm": _QKV, "post_attention_layernorm": _MOE},
    ),
    _spec("qwen2", T.Qwen2Config, T.Qwen2ForCausalLM, _LLAMA_LIKE, "model.layers", _LLAMA_GROUPS),
    _spec(
        "qwen2_moe",
        T.Qwen2MoeConfig,
        T.Qwen2MoeForCausalLM,
        dict(
            _LLAMA_LIKE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        ),
        "model.layers",
        {
            "input_layernorm": _QKV,
            "post_attention_layernorm": _MOE
            + ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"],
        },
    ),
    _spec(
        "qwen3",
        T.Qwen3Config,
        T.Qwen3ForCausalLM,
        dict(_LLAMA_LIKE, head_dim=HEAD_DIM),
        "model.layers",
        _LLAMA_GROUPS,
        notes="self_attn.q_norm/k_norm are per-head RMSNorms after q/k_proj: not groups",
    ),
    _spec(
        "qwen3_moe",
        T.Qwen3MoeConfig,
        T.Qwen3MoeForCausalLM,
        dict(_LLAMA_LIKE, head_dim=HEAD_DIM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
        "model.layers",
        {"input_layernorm": _QKV, "post_attention_layernorm": _MOE},
    ),
    _spec(
        "gemma",
        T.GemmaConfig,
        T.GemmaForCausalLM,
        dict(_LLAMA_LIKE, head_dim=HEAD_DIM),
        "model.layers",
        _LLAMA_GROUPS,
        unit_offset_norm=True,
    ),
    _spec(
        "gemma2",
        T.Gemma2Config,
        T.Gemma2ForCausalLM,
        dict(_LLAMA_LIKE, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=16),
        "model.layers",
        {"input_layernorm": _QKV, "pre_feedforward_layernorm": _GATE_UP},
        unit_offset_norm=True,
        notes="post_attention_layernorm / post_feedforward_layernorm normalise a sublayer OUTPUT that goes into "
        "the residual add: not groups",
    ),
    _spec(
        "gemma3",
        T.Gemma3TextConfig,
        T.Gemma3ForCausalLM,
        dict(
            _LLAMA_LIKE,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "model.layers",
        {"input_layernorm": _QKV, "pre_feedforward_layernorm": _GATE_UP},
        unit_offset_norm=True,
        notes="post_attention_layernorm / post_feedforward_layernorm feed the residual add; q_norm/k_norm are "
        "per-head: not groups",
    ),
    _spec(
        "phi3",
        T.Phi3Config,
        T.Phi3ForCausalLM,
        _LLAMA_LIKE,
        "model.layers",
        {"input_layernorm": ["self_attn.qkv_proj"], "post_attention_layernorm": ["mlp.gate_up_proj"]},
        notes="fused qkv_proj and gate_up_proj",
    ),
    _spec(
        "phi",
        T.PhiConfig,
        T.PhiForCausalLM,
        _LLAMA_LIKE,
        "model.layers",
        {"input_layernorm": _QKV + ["mlp.fc1"]},
        notes="parallel block: input_layernorm feeds both attention and mlp.fc1; no post_attention_layernorm",
    ),
    _spec(
        "opt",
        T.OPTConfig,
        T.OPTForCausalLM,
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            word_embed_proj_dim=HIDDEN,
            ffn_dim=INTER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POS,
            **_TOKENS,
        ),
        "model.decoder.layers",
        {"self_attn_layer_norm": _QKV, "final_layer_norm": ["fc1"]},
        notes="fc1/fc2 live directly in the block (no mlp submodule); final_layer_norm is per block",
    ),
    _spec(
        "bloom",
        T.BloomConfig,
        T.BloomForCausalLM,
        dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **_TOKENS),
        "transformer.h",
        {
            "input_layernorm": ["self_attention.query_key_value"],
            "post_attention_layernorm": ["mlp.dense_h_to_4h"],
        },
        notes="intermediate is fixed at 4*hidden; word_embeddings_layernorm (outside blocks) is not a group",
    ),
    _spec(
        "falcon_new",
        T.FalconConfig,
        T.FalconForCausalLM,
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_kv_heads=KV_HEADS,
            ffn_hidden_size=INTER,
            max_position_embeddings=MAX_POS,
            new_decoder_architecture=True,
            parallel_attn=True,
            **_TOKENS,
        ),
        "transformer.h",
        {"ln_attn": ["self_attention.query_key_value"], "ln_mlp": ["mlp.dense_h_to_4h"]},
        notes="both ln_attn and ln_mlp read the same block input (two norms, parallel attention+MLP)",
    ),
    _spec(
        "falcon_parallel",
        T.FalconConfig,
        T.FalconForCausalLM,
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            ffn_hidden_size=INTER,
            max_position_embeddings=MAX_POS,
            new_decoder_architecture=False,
            parallel_attn=True,
            multi_query=True,
            **_TOKENS,
        ),
        "transformer.h",
        {"input_layernorm": ["mlp.dense_h_to_4h", "self_attention.query_key_value"]},
        notes="Falcon-7B layout: one input_layernorm feeds both attention and MLP; multi-query (1 kv head)",
    ),
    _spec(
        "gpt2",
        T.GPT2Config,
        T.GPT2LMHeadModel,
        dict(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTER,
            n_positions=MAX_POS,
            **_TOKENS,
        ),
        "transformer.h",
        {"ln_1": ["attn.c_attn"], "ln_2": ["mlp.c_fc"]},
        notes="consumers are transformers Conv1D (weight is [in, out], transposed w.r.t. nn.Linear)",
    ),
    _spec(
        "gpt_neox",
        T.GPTNeoXConfig,
        T.GPTNeoXForCausalLM,
        {k: v for k, v in _LLAMA_LIKE.items() if k != "num_key_value_heads"} | {"use_parallel_residual": True},
        "gpt_neox.layers",
        {"input_layernorm": ["attention.query_key_value"], "post_attention_layernorm": ["mlp.dense_h_to_4h"]},
        notes="use_parallel_residual=True: both norms read the block input, each feeds one sublayer",
    ),
    _spec(
        "gptj",
        T.GPTJConfig,
        T.GPTJForCausalLM,
        dict(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTER,
            n_positions=MAX_POS,
            rotary_dim=HEAD_DIM // 2,
            **_TOKENS,
        ),
        "transformer.h",
        {"ln_1": ["attn.k_proj", "attn.q_proj", "attn.v_proj", "mlp.fc_in"]},
        notes="parallel block: ln_1 feeds attention and mlp.fc_in",
    ),
    _spec(
        "starcoder2",
        T.Starcoder2Config,
        T.Starcoder2ForCausalLM,
        _LLAMA_LIKE,
        "model.layers",
        {"input_layernorm": _QKV, "post_attention_layernorm": ["mlp.c_fc"]},
        notes="nn.LayerNorm with bias",
    ),
    _spec(
        "stablelm",
        T.StableLmConfig,
        T.StableLmForCausalLM,
        _LLAMA_LIKE,
        "model.layers",
        _LLAMA_GROUPS,
        notes="default use_parallel_residual=False (StableLM-2 1.6B); with True there is no "
        "post_attention_layernorm and input_layernorm feeds q/k/v + gate/up",
    ),
    _spec(
        "cohere",
        T.CohereConfig,
        T.CohereForCausalLM,
        _LLAMA_LIKE,
        "model.layers",
        {"input_layernorm": _QKV + _GATE_UP},
        notes="parallel block with one CohereLayerNorm (mean-centred, weight only, no bias)",
    ),
    _spec("granite", T.GraniteConfig, T.GraniteForCausalLM, _LLAMA_LIKE, "model.layers", _LLAMA_GROUPS),
    _spec(
        "bert",
        T.BertConfig,
        T.BertForMaskedLM,
        dict(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTER,
            max_position_embeddings=MAX_POS,
            pad_token_id=0,
        ),
        "bert.encoder.layer",
        {},
        why_none="post-LN: every LayerNorm output feeds a residual add (and the next block), not only Linears",
    ),
    _spec(
        "olmo",
        T.OlmoConfig,
        T.OlmoForCausalLM,
        _LLAMA_LIKE,
        "model.layers",
        {},
        why_none="OlmoLayerNorm has no weight (non-parametric): there is nothing to fold a scale into",
    ),
]

ARCHITECTURES: dict[str, ArchSpec] = {s.key: s for s in _SPECS}


def get_spec(spec_or_key: ArchSpec | str) -> ArchSpec:
    return spec_or_key if isinstance(spec_or_key, ArchSpec) else ARCHITECTURES[spec_or_key]


def norm_modules(model: nn.Module):
    """(name, module) of every norm-like module that owns parameters."""
    for name, mod in model.named_modules():
        if "norm" in type(mod).__name__.lower() and any(True for _ in mod.parameters(recurse=False)):
            yield name, mod


@torch.no_grad()
def _perturb_norms(model: nn.Module, unit_offset: bool, gen: torch.Generator) -> None:
    for _, mod in norm_modules(model):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            target = torch.empty(w.shape).uniform_(0.5, 1.5, generator=gen)
            flat = target.view(-1, target.shape[-1])
            n = target.shape[-1]
            k = max(1, n // 16)
            idx = torch.randperm(n, generator=gen)[:k]
            flat[:, idx] *= torch.empty(k).uniform_(5.0, 10.0, generator=gen)
            w.copy_(target - 1.0 if unit_offset else target)
        b = getattr(mod, "bias", None)
        if isinstance(b, torch.Tensor):
            b.copy_(torch.empty(b.shape).uniform_(-0.5, 0.5, generator=gen))


def build_model(key: ArchSpec | str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The tiny model of ``key`` in eval mode, random weights, non-trivial norm parameters."""
    spec = get_spec(key)
    config = spec.config_cls(**spec.config_kwargs)
    torch.manual_seed(seed)
    model = spec.model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    _perturb_norms(model, spec.unit_offset_norm, gen)
    return model.to(dtype).eval()


def input_ids(spec_or_key: ArchSpec | str, batch: int = 2, seq: int = 8, seed: int = 0) -> torch.LongTensor:
    spec = get_spec(spec_or_key)
    vocab = spec.config_kwargs["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen, dtype=torch.long)
