"""Configs of released checkpoints, as data: the published ``config.json`` values, sizes shrunk for tests.

Each :class:`RealConfig` holds the fields of a released checkpoint's ``config.json`` (``published``, copied
as published, with the size fields included so what was shrunk is visible) and the size overrides
(``shrink``): hidden size, layers = 2, heads (head_dim >= 8, the ratio of query to key/value heads kept),
intermediate sizes, experts, window sizes. Everything else (pad/bos/eos ids, rope scaling, sliding
windows and layer types, soft-capping, biases, multipliers, tied heads, partial rotary) is kept.

Vocabulary: the tiny models use :data:`VOCAB` tokens. Special ids below :data:`VOCAB` are kept as they
are; larger ones (Llama 3's 128000, Qwen's 151643, GPT-2's 50256, ...) are **remapped** into the top of
the tiny vocabulary, distinct ids to distinct ids, so that equal ids stay equal (GPT-2 bos == eos, Phi-3
pad == eos) and lists stay lists (Llama 3.1's three eos ids). :func:`tiny_config_dict` applies both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VOCAB = 256
_SPECIAL = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


@dataclass(frozen=True)
class RealConfig:
    key: str
    source: str  # the Hugging Face repository whose config.json ``published`` copies
    published: dict[str, Any]
    shrink: dict[str, Any]
    adds_bos: bool  # whether that checkpoint's tokenizer begins a text with its BOS
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # non-size fields changed, and why (in notes)


def _remap_ids(config: dict[str, Any]) -> dict[str, Any]:
    """Special ids >= VOCAB onto VOCAB-1, VOCAB-2, ... (one slot per distinct id, in increasing order)."""
    large: set[int] = set()
    for key in _SPECIAL:
        value = config.get(key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v >= VOCAB:
                large.add(v)
    slot = {v: VOCAB - 1 - i for i, v in enumerate(sorted(large))}
    out = dict(config)
    for key in _SPECIAL:
        value = config.get(key)
        if isinstance(value, list):
            out[key] = [slot.get(v, v) for v in value]
        elif isinstance(value, int):
            out[key] = slot.get(value, value)
    return out


def tiny_config_dict(real: RealConfig) -> dict[str, Any]:
    """The published config with sizes shrunk, the vocabulary set to VOCAB and large special ids remapped."""
    config = {**real.published, **real.shrink, **real.extra}
    for size_key in ("vocab_size",):
        if size_key in config:
            config[size_key] = VOCAB
    return _remap_ids(config)


def special_ids(config: dict[str, Any]) -> set[int]:
    ids: set[int] = set()
    for key in _SPECIAL:
        value = config.get(key)
        ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return ids


_LLAMA_SHRINK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=8)

CONFIGS: list[RealConfig] = [
    RealConfig(
        "llama3.2-1b", "meta-llama/Llama-3.2-1B",
        {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
         "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
         "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
         "pretraining_tp": 1, "rms_norm_eps": 1e-05,
         "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"},
         "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256},
        _LLAMA_SHRINK, adds_bos=True, notes="llama3 rope scaling, tied head, bos/eos 128000/128001 remapped"),
    RealConfig(
        "llama3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct",
        {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
         "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
         "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
         "pretraining_tp": 1, "rms_norm_eps": 1e-05,
         "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"},
         "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256},
        {k: v for k, v in _LLAMA_SHRINK.items() if k != "head_dim"}, adds_bos=True,
        notes="untied head, three eos ids (a list), head_dim from hidden/heads"),
    RealConfig(
        "llama-pad2", "a Llama converted by transformers with pad_token_id 2 (issue 16)",
        {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
         "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 4096,
         "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
         "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": 32000},
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8),
        adds_bos=True, notes="the issue's failing case: an embedding with padding_idx"),
    RealConfig(
        "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B",
        {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
         "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
         "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
         "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
         "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
         "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
        dict(hidden_size=112, intermediate_size=128, num_hidden_layers=2, num_attention_heads=14,
             num_key_value_heads=2, max_window_layers=2),
        adds_bos=False, notes="q/k/v biases, sliding-window fields present but off, tied head"),
    RealConfig(
        "qwen3-0.6b", "Qwen/Qwen3-0.6B",
        {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
         "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
         "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
         "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
         "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
         "use_sliding_window": False, "vocab_size": 151936},
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, head_dim=16, max_window_layers=2),
        adds_bos=False, notes="per-head q/k norms, head_dim larger than hidden/heads"),
    RealConfig(
        "mistral-7b-v0.1", "mistralai/Mistral-7B-v0.1",
        {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
         "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
         "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
         "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
         "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000},
        dict(_LLAMA_SHRINK, sliding_window=8), adds_bos=True,
        notes="sliding window shrunk to 8 so that 16-token windows use it"),
    RealConfig(
        "gemma2-2b", "google/gemma-2-2b",
        {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
         "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
         "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
         "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2",
         "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
         "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
         "torch_dtype": "float32", "vocab_size": 256000},
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
        adds_bos=True,
        notes="sandwich norms, logit soft-capping, query_pre_attn_scalar = head_dim as published, sliding window 8"),
    RealConfig(
        "gemma3-1b", "google/gemma-3-1b-pt",
        {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
         "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
         "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
         "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
         "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
         "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
         "torch_dtype": "bfloat16", "vocab_size": 262144},
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
             head_dim=16, query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=2),
        adds_bos=True, notes="one sliding and one full layer (pattern 2 on 2 layers), local/global rope bases, MQA"),
    RealConfig(
        "phi3-mini-4k", "microsoft/Phi-3-mini-4k-instruct",
        {"architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
         "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
         "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
         "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
         "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
         "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
         "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32064},
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8),
        adds_bos=True, notes="fused qkv_proj and gate_up_proj, pad == eos = 32000 (remapped)"),
    RealConfig(
        "phi3-longrope", "microsoft/Phi-3-mini-128k-instruct (rope_scaling shape)",
        {"architectures": ["Phi3ForCausalLM"], "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu",
         "hidden_size": 3072, "intermediate_size": 8192, "max_position_embeddings": 131072, "model_type": "phi3",
         "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
         "original_max_position_embeddings": 4096, "pad_token_id": 32000, "rms_norm_eps": 1e-05,
         "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "vocab_size": 32064},
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
        adds_bos=True,
        extra={"rope_scaling": {"type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(8)],
                                "long_factor": [1.0 + 0.5 * i for i in range(8)]}},
        notes="longrope: the factor lists must have head_dim/2 entries, so they are synthetic (not copied)"),
    RealConfig(
        "opt-125m", "facebook/opt-125m",
        {"activation_dropout": 0.0, "activation_function": "relu", "architectures": ["OPTForCausalLM"],
         "attention_dropout": 0.0, "bos_token_id": 2, "do_layer_norm_before": True, "dropout": 0.1,
         "eos_token_id": 2, "ffn_dim": 3072, "hidden_size": 768, "init_std": 0.02, "layerdrop": 0.0,
         "max_position_embeddings": 2048, "model_type": "opt", "num_attention_heads": 12, "num_hidden_layers": 12,
         "pad_token_id": 1, "prefix": "</s>", "torch_dtype": "float16", "use_cache": True, "vocab_size": 50272,
         "word_embed_proj_dim": 768},
        dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=8, word_embed_proj_dim=64),
        adds_bos=True, notes="learned positions with offset 2, pad 1, biases everywhere"),
    RealConfig(
        "gpt2", "openai-community/gpt2",
        {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
         "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
         "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
         "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "vocab_size": 50257},
        dict(n_embd=64, n_head=8, n_layer=2), adds_bos=False, notes="Conv1D layers, tied head"),
    RealConfig(
        "pythia-70m", "EleutherAI/pythia-70m",
        {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
         "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 2048, "layer_norm_eps": 1e-05,
         "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8,
         "num_hidden_layers": 6, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
         "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304},
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2),
        adds_bos=False, notes="parallel residual, fused query_key_value, partial rotary"),
    RealConfig(
        "falcon-7b", "tiiuae/falcon-7b",
        {"alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"],
         "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
         "hidden_size": 4544, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
         "multi_query": True, "new_decoder_architecture": False, "num_attention_heads": 71,
         "num_hidden_layers": 32, "parallel_attn": True, "torch_dtype": "bfloat16", "vocab_size": 65024},
        dict(hidden_size=64, num_attention_heads=8, num_hidden_layers=2), adds_bos=False,
        notes="parallel attention with one shared norm, multi-query fused qkv"),
    RealConfig(
        "stablelm-2-1.6b", "stabilityai/stablelm-2-1_6b",
        {"architectures": ["StableLmForCausalLM"], "bos_token_id": 100257, "eos_token_id": 100257,
         "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 2048, "initializer_range": 0.02,
         "intermediate_size": 5632, "layer_norm_eps": 1e-05, "max_position_embeddings": 4096,
         "model_type": "stablelm", "num_attention_heads": 32, "num_hidden_layers": 24, "num_key_value_heads": 32,
         "partial_rotary_factor": 0.25, "qk_layernorm": False, "rope_scaling": None, "rope_theta": 10000,
         "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
         "use_parallel_residual": False, "use_qkv_bias": True, "vocab_size": 100352},
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
             num_hidden_layers=2), adds_bos=False, notes="LayerNorm with bias, qkv biases, partial rotary"),
    RealConfig(
        "granite-3.0-2b", "ibm-granite/granite-3.0-2b-base",
        {"architectures": ["GraniteForCausalLM"], "attention_bias": False, "attention_dropout": 0.1,
         "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
         "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
         "logits_scaling": 8.0, "max_position_embeddings": 4096, "mlp_bias": False, "model_type": "granite",
         "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "pad_token_id": 0,
         "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
         "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49155},
        {k: v for k, v in _LLAMA_SHRINK.items() if k != "head_dim"}, adds_bos=False,
        notes="embedding/residual/attention multipliers and logits scaling, pad == bos == eos == 0"),
    RealConfig(
        "mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1",
        {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
         "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
         "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
         "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
         "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
         "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
         "torch_dtype": "bfloat16", "vocab_size": 32000},
        dict(_LLAMA_SHRINK, num_local_experts=4), adds_bos=True, notes="top-2 of experts (8 shrunk to 4)"),
    RealConfig(
        "qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B",
        {"architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
         "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
         "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
         "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408, "norm_topk_prob": False,
         "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24,
         "num_key_value_heads": 16, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
         "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 5632, "sliding_window": 32768,
         "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
         "vocab_size": 151936},
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
             moe_intermediate_size=32, num_experts=6, shared_expert_intermediate_size=128, max_window_layers=2),
        adds_bos=False, notes="top-4 of experts (60 shrunk to 6) plus a gated shared expert"),
]

BY_KEY = {c.key: c for c in CONFIGS}
